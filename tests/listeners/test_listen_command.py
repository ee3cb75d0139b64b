"""The ``listen`` command as an operator meets it: mistakes and outages end in one clear line."""

from __future__ import annotations

import io
import logging
import re

import pytest
from django.core.management import CommandError, call_command

from listeners.registry import known_subjects
from tests.helpers import free_port
from tests.listeners.helpers import event_id, listener_env, publish, run_manage, summary, ticket
from ticketing.replica.models import TicketReplica

BOTH = ("ticket:created", "ticket:updated")


def test_unknown_subject_is_a_one_line_error_listing_the_known_subjects():
    result = run_manage("listen", "ticket:created", "tikcet:updated")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"CommandError: no listener for tikcet:updated; known subjects: {', '.join(known_subjects())}"
    ]
    assert "ticket:created, ticket:updated" in result.stderr


def test_unreachable_nats_is_a_one_line_error_not_a_hang_or_a_traceback():
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_manage("listen", *BOTH, env=listener_env(NATS_URL=url), timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"CommandError: cannot connect to NATS at {url}")
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--batch", "0"), "--batch must be between 1 and 5000"),
        (("--max-messages", "0"), "--max-messages must be at least 1"),
        (("--reset",), "--reset only makes sense with --from-start"),
        (("--idle-exit", "0"), "--idle-exit must be a positive number of seconds"),
        (("--ack-wait", "0.1"), "--ack-wait must be between 0.5 and 86400 seconds"),
        (("--group", "nobody"), "no listener of group 'nobody' for these subjects; groups: replica"),
    ],
)
def test_operator_mistakes_are_refused_before_connecting(args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("listen", *BOTH, *args)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_streams")
def test_each_event_is_logged_on_one_structured_line_and_idle_exit_ends_the_run(caplog):
    created = ticket("t1", 0)
    publish([created])
    caplog.set_level(logging.INFO, logger="listeners")
    out = io.StringIO()

    call_command("listen", *BOTH, "--idle-exit", "1", stdout=out)

    assert summary(out.getvalue()) == (1, {"applied": 1})
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listener.event ")]
    assert re.fullmatch(
        rf"listener\.event subject=ticket:created event_id={event_id(created)} version=0 outcome=applied "
        r"deliveries=1 ms=\d+\.\d\d",
        line,
    ), line
    assert TicketReplica.objects.get(pk="t1").version == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_streams")
def test_ack_wait_option_updates_the_existing_durable():
    from tests.listeners.helpers import consumer_info

    publish([ticket("t1", 0)])
    call_command("listen", *BOTH, "--max-messages", "1", stdout=io.StringIO())
    assert consumer_info().config.ack_wait == 5.0
    publish([ticket("t1", 1)])
    call_command("listen", *BOTH, "--max-messages", "1", "--ack-wait", "7", stdout=io.StringIO())
    assert consumer_info().config.ack_wait == 7.0
    assert TicketReplica.objects.get(pk="t1").version == 1
