"""``manage.py listen`` applies every event exactly once and in version order, across crashes and restarts.

Real PostgreSQL and NATS JetStream; listeners run in this process (``call_command``)
where nothing has to die, as child processes where something does.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command

from listeners.models import InboxEntry
from outbox.streams import stream_name
from tests import helpers
from tests.helpers import read_stream, stop, wait_for
from tests.listeners.helpers import (
    REPLICA,
    consumer_info,
    event_id,
    log_lines,
    outcomes,
    publish,
    publish_again_after_dedup_window,
    settled,
    setup_streams,
    start_listener,
    summary,
    ticket,
    tickets,
)
from ticketing.replica.models import TicketReplica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("isolated_streams")]

BOTH = ("ticket:created", "ticket:updated")


def listen(*args: str) -> tuple[int, dict[str, int]]:
    out = io.StringIO()
    call_command("listen", *BOTH, *args, stdout=out)
    return summary(out.getvalue())


def replica_versions() -> dict[str, int]:
    return dict(TicketReplica.objects.values_list("id", "version"))


def assert_each_applied_once(messages) -> None:
    ids = Counter(InboxEntry.objects.filter(consumer=REPLICA).values_list("event_id", flat=True))
    assert ids.keys() == {event_id(m) for m in messages}
    assert set(ids.values()) == {1}
    assert set(InboxEntry.objects.values_list("outcome", flat=True)) == {"applied"}


def final_versions(messages) -> dict[str, int]:
    versions: dict[str, int] = {}
    for _, _, headers in messages:
        tid, version = headers["aggregate-id"], int(headers["aggregate-version"])
        versions[tid] = max(versions.get(tid, -1), version)
    return versions


# --- duplicates and order -------------------------------------------------------------


def test_same_event_stored_twice_after_the_dedup_window_is_applied_once():
    created = ticket("t1", 0)
    publish([created])
    # A late re-publish (e.g. a relay whose lease expired) stores a second copy with the same event id.
    second = publish_again_after_dedup_window(created)
    updated = ticket("t1", 1)
    publish([updated])
    copies = [m for m in read_stream(stream_name("TICKETS")) if m["headers"]["Nats-Msg-Id"] == event_id(created)]
    assert [m["seq"] for m in copies] == [1, second.seq] and second.seq == 2

    # Both copies arrive in one batch: the second is absorbed by the inbox, not by the version rule.
    assert listen("--max-messages", "3", "--idle-exit", "30") == (3, {"applied": 2, "duplicate": 1})

    # A third copy, long after the first was applied and acked, in a later batch of a later run.
    publish_again_after_dedup_window(created)
    assert listen("--max-messages", "1", "--idle-exit", "30") == (1, {"duplicate": 1})

    assert InboxEntry.objects.filter(event_id=event_id(created)).count() == 1
    assert_each_applied_once([created, updated])
    assert TicketReplica.objects.get(pk="t1").title == "t1 v1"
    assert settled()


@pytest.mark.parametrize("batch", [1, 100])
def test_versions_published_0_2_1_are_applied_in_order_0_1_2(batch, caplog):
    v0, v1, v2 = ticket("t1", 0), ticket("t1", 1), ticket("t1", 2)
    publish([v0, v2, v1])
    caplog.set_level(logging.INFO, logger="listeners.events")

    assert listen("--batch", str(batch), "--max-messages", "3", "--idle-exit", "30") == (3, {"applied": 3})

    replica = TicketReplica.objects.get(pk="t1")
    assert (replica.version, replica.title) == (2, "t1 v2")
    # Order of application = inbox order; stream order was v0 (seq 1), v2 (seq 2), v1 (seq 3).
    applied = list(InboxEntry.objects.order_by("id").values_list("event_id", "stream_sequence"))
    assert applied == [(event_id(v0), 1), (event_id(v1), 3), (event_id(v2), 2)]
    # Version 2 came first and was sent back to wait for version 1.
    events = [(r.getMessage(), r.created) for r in caplog.records if "listener.event" in r.getMessage()]
    seen = [(re.search(r"version=(\d+)", m).group(1), re.search(r"outcome=(\S+)", m).group(1)) for m, _ in events]
    assert seen[0] == ("0", "applied")
    assert seen.index(("2", "waiting")) < seen.index(("1", "applied")) < seen.index(("2", "applied"))


# --- crashes --------------------------------------------------------------------------


def test_crash_after_commit_before_ack_redelivers_as_duplicate_and_applies_nothing_twice(tmp_path: Path):
    messages = [ticket("t1", 0), ticket("t1", 1), ticket("t1", 2), ticket("t2", 0), ticket("t2", 1)]
    publish(messages)

    # The fault hook SIGKILLs the process right after the first batch committed, before any ack.
    crashed = start_listener(*BOTH, "--batch", "10", "--ack-wait", "2", log=tmp_path / "1.log", crash_after_commit=1)
    assert crashed.wait(60) == -signal.SIGKILL
    assert_each_applied_once(messages)
    assert replica_versions() == {"t1": 2, "t2": 1}
    assert consumer_info().num_ack_pending == 5  # applied, committed, never acked

    restarted = start_listener(*BOTH, "--ack-wait", "2", "--max-messages", "5", log=tmp_path / "2.log")
    assert restarted.wait(60) == 0
    assert outcomes(tmp_path / "2.log") == {"duplicate": 5}
    assert_each_applied_once(messages)
    assert replica_versions() == {"t1": 2, "t2": 1}
    assert settled()


def _lock_replica_row(ticket_id: str) -> psycopg.Connection:
    """Hold a row lock on a replica from outside Django, so a listener's batch blocks mid-transaction."""
    conn = psycopg.connect(helpers.test_database_url())
    conn.execute("SELECT 1 FROM replica_ticketreplica WHERE id = %s FOR UPDATE", [ticket_id])
    return conn


def _blocked_on_a_lock() -> bool:
    with psycopg.connect(helpers.test_database_url(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return row[0] > 0


def test_kill_inside_the_batch_transaction_commits_nothing_and_restart_applies_each_once(tmp_path: Path):
    first = [ticket("t1", 0)]
    publish(first)
    assert listen("--max-messages", "1", "--idle-exit", "30") == (1, {"applied": 1})
    rest = [ticket("t1", 1), ticket("t1", 2), ticket("t2", 0), ticket("t3", 0)]
    publish(rest)

    lock = _lock_replica_row("t1")
    try:
        proc = start_listener(*BOTH, "--batch", "10", "--ack-wait", "2", log=tmp_path / "1.log")
        wait_for(_blocked_on_a_lock, timeout=60, what="the listener's batch to block on the locked row")
        stop(proc, sig=signal.SIGKILL)
    finally:
        lock.rollback()
        lock.close()
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: not _blocked_on_a_lock(), timeout=30, what="the killed session to end")
    assert replica_versions() == {"t1": 0}  # nothing of the killed batch committed
    assert InboxEntry.objects.count() == 1

    assert listen("--ack-wait", "2", "--max-messages", "4", "--idle-exit", "60") == (4, {"applied": 4})
    assert_each_applied_once(first + rest)
    assert replica_versions() == {"t1": 2, "t2": 0, "t3": 0}
    assert settled()


def test_second_signal_exits_at_once_with_the_batch_uncommitted(tmp_path: Path):
    publish([ticket("t1", 0)])
    assert listen("--max-messages", "1", "--idle-exit", "30") == (1, {"applied": 1})
    publish([ticket("t1", 1)])
    log = tmp_path / "listen.log"

    lock = _lock_replica_row("t1")
    try:
        proc = start_listener(*BOTH, "--ack-wait", "2", log=log)
        wait_for(_blocked_on_a_lock, timeout=60, what="the listener's batch to block on the locked row")
        os.killpg(proc.pid, signal.SIGTERM)
        wait_for(lambda: log_lines(log, "listener.stopping"), timeout=30, what="the first signal to be heard")
        assert proc.poll() is None  # graceful: it waits for the batch in hand, which waits for the lock
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 130
    finally:
        lock.rollback()
        lock.close()
    wait_for(lambda: not _blocked_on_a_lock(), timeout=30, what="the abandoned session to end")
    assert replica_versions() == {"t1": 0}

    assert listen("--ack-wait", "2", "--max-messages", "1", "--idle-exit", "60") == (1, {"applied": 1})
    assert replica_versions() == {"t1": 1}


def test_sigterm_mid_run_exits_0_and_a_restart_applies_every_event_exactly_once(tmp_path: Path):
    messages = tickets(250, 20)  # 5,000 events
    publish(messages)

    proc = start_listener(*BOTH, "--batch", "50", "--ack-wait", "120", log=tmp_path / "1.log")
    wait_for(lambda: InboxEntry.objects.count() >= 300, timeout=120, what="the listener to apply some events")
    # The signal arrives while a batch is inside its transaction (held at its inbox INSERT):
    # that batch must still commit and be acked, and nothing after it fetched.
    lock = _lock_inbox_table()
    try:
        wait_for(_blocked_on_a_lock, timeout=60, what="a batch to block inside its transaction")
        os.killpg(proc.pid, signal.SIGTERM)
        wait_for(lambda: log_lines(tmp_path / "1.log", "listener.stopping"), timeout=30, what="the signal heard")
    finally:
        lock.rollback()
        lock.close()
    assert proc.wait(30) == 0
    applied_before = InboxEntry.objects.count()
    assert applied_before < len(messages), "stopped too late to test anything; publish more"

    # Everything the stopped process held was acked or handed back, so nothing waits for the
    # consumer's ack_wait (120 s here): a restart that gives up after 6 idle seconds still gets it all.
    restarted = start_listener(*BOTH, "--batch", "50", "--idle-exit", "6", log=tmp_path / "2.log")
    assert restarted.wait(150) == 0
    assert InboxEntry.objects.count() == len(messages)
    assert settled()

    assert_each_applied_once(messages)
    assert replica_versions() == final_versions(messages)
    assert "stale" not in outcomes(tmp_path / "1.log") | outcomes(tmp_path / "2.log")


def test_two_processes_sharing_the_durable_apply_each_event_once(tmp_path: Path):
    messages = tickets(100, 20)  # 2,000 events over 100 tickets
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    setup_streams()  # the producer's step: a listener only checks its streams
    procs = [start_listener(*BOTH, "--batch", "50", log=log) for log in logs]
    try:
        for log in logs:
            wait_for(lambda log=log: log_lines(log, "listener.ready"), timeout=60, what=f"{log.name} ready")
        publish(messages)
        wait_for(lambda: InboxEntry.objects.count() == len(messages), timeout=150, what="every event applied")
        wait_for(settled, timeout=30, what="every message acked")
    finally:
        codes = [stop(p, sig=signal.SIGTERM) for p in procs]
    assert codes == [0, 0]

    assert_each_applied_once(messages)
    assert replica_versions() == final_versions(messages)
    per_process = [outcomes(log).get("applied", 0) for log in logs]
    assert all(per_process) and sum(per_process) == len(messages), per_process


# --- NATS going away ------------------------------------------------------------------


def test_listener_rides_out_a_nats_restart_and_loses_nothing(private_nats, tmp_path: Path):
    before, after = tickets(40, 10, seed=1), [ticket(f"n{n}", 0) for n in range(200)]
    publish(before)
    log = tmp_path / "listen.log"
    proc = start_listener(*BOTH, "--batch", "20", "--ack-wait", "5", log=log)
    try:
        wait_for(lambda: InboxEntry.objects.count() >= 50, timeout=60, what="some events applied")
        private_nats.kill()
        wait_for(lambda: len(log_lines(log, r"nats: .*(refused|Connect call failed)")) >= 3, timeout=60,
                 what="the listener to fail reconnecting a few times")  # fmt: skip
        private_nats.start()
        wait_for(lambda: _published(after), timeout=60, what="the restarted server to take new events")
        everything = before + after
        wait_for(lambda: InboxEntry.objects.count() == len(everything), timeout=120, what="every event applied")
        wait_for(settled, timeout=30, what="every message acked")
    finally:
        assert stop(proc, sig=signal.SIGTERM) == 0
    assert_each_applied_once(everything)
    assert replica_versions() == final_versions(everything)


def _published(messages) -> bool:
    try:
        publish(messages)  # idempotent: the same Nats-Msg-Ids within the duplicate window
    except Exception:  # noqa: BLE001 - JetStream still recovering its streams
        return False
    return True


# --- replay ---------------------------------------------------------------------------


def test_from_start_replays_the_stream_and_with_reset_rebuilds_the_replica():
    messages = [ticket("t1", 0), ticket("t1", 1), ticket("t2", 0)]
    publish(messages)
    assert listen("--max-messages", "3", "--idle-exit", "30") == (3, {"applied": 3})
    TicketReplica.objects.filter(pk="t1").update(title="damaged")

    # Without --reset the replica is kept: every replayed event is already there.
    assert listen("--from-start", "--max-messages", "3", "--idle-exit", "30") == (3, {"stale": 3})
    assert TicketReplica.objects.get(pk="t1").title == "damaged"
    assert InboxEntry.objects.count() == 3

    assert listen("--from-start", "--reset", "--max-messages", "3", "--idle-exit", "30") == (3, {"applied": 3})
    assert TicketReplica.objects.get(pk="t1").title == "t1 v1"
    assert replica_versions() == {"t1": 1, "t2": 0}
    assert_each_applied_once(messages)
    assert settled()


# --- the database going away ----------------------------------------------------------


def _terminate_other_sessions() -> int:
    """Kill every session of the test database except this test's own (the listener's, that is)."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        mine = cur.fetchone()[0]
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> %s AND backend_type = 'client backend'",
            [mine],
        )
        return cur.fetchone()[0]


def _lock_inbox_table() -> psycopg.Connection:
    """Hold an EXCLUSIVE lock on the inbox from outside Django: reads pass, a batch's inbox INSERT waits.

    The listener's batch then sits mid-transaction (its replica rows locked and written)
    until the lock goes: a deterministic moment to take the database away from it.
    """
    conn = psycopg.connect(helpers.test_database_url())
    conn.execute("LOCK TABLE listeners_inboxentry IN EXCLUSIVE MODE")
    return conn


def _close_quietly(conn: psycopg.Connection) -> None:
    try:
        conn.close()
    except psycopg.Error:
        pass


def test_database_connection_lost_mid_run_is_retried_in_place_without_spending_deliveries(tmp_path: Path):
    messages = tickets(100, 20, seed=3)
    chunks = [messages[start : start + 500] for start in range(0, len(messages), 500)]
    log = tmp_path / "listen.log"
    setup_streams()  # the producer's step: a listener only checks its streams
    proc = start_listener(*BOTH, "--batch", "50", log=log)
    try:
        wait_for(lambda: log_lines(log, "listener.ready"), timeout=60, what="the listener to be ready")
        for round_, chunk in enumerate(chunks[:3], start=1):
            lock = _lock_inbox_table()
            try:
                publish(chunk)
                wait_for(_blocked_on_a_lock, timeout=60, what="a batch to block inside its transaction")
                # Kills the listener's session mid-batch (and the lock holder's, which frees the table).
                wait_for(_terminate_other_sessions, timeout=30, what="the listener's session to kill")
            finally:
                _close_quietly(lock)
            wait_for(lambda r=round_: len(log_lines(log, "listener.batch_failed")) >= r, timeout=30,
                     what="the listener to notice")  # fmt: skip
            # The retried batch and the rest of the chunk go through before the next round.
            applied = sum(map(len, chunks[:round_]))
            wait_for(lambda n=applied: InboxEntry.objects.count() == n, timeout=60, what="the chunk applied")
        publish(chunks[3])
        wait_for(lambda: InboxEntry.objects.count() == len(messages), timeout=120, what="every event applied")
        wait_for(settled, timeout=30, what="every message acked")
    finally:
        assert stop(proc, sig=signal.SIGTERM) == 0
    assert_each_applied_once(messages)
    assert replica_versions() == final_versions(messages)
    # The failed batches were retried by the process that held them: no redelivery, no dead letter.
    assert not log_lines(log, r"deliveries=(?!1 )")
    assert consumer_info().num_redelivered == 0


def test_a_database_outage_longer_than_ack_wait_spends_no_delivery_of_the_batch_or_of_those_behind_it(
    tmp_path: Path,
):
    """The batch in hand and the messages the open pull delivered behind it are all kept in progress."""
    from django.db import connection

    messages = [ticket(f"o{n:02d}", 0) for n in range(30)]
    log = tmp_path / "listen.log"
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        ours = cur.fetchone()[0]
    admin = psycopg.connect(helpers.test_database_url().rsplit("/", 1)[0] + "/postgres", autocommit=True)
    setup_streams()  # the producer's step: a listener only checks its streams
    proc = start_listener(*BOTH, "--batch", "5", "--ack-wait", "2", log=log)
    try:
        wait_for(lambda: log_lines(log, "listener.ready"), timeout=60, what="the listener to be ready")
        try:
            # No session of the listener survives, and no new one can open, until the database comes back.
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> %s "
                "AND backend_type = 'client backend'",
                [name, ours],
            )
            publish(messages)
            # Attempt 10 comes after several ack_waits (2 s) of outage.
            wait_for(lambda: log_lines(log, r"listener\.batch_failed .*attempt=10 "), timeout=120,
                     what="the batch to fail ten times")  # fmt: skip
            # A batch in hand and more buffered behind it. (How many the batch took depends on how the
            # published messages met the open pull: one credit of 5 may be spent as 1 in hand + 4 behind.)
            [tenth] = log_lines(log, r"listener\.batch_failed .*attempt=10 ")
            in_hand = int(re.search(r" messages=(\d+) ", tenth).group(1))
            assert consumer_info().num_ack_pending > in_hand
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        wait_for(lambda: InboxEntry.objects.count() == len(messages), timeout=120, what="every event applied")
        wait_for(settled, timeout=30, what="every message acked")
    finally:
        admin.close()
        assert stop(proc, sig=signal.SIGTERM) == 0
    assert_each_applied_once(messages)
    assert not log_lines(log, r"deliveries=(?!1 )")
    assert consumer_info().num_redelivered == 0


def test_a_batch_stuck_on_a_lock_longer_than_ack_wait_is_not_redelivered_nor_are_those_behind_it(tmp_path: Path):
    """A batch waits on a row lock for several ack_waits; it and the messages buffered behind it stay in progress."""
    first = ticket("s00", 0)
    rest = [ticket("s00", 1)] + [ticket(f"s{n:02d}", 0) for n in range(1, 20)]
    log = tmp_path / "listen.log"
    setup_streams()  # the producer's step: a listener only checks its streams
    proc = start_listener(*BOTH, "--batch", "5", "--ack-wait", "2", log=log)
    try:
        publish([first])
        wait_for(lambda: InboxEntry.objects.count() == 1, timeout=60, what="the first event applied")
        lock = _lock_replica_row("s00")
        try:
            publish(rest)
            wait_for(_blocked_on_a_lock, timeout=60, what="a batch to block on the row lock")
            # One line per ack_wait / 2 (1 s): four of them are two ack_waits.
            wait_for(lambda: len(log_lines(log, r"listener\.batch_slow ")) >= 4, timeout=120,
                     what="the batch to be kept in progress for two ack_waits")  # fmt: skip
            # A batch in hand and more buffered behind it (see the outage test above).
            slow = log_lines(log, r"listener\.batch_slow ")[-1]
            in_hand = int(re.search(r" messages=(\d+) ", slow).group(1))
            assert consumer_info().num_ack_pending > in_hand
        finally:
            _close_quietly(lock)
        wait_for(lambda: InboxEntry.objects.count() == 1 + len(rest), timeout=120, what="every event applied")
        wait_for(settled, timeout=30, what="every message acked")
    finally:
        assert stop(proc, sig=signal.SIGTERM) == 0
    assert_each_applied_once([first, *rest])
    assert not log_lines(log, r"deliveries=(?!1 )")
    assert consumer_info().num_redelivered == 0


def _count_health_checks(monkeypatch) -> list[int]:
    """Every ``is_usable()`` (the ``SELECT 1`` of ``CONN_HEALTH_CHECKS``) any connection runs from now on."""
    from django.db import connections

    calls: list[int] = []
    cls = type(connections["default"])
    real = cls.is_usable

    def is_usable(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(cls, "is_usable", is_usable)
    return calls


def test_a_steady_flow_checks_its_database_connection_once_not_before_every_batch(monkeypatch):
    """A connection that served a batch a moment ago needs no SELECT 1 round trip before the next."""
    monkeypatch.setattr("listeners.db_health.DB_CHECK_INTERVAL", 3600.0)  # the whole run is one steady stretch
    messages = [ticket(f"c{n}", 0) for n in range(10)]
    publish(messages)
    checks = _count_health_checks(monkeypatch)

    assert listen("--batch", "1", "--max-messages", "10", "--idle-exit", "30") == (10, {"applied": 10})

    assert len(checks) <= 1  # not one per batch
    assert_each_applied_once(messages)


def test_a_connection_ended_while_the_listener_was_idle_is_replaced_before_the_next_batch(monkeypatch, caplog):
    """Idle longer than the interval (0 here), the next batch checks its connection first: no failed batch."""
    import threading

    from django.db import connection

    monkeypatch.setattr("listeners.db_health.DB_CHECK_INTERVAL", 0.0)
    caplog.set_level(logging.INFO, logger="listeners")
    first, second = ticket("i1", 0), ticket("i2", 0)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        ours = cur.fetchone()[0]
    problems: list[BaseException] = []

    def meanwhile() -> None:  # the listener runs in the main thread (it installs signal handlers)
        try:
            with psycopg.connect(helpers.test_database_url(), autocommit=True) as admin:
                publish([first])
                wait_for(lambda: admin.execute("SELECT count(*) FROM listeners_inboxentry").fetchone()[0] == 1,
                         timeout=60, what="the first event applied")  # fmt: skip
                ended = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND pid NOT IN (%s, pg_backend_pid()) AND backend_type = 'client backend'",
                    [ours],
                ).fetchone()[0]
                assert ended >= 1  # the listener's session
                publish([second])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            problems.append(exc)

    helper = threading.Thread(target=meanwhile)
    setup_streams()  # the producer's step: a listener only checks its streams
    helper.start()
    try:
        assert listen("--max-messages", "2", "--idle-exit", "60") == (2, {"applied": 2})
    finally:
        helper.join(120)
    assert not problems, problems
    assert not [r for r in caplog.records if "listener.batch_failed" in r.getMessage()]
    assert_each_applied_once([first, second])


def test_stopping_hands_back_messages_a_late_pull_left_in_the_client_buffer():
    """A pull can deliver after the last batch was taken; unacked, those would wait ack_wait (120 s) for anyone."""
    import asyncio
    import json

    from listeners.pull import OpenPull
    from listeners.registry import listeners_for
    from listeners.runner import ListenerRunner

    publish([ticket("t1", 0), ticket("t2", 0), ticket("t3", 0)])

    async def scenario() -> list[int]:
        runner = ListenerRunner(listeners_for(list(BOTH)), subjects=list(BOTH), ack_wait=120)
        js = await runner.connect()
        plan = runner.plans[0]
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        # A pull request answered into the subscription, with no batch waiting for it.
        await runner.nc.publish(psub._nms, json.dumps({"batch": 3, "no_wait": True}).encode(), reply=psub._deliver)
        for _ in range(200):
            if psub.pending_msgs >= 3:
                break
            await asyncio.sleep(0.05)
        assert psub.pending_msgs >= 3
        await runner.hand_back(OpenPull(runner.nc, psub, expires=1.0), plan)
        await runner.nc.flush()
        again = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        msgs = await again.fetch(3, timeout=5)  # at once, not after ack_wait
        for msg in msgs:
            await msg.nak()
        await runner.close()
        return [m.metadata.num_delivered for m in msgs]

    assert asyncio.run(scenario()) == [2, 2, 2]


def test_stopping_hands_back_messages_still_on_the_way_from_an_open_pull():
    """The listener keeps a pull open; what the server sent just before the stop must not be dropped unacked."""
    import asyncio
    import json
    import threading

    from listeners.pull import OpenPull
    from listeners.registry import listeners_for
    from listeners.runner import ListenerRunner
    from tests.listeners.helpers import _with_js

    publish([ticket("t1", 0), ticket("t2", 0), ticket("t3", 0)])

    def deliver_unread(psub) -> None:
        """From another connection, have the server send 3 messages to the listener's inbox, and wait until it did."""

        async def work(js):
            await js._nc.publish(psub._nms, json.dumps({"batch": 3, "expires": 30 * 10**9}).encode(),
                                 reply=psub._deliver)  # fmt: skip
            for _ in range(400):
                if (await js.consumer_info(plan.stream, plan.durable)).num_ack_pending == 3:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the server did not deliver the 3 messages")

        asyncio.run(_with_js(work))

    async def scenario() -> list[int]:
        nonlocal plan
        runner = ListenerRunner(listeners_for(list(BOTH)), subjects=list(BOTH), ack_wait=120)
        js = await runner.connect()
        plan = runner.plans[0]
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        pull = OpenPull(runner.nc, psub, expires=30.0)
        await runner.nc.flush()  # the subscription is known to the server
        # The loop is held while the server delivers: the messages wait, unread, in the socket
        # when the stop begins — as with a pull answered just before a SIGTERM.
        helper = threading.Thread(target=deliver_unread, args=(psub,))
        helper.start()
        helper.join()
        await runner.hand_back(pull, plan)
        again = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        msgs = await again.fetch(3, timeout=10)  # at once, not after ack_wait (120 s)
        for msg in msgs:
            await msg.nak()
        await runner.close()
        return [m.metadata.num_delivered for m in msgs]

    plan = None
    assert asyncio.run(scenario()) == [2, 2, 2]


def test_a_message_that_arrives_with_the_stop_is_handed_back_not_started():
    """First SIGTERM: the batch in hand is finished, but no new batch begins."""
    import asyncio

    from listeners.pull import OpenPull
    from listeners.registry import listeners_for
    from listeners.runner import ListenerRunner

    publish([ticket("t1", 0)])

    async def scenario() -> tuple[list, int]:
        runner = ListenerRunner(listeners_for(list(BOTH)), subjects=list(BOTH), ack_wait=120)
        js = await runner.connect()
        plan = runner.plans[0]
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        pull = OpenPull(runner.nc, psub, expires=30.0)
        stop = asyncio.get_running_loop().create_future()
        queue = psub._sub._pending_queue
        put = queue.put_nowait

        def put_and_stop(msg):  # the signal lands in the same turn of the loop as the message
            put(msg)
            if not stop.done():
                stop.set_result(None)

        queue.put_nowait = put_and_stop
        batch = await pull.next_batch(1, wait=30, stop=stop)
        await runner.hand_back(pull, plan)
        again = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        [msg] = await again.fetch(1, timeout=10)  # handed back: at once, not after ack_wait
        await msg.nak()
        await runner.close()
        return batch, msg.metadata.num_delivered

    assert asyncio.run(scenario()) == ([], 2)


def test_a_stopped_listener_leaves_no_open_pull_to_swallow_later_messages():
    """Its pull requests outlive the process on the server; one must not take a message nobody will read."""
    import asyncio

    from listeners.pull import OpenPull
    from listeners.registry import listeners_for
    from listeners.runner import ListenerRunner

    setup_streams()  # the producer's step: a listener only checks its streams

    async def scenario() -> int:
        runner = ListenerRunner(listeners_for(list(BOTH)), subjects=list(BOTH), ack_wait=120)
        js = await runner.connect()
        plan = runner.plans[0]
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        pull = OpenPull(runner.nc, psub, expires=60.0)
        await pull.renew(10)  # open for a minute, nothing to deliver yet
        await runner.nc.flush()
        await runner.hand_back(pull, plan)
        await asyncio.to_thread(publish, [ticket("t1", 0)])
        again = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        [msg] = await again.fetch(1, timeout=10)  # not after ack_wait: the old request took nothing
        await msg.ack()
        await runner.close()
        return msg.metadata.num_delivered

    assert asyncio.run(scenario()) == 1
