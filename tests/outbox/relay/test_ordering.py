"""Ownership, ordering and failure paths of the relay's claim and publish (real PostgreSQL and NATS).

test_relay.py attacks the guarantees end to end; this file attacks the pieces the fast path rests on:
partitions held by one relay at a time, the window claim that skips history, blocked aggregates,
the fencing of marks, chains cut by a failure, and the lease mode that SQLite and pgbouncer use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from collections import defaultdict
from datetime import timedelta

import nats
import pytest
from django.db import connection, transaction
from django.utils import timezone

from outbox.conf import outbox_settings
from outbox.models import OutboxEvent
from outbox.relay import PublishResult, Relay
from outbox.relay.chains import publish_rows
from outbox.relay.database import LOCK_CLASS, cursor
from outbox.relay.leases import claim_leased_batch, contiguous_rows
from outbox.relay.marks import PARTITION_FENCE, mark_results, published_sql
from outbox.relay.partitions import CLAIM_SQL, PARTITIONS, Partitions, claim_from_partitions, claim_partitions
from outbox.relay.transport import JetStreamPublisher
from outbox.streams import stream_name
from tests import crashing_relay
from tests.helpers import insert_ticket_events, manage, read_stream_fast, subprocess_env, wait_for
from tests.outbox.relay.test_relay import assert_stream_matches_outbox

pytestmark = pytest.mark.django_db(transaction=True)

TICKETS = stream_name("TICKETS")


def conf(**changes):
    return dataclasses.replace(outbox_settings(), **changes)


def claim(limit: int = 500, inflight: str = "") -> list:
    """One claim over all partitions, as a relay holding them all would run it."""
    with cursor() as cur:
        return claim_from_partitions(cur, limit=limit, window=None, inflight=inflight, partitions=None)


def advisory_locks(*, other_than_us: bool = False) -> int:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            + (" AND pid <> pg_backend_pid()" if other_than_us else ""),
            [LOCK_CLASS],
        )
        return cur.fetchone()[0]


def versions_in_stream(messages: list[dict]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        seen[m["data"]["id"]].append(m["data"]["version"])
    return seen


# --- partitions -------------------------------------------------------------------------


def test_two_relays_split_the_partitions_and_never_hold_the_same_one():
    from django.db import connections

    first, second = Partitions(outbox_settings()), Partitions(outbox_settings())
    with cursor() as cur:
        first.join(cur)
    assert first.held == set(range(PARTITIONS)), "a relay alone takes every partition"
    # The second relay runs on its own session (another thread's connection).
    other = connections.create_connection("default")
    try:
        import psycopg

        other.ensure_connection()
        with psycopg.Cursor(other.connection) as cur2:
            second.join(cur2)
            assert second.held == set(), "all partitions are taken: the newcomer waits"
            with cursor() as cur:
                first.rebalance(cur, busy={0, 1})
            assert len(first.held) == PARTITIONS // 2 and {0, 1} <= first.held, "busy partitions are kept"
            second.rebalance(cur2, busy=set())
            assert len(second.held) == PARTITIONS // 2
            assert not first.held & second.held
            second.leave(cur2)
        with cursor() as cur:
            first.rebalance(cur, busy=set(), greedy=True)
            assert first.held == set(range(PARTITIONS))
            first.leave(cur)
    finally:
        other.close()
    assert advisory_locks() == 0


def test_a_relay_killed_after_its_claim_releases_its_partitions_at_once_and_another_publishes_everything(logs):
    total = insert_ticket_events(aggregates=40, per_aggregate=5)
    env = subprocess_env(OUTBOX_LEASE_SECONDS="600")
    crashed = crashing_relay.start("after-claim", "outbox_relay", "--drain", "--quiet", env=env, log=logs / "crash.log")
    assert crashed.wait(120) == -signal.SIGKILL
    # Its session ended with the process: no partition stays locked, although the lease setting is 10 min.
    wait_for(lambda: advisory_locks() == 0, timeout=30, what="the killed relay's locks to go")
    assert OutboxEvent.objects.filter(status="published").count() == 0
    survivor = manage("outbox_relay", "--drain", "--quiet", log=logs / "survivor.log")
    assert survivor.wait(120) == 0, (logs / "survivor.log").read_text()
    messages = read_stream_fast(TICKETS)
    assert len(messages) == total
    assert_stream_matches_outbox(messages)


def test_a_mark_is_refused_once_the_session_that_held_the_partitions_has_ended():
    insert_ticket_events(aggregates=3, per_aggregate=1)
    rows = claim()
    result = PublishResult(published=[(r, TICKETS, n + 1) for n, r in enumerate(rows)])
    parts = Partitions(outbox_settings())
    with cursor() as cur:
        parts.join(cur)
        live = parts.owner
        parts.leave(cur)
    pid, started = live.split("@", 1)
    gone = f"{int(pid) + 1_000_000}@{started}"
    mark_results(result, owner=gone, conf=outbox_settings(), by_partitions=True)
    assert OutboxEvent.objects.filter(status="published").count() == 0, "a dead owner's mark must not land"
    mark_results(result, owner=live, conf=outbox_settings(), by_partitions=True)
    assert OutboxEvent.objects.filter(status="published").count() == 3


# --- the claim ------------------------------------------------------------------------


def test_the_claim_takes_each_aggregate_in_version_order_and_never_returns_rows_in_flight():
    insert_ticket_events(aggregates=3, per_aggregate=4)
    rows = claim(limit=100)
    by_aggregate = defaultdict(list)
    for row in rows:
        by_aggregate[row.aggregate_id].append(row.aggregate_version)
    assert all(v == [0, 1, 2, 3] for v in by_aggregate.values()), by_aggregate
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    # A row of a batch in flight is not claimed again; the rows after it may be (the publisher
    # chains them behind it), but nothing after a row that is not due.
    head = rows[0]
    again = claim(limit=100, inflight=str(head.seq))
    assert head.id not in {r.id for r in again}
    assert [r.aggregate_version for r in again if r.aggregate_id == head.aggregate_id] == [1, 2, 3]
    OutboxEvent.objects.filter(pk=head.id).update(next_attempt_at=timezone.now() + timedelta(minutes=5))
    later = claim(limit=100, inflight=str(head.seq))
    assert head.aggregate_id not in {r.aggregate_id for r in later}


def test_a_chain_in_a_later_batch_waits_for_the_earlier_batch_and_is_skipped_when_it_failed():
    insert_ticket_events(aggregates=2, per_aggregate=2, interleave=False)
    x0, y0 = claim(limit=2)  # seq order: the first versions, then the second ones
    x1, y1 = claim(limit=100, inflight=f"{x0.seq},{y0.seq}")
    assert (x1.aggregate_id, y1.aggregate_id) == (x0.aggregate_id, y0.aggregate_id)
    assert (x1.after, y1.after, x0.after) == (x0.seq, y0.seq, None)
    x0.headers = {"bad header": "x"}  # refused before sending: its chain fails
    relay = Relay()
    relay.ensure_streams()

    async def two_batches(nc):
        publisher = await JetStreamPublisher.for_client(nc)
        return await asyncio.gather(
            publish_rows(publisher, [x0, y0], timeout=5),
            publish_rows(publisher, [x1, y1], timeout=5),
        )

    first, second = relay.broker.result(relay.broker.submit_client(two_batches), timeout=30)
    assert [r.id for r, _, _ in first.published] == [y0.id]
    assert [r.id for r, _, _ in second.published] == [y1.id], "y1 goes once y0 is in"
    assert [r.id for r in second.skipped] == [x1.id], "x1 must not go out without x0"
    assert [m["data"]["version"] for m in read_stream_fast(TICKETS)] == [0, 1]


def test_a_chain_that_follows_rows_the_publisher_knows_nothing_about_does_not_go():
    insert_ticket_events(aggregates=1, per_aggregate=2)
    (x0,) = claim(limit=1)
    (x1,) = claim(limit=100, inflight=str(x0.seq))
    assert x1.after == x0.seq
    relay = Relay()
    relay.ensure_streams()

    async def orphan(nc):
        publisher = await JetStreamPublisher.for_client(nc)
        return await publish_rows(publisher, [x1], timeout=5)

    result = relay.broker.result(relay.broker.submit_client(orphan), timeout=30)
    assert not result.published and [r.id for r in result.skipped] == [x1.id]


def test_a_chain_behind_a_batch_that_never_reached_the_publisher_does_not_go_on_an_older_record():
    # x0 went out in an earlier batch (its chain is on record, published entirely); the batch
    # holding x1 never reached the publisher (NATS refused it before it started); x2 was claimed
    # behind x1. The record of x0's chain must not let x2 go without x1.
    insert_ticket_events(aggregates=1, per_aggregate=3)
    relay = Relay()
    relay.ensure_streams()

    def publish(rows):
        async def run(nc):
            publisher = await JetStreamPublisher.for_client(nc)
            return await publish_rows(publisher, rows, timeout=5)

        return relay.broker.result(relay.broker.submit_client(run), timeout=30)

    (x0,) = claim(limit=1)
    first = publish([x0])
    assert [r.id for r, _, _ in first.published] == [x0.id]
    OutboxEvent.objects.filter(pk=x0.id).update(status="published")
    x1 = OutboxEvent.objects.get(aggregate_version=1)
    (x2,) = claim(limit=100, inflight=str(x1.seq))
    assert x2.aggregate_version == 2 and x2.after == x1.seq
    third = publish([x2])
    assert not third.published and [r.id for r in third.skipped] == [x2.id]
    assert [m["data"]["version"] for m in read_stream_fast(TICKETS)] == [0]


def test_a_row_backing_off_or_leased_holds_back_its_own_aggregate_only():
    insert_ticket_events(aggregates=3, per_aggregate=2, interleave=False)
    a, b, c = (OutboxEvent.objects.filter(aggregate_version=0).order_by("seq"))[:3]
    later = timezone.now() + timedelta(minutes=5)
    OutboxEvent.objects.filter(pk=a.pk).update(next_attempt_at=later, attempts=1)
    OutboxEvent.objects.filter(pk=b.pk).update(lease_until=later, lease_owner="someone-else")
    rows = claim(limit=100)
    assert {r.aggregate_id for r in rows} == {c.aggregate_id}
    assert [r.aggregate_version for r in rows] == [0, 1]


def test_a_dead_row_holds_back_its_aggregate_in_the_claim():
    insert_ticket_events(aggregates=2, per_aggregate=3, interleave=False)
    dead = OutboxEvent.objects.order_by("seq").first()
    OutboxEvent.objects.filter(pk=dead.pk).update(status="dead")
    rows = claim(limit=100)
    assert {r.aggregate_id for r in rows} == set(OutboxEvent.objects.values_list("aggregate_id", flat=True)) - {
        dead.aggregate_id
    }


def test_the_claim_reads_the_window_not_the_published_history():
    """The buffers a claim touches do not grow with the published history, and nothing scans the table."""

    def claim_plan() -> tuple[int, str]:
        sql = CLAIM_SQL.format(partitions="", window="LIMIT %(window)s")
        params = {"now": timezone.now(), "inflight": "", "limit": 500, "window": 1000, "partitions": None}
        with cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
            plan = cur.fetchone()[0][0]["Plan"]
        return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], json.dumps(plan)

    def add_history(rows: int, offset: int) -> None:
        with connection.cursor() as cur:
            cur.execute(
                """
                INSERT INTO outbox_outboxevent (id, subject, payload, headers, aggregate_type, aggregate_id,
                    aggregate_version, status, attempts, lease_owner, last_error, published_at, stream,
                    stream_sequence)
                SELECT gen_random_uuid(), 'ticket:updated', jsonb_build_object('id', 'h' || (g %% 15000), 'version', g),
                       '{}'::jsonb, 'ticket', 'h' || (g %% 15000), g / 15000, 'published', 1, '', '',
                       now() - interval '1 hour', 'X', g
                FROM generate_series(%s, %s) AS g
                """,
                [offset, offset + rows - 1],
            )
            cur.execute("ANALYZE outbox_outboxevent")

    add_history(50_000, 0)
    insert_ticket_events(aggregates=200, per_aggregate=5)
    some, _ = claim_plan()
    add_history(150_000, 50_000)
    more, plan = claim_plan()
    assert more <= some * 1.2 + 20, (some, more)
    assert '"Seq Scan"' not in plan, plan


def test_claims_and_marks_keep_their_plans_on_a_backlog_the_table_has_no_statistics_of():
    """A backlog bulk-loaded into a table with no statistics (the operator's case after an outage):
    the claim still walks ``outbox_pending_seq`` and stops after its window, and the mark still
    finds its rows by primary key — with ``'pending'`` written out, the planner believed the
    pending set tiny and hash-joined the batch against a scan of every pending row."""
    with connection.cursor() as cur:
        cur.execute("DELETE FROM pg_statistic WHERE starelid = 'outbox_outboxevent'::regclass")
        cur.execute(
            """
            INSERT INTO outbox_outboxevent (id, subject, payload, headers, aggregate_type, aggregate_id,
                aggregate_version, status, attempts, lease_owner, last_error, stream)
            SELECT gen_random_uuid(), 'ticket:updated', jsonb_build_object('id', 'b' || g, 'version', 0),
                   '{}'::jsonb, 'ticket', 'b' || g, 0, 'pending', 0, '', '', ''
            FROM generate_series(1, 30000) AS g
            """
        )
        cur.execute("SELECT reltuples, count(s.*) FROM pg_class c LEFT JOIN pg_statistic s ON s.starelid = c.oid "
                    "WHERE c.oid = 'outbox_outboxevent'::regclass GROUP BY reltuples")  # fmt: skip
        assert cur.fetchone() == (-1.0, 0)  # never analyzed, no column statistics
    with cursor() as cur:
        sql = CLAIM_SQL.format(partitions="", window="LIMIT %(window)s")
        params = {"now": timezone.now(), "inflight": "", "limit": 100, "window": 200}
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        claim_plan = json.dumps(cur.fetchone()[0][0]["Plan"])
        ids = [str(i) for i in OutboxEvent.objects.order_by("seq").values_list("id", flat=True)[:100]]
        mark = published_sql(async_commit="", fence=PARTITION_FENCE, one_stream=True)
        cur.execute(
            "EXPLAIN (FORMAT JSON) " + mark,
            {
                "now": timezone.now(),
                "ids": ",".join(ids),
                "sseqs": ",".join(str(n) for n in range(1, 101)),
                "stream": "TICKETS",
                "owner": "1@2026-01-01 00:00:00+00",
            },
        )
        mark_plan = json.dumps(cur.fetchone()[0][0]["Plan"])
    assert '"Index Name": "outbox_pending_seq"' in claim_plan and "Bitmap" not in claim_plan, claim_plan
    assert '"Actual Rows": 200' in claim_plan, claim_plan  # the window, not the 30,000 pending rows
    assert '"Index Name": "outbox_outboxevent_pkey"' in mark_plan, mark_plan
    assert "outbox_pending_seq" not in mark_plan and "Hash Join" not in mark_plan, mark_plan


def test_the_claim_after_a_wake_up_is_prepared_and_claims_behind_batches_in_flight_are_not():
    """The claim with nothing in flight skips planning; one behind batches in flight is planned for
    its parameters (a generic plan cannot know how many seqs are in flight, and did not hash them)."""
    insert_ticket_events(aggregates=50, per_aggregate=2)

    def executions() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT coalesce(sum(generic_plans + custom_plans), 0) FROM pg_prepared_statements")
            return cur.fetchone()[0]

    with cursor() as cur:
        first = claim_partitions(cur, limit=10, window=20, inflight="", partitions=None)[0]
    # Django's cursor and the relay's share the session: the prepared statement is visible here.
    assert executions() == 1
    inflight = ",".join(str(r.seq) for r in first)
    with cursor() as cur:
        behind = claim_partitions(cur, limit=10, window=40, inflight=inflight, partitions=None)[0]
    assert executions() == 1, "a claim behind batches in flight ran the prepared statement"
    assert behind and not {r.seq for r in behind} & {r.seq for r in first}
    with cursor() as cur:
        claim_partitions(cur, limit=10, window=20, inflight="", partitions=None)
    assert executions() == 2


# --- publishing -----------------------------------------------------------------------


def test_a_refused_publish_cuts_its_chain_and_later_versions_wait_while_other_aggregates_go():
    """JetStream refuses one message for good (over the stream's max_msg_size, err_code 10054): it is
    dead at once, and its aggregate stops there while the others go."""
    insert_ticket_events(aggregates=3, per_aggregate=3, interleave=False)
    victim = OutboxEvent.objects.filter(aggregate_version=1).order_by("seq").first()
    payload = dict(victim.payload, title="x" * 2000)
    OutboxEvent.objects.filter(pk=victim.pk).update(payload=payload)
    relay = Relay(conf=conf(BATCH_SIZE=100, BACKOFF_BASE=60.0, BACKOFF_MAX=60.0))
    relay.ensure_streams()

    async def limit_size() -> None:
        nc = await nats.connect(os.environ["NATS_URL"])
        try:
            js = nc.jetstream()
            info = await js.stream_info(TICKETS)
            await js.update_stream(info.config.evolve(max_msg_size=1024))
        finally:
            await nc.close()

    asyncio.run(limit_size())
    report = relay.drain()
    assert report.published == 7 and report.failed == 1
    victim.refresh_from_db()
    assert victim.status == "dead" and victim.attempts == 1 and "10054" in victim.last_error
    after = OutboxEvent.objects.get(aggregate_id=victim.aggregate_id, aggregate_version=2)
    assert after.status == "pending" and after.attempts == 0, "the version after a failure must not be tried"
    seen = versions_in_stream(read_stream_fast(TICKETS))
    assert seen[victim.aggregate_id] == [0]
    assert sorted(len(v) for v in seen.values()) == [1, 3, 3]


def test_an_invalid_header_name_makes_the_row_dead_without_blocking_other_aggregates():
    insert_ticket_events(aggregates=2, per_aggregate=2, interleave=False)
    bad = OutboxEvent.objects.order_by("seq").first()
    OutboxEvent.objects.filter(pk=bad.pk).update(headers={"bad header": "x"})
    report = Relay().drain()
    bad.refresh_from_db()
    assert bad.status == "dead" and "invalid header name" in bad.last_error
    assert report.published == 2
    assert set(OutboxEvent.objects.exclude(aggregate_id=bad.aggregate_id).values_list("status", flat=True)) == {
        "published"
    }


def test_deep_backlogs_on_few_aggregates_go_out_in_version_order_through_a_deep_pipeline():
    insert_ticket_events(aggregates=4, per_aggregate=150, interleave=False)
    insert_ticket_events(aggregates=3, per_aggregate=100)
    report = Relay(conf=conf(BATCH_SIZE=40, PIPELINE_DEPTH=4)).drain()
    assert report.published == 900
    assert_stream_matches_outbox(read_stream_fast(TICKETS))


def test_the_public_publish_path_gives_the_same_stream():
    insert_ticket_events(aggregates=20, per_aggregate=5)
    report = Relay(conf=conf(WIRE_PUBLISH=False, BATCH_SIZE=30)).drain()
    assert report.published == 100
    messages = read_stream_fast(TICKETS)
    assert_stream_matches_outbox(messages)
    assert {"Nats-Msg-Id", "aggregate-type", "aggregate-id", "aggregate-version", "correlation-id"} <= set(
        messages[0]["headers"]
    )


# --- the lease mode (SQLite, pgbouncer) ----------------------------------------------------


def test_lease_mode_drains_in_version_order_and_leaves_no_lease_behind():
    insert_ticket_events(aggregates=30, per_aggregate=10)
    report = Relay(conf=conf(OWNERSHIP="leases", BATCH_SIZE=50)).drain()
    assert report.published == 300
    assert not OutboxEvent.objects.filter(lease_until__isnull=False).exists()
    assert_stream_matches_outbox(read_stream_fast(TICKETS))


def test_lease_mode_claims_lease_rows_and_a_second_claim_skips_their_aggregates():
    insert_ticket_events(aggregates=4, per_aggregate=3)
    first = claim_leased_batch(limit=3, lease_seconds=30, owner="first")
    assert len({r.aggregate_id for r in first}) == 3
    assert OutboxEvent.objects.filter(lease_owner="first").count() == 3
    second = claim_leased_batch(limit=100, lease_seconds=30, owner="second")
    assert len({r.aggregate_id for r in second}) == 1
    assert {r.aggregate_id for r in first}.isdisjoint({r.aggregate_id for r in second})
    assert [r.aggregate_version for r in second] == [0, 1, 2]


def test_lease_mode_drops_rows_after_a_hole_in_their_chain():
    rows = {f"r{n}": object() for n in range(4)}
    chosen = [("r0", ("t", "a")), ("r1", ("t", "a")), ("r2", ("t", "a")), ("r3", ("t", "b"))]
    leased = {"r0": rows["r0"], "r2": rows["r2"], "r3": rows["r3"]}  # r1 changed under the claim
    kept, released = contiguous_rows(chosen, leased)
    assert kept == [rows["r0"], rows["r3"]]
    assert released == ["r2"]


def test_inside_a_transaction_block_the_relay_sees_and_marks_the_callers_uncommitted_rows():
    with transaction.atomic():
        insert_ticket_events(aggregates=30, per_aggregate=4)
        report = Relay(conf=conf(BATCH_SIZE=20)).drain()
        assert report.published == 120
        assert not OutboxEvent.objects.exclude(status="published").exists()
        insert_ticket_events(aggregates=2, per_aggregate=2)
        assert Relay().run_batch().published == 4
    assert advisory_locks() == 0
    assert_stream_matches_outbox(read_stream_fast(TICKETS))


def test_no_relay_leaves_partition_locks_behind_after_drain_or_run_batch():
    insert_ticket_events(aggregates=5, per_aggregate=2)
    relay = Relay()
    relay.run_batch()
    assert advisory_locks() == 0
    insert_ticket_events(aggregates=5, per_aggregate=2)
    relay.drain()
    assert advisory_locks() == 0


# --- the worker sessions ----------------------------------------------------------------


def session_pids(relay: Relay) -> list[int]:
    def pid() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]

    return [session.submit(pid).result(timeout=30) for session in relay.sessions]


def test_a_relay_keeps_its_worker_sessions_between_drains_and_replaces_one_the_server_terminated():
    relay = Relay()
    relay.ensure_streams()
    insert_ticket_events(aggregates=4, per_aggregate=2)
    assert relay.drain().published == 8
    first = session_pids(relay)
    assert len(first) == 2
    insert_ticket_events(aggregates=4, per_aggregate=2)
    assert relay.drain().published == 8
    assert session_pids(relay) == first, "a drain must not open new database sessions"

    with connection.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [first[0]])
    wait_for(lambda: first[0] not in all_backend_pids(), timeout=30, what="the session to end")
    insert_ticket_events(aggregates=4, per_aggregate=2)
    assert relay.drain().published == 8, "the relay opens a new session in place of the terminated one"
    replaced = session_pids(relay)
    assert replaced[0] != first[0] and replaced[1] == first[1]
    relay.close_sessions()
    assert relay.sessions == []


def all_backend_pids() -> set[int]:
    with connection.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity")
        return {r[0] for r in cur.fetchall()}
