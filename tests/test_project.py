"""The project's shape: the demo path, docker-compose, the README's promises."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import PYTHON, ROOT, free_port, stop, subprocess_env, wait_for

README = (ROOT / "README.md").read_text()


def test_docker_compose_has_every_service_the_readme_mentions_configured_by_the_same_variables():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    section = README.split("### Docker", 1)[1].split("##", 1)[0]
    mentioned = set(re.findall(r"`([a-z][a-z-]+)`", section)) - {"docker-compose.cluster.yml"}
    assert mentioned, "the README's Docker section names the services"
    assert mentioned <= set(services), mentioned - set(services)
    assert "-js" in services["nats"]["command"] and services["nats"]["volumes"]
    for name in ("web", "relay", "beat", "listener", "tickets-listener"):
        env = services[name]["environment"]
        assert {"DATABASE_URL", "NATS_URL", "CELERY_BROKER_URL", "SECRET_KEY"} <= set(env), name
    assert "worker" in services["relay"]["command"] and "--beat" not in services["relay"]["command"]
    assert services["beat"]["command"].startswith("celery -A ticketing beat")
    assert "listen ticket:created ticket:updated" in services["listener"]["command"]


def test_procfile_runs_web_relay_and_both_listeners():
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    assert set(procfile) == {"web", "relay", "replica", "tickets"}
    assert "--beat" in procfile["relay"]


@pytest.mark.django_db(transaction=True)
def test_the_demo_runs_end_to_end_against_the_test_services_and_shows_replica_equal_to_source(tmp_path):
    env = subprocess_env(VAR_DIR=str(tmp_path / "var"))
    result = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "demo.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "replica == source" in result.stdout
    assert "applied by replica-TICKETS" in result.stdout  # each event as a listener applied it


def closed_port() -> int:
    return free_port()  # nothing listens on it once the probe socket is closed


def fallback_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No service answers: a closed NATS port, a closed Redis port, DATABASE_URL unset."""
    env = subprocess_env(
        VAR_DIR=str(tmp_path / "var"),
        NATS_URL=f"nats://127.0.0.1:{closed_port()}",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{closed_port()}/0",
        WEB_PORT=str(free_port()),
    )
    env.pop("DATABASE_URL")
    for name in ("OUTBOX_SUBJECT_PREFIX", "OUTBOX_STREAM_PREFIX", "OUTBOX_CELERY_QUEUE", "NO_COLOR"):
        env.pop(name, None)  # a private NATS and broker: nothing to keep apart from other runs
    env.update(extra)
    return env


def test_the_demo_with_every_fallback_prints_for_a_person_and_leaves_nothing_in_the_repo(tmp_path):
    var = tmp_path / "var"
    result = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "demo.py")],
        cwd=ROOT,
        env=fallback_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "SQLite file" in out and "filesystem broker" in out and "starting nats-server" in out
    assert (var / "db.sqlite3").exists() and (var / "nats").is_dir()
    assert (var / "broker" / "control").is_dir()  # kombu's exchange table, not ./control
    assert not (ROOT / "control").exists()
    for noise in ("celery@", "-------------- [queues]", "No hostname", "\x1b[", "WARNING", "unchanged", "Traceback"):
        assert noise not in out, f"{noise!r} in the demo's output:\n{out[-6000:]}"
    assert "Connect call failed" not in out  # nats-server stopped after the processes that use it
    # The final table, and every ticket in it matched to the events applied to it.
    assert "tickets: source (ticketing) | replica (listeners)" in out and "replica == source" in out
    table_ids = re.findall(r"^│ ([0-9a-f]{8}) │", out, flags=re.MULTILINE)
    assert len(table_ids) == 3
    applied = re.findall(r"ticket ([0-9a-f]{8}) .* event ([0-9a-f]{8})  applied by (\S+)", out)
    assert {ticket for ticket, _, _ in applied} == set(table_ids)
    assert {consumer for _, _, consumer in applied} == {"replica-TICKETS", "tickets-ORDERS"}


def test_make_run_starts_on_the_fallbacks_serves_the_admin_relays_and_listens_then_stops_in_order(tmp_path):
    env = fallback_env(tmp_path)
    port = int(env["WEB_PORT"])
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [PYTHON, str(ROOT / "scripts" / "run.py")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def admin_login_answers() -> bool:
            assert run.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(admin_login_answers, timeout=120, interval=0.2, what="the admin of make run")
        nats_port = int(re.search(r"starting nats-server on 127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        # The whole path through make run's relay and listeners: same folder, broker and database.
        steps_env = dict(env, CELERY_BROKER_URL="filesystem://localhost//", NATS_URL=f"nats://127.0.0.1:{nats_port}")
        steps = subprocess.run(
            [PYTHON, str(ROOT / "manage.py"), "demo_tickets", "--timeout", "120"],
            cwd=ROOT,
            env=steps_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert steps.returncode == 0, steps.stdout[-4000:] + steps.stderr[-4000:] + log.read_text()[-4000:]
        assert "replica == source" in steps.stdout

        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert run.wait(90) == 0, log.read_text()[-4000:]
    finally:
        # On a failure above: SIGTERM first, so run.py stops honcho's processes and its nats-server
        # (each in a process group of its own) before anything is killed outright.
        stop(run, timeout=90)
    text = log.read_text()
    assert "web, relay and listeners first, then the services" in text
    assert not _answers(nats_port), "the embedded nats-server outlived make run"
    assert "Connect call failed" not in text and "Traceback" not in text, text[-6000:]
    assert (tmp_path / "var" / "db.sqlite3").exists()  # make run's own state, apart from the demo's


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_make_run_says_in_one_line_what_to_do_when_a_service_cannot_be_had(tmp_path):
    env = fallback_env(tmp_path, DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed_port()}/outbox")
    run = subprocess.Popen(
        [PYTHON, str(ROOT / "scripts" / "run.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    assert run.returncode == 1, stdout + stderr
    (line,) = [line for line in stdout.splitlines() if "PostgreSQL" in line]
    assert "unset DATABASE_URL" in line and "Traceback" not in stderr
    assert "starting nats-server" not in stdout  # it stopped before starting anything


def test_ci_entry_point_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
