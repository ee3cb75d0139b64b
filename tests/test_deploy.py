"""The production image and docker-compose.yml, checked without a Docker engine.

The compose files are parsed with PyYAML (health checks, the one-shot migrate service, the dependency
graph, no default SECRET_KEY); the Dockerfile is parsed line by line (non-root USER, HEALTHCHECK,
runtime lock only). Then what the image would run is run here: its gunicorn command against
ticketing.wsgi with DEBUG off, after the build's collectstatic, serving the admin and a static file;
its HEALTHCHECK command against that server; the relay's and the listeners' compose health checks
against a real worker and a real durable consumer.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command

from tests.helpers import PYTHON, ROOT, free_port, stop, subprocess_env, wait_for

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DEV = yaml.safe_load((ROOT / "docker-compose.dev.yml").read_text())
SERVICES = COMPOSE["services"]
APPS = {name for name, service in SERVICES.items() if "build" in service}
VENV_BIN = Path(PYTHON).parent


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [args for inst, args in dockerfile() if inst == name]


def exec_form(args: str) -> list[str]:
    """The JSON array of a CMD / HEALTHCHECK ... CMD instruction."""
    return json.loads(args[args.index("[") :])


# --- docker-compose.yml -------------------------------------------------------------------------


def test_every_compose_service_has_a_health_check_and_only_the_one_shot_migrate_disables_it():
    for name, service in SERVICES.items():
        assert "healthcheck" in service, f"{name} has no health check"
        if name == "migrate":
            assert service["healthcheck"] == {"disable": True} and service["restart"] == "no"
        else:
            assert service["healthcheck"]["test"], name
    assert "healthz" in " ".join(SERVICES["nats"]["healthcheck"]["test"])
    assert str(SERVICES["nats"]["image"]).startswith("nats:2.10")
    # The monitor port /healthz is served on, and every acknowledged write synced, in the mounted config.
    assert "8222" in SERVICES["nats"]["command"]
    assert SERVICES["nats"]["command"][:2] == ["-c", "/etc/nats/nats.conf"]
    assert "./deploy/nats/nats.conf:/etc/nats/nats.conf:ro" in SERVICES["nats"]["volumes"]
    assert "sync_interval: always" in (ROOT / "deploy" / "nats" / "nats.conf").read_text()


def test_app_services_wait_for_healthy_services_and_the_completed_migrate_which_runs_migrations_then_streams():
    assert {"migrate", "web", "relay", "beat", "listener", "tickets-listener"} <= APPS
    for name in APPS - {"migrate"}:
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        for service in ("postgres", "redis", "nats"):
            assert deps[service] == {"condition": "service_healthy"}, name
    migrate = SERVICES["migrate"]
    assert set(migrate["depends_on"]) == {"postgres", "nats"}
    assert all(dep["condition"] == "service_healthy" for dep in migrate["depends_on"].values())
    command = migrate["command"]
    assert command.index("migrate --no-input") < command.index("outbox_streams")
    assert "command" not in SERVICES["web"]  # the image's gunicorn


def test_compose_has_no_default_secret_key_and_is_in_production_mode_unless_the_dev_override_is_added():
    for name in APPS:
        env = SERVICES[name]["environment"]
        assert re.fullmatch(r"\$\{SECRET_KEY:\?[^}]+\}", env["SECRET_KEY"]), f"{name}: SECRET_KEY must be required"
        assert env["DEBUG"] == "${DEBUG:-0}", name
        assert DEV["services"][name]["environment"]["DEBUG"] == "1", name
    assert set(DEV["services"]) == APPS


def test_compose_relay_and_listener_health_checks_name_what_they_probe():
    relay = SERVICES["relay"]
    assert "-n relay@%h" in relay["command"]
    assert "inspect ping -d relay@$$HOSTNAME" in relay["healthcheck"]["test"][1]
    for name, subjects in {
        "listener": "ticket:created ticket:updated",
        "tickets-listener": "order:created order:cancelled",
    }.items():
        assert SERVICES[name]["command"].endswith(f"listen {subjects}")
        assert " ".join(SERVICES[name]["healthcheck"]["test"][1:]).endswith(f"listener_ready {subjects}")


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_installs_the_runtime_lock_only_collects_static_runs_as_non_root_with_a_health_check():
    assert not [args for _, args in dockerfile() if "requirements-dev.lock" in args]  # comments may name it
    runs = " ".join(instruction("RUN"))
    assert "pip install --no-cache-dir -r requirements.lock" in runs
    assert "collectstatic --no-input" in runs
    (user,) = instruction("USER")
    assert user not in {"root", "0"} and not user.startswith("0:")
    assert "useradd" in runs and user.split(":")[0] in runs
    assert len(instruction("HEALTHCHECK")) == 1
    (cmd,) = instruction("CMD")
    assert exec_form(cmd)[:2] == ["gunicorn", "ticketing.wsgi:application"]


@pytest.fixture
def image_server(tmp_path):
    """The image's CMD (gunicorn) on a free loopback port, production settings, after collectstatic."""
    static = tmp_path / "static"
    env = subprocess_env(
        SECRET_KEY=secrets.token_urlsafe(50),
        DEBUG="0",
        STATIC_ROOT=str(static),
        VAR_DIR=str(tmp_path / "var"),
    )
    for name in ("DJANGO_DEV", "SECURE_SSL_REDIRECT"):
        env.pop(name, None)  # the image's defaults: production mode, redirect to https
    subprocess.run(
        [PYTHON, "manage.py", "collectstatic", "--no-input", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=120
    )
    port = free_port()
    (cmd,) = instruction("CMD")
    args = exec_form(cmd)
    args[args.index("--bind") + 1] = f"127.0.0.1:{port}"
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / args[0]), *args[1:]],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def answers() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        wait_for(answers, timeout=60, what="gunicorn")
        # The worker imports Django on its first request: take that cost here, with a generous
        # bound, so the checks below meet a warm server as a container's health check would.
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        warm.request("GET", "/admin/login/", headers={"X-Forwarded-Proto": "https"})
        warm.getresponse().read()
        warm.close()
        yield port, static, log
    finally:
        stop(proc)


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    # The TLS-terminating proxy's header: production settings redirect plain http to https.
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"X-Forwarded-Proto": "https"})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.django_db(transaction=True)
def test_the_images_gunicorn_serves_the_admin_and_static_files_with_debug_off(image_server):
    port, static, _ = image_server
    assert (static / "admin" / "css" / "base.css").exists()
    status, headers, body = get(port, "/static/admin/css/base.css")
    assert status == 200 and b"body" in body
    assert "max-age" in headers.get("Cache-Control", "")  # WhiteNoise, not Django's DEBUG-only view
    status, _, body = get(port, "/admin/login/")
    assert status == 200 and b"csrfmiddlewaretoken" in body
    status, headers, _ = get(port, "/")
    assert (status, headers["Location"]) == (302, "/admin/")
    status, _, _ = get(port, "/static/nothing-here.css")
    assert status == 404


@pytest.mark.django_db(transaction=True)
def test_the_images_health_check_passes_against_the_running_server(image_server):
    port, _, _ = image_server
    (health,) = instruction("HEALTHCHECK")
    command = [arg.replace("8000", str(port)) for arg in exec_form(health)]
    assert command[0] == "python"
    assert subprocess.run([PYTHON, *command[1:]], timeout=30).returncode == 0
    web = [arg.replace("8000", str(port)) for arg in SERVICES["web"]["healthcheck"]["test"][1:]]
    assert subprocess.run([PYTHON, *web[1:]], timeout=30).returncode == 0


def test_check_deploy_refuses_a_missing_secret_key_and_flags_the_development_key_in_production_mode():
    base = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DJANGO_DEV", "DEBUG"}}
    base.update(DEBUG="0", SECURE_SSL_REDIRECT="1", ALLOWED_HOSTS="example.com")
    check = [PYTHON, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]

    missing = subprocess.run(check, cwd=ROOT, env=base, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "SECRET_KEY is not set" in missing.stderr

    dev_key = subprocess.run(check, cwd=ROOT, env={**base, "DJANGO_DEV": "1"}, capture_output=True, text=True)
    assert dev_key.returncode != 0 and "security.W009" in dev_key.stderr + dev_key.stdout

    strong = subprocess.run(
        check, cwd=ROOT, env={**base, "SECRET_KEY": secrets.token_urlsafe(50)}, capture_output=True, text=True
    )
    assert strong.returncode == 0, strong.stdout + strong.stderr


# --- the relay's and the listeners' compose health checks, run for real --------------------------


@pytest.mark.django_db(transaction=True)
def test_the_relay_health_check_pings_the_named_worker_over_the_broker(tmp_path):
    host = f"t{os.environ['TEST_RUN_ID']}"  # the container's $HOSTNAME; %h in the worker's name
    env = subprocess_env(HOSTNAME=host)
    queue = env["OUTBOX_CELERY_QUEUE"]
    worker = shlex.split(SERVICES["relay"]["command"].replace("%h", host).replace("-Q outbox", f"-Q {queue}"))
    ping = SERVICES["relay"]["healthcheck"]["test"][1].replace("$$", "$")
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / worker[0]), *worker[1:]],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"

        def pinged() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return subprocess.run(["sh", "-c", ping], cwd=ROOT, env=env, capture_output=True).returncode == 0

        wait_for(pinged, timeout=90, interval=1, what="the relay worker to answer its health check")
    finally:
        stop(proc)
    after = subprocess.run(["sh", "-c", ping], cwd=ROOT, env=env, capture_output=True, text=True)
    assert after.returncode != 0  # a stopped worker fails it


@pytest.mark.django_db(transaction=True)
def test_listener_ready_fails_until_the_listeners_durable_consumer_exists():
    with pytest.raises(CommandError, match="no durable consumer yet: .*replica-TICKETS"):
        call_command("listener_ready", "ticket:created", "ticket:updated")
    call_command("outbox_streams")  # the producer's job: a listener never creates a stream
    call_command("listen", "ticket:created", "ticket:updated", "--idle-exit", "0.5")
    call_command("listener_ready", "ticket:created", "ticket:updated")
    with pytest.raises(CommandError, match="tickets-ORDERS"):
        call_command("listener_ready", "order:created", "order:cancelled")
