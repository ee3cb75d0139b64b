"""How long publishing has been failing, and why: in outbox_status (text and JSON) and the dashboard."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from outbox.models import OutboxEvent
from ticketing.services import ticket_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def failing():
    ticket_create(title="T", price="1", user_id="u")
    ticket_create(title="U", price="1", user_id="u")
    OutboxEvent.objects.update(
        failing_since=timezone.now() - timedelta(seconds=95),
        attempts=7,
        last_error="cannot connect to NATS at nats://127.0.0.1:4222: [Errno 111] Connect call failed",
    )


def test_outbox_status_says_how_long_publishing_has_been_failing_and_why(failing):
    out = io.StringIO()
    call_command("outbox_status", stdout=out)
    text = out.getvalue()
    assert "publishing has been failing for 1m 3" in text
    assert "(2 pending event(s) retrying): cannot connect to NATS" in text

    out = io.StringIO()
    call_command("outbox_status", "--json", stdout=out)
    outbox = json.loads(out.getvalue())["outbox"]
    assert outbox["failing"] == 2 and 95 <= outbox["failing_for"] < 120
    assert outbox["failing_error"].startswith("cannot connect to NATS")


def test_nothing_is_said_when_nothing_fails():
    ticket_create(title="T", price="1", user_id="u")
    out = io.StringIO()
    call_command("outbox_status", stdout=out)
    assert "failing" not in out.getvalue()


def test_the_dashboard_shows_the_failing_card(failing, admin_client):
    page = admin_client.get(reverse("operations")).content.decode()
    assert 'id="card-failing"' in page and "Publishing failing" in page and "2 retrying" in page


@pytest.mark.parametrize("command", ["outbox_status", "nats_status"])
@pytest.mark.parametrize("as_json", [False, True])
def test_the_status_commands_exit_1_when_nats_is_unreachable_after_printing_what_they_can(command, as_json):
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port, subprocess_env

    args = [sys.executable, str(ROOT / "manage.py"), command, *(["--json"] if as_json else [])]
    env = subprocess_env(NATS_URL=f"nats://127.0.0.1:{free_port()}", NATS_CONNECT_TIMEOUT="0.5")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("CommandError: NATS unreachable:")
    if as_json:
        lines = done.stdout.splitlines()  # log lines may come first: the document starts at its "{"
        doc = json.loads("\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("{")) :]))
        assert doc.get("nats_error") or doc.get("error")
        if command == "outbox_status":
            assert "pending" in doc["outbox"]
    elif command == "outbox_status":
        assert "outbox" in done.stdout and "pending" in done.stdout
