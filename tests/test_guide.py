"""The README's guide, followed on a project that is not this one.

A fresh virtual environment gets the built wheel (and nothing of this checkout); a new
Django project is generated with ``django-admin startproject``, its files written from
the README's own snippets (the ``<!-- guide: ... -->`` blocks), migrated and run: the
relay worker as the README starts it, driven by commit wake-ups alone (no beat), and
``manage.py listen``. The project's own local model must end up with one row per event.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest

from tests.helpers import ROOT, delete_streams, stop, wait_for

pytestmark = pytest.mark.timeout(900)

README = ROOT / "README.md"
SNIPPET = re.compile(r"<!-- guide: (write|append) (\S+) -->\n```python\n(.*?)```", re.S)
ORDERS = 20

MODELS = """from django.db import models


class Order(models.Model):
    total = models.IntegerField()


class OrderCopy(models.Model):
    id = models.CharField(primary_key=True, max_length=64)
    total = models.IntegerField()
    version = models.IntegerField()
"""


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env(venv: Path) -> dict[str, str]:
    """Nothing of this checkout or this test run: no PYTHONPATH, no DJANGO_SETTINGS_MODULE, no broker URL."""
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The distribution, built from the library's files alone."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("outbox", "listeners"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        cwd=src,
        env=dict(os.environ),
    )
    (built,) = dist.glob("django_nats_outbox-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(path)], cwd=path, env=dict(os.environ))
    run(
        [
            str(path / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            str(wheel),
            "psycopg[binary]",
            "-c",
            str(ROOT / "requirements.lock"),
        ],
        cwd=path,
        env=clean_env(path),
    )
    return path


def test_the_wheel_carries_migrations_commands_templates_and_types_and_no_example(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "outbox/migrations/0001_initial.py",
        "outbox/management/commands/outbox_relay.py",
        "outbox/management/commands/outbox_schema.py",
        "outbox/templates/admin/outbox/operations.html",
        "outbox/templates/admin/outbox/outboxevent/change_list.html",
        "outbox/py.typed",
        "outbox/backends/postgresql/base.py",
        "listeners/migrations/0001_initial.py",
        "listeners/management/commands/listen.py",
        "listeners/templates/admin/listeners/deadletter/submit_line.html",
        "listeners/py.typed",
    ):
        assert expected in names
    assert not [n for n in names if n.startswith(("ticketing/", "tests/", "benchmarks/"))]
    assert any(n.endswith("/licenses/LICENSE") for n in names)


@pytest.fixture
def project(venv, tmp_path):
    """A new project from startproject + the guide's snippets, on its own database, streams and queue."""
    run_id = os.environ["TEST_RUN_ID"]
    tag = f"{os.environ['OUTBOX_STREAM_PREFIX']}G_"
    queue = f"{os.environ['OUTBOX_CELERY_QUEUE']}-guide"
    db = f"test_guide_{run_id}"
    env = clean_env(venv)
    home = tmp_path / "shopsite"
    home.mkdir()
    run([str(venv / "bin" / "django-admin"), "startproject", "shopsite", str(home)], cwd=tmp_path, env=env)
    run([str(venv / "bin" / "python"), "manage.py", "startapp", "shop"], cwd=home, env=env)
    (home / "shop" / "models.py").write_text(MODELS)
    snippets = SNIPPET.findall(README.read_text())
    assert {path for _, path, _ in snippets} >= {"shopsite/settings.py", "shop/events.py", "shop/handlers.py"}
    for mode, path, code in snippets:
        target = home / path
        if mode == "append":
            target.write_text(target.read_text() + "\n" + code)
        else:
            target.write_text(code)
    # Not part of the guide: this run's database, streams, subjects and queue, and the shared services' URLs.
    (home / "shopsite" / "settings.py").write_text(
        (home / "shopsite" / "settings.py").read_text()
        + f"""
DATABASES = {{"default": {{"ENGINE": "outbox.backends.postgresql", "NAME": "{db}",
    "HOST": "127.0.0.1", "PORT": 5432, "USER": "postgres"}}}}
NATS = {{"SERVERS": {os.environ["NATS_URL"].split(",")!r}}}
CELERY_BROKER_URL = {os.environ["CELERY_BROKER_URL"]!r}
OUTBOX.update(STREAM_PREFIX={tag!r}, SUBJECT_PREFIX={tag.lower().replace("_", ".")!r}, CELERY_QUEUE={queue!r})
CELERY_BEAT_SCHEDULE = beat_schedule(OUTBOX)
"""
    )
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield home, env, queue, db
    finally:
        delete_streams(tag)
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def count(db: str, sql: str) -> int:
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={db}") as conn:
        return conn.execute(sql).fetchone()[0]


def test_a_new_project_following_the_guide_publishes_and_applies_its_own_events(project, venv, tmp_path):
    home, env, queue, db = project
    python = str(venv / "bin" / "python")
    where = run(
        [python, "-c", "import outbox, listeners; print(outbox.__file__, listeners.__file__)"], cwd=home, env=env
    )
    assert str(ROOT) not in where and "site-packages" in where

    run([python, "manage.py", "check"], cwd=home, env=env)
    run([python, "manage.py", "makemigrations", "shop"], cwd=home, env=env)
    run([python, "manage.py", "migrate", "-v", "0"], cwd=home, env=env)
    assert "SHOP_ORDERS: created" in run([python, "manage.py", "outbox_streams"], cwd=home, env=env)

    # The processes as the README starts them (beat left out: only commit wake-ups drive the relay here).
    readme = README.read_text()
    assert "celery -A shopsite worker --pool=solo -Q outbox --beat" in readme
    assert "python manage.py listen order:placed" in readme
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(logs / "worker.log", "wb") as worker_log, open(logs / "listen.log", "wb") as listen_log:
        run_the_processes(home, env, queue, db, venv, logs, worker_log, listen_log)


def run_the_processes(home, env, queue, db, venv, logs, worker_log, listen_log) -> None:
    python = str(venv / "bin" / "python")
    worker = subprocess.Popen(
        [str(venv / "bin" / "celery"), "-A", "shopsite", "worker", "--pool=solo", "-Q", queue, "--loglevel=WARNING"],
        cwd=home,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    listen = subprocess.Popen(
        [python, "manage.py", "listen", "order:placed"],
        cwd=home,
        env=env,
        stdout=listen_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run(
            [
                python,
                "manage.py",
                "shell",
                "-c",
                f"from shop.services import order_place\nfor n in range({ORDERS}): order_place(total=n)",
            ],
            cwd=home,
            env=env,
        )
        wait_for(
            lambda: count(db, "SELECT count(*) FROM shop_ordercopy") == ORDERS,
            timeout=120,
            what=f"{ORDERS} order copies (worker log: {logs / 'worker.log'}, listener log: {logs / 'listen.log'})",
        )
        assert count(db, "SELECT count(*) FROM outbox_outboxevent WHERE status = 'published'") == ORDERS
        assert count(db, "SELECT count(DISTINCT event_id) FROM listeners_inboxentry") == ORDERS
        assert count(db, "SELECT sum(total) FROM shop_ordercopy") == sum(range(ORDERS))

        # The apps' templates came with the wheel: the admin pages render in the new project.
        pages = run(
            [python, "manage.py", "shell", "-c", ADMIN_PAGES],
            cwd=home,
            env=env,
        )
        assert pages.split()[-3:] == ["200", "200", "200"], pages
    finally:
        assert stop(listen) == 0, (logs / "listen.log").read_text()
        stop(worker)


ADMIN_PAGES = """
from django.contrib.auth.models import User
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
client = Client()
client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
for url in ("/admin/operations/", "/admin/outbox/outboxevent/", "/admin/listeners/deadletter/"):
    print(client.get(url).status_code)
"""
