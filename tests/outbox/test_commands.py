"""The operator commands: publish, outbox_schema, outbox_streams, and configuration checks."""

from __future__ import annotations

import json
import subprocess

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from outbox.models import OutboxEvent
from outbox.relay import Relay
from tests.helpers import PYTHON, ROOT, free_port, subprocess_env

GOOD = {"id": "o-1", "version": 0, "ticket": {"id": "t-1"}}


@pytest.mark.django_db
def test_publish_validates_writes_through_the_outbox_and_prints_the_event_id(capsys):
    call_command("publish", "order:cancelled", "--data", json.dumps(GOOD))
    event_id = capsys.readouterr().out.strip()
    row = OutboxEvent.objects.get(pk=event_id)
    assert (row.subject, row.aggregate_type, row.aggregate_id, row.status) == (
        "order:cancelled",
        "order",
        "o-1",
        "pending",
    )


@pytest.mark.django_db(transaction=True)
def test_publish_wait_prints_the_stream_sequence_once_the_relay_published_it(capsys):
    # The relay runs in a thread of this test, as a worker would elsewhere.
    import threading

    done = threading.Event()

    def relay():
        from django.db import connection

        relay = Relay()
        while not done.is_set():
            relay.run_batch()
        connection.close()

    thread = threading.Thread(target=relay)
    thread.start()
    try:
        call_command("publish", "order:cancelled", "--data", json.dumps(GOOD), "--wait", "--timeout", "60")
    finally:
        done.set()
        thread.join()
    assert "as sequence 1" in capsys.readouterr().out


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["order:shipped", "--data", "{}"], "unknown subject 'order:shipped'; allowed: order:cancelled, order:created"),
        (
            ["order:cancelled", "--data", "{not json"],
            "invalid data for order:cancelled: order:cancelled: not valid JSON",
        ),
        (["order:cancelled", "--data", '{"id": "o"}'], "Object missing required field `version`"),
        (["order:cancelled", "--data", '{"id": "o", "version": "x", "ticket": {"id": "t"}}'], "Expected `int`"),
        (
            [
                "ticket:created",
                "--data",
                json.dumps({"id": "t", "version": 0, "title": "x" * 10000, "price": 1, "userId": "u"}),
            ],
            "length <= 200",
        ),
    ],
)
def test_publish_bad_input_is_a_one_line_error_and_nothing_is_written(args, message):
    with pytest.raises(CommandError) as info:
        call_command("publish", *args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert OutboxEvent.objects.count() == 0


def test_publish_from_the_shell_exits_non_zero_with_one_line_on_stderr():
    result = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "publish", "nope", "--data", "{}"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "CommandError: unknown subject 'nope'; allowed: order:cancelled, order:created, ticket:created, ticket:updated"
    ]


def test_outbox_schema_exports_a_json_schema_per_subject_with_the_course_field_names(capsys):
    call_command("outbox_schema")
    schemas = json.loads(capsys.readouterr().out)
    assert set(schemas) == {"ticket:created", "ticket:updated", "order:created", "order:cancelled"}
    updated = schemas["ticket:updated"]
    assert set(updated["required"]) == {"id", "version", "title", "price", "userId"}
    assert updated["properties"]["price"] == {"type": "number", "minimum": 0}
    assert updated["properties"]["orderId"]["anyOf"][1] == {"type": "null"}
    assert sorted(schemas["order:created"]["properties"]["status"]["enum"]) == [
        "awaiting:payment",
        "cancelled",
        "complete",
        "created",
    ]


@pytest.mark.django_db(transaction=True)
def test_outbox_streams_creates_then_reports_unchanged(capsys):
    call_command("outbox_streams")
    first = capsys.readouterr().out
    call_command("outbox_streams", "--check")
    second = capsys.readouterr().out
    assert "TICKETS: created" in first and "TICKETS: unchanged" in second


def test_outbox_streams_with_nats_unreachable_is_a_one_line_error():
    from django.conf import settings

    unreachable = dict(settings.NATS, SERVERS=[f"nats://127.0.0.1:{free_port()}"])
    with override_settings(NATS=unreachable), pytest.raises(CommandError, match="cannot connect to NATS at nats://"):
        call_command("outbox_streams")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NATS_URL": "http://example"}, "outbox.E007"),
        ({"NATS_URL": "nats://127.0.0.1:notaport"}, "outbox.E007"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "outbox.E003"),
        ({"OUTBOX_BATCH_SIZE": "ten"}, "OUTBOX_BATCH_SIZE='ten' is not a number"),
        ({"DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
        ({"DJANGO_DEV": "", "SECRET_KEY": ""}, "SECRET_KEY is not set"),
        ({"DATABASE_URL": "nosuchdb://x"}, "nosuchdb"),
        ({"OUTBOX_OWNERSHIP": "shared"}, "outbox.E008"),
        ({"OUTBOX_PIPELINE_DEPTH": "0"}, "outbox.E009"),
        ({"OUTBOX_FOLLOW_SECONDS": "-1"}, "outbox.E010"),
        ({"OUTBOX_FOLLOW_SECONDS": "30", "OUTBOX_TASK_TIME_BUDGET": "20"}, "outbox.E010"),
        ({"OUTBOX_WIRE_PUBLISH": "perhaps"}, "OUTBOX_WIRE_PUBLISH='perhaps' is not a boolean"),
    ],
)
def test_bad_configuration_is_a_clear_message_at_start_up_not_a_traceback_loop(env, expected):
    result = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "check"],
        cwd=ROOT,
        env={**subprocess_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout


def test_unknown_outbox_keys_fail_the_system_check():
    from outbox.checks import check_outbox_settings

    with override_settings(OUTBOX={"BATCH_SIZ": 10}):
        [error] = check_outbox_settings()
    assert error.id == "outbox.E001" and "BATCH_SIZ" in error.msg


def test_check_deploy_is_clean_for_production_settings():
    env = {
        **subprocess_env(),
        "SECRET_KEY": "x" * 64 + "-production-like-secret-value-0123456789",
        "DJANGO_DEV": "",
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "1",
    }
    result = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
