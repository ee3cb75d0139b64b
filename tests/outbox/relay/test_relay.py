"""The relay's guarantees against real PostgreSQL, Redis and NATS JetStream."""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from datetime import timedelta

import pytest
import redis
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from outbox.conf import OutboxSettings
from outbox.kick import kick_relay
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay import Relay
from outbox.services import outbox_purge_published, outbox_requeue
from outbox.streams import stream_name
from tests import crashing_relay
from tests.helpers import (
    PrivateNats,
    PrivateRedis,
    celery_worker,
    free_port,
    insert_ticket_events,
    manage,
    read_stream_fast,
    stop,
    subprocess_env,
    wait_for,
)
from ticketing.services import ticket_create, ticket_update

pytestmark = pytest.mark.django_db(transaction=True)

TICKETS = stream_name("TICKETS")


def assert_stream_matches_outbox(messages: list[dict], *, url: str | None = None) -> None:
    """Every outbox row is in the stream exactly once, per-aggregate in version order, marked with its seq."""
    ids = [m["headers"]["Nats-Msg-Id"] for m in messages]
    assert len(ids) == len(set(ids)), "an event is in the stream more than once"
    rows = {str(r.id): r for r in OutboxEvent.objects.all()}
    assert set(ids) == set(rows), "stream and outbox differ"
    versions: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        versions[m["data"]["id"]].append(m["data"]["version"])
        row = rows[m["headers"]["Nats-Msg-Id"]]
        assert row.status == OutboxStatus.PUBLISHED
        assert row.stream_sequence == m["seq"], "row not marked with its stream sequence"
    for aggregate, seen in versions.items():
        assert seen == sorted(seen), f"aggregate {aggregate} entered the stream out of version order: {seen}"


def test_four_relay_processes_drain_20000_events_over_500_aggregates_once_each_in_version_order(logs):
    total = insert_ticket_events(aggregates=500, per_aggregate=40)
    env = subprocess_env(OUTBOX_BATCH_SIZE="200")
    relays = [manage("outbox_relay", "--drain", "--quiet", env=env, log=logs / f"relay{n}.log") for n in range(4)]
    try:
        for n, proc in enumerate(relays):
            assert proc.wait(300) == 0, (logs / f"relay{n}.log").read_text()
    finally:
        for proc in relays:
            stop(proc)
    # The last relay standing drained what the others left: nothing is pending.
    assert not OutboxEvent.objects.exclude(status="published").exists()
    messages = read_stream_fast(TICKETS)
    assert len(messages) == total
    assert_stream_matches_outbox(messages)


def test_relay_killed_between_publish_and_mark_republishes_into_dedup_and_each_event_is_in_the_stream_once(logs):
    for n in range(30):
        ticket = ticket_create(title=f"T{n}", price="1", user_id="u")
        ticket_update(ticket_id=ticket.id, expected_version=0, price="2")
    env = subprocess_env(OUTBOX_LEASE_SECONDS="1")
    crashed = crashing_relay.start(
        "after-publish", "outbox_relay", "--drain", "--quiet", env=env, log=logs / "crash.log"
    )
    assert crashed.wait(120) == -9, "the relay should have been SIGKILLed by the fault hook"
    # It published (the stream has messages) but marked nothing.
    assert OutboxEvent.objects.filter(status="published").count() == 0
    published_before = len(read_stream_fast(TICKETS))
    assert published_before > 0

    restarted = manage("outbox_relay", "--drain", "--quiet", env=subprocess_env(OUTBOX_LEASE_SECONDS="1"))
    try:
        wait_for(
            lambda: OutboxEvent.objects.filter(status="published").count() == 60,
            timeout=120,
            what="all 60 events marked published after restart",
        )
    finally:
        stop(restarted)
    messages = read_stream_fast(TICKETS)
    assert len(messages) == 60
    assert_stream_matches_outbox(messages)


def test_nats_stopped_during_a_drain_keeps_rows_pending_with_failure_state_then_publishes_all(private_nats, logs):
    insert_ticket_events(aggregates=50, per_aggregate=40)
    env = subprocess_env(
        NATS_URL=private_nats.url,
        OUTBOX_PUBLISH_TIMEOUT="1",
        OUTBOX_BACKOFF_BASE="0.2",
        OUTBOX_BACKOFF_MAX="1",
        OUTBOX_BATCH_SIZE="50",
        OUTBOX_LEASE_SECONDS="5",
    )
    relay = manage("outbox_relay", "--idle", "0.05", "--quiet", env=env, log=logs / "relay.log")
    try:
        wait_for(
            lambda: OutboxEvent.objects.filter(status="published").count() >= 200,
            timeout=120,
            what="some events published",
        )
        private_nats.kill()
        wait_for(
            lambda: OutboxEvent.objects.filter(status="pending", attempts__gt=0).exclude(last_error="").exists(),
            timeout=120,
            what="rows carrying the failure (attempts, last_error)",
        )
        failing = OutboxEvent.objects.filter(status="pending", attempts__gt=0).first()
        assert failing.next_attempt_at > failing.created_at
        assert OutboxEvent.objects.filter(status="pending").exists()
        private_nats.start()
        wait_for(
            lambda: not OutboxEvent.objects.exclude(status="published").exists(),
            timeout=180,
            what="every row published after NATS came back",
        )
    finally:
        stop(relay)
    messages = read_stream_fast(TICKETS, url=private_nats.url)
    assert len(messages) == 2000
    assert_stream_matches_outbox(messages)


WRITER = """
from ticketing.services import ticket_create, ticket_update
t = ticket_create(title="during outage", price="1", user_id="u")
for n in range(20):
    t = ticket_update(ticket_id=t.id, expected_version=n, price=str(n + 2))
print("wrote", t.version)
"""


def test_redis_down_during_ticket_writes_the_writes_succeed_and_the_beat_sweep_publishes_them(logs):
    private_redis = PrivateRedis().start()
    env = subprocess_env(CELERY_BROKER_URL=private_redis.url, OUTBOX_SWEEP_INTERVAL="1", OUTBOX_WAKE="kick")
    worker = celery_worker(env=env, beat=True, log=logs / "worker.log")
    try:
        private_redis.stop()
        writer = manage("shell", "-c", WRITER, env=env, log=logs / "writer.log")
        assert writer.wait(120) == 0, (logs / "writer.log").read_text()
        assert "wrote 20" in (logs / "writer.log").read_text()
        assert OutboxEvent.objects.filter(status="pending").count() == 21

        private_redis.start()
        wait_for(
            lambda: not OutboxEvent.objects.filter(status="pending").exists(),
            timeout=180,
            what="the beat sweep publishing the events whose kicks were lost",
        )
    finally:
        stop(worker)
        private_redis.stop()
    messages = read_stream_fast(TICKETS)
    assert [m["data"]["version"] for m in messages] == list(range(21))


def test_a_burst_of_commits_enqueues_one_relay_task_not_one_per_commit(settings):
    import time

    from outbox.conf import outbox_settings
    from outbox.kick import _FLAG_TTL_MS

    settings.OUTBOX = {**settings.OUTBOX, "WAKE": "kick"}
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    queue = outbox_settings().CELERY_QUEUE
    flag = f"outbox:kick:{outbox_settings().STREAM_PREFIX}{queue}"
    client.delete(queue, flag)
    try:
        started = time.monotonic()
        for n in range(300):
            with transaction.atomic():
                ticket_create(title=f"T{n}", price="1", user_id="u")
        elapsed = time.monotonic() - started
        # No worker consumes the queue here: every kick after the first found the flag set, until the
        # flag expired (a loaded machine may need more than one flag lifetime for 300 commits).
        assert 1 <= client.llen(queue) <= 1 + int(elapsed * 1000 // _FLAG_TTL_MS)
    finally:
        client.delete(queue, flag)


def test_celery_worker_publishes_on_commit_using_one_nats_connection_per_process(logs, settings):
    settings.OUTBOX = {**settings.OUTBOX, "WAKE": "kick"}  # the writer (this process) kicks the worker
    monitor = free_port()
    server = PrivateNats(extra=["-m", str(monitor)]).start()
    env = subprocess_env(NATS_URL=server.url, OUTBOX_WAKE="kick")
    worker = celery_worker(env=env, log=logs / "worker.log")
    try:
        # Each commit kicks the worker (shared Redis, this run's queue); each kick is a separate task.
        for n in range(25):
            ticket_create(title=f"T{n}", price="1", user_id="u")
            wait_for(
                lambda n=n: OutboxEvent.objects.filter(status="published").count() == n + 1,
                timeout=60,
                what=f"event {n} published by the worker",
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz") as response:  # loopback
            connz = json.load(response)
        relay_connections = [c for c in connz["connections"] if c.get("name", "").startswith("outbox-relay")]
        assert len(relay_connections) == 1, connz["connections"]
    finally:
        stop(worker)
        server.kill()


def test_an_outage_longer_than_max_attempts_never_makes_a_row_dead(tmp_path):
    """NATS away for many times MAX_ATTEMPTS: a transient failure backs off and retries, never dead."""
    server = PrivateNats(store=tmp_path / "nats")  # not started yet: NATS is down
    from django.conf import settings
    from django.test import override_settings

    with override_settings(NATS=dict(settings.NATS, SERVERS=[server.url], CONNECT_TIMEOUT=0.5)):
        ticket_create(title="T", price="1", user_id="u")
        conf = OutboxSettings(MAX_ATTEMPTS=3, BACKOFF_BASE=0.01, BACKOFF_MAX=0.02, PUBLISH_TIMEOUT=0.5)
        relay = Relay(conf=conf)

        def attempt() -> bool:
            relay.run_batch()
            return OutboxEvent.objects.get().attempts >= 4 * conf.MAX_ATTEMPTS

        wait_for(attempt, timeout=120, what="many more failed attempts than MAX_ATTEMPTS")
        row = OutboxEvent.objects.get()
        assert row.status == "pending" and "cannot connect to NATS" in row.last_error
        assert row.failing_since is not None

        server.start()
        try:
            wait_for(lambda: relay.run_batch().published == 1, timeout=60, what="the row published after the outage")
            row.refresh_from_db()
            assert row.status == "published" and row.stream_sequence == 1 and row.failing_since is None
        finally:
            relay.broker.close()
            server.kill()


def test_max_attempts_makes_a_row_with_unknown_refusals_dead_and_requeue_publishes_it():
    """A refusal the relay cannot classify (here: a stale Nats-Expected-Last-Sequence, err_code 10071)
    is retried MAX_ATTEMPTS times, then the row is dead; requeued after a fix, it goes out."""
    ticket = ticket_create(title="T", price="1", user_id="u")
    row = OutboxEvent.objects.get()
    OutboxEvent.objects.filter(pk=row.pk).update(headers={**row.headers, "Nats-Expected-Last-Sequence": "999"})
    conf = OutboxSettings(MAX_ATTEMPTS=3, BACKOFF_BASE=0.01, BACKOFF_MAX=0.02)
    relay = Relay(conf=conf)
    wait_for(
        lambda: relay.run_batch() and OutboxEvent.objects.filter(status="dead").exists(),
        timeout=60,
        what="the row to become dead",
    )
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("dead", 3)
    assert "10071" in row.last_error
    assert relay.run_batch().claimed == 0  # dead rows are not retried

    OutboxEvent.objects.filter(pk=row.pk).update(headers={"correlation-id": str(row.pk)})
    assert outbox_requeue(event_ids=[row.id]) == 1
    wait_for(lambda: relay.run_batch().published == 1, timeout=60, what="the requeued row published")
    row.refresh_from_db()
    assert row.status == "published" and str(ticket.id) == row.aggregate_id


def test_oversized_payload_goes_dead_without_blocking_other_aggregates():
    ticket_create(title="small", price="1", user_id="u")
    with transaction.atomic():
        huge = OutboxEvent.objects.create(
            subject="ticket:updated",
            payload={"id": "big", "version": 1, "title": "x" * (2 * 1024 * 1024), "price": 1, "userId": "u"},
            aggregate_type="ticket",
            aggregate_id="big",
            aggregate_version=1,
        )
    ticket_create(title="after", price="1", user_id="u")
    Relay().drain()
    huge.refresh_from_db()
    assert huge.status == "dead" and "too large" in huge.last_error
    assert OutboxEvent.objects.filter(status="published").count() == 2


def test_a_dead_row_holds_back_later_events_of_its_own_aggregate_only():
    insert_ticket_events(aggregates=2, per_aggregate=3, interleave=False)
    first = OutboxEvent.objects.order_by("seq").first()
    OutboxEvent.objects.filter(pk=first.pk).update(status="dead", last_error="simulated")
    Relay().drain()
    blocked = OutboxEvent.objects.filter(aggregate_id=first.aggregate_id).exclude(pk=first.pk)
    assert set(blocked.values_list("status", flat=True)) == {"pending"}
    other = OutboxEvent.objects.exclude(aggregate_id=first.aggregate_id)
    assert set(other.values_list("status", flat=True)) == {"published"}
    outbox_requeue(event_ids=[first.pk])
    Relay().drain()
    assert not OutboxEvent.objects.exclude(status="published").exists()
    assert_stream_matches_outbox(read_stream_fast(TICKETS))


def test_retention_purges_old_published_rows_in_batches_and_never_dead_rows():
    insert_ticket_events(aggregates=10, per_aggregate=3)
    Relay().drain()
    old = timezone.now() - timedelta(days=8)
    OutboxEvent.objects.update(published_at=old)
    dead = OutboxEvent.objects.order_by("seq").last()
    OutboxEvent.objects.filter(pk=dead.pk).update(status="dead", published_at=None, created_at=old)
    fresh = OutboxEvent.objects.order_by("seq").first()
    OutboxEvent.objects.filter(pk=fresh.pk).update(published_at=timezone.now())
    assert outbox_purge_published(batch=7) == 28
    assert set(OutboxEvent.objects.values_list("pk", flat=True)) == {dead.pk, fresh.pk}


def test_outbox_status_json_reports_backlog_and_streams(capsys):
    insert_ticket_events(aggregates=3, per_aggregate=2)
    Relay().run_batch()
    insert_ticket_events(aggregates=1, per_aggregate=2)
    call_command("outbox_status", "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["outbox"]["pending"] == 2
    assert report["outbox"]["published_last_minute"] == 6
    assert report["outbox"]["per_subject"]["ticket:updated"] == {"pending": 2, "published": 6}
    [tickets] = [s for s in report["streams"] if s["stream"] == TICKETS]
    assert tickets["messages"] == 6 and tickets["last_seq"] == 6


def test_kick_with_redis_unreachable_does_not_raise_and_the_write_commits(settings):
    import outbox.kick
    from tests.outbox.test_kick import celery_broker

    settings.OUTBOX = {**settings.OUTBOX, "WAKE": "kick"}
    outbox.kick._local.__dict__.clear()
    try:
        # The kick uses the Celery app's broker (whose CELERY_BROKER_URL environment variable wins
        # over Django's settings), so the app itself is pointed at a port nobody listens on.
        with celery_broker(f"redis://127.0.0.1:{free_port()}/0"):
            assert kick_relay() is False
            ticket_create(title="still written", price="1", user_id="u")  # its on-commit kick fails quietly
    finally:
        outbox.kick._local.__dict__.clear()
    assert OutboxEvent.objects.filter(status="pending").count() == 1
