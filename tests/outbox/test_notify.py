"""PostgreSQL wakes the relay (``OUTBOX['WAKE'] = "notify"``): the outbox table's trigger NOTIFYs at
commit, the relay loop that the Celery worker runs as a bootstep LISTENs and drains. Real worker
processes, real PostgreSQL, Redis and NATS; no beat runs, so nothing else publishes."""

from __future__ import annotations

import signal

import pytest
import redis
from django.conf import settings
from django.db import connection, transaction

from outbox.conf import NOTIFY_CHANNEL, outbox_settings
from outbox.kick import _flag_key
from outbox.models import OutboxEvent
from tests.helpers import celery_worker, stop, subprocess_env, update_tickets_concurrently, wait_for
from ticketing.services import ticket_create, ticket_update

pytestmark = pytest.mark.django_db(transaction=True)


def published() -> int:
    return OutboxEvent.objects.filter(status="published").count()


def worker_sessions() -> list[int]:
    """Every other client session of this test's database: the worker's (its LISTEN session among them)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
        return [r[0] for r in cur.fetchall()]


def relay_locks() -> int:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [0x6F627830],
        )
        return cur.fetchone()[0]


@pytest.fixture
def no_kicks():
    """This run's relay queue and kick flag stay empty: nothing but the loop may publish."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    name = outbox_settings().CELERY_QUEUE
    client.delete(name, _flag_key())
    yield client, name
    client.delete(name, _flag_key())


def test_the_outbox_table_notifies_at_commit_and_only_then():
    with connection.cursor() as cur:
        cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
    raw = connection.connection
    try:
        with transaction.atomic():
            ticket_create(title="T", price="1", user_id="u")
            assert not list(raw.notifies(timeout=0.2)), "delivered before the commit"
        assert [n.channel for n in raw.notifies(timeout=10, stop_after=1)] == [NOTIFY_CHANNEL]
    finally:
        with connection.cursor() as cur:
            cur.execute(f"UNLISTEN {NOTIFY_CHANNEL}")


def test_the_worker_loop_publishes_commits_on_their_notify_with_no_kick_and_no_task(logs, no_kicks):
    client, name = no_kicks
    worker = celery_worker(log=logs / "worker.log")
    try:
        ticket = ticket_create(title="T", price="1", user_id="u")
        wait_for(lambda: published() == 1, timeout=60, what="the event published by the worker's loop")
        for version in range(5):
            ticket_update(ticket_id=ticket.id, expected_version=version, price=str(version + 2))
            wait_for(lambda v=version: published() == v + 2, timeout=30, what=f"update {version + 1} published")
        # The write path touched no Redis: no kick flag, no relay task queued.
        assert not client.exists(_flag_key()) and client.llen(name) == 0
        assert worker.poll() is None
    finally:
        stop(worker)


def test_a_lost_wake_up_waits_at_most_the_loops_poll(logs, no_kicks):
    """The LISTEN session terminated, and a commit that sends no NOTIFY at all: both published by a
    loop that polls every 2 s, with no beat sweep and no kick."""
    worker = celery_worker(env=subprocess_env(OUTBOX_SWEEP_INTERVAL="2"), log=logs / "worker.log")
    try:
        ticket = ticket_create(title="T", price="1", user_id="u")
        wait_for(lambda: published() == 1, timeout=60, what="the first event published")
        # The worker's sessions end (the LISTEN one among them) and a commit lands right away.
        with connection.cursor() as cur:
            for pid in worker_sessions():
                cur.execute("SELECT pg_terminate_backend(%s)", [pid])
        ticket_update(ticket_id=ticket.id, expected_version=0, price="5")
        wait_for(lambda: published() == 2, timeout=60, what="the commit after the LISTEN session was terminated")
        # A commit whose NOTIFY never comes (triggers off for this session): only the poll finds it.
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("SET LOCAL session_replication_role = replica")
            ticket_update(ticket_id=ticket.id, expected_version=1, price="6")
        wait_for(lambda: published() == 3, timeout=60, what="the commit that sent no NOTIFY")
        assert worker.poll() is None
        assert "outbox.relay_loop_error" in (logs / "worker.log").read_text()
    finally:
        stop(worker)


def test_sigterm_stops_the_worker_and_its_loop_promptly(logs):
    worker = celery_worker(log=logs / "worker.log")
    try:
        ticket_create(title="T", price="1", user_id="u")
        wait_for(lambda: published() == 1, timeout=60, what="the event published (the loop now waits)")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, (logs / "worker.log").read_text()[-2000:]
        wait_for(lambda: relay_locks() == 0, timeout=30, what="the partitions given back")
    finally:
        stop(worker, sig=signal.SIGKILL)


def test_a_killed_worker_loses_nothing_its_partitions_go_with_its_session(logs, no_kicks):
    worker = celery_worker(log=logs / "worker.log")
    try:
        ticket = ticket_create(title="T", price="1", user_id="u")
        wait_for(lambda: published() == 1, timeout=60, what="the first event published")
        assert relay_locks() > 0  # the loop holds its partitions between drains
        stop(worker, sig=signal.SIGKILL)
        wait_for(lambda: relay_locks() == 0, timeout=30, what="the killed worker's partitions released")
        ticket_update(ticket_id=ticket.id, expected_version=0, price="5")  # nobody listens now
        assert OutboxEvent.objects.filter(status="pending").count() == 1
        worker = celery_worker(log=logs / "worker2.log")
        wait_for(lambda: published() == 2, timeout=60, what="the pending event published by the next worker")
    finally:
        stop(worker)


@pytest.fixture
def loop_in_process():
    """A relay loop on a thread of this process (as the worker's bootstep runs it), polling only
    every 120 s: within a test's bounds, only notifications wake it."""
    from outbox.relay.notify import RelayLoop

    loop = RelayLoop(poll=120)
    loop.start()
    yield loop
    assert loop.stop(timeout=30)


def test_a_woken_loop_claims_once_per_commit_when_that_claim_saw_everything(monkeypatch, loop_in_process):
    """One event per wake-up: one claim, not a second one to find nothing (nor a third after the mark)."""
    from outbox.relay import partitions

    claims = []
    real = partitions.claim_partitions

    def counted(*args, **kwargs):
        rows, complete = real(*args, **kwargs)
        claims.append((len(rows), complete))
        return rows, complete

    monkeypatch.setattr(partitions, "claim_partitions", counted)
    ticket = ticket_create(title="T", price="1", user_id="u")
    wait_for(lambda: published() == 1, timeout=60, what="the first event published")
    claims.clear()
    for version in range(10):
        ticket_update(ticket_id=ticket.id, expected_version=version, price=str(version + 2))
        wait_for(lambda v=version: published() == v + 2, timeout=30, what=f"update {version + 1} published")
    # Each wake-up's claim took its one row and saw nothing else pending: the drain ended there.
    assert claims == [(1, True)] * 10


def test_commits_that_land_while_a_drain_runs_are_published_on_their_own_notify(loop_in_process):
    """A drain that ends after a claim saw everything leaves later commits to their notifications:
    none may wait for the poll. Every batch's publish is held back 30 ms so that commits land
    while drains are in flight."""
    import time

    from outbox.relay import hooks

    tickets = [ticket_create(title=f"T{i}", price="1", user_id="u").id for i in range(4)]
    wait_for(lambda: published() == 4, timeout=60, what="the tickets' events published")
    unregister = hooks.register(hooks.AFTER_CLAIM, lambda rows: time.sleep(0.03))
    try:
        started = time.monotonic()
        update_tickets_concurrently(tickets, updates=25)
        # Well inside the 120 s poll: only the notifications can have done it.
        wait_for(lambda: published() == 104, timeout=60, what="all 100 updates published")
        assert time.monotonic() - started < 100
    finally:
        unregister()
