"""Issue 18: ``listen --health-file`` and ``listeners_health``, the liveness/readiness probe, on real NATS."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import stop, wait_for
from tests.listeners.helpers import listener_env, publish, run_manage, setup_streams, start_listener, ticket
from ticketing.replica.models import TicketReplica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("isolated_streams")]

BOTH = ("ticket:created", "ticket:updated")


def probe(path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = run_manage("listeners_health", str(path), *args, env=env)
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()


def status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def test_the_health_file_appears_once_ready_and_the_probe_fails_after_a_stop(tmp_path: Path):
    health = tmp_path / "run" / "health.json"
    missing = f"unhealthy: no health file at {health} (listener not started yet, or not writing one)"
    assert probe(health) == (1, [missing])
    setup_streams()
    proc = start_listener(*BOTH, "--health-file", str(health), log=tmp_path / "listener.log")
    try:
        wait_for(lambda: status(health).get("ready"), timeout=60, what="the listener ready in its health file")
        doc = status(health)
        assert doc["pid"] == proc.pid and doc["state"] == "running" and doc["connected"] is True
        assert list(doc["consumers"]) == ["replica-TICKETS"]
        code, lines = probe(health)
        assert code == 0 and len(lines) == 1 and lines[0].startswith("ok: ready, last loop turn "), lines
        # It keeps working while it is probed.
        publish([ticket("t1", 0)], setup=False)
        wait_for(lambda: TicketReplica.objects.filter(pk="t1").exists(), timeout=60, what="the event applied")
        assert probe(health, "--live")[0] == 0
    finally:
        assert stop(proc) == 0
    code, lines = probe(health)
    assert (code, lines) == (1, [f"unhealthy: the listener (pid {proc.pid}) stopped"])


def test_a_stalled_listener_fails_the_probe_and_passes_again_when_it_resumes(tmp_path: Path):
    health = tmp_path / "health.json"
    setup_streams()
    proc = start_listener(*BOTH, "--health-file", str(health), log=tmp_path / "listener.log")
    try:
        wait_for(lambda: status(health).get("ready"), timeout=60, what="the listener ready")
        os.killpg(proc.pid, signal.SIGSTOP)  # a wedged process: its loop no longer turns
        try:
            wait_for(lambda: probe(health, "--max-age", "2")[0] == 1, timeout=60, what="the probe to fail")
            code, lines = probe(health, "--max-age", "2", "--live")
            assert code == 1 and len(lines) == 1 and lines[0].startswith("unhealthy: no loop turn for "), lines
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        wait_for(lambda: probe(health, "--max-age", "2")[0] == 0, timeout=60, what="the probe to pass again")
    finally:
        assert stop(proc) == 0


def test_a_listener_cut_off_from_nats_is_alive_but_not_ready(private_nats, tmp_path: Path):
    health = tmp_path / "health.json"
    setup_streams()
    env = listener_env(NATS_URL=private_nats.url)
    proc = start_listener(*BOTH, "--health-file", str(health), log=tmp_path / "listener.log", NATS_URL=private_nats.url)
    try:
        wait_for(lambda: status(health).get("ready"), timeout=60, what="the listener ready")
        private_nats.kill()
        wait_for(lambda: status(health).get("connected") is False, timeout=60, what="the disconnection noticed")
        code, lines = probe(health, env=env)
        assert code == 1 and lines[0].startswith("unhealthy: not ready (not connected to NATS)"), lines
        assert probe(health, "--live", env=env)[0] == 0  # alive: restarting it would not bring NATS back
        private_nats.start()
        wait_for(lambda: probe(health, env=env)[0] == 0, timeout=60, what="ready again after NATS came back")
    finally:
        assert stop(proc) == 0


def test_a_health_file_that_cannot_be_written_is_a_one_line_error_before_connecting(tmp_path: Path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = run_manage("listen", *BOTH, "--health-file", str(blocker / "health.json"), timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"CommandError: cannot write the health file {blocker}/"), lines
