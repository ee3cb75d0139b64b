"""The example project's logs: LOG_FORMAT=json gives JSON lines, the default stays a person's line.

Real ``manage.py`` processes with the project's own LOGGING, as a deployment runs them.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.helpers import PYTHON, ROOT, stop, subprocess_env, wait_for
from tests.listeners.helpers import event_id, message, publish, ticket


@pytest.mark.django_db(transaction=True)
def test_listen_with_log_format_json_writes_each_log_line_as_one_json_object(tmp_path):
    good = ticket("t1", 0)
    poison = message("ticket:created", json.dumps({"id": "t2"}).encode())
    publish([good, poison])
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [PYTHON, str(ROOT / "manage.py"), "listen", "ticket:created", "ticket:updated"],
            cwd=ROOT,
            env=subprocess_env(LOG_FORMAT="json", LOG_LEVEL="INFO"),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: out.read_text().count('"event": "listener.event"') == 2,
            timeout=120,
            what="both events logged",
        )
    finally:
        code = stop(proc)  # SIGTERM: the asked-for stop, logged, then the command's summary
    assert code == 0, out.read_text() + err.read_text()

    *logged, summary = out.read_text().splitlines()
    # The command's own report to the operator is plain text; every log record before it is JSON.
    assert summary == "listener stopped after 2 message(s): applied=1, dead:invalid=1"
    records = [json.loads(line) for line in logged]
    assert err.read_text() == ""
    assert all(r["time"].endswith("Z") and r["level"] and r["logger"] and r["message"] for r in records)
    events = [r.get("event") for r in records]
    assert {"listener.starting", "listener.ready", "listener.stopping"} <= set(events), events
    by_outcome = {r["outcome"]: r for r in records if r.get("event") == "listener.event"}
    assert set(by_outcome) == {"applied", "dead:invalid"}
    applied, dead = by_outcome["applied"], by_outcome["dead:invalid"]
    assert (applied["subject"], applied["event_id"], applied["version"], applied["deliveries"]) == (
        "ticket:created",
        event_id(good),
        0,
        1,
    )
    assert isinstance(applied["ms"], float) and "error" not in applied
    assert dead["event_id"] == event_id(poison)
    assert "missing required field `version`" in dead["error"]
    assert dead["message"].endswith(f"error={dead['error']!r}"), "the field is the repr's string"
    # The project's filters stay on the handler: a stop that was asked for is INFO, not WARNING.
    [stopping] = [r for r in records if r.get("event") == "listener.stopping"]
    assert (stopping["level"], stopping["signal"]) == ("INFO", "SIGTERM")


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=subprocess_env(LOG_LEVEL="INFO", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_default_log_format_stays_the_line_a_person_reads():
    code = "import logging; logging.getLogger('outbox.relay').info('outbox.purged count=%d', 3)"
    result = run_manage("shell", "-v", "0", "-c", code)

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO outbox\.relay outbox\.purged count=3\n", result.stdout
    ), result.stdout


def test_an_unknown_log_format_is_refused_with_the_allowed_values():
    result = run_manage("check", LOG_FORMAT="bogus")  # a command that reads the settings, as every process does

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: LOG_FORMAT='bogus' is not a log format (use line or json)"
    )
