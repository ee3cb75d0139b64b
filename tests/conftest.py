from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.test import override_settings

from tests.helpers import PrivateNats, delete_streams


@pytest.fixture(scope="session", autouse=True)
def _clean_streams_after_run():
    yield
    try:
        delete_streams(os.environ["OUTBOX_STREAM_PREFIX"])
    except Exception as exc:  # noqa: BLE001
        print(f"could not delete this run's streams: {exc}")
    try:
        import redis

        client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
        for key in client.scan_iter(f"*{os.environ['OUTBOX_CELERY_QUEUE']}*"):
            client.delete(key)
    except Exception as exc:  # noqa: BLE001
        print(f"could not clean Redis keys: {exc}")


@pytest.fixture(autouse=True)
def _fresh_broker():
    """Each test starts with no NATS connection in this process and none of this run's streams."""
    from outbox.broker import reset_broker

    reset_broker()
    delete_streams(os.environ["OUTBOX_STREAM_PREFIX"])
    yield
    reset_broker()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def private_nats(tmp_path: Path):
    """A private nats-server (file store) that a test may kill and restart; settings point at it."""
    server = PrivateNats(store=tmp_path / "nats").start()
    old = os.environ["NATS_URL"]
    os.environ["NATS_URL"] = server.url
    from django.conf import settings

    nats_conf = dict(settings.NATS, SERVERS=[server.url])
    try:
        with override_settings(NATS=nats_conf):
            yield server
    finally:
        os.environ["NATS_URL"] = old
        server.kill()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """After the run, end sessions that child processes left, so the test database can be dropped."""
    yield
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
