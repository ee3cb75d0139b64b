"""The on-commit kick: made by the kicker thread after the commit, never lost by coalescing.

Real Redis (this run's Celery queue), real PostgreSQL and, for the end-to-end test, a real
Celery worker and NATS. ``_enqueue`` (the SET NX and the Celery message) is wrapped, never
replaced, where a test needs to hold a kick in flight.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from contextlib import contextmanager

import pytest
import redis
from django.conf import settings

from outbox import kick
from outbox.conf import outbox_settings
from outbox.models import OutboxEvent
from tests.helpers import celery_worker, manage, stop, subprocess_env, update_tickets_concurrently, wait_for
from ticketing.services import ticket_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _wake_by_kick(settings):
    """These tests are about the kick: ``WAKE = "kick"`` (the default on PostgreSQL is "notify")."""
    settings.OUTBOX = {**settings.OUTBOX, "WAKE": "kick"}


@pytest.fixture
def queue():
    """This run's relay queue and kick flag, empty before and after the test; yields (client, queue, flag)."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    name = outbox_settings().CELERY_QUEUE
    flag = kick._flag_key()
    assert kick.flush_kicks(60), "an earlier test's kicks are still in flight"
    client.delete(name, flag)
    yield client, name, flag
    kick.flush_kicks(60)
    client.delete(name, flag)


def test_a_commit_returns_without_waiting_for_its_kick_which_the_kicker_makes_after_it(monkeypatch, queue):
    client, name, flag = queue
    order: list[tuple[str, str]] = []
    gate = threading.Event()
    real = kick._enqueue

    def held() -> bool:
        gate.wait(30)  # held until the caller has returned: the commit cannot be waiting for it
        order.append(("kick", threading.current_thread().name))
        return real()

    monkeypatch.setattr(kick, "_enqueue", held)
    ticket_create(title="T", price="1", user_id="u")
    order.append(("returned", threading.current_thread().name))
    gate.set()
    assert kick.flush_kicks(60)
    assert order == [("returned", "MainThread"), ("kick", "outbox-kicker")]
    # The kick was real: the flag is set and one relay task is queued.
    assert client.llen(name) == 1 and client.exists(flag)


def test_commits_during_a_kick_in_flight_get_one_more_kick_that_starts_after_them(monkeypatch, queue):
    client, name, _flag = queue
    returned = 0
    seen_at_kick: list[int] = []
    first_in_flight, gate = threading.Event(), threading.Event()
    real = kick._enqueue

    def held() -> bool:
        seen_at_kick.append(returned)
        if len(seen_at_kick) == 1:
            first_in_flight.set()
            gate.wait(30)
        return real()

    monkeypatch.setattr(kick, "_enqueue", held)
    ticket_create(title="first", price="1", user_id="u")
    returned += 1
    assert first_in_flight.wait(30), "the first commit was never kicked"
    for n in range(3):  # these commit while the first kick is still in flight
        ticket_create(title=f"during {n}", price="1", user_id="u")
        returned += 1
    gate.set()
    assert kick.flush_kicks(60)
    # One kick for the burst during the flight, and it started after all of those commits.
    assert len(seen_at_kick) == 2 and seen_at_kick[1] == 4
    assert client.llen(name) == 1  # the second kick found the first one's task still queued


def test_turning_kick_on_commit_off_takes_effect_for_the_next_commit(queue, settings):
    client, name, flag = queue
    ticket_create(title="kicked", price="1", user_id="u")  # the kick reads (and keeps) the settings
    assert kick.flush_kicks(60) and client.llen(name) == 1
    client.delete(name, flag)
    settings.OUTBOX = {**settings.OUTBOX, "KICK_ON_COMMIT": False}
    ticket_create(title="not kicked", price="1", user_id="u")
    assert kick.flush_kicks(60)
    assert client.llen(name) == 0 and not client.exists(flag)


@contextmanager
def celery_broker(url: str):
    """Point the Celery app itself (not Django's settings) at ``url`` for a while."""
    from celery import current_app

    from outbox.celery_broker import forget_broker_url

    # Celery reads its own CELERY_BROKER_URL environment variable before its configuration.
    old, old_env = current_app.conf.broker_url, os.environ.get("CELERY_BROKER_URL")
    current_app.conf.broker_url = os.environ["CELERY_BROKER_URL"] = url
    forget_broker_url()
    try:
        yield
    finally:
        current_app.conf.broker_url = old
        if old_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = old_env
        forget_broker_url()


def test_with_redis_unreachable_the_commit_returns_and_the_kicker_drops_the_kick_with_a_warning(caplog):
    from tests.helpers import free_port

    with celery_broker(f"redis://127.0.0.1:{free_port()}/0"):
        ticket_create(title="written anyway", price="1", user_id="u")
        assert kick.flush_kicks(60)
    assert OutboxEvent.objects.filter(status="pending").count() == 1
    assert any(
        r.name == "outbox.kick" and "relay kick failed" in r.getMessage() and r.threadName == "outbox-kicker"
        for r in caplog.records
    ), caplog.text


def test_the_kick_goes_through_the_celery_apps_broker_not_a_django_setting(queue):
    """A project that configures Celery without CELERY_BROKER_URL in its settings still gets kicks."""
    from django.test import override_settings

    from tests.helpers import free_port

    client, name, _flag = queue
    with override_settings(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"):  # not what Celery uses
        ticket_create(title="kicked through the app", price="1", user_id="u")
        assert kick.flush_kicks(60)
    assert client.llen(name) == 1


def test_a_process_that_exits_right_after_its_commit_still_kicks_the_relay(queue, logs):
    client, name, _flag = queue
    writer = manage(
        "shell",
        "-c",
        "from ticketing.services import ticket_create; ticket_create(title='last words', price='1', user_id='u')",
        env=subprocess_env(OUTBOX_WAKE="kick"),
        log=logs / "writer.log",
    )
    assert writer.wait(120) == 0, (logs / "writer.log").read_text()
    assert OutboxEvent.objects.filter(status="pending").count() == 1
    assert client.llen(name) == 1, "the exiting process did not make its kick"


def _kick_in_child(result) -> None:
    kick.kick_relay_after_commit()
    result.put(kick.flush_kicks(30))


def test_a_forked_child_kicks_with_a_kicker_of_its_own(queue):
    client, name, flag = queue
    # The parent's kicker thread exists (it made this kick); a forked child has none of it.
    ticket_create(title="parent", price="1", user_id="u")
    assert kick.flush_kicks(60) and client.llen(name) == 1
    client.delete(name, flag)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_kick_in_child, args=(result,))
    try:
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert result.get(timeout=10) is True, "the child's kick was never made"
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert client.llen(name) == 1


def test_a_worker_without_beat_publishes_every_event_of_concurrent_writers(logs):
    # No sweep runs here: each row is published only if some kick after its commit reached a relay
    # task that drained after that commit, including commits that land while a task drains.
    tickets = [ticket_create(title=f"T{n}", price="1", user_id="u").id for n in range(4)]
    worker = celery_worker(env=subprocess_env(OUTBOX_WAKE="kick"), log=logs / "worker.log")
    try:
        update_tickets_concurrently(tickets, updates=25)
        wait_for(
            lambda: not OutboxEvent.objects.exclude(status="published").exists(),
            timeout=120,
            what="every event published by kicked relay tasks alone",
        )
    finally:
        stop(worker)
    assert OutboxEvent.objects.filter(status="published").count() == 4 + 4 * 25
