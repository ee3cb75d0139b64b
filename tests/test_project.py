"""The project's shape: the demo path, docker-compose, the README's promises."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from tests.helpers import PYTHON, ROOT, subprocess_env

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
    assert "outcome=applied" in result.stdout  # the listener printed each event it applied


def test_the_demo_falls_back_to_sqlite_when_database_url_is_unset(tmp_path):
    env = subprocess_env(VAR_DIR=str(tmp_path / "var"))
    env.pop("DATABASE_URL")
    result = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "demo.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SQLite file" in result.stdout and "replica == source" in result.stdout
    assert (tmp_path / "var" / "db.sqlite3").exists()


def test_ci_entry_point_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
