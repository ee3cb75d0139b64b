"""The set-based path of a batch decides exactly what the per-message path would, with a fixed cost.

``apply_batch`` hands the events of a :class:`VersionedReplicaListener` to ``handle_batch``
(one locking SELECT, one INSERT, one UPDATE, one inbox INSERT); these tests hold it to
the per-message path as the reference, on real PostgreSQL, and attack its fallback.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from unittest import mock

import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from listeners.apply import apply_batch
from listeners.base import VersionedReplicaListener
from listeners.delivery import Delivery
from listeners.models import DeadLetter, InboxEntry
from tests import helpers
from tests.listeners.helpers import REPLICA
from ticketing.replica.handlers import TicketCreatedListener, TicketUpdatedListener
from ticketing.replica.models import TicketReplica

LISTENERS = {"ticket:created": TicketCreatedListener, "ticket:updated": TicketUpdatedListener}


_ticket_of: dict[str, str] = {}


def delivery(ticket_id: str, version: int, *, name: str | None = None, eid: str | None = None, **fields) -> Delivery:
    name = name or ("ticket:created" if version == 0 else "ticket:updated")
    body = {"id": ticket_id, "version": version, "title": f"{ticket_id} v{version}", "price": 10 + version,
            "userId": "u1", **fields}  # fmt: skip
    eid = eid or str(uuid.uuid4())
    _ticket_of[eid] = ticket_id
    return Delivery(
        event_name=name,
        data=json.dumps(body).encode(),
        headers={"Nats-Msg-Id": eid, "aggregate-type": "ticket", "aggregate-id": ticket_id},
        stream="T_TICKETS",
        stream_sequence=1,
        deliveries=1,
        consumer=REPLICA,
        listener=LISTENERS[name],
    )


class _Rollback(Exception):
    pass


@pytest.fixture(params=["outbox.backends.postgresql", "django.db.backends.postgresql"])
def engine(request):
    """The test settings' backend, and Django's own: with it the inbox INSERT is a statement of its own."""
    if request.param == "django.db.backends.postgresql":
        connection.sends_with_next_statement = False  # shadows the backend's class attribute
        yield request.param
        del connection.sends_with_next_statement
    else:
        yield request.param


def _state() -> tuple[dict, list]:
    replicas = {
        r.id: (r.version, r.title, str(r.price), r.user_id, r.order_id) for r in TicketReplica.objects.order_by("id")
    }
    # Order of application per ticket (the per-message path groups the batch by aggregate, the set
    # path keeps stream order: the same order within each aggregate, which is what versions need).
    inbox: dict[str, list] = {}
    for eid, outcome in InboxEntry.objects.order_by("id").values_list("event_id", "outcome"):
        inbox.setdefault(_ticket_of[eid], []).append((eid, outcome))
    return replicas, inbox


def _run(batch: list[Delivery], held: dict[str, int], *, per_message: bool) -> tuple[list, tuple]:
    """Apply ``batch`` on top of replicas at ``held`` versions; return the decisions and the end state, undone."""
    result: tuple[list, tuple] = ([], ({}, {}))
    patch = mock.patch.object(VersionedReplicaListener, "batch_group", classmethod(lambda cls: None))
    try:
        with transaction.atomic():
            for tid, version in held.items():
                TicketReplica.objects.create(id=tid, title="old", price=1, user_id="u0", version=version)
            if per_message:
                with patch:
                    decisions = apply_batch(batch)
            else:
                decisions = apply_batch(batch)
            result = ([(d.action, d.outcome, d.delay) for d in decisions], _state())
            raise _Rollback
    except _Rollback:
        pass
    return result


@pytest.mark.django_db
@pytest.mark.parametrize("seed", range(12))
def test_set_based_batch_decides_and_writes_exactly_what_one_event_at_a_time_does(seed, engine):
    rng = random.Random(seed)
    ids = ["a", "b", "c", "d"]
    held = {tid: rng.randrange(0, 3) for tid in rng.sample(ids, rng.randrange(0, 3))}
    batch: list[Delivery] = []
    for _ in range(rng.randrange(5, 40)):
        tid, version = rng.choice(ids), rng.randrange(0, 6)
        name = rng.choice(["ticket:created", "ticket:updated"]) if version else "ticket:created"
        order = {"orderId": f"o{version}"} if name == "ticket:updated" and rng.random() < 0.5 else {}
        batch.append(delivery(tid, version, name=name, **order))
        if rng.random() < 0.15:  # a second copy of an event, later in the same batch
            batch.append(rng.choice(batch))

    fast = _run(batch, held, per_message=False)
    reference = _run(batch, held, per_message=True)

    assert fast == reference
    assert fast[0], "the batch produced decisions"


@pytest.mark.django_db
def test_a_mixed_batch_applies_in_stream_order_and_waits_on_gaps():
    TicketReplica.objects.create(id="old", title="old", price=1, user_id="u0", version=5)
    batch = [
        delivery("t1", 0),
        delivery("t1", 2),  # gap: holds 0
        delivery("t1", 1),
        delivery("t2", 1),  # an update of a ticket never created: gap
        delivery("old", 5, name="ticket:updated"),  # stale
        delivery("old", 6, orderId="o1"),
        delivery("t1", 0),  # another event, same version: stale
    ]

    outcomes = [d.outcome for d in apply_batch(batch)]

    assert outcomes == ["applied", "waiting", "applied", "waiting", "stale", "applied", "stale"]
    assert dict(TicketReplica.objects.values_list("id", "version")) == {"t1": 1, "old": 6}
    assert TicketReplica.objects.get(pk="old").order_id == "o1"
    assert TicketReplica.objects.get(pk="t1").title == "t1 v1"
    applied_order = list(InboxEntry.objects.order_by("id").values_list("event_id", flat=True))
    expected = [batch[i].headers["Nats-Msg-Id"] for i in (0, 2, 4, 5, 6)]
    assert applied_order == expected


@pytest.mark.django_db
def test_a_poison_event_sends_its_batch_down_the_per_message_path_and_the_rest_still_applies():
    batch = [delivery("t1", 0), delivery("t2", 0, price=1e20), delivery("t1", 1), delivery("t3", 0, title="a\x00b")]

    decisions = apply_batch(batch)

    assert [d.outcome for d in decisions] == ["applied", "dead:data", "applied", "dead:data"]
    assert dict(TicketReplica.objects.values_list("id", "version")) == {"t1": 1}
    assert DeadLetter.objects.count() == 2
    assert InboxEntry.objects.count() == 2


@pytest.mark.django_db
def test_a_failed_set_path_is_rolled_back_whole_and_leaves_one_dead_letter_per_bad_message():
    """The fallback runs the batch again from scratch: nothing of the first attempt may stay twice."""
    not_json = Delivery(
        event_name="ticket:created",
        data=b"{not json",
        headers={"Nats-Msg-Id": str(uuid.uuid4())},
        stream="T_TICKETS",
        stream_sequence=9,
        deliveries=1,
        consumer=REPLICA,
        listener=TicketCreatedListener,
    )
    batch = [delivery("t1", 0), not_json, delivery("t2", 0, price=1e20), delivery("t1", 1)]

    decisions = apply_batch(batch)

    assert [d.outcome for d in decisions] == ["applied", "dead:invalid", "dead:data", "applied"]
    assert sorted(DeadLetter.objects.values_list("stream_sequence", flat=True)) == [1, 9]
    assert dict(TicketReplica.objects.values_list("id", "version")) == {"t1": 1}
    assert InboxEntry.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_row_created_by_another_process_after_the_lock_turns_into_a_per_message_decision():
    """The set's INSERT meets a row another transaction created meanwhile: no overwrite, no lost event."""
    other = psycopg.connect(helpers.test_database_url())
    other.execute(
        "INSERT INTO replica_ticketreplica (id, title, price, user_id, version, updated_at) "
        "VALUES ('c1', 'theirs', 1, 'u9', 1, now())"
    )
    # Committed while our INSERT waits on the uncommitted row: ON CONFLICT sees it after our lock.
    timer = threading.Timer(1.0, other.commit)
    timer.start()
    try:
        decisions = apply_batch([delivery("c1", 0), delivery("c2", 0)])
    finally:
        timer.join()
        other.close()

    assert [d.outcome for d in decisions] == ["stale", "applied"]
    assert TicketReplica.objects.get(pk="c1").title == "theirs"
    assert TicketReplica.objects.get(pk="c2").version == 0


@pytest.mark.django_db
@pytest.mark.parametrize("size", [50, 500])
def test_a_batch_of_replica_events_costs_a_fixed_number_of_statements(size, engine):
    TicketReplica.objects.bulk_create(
        [TicketReplica(id=f"u{n}", title="x", price=1, user_id="u", version=0) for n in range(size // 2)]
    )
    batch = [delivery(f"u{n}", 1) for n in range(size // 2)] + [delivery(f"n{n}", 0) for n in range(size // 2)]
    with CaptureQueriesContext(connection) as queries:
        decisions = apply_batch(batch)
    assert {d.outcome for d in decisions} == {"applied"}
    # The batch's own transaction (a savepoint here, inside the test's), SELECT ... FOR UPDATE,
    # INSERT new, UPDATE changed, INSERT inbox, its RELEASE: the set path has no savepoint of
    # its own (each one costs two round trips in every batch), and first deliveries need no
    # inbox read (the inbox's unique constraint catches the rare duplicate).
    assert len(queries) <= 6, [q["sql"][:80] for q in queries]
    assert sum("SAVEPOINT" in q["sql"] for q in queries) == 2, [q["sql"][:80] for q in queries]
    assert not [q for q in queries if q["sql"].startswith("SELECT") and "listeners_inboxentry" in q["sql"]]


def _inbox_reads(queries) -> int:
    # (A statement that never ran — one whose rows sent before it failed — is logged with sql None.)
    return sum((q["sql"] or "").startswith("SELECT") and "listeners_inboxentry" in q["sql"] for q in queries)


@pytest.mark.django_db
def test_first_deliveries_of_events_applied_before_are_duplicates_though_the_inbox_was_not_read_first(engine):
    """A re-publish after the dedup window is a first delivery: the inbox still absorbs it, nothing changes."""
    done = [delivery("d1", 0), delivery("d1", 1), delivery("d2", 0)]
    apply_batch(done)
    before = _state()
    copies = [_copy(done[1]), delivery("d3", 0), _copy(done[0]), delivery("d2", 1), _copy(done[2])]

    with CaptureQueriesContext(connection) as queries:
        decisions = apply_batch(copies)

    assert [d.outcome for d in decisions] == ["duplicate", "applied", "duplicate", "applied", "duplicate"]
    assert _inbox_reads(queries) == 1  # the attempt without the read was refused by the inbox, then read
    replicas, _ = _state()
    assert replicas["d1"] == before[0]["d1"]
    assert (replicas["d2"][0], replicas["d3"][0]) == (1, 0)
    assert InboxEntry.objects.count() == 5
    assert sorted(InboxEntry.objects.values_list("event_id", flat=True)) == sorted(
        d.headers["Nats-Msg-Id"] for d in [*done, copies[1], copies[3]]
    )


@pytest.mark.django_db
def test_redelivered_messages_read_the_inbox_before_anything_else():
    """A redelivery is often a duplicate (a crash between commit and ack): decided by the read, in one attempt."""
    done = [delivery("r1", 0), delivery("r2", 0)]
    apply_batch(done)
    again = [_copy(d, deliveries=2) for d in done]

    with CaptureQueriesContext(connection) as queries:
        decisions = apply_batch(again)

    assert [d.outcome for d in decisions] == ["duplicate", "duplicate"]
    assert _inbox_reads(queries) == 1
    assert not [q for q in queries if "FOR UPDATE" in q["sql"]]  # no attempt went further than the read


def _copy(d: Delivery, *, deliveries: int = 1) -> Delivery:
    return Delivery(d.event_name, d.data, dict(d.headers), d.stream, d.stream_sequence, deliveries, d.consumer,
                    d.listener)  # fmt: skip


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.DeadlockDetected("deadlock detected"), False),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
    ],
)
def test_a_session_ended_by_the_server_is_a_lost_connection_even_before_the_socket_says_so(error, lost):
    """The set path has no savepoint: the runner must retry a lost connection, the batch must not fall back."""
    from django.db import OperationalError

    from listeners.db_health import connection_lost

    connection.ensure_connection()
    assert not connection.connection.broken  # the driver has not seen the closed socket yet
    try:
        raise OperationalError(str(error)) from error
    except OperationalError as exc:
        assert connection_lost(exc) is lost


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("held", "event", "outcome"),
    [
        ({"s": 1}, ("s", 2, "ticket:updated"), "applied"),
        ({}, ("s", 0, "ticket:created"), "applied"),
        ({"s": 2}, ("s", 2, "ticket:updated"), "stale"),
        ({"s": 1}, ("s", 3, "ticket:updated"), "waiting"),
        ({}, ("s", 1, "ticket:updated"), "waiting"),
        ({"s": 0}, ("s", 0, "ticket:created"), "stale"),
        ({"s": 0}, ("s", 1, "ticket:created"), "applied"),
    ],
)
def test_a_batch_of_one_event_decides_what_the_locked_read_decides_and_applies_in_one_statement(held, event, outcome):
    tid, version, name = event
    batch = [delivery(tid, version, name=name)]
    with CaptureQueriesContext(connection) as queries:
        alone = _run(batch, held, per_message=False)
    with mock.patch.object(VersionedReplicaListener, "_apply_alone", lambda *args: False):
        locked = _run(batch, held, per_message=False)

    assert alone == locked
    assert alone[0][0][1] == outcome
    locks = [q["sql"][:60] for q in queries if "FOR UPDATE" in q["sql"]]
    if outcome == "applied" and not (name == "ticket:created" and held):
        assert locks == []  # the INSERT or the conditional UPDATE alone
    else:
        assert locks  # it wrote nothing: the locked read decided (a gap reads again, with the inbox)


@pytest.mark.django_db(transaction=True)
def test_a_batch_sends_its_inbox_rows_in_its_commits_query_and_a_refused_commit_reads_the_inbox():
    batch = [delivery("c1", 0), delivery("c2", 0)]
    with CaptureQueriesContext(connection) as queries:
        assert {d.outcome for d in apply_batch(batch)} == {"applied"}
    last = queries.captured_queries[-1]["sql"]
    assert last.startswith("INSERT INTO listeners_inboxentry") and last.endswith("; COMMIT"), last
    assert InboxEntry.objects.count() == 2

    # The same events again, as first deliveries (a re-publish): the inbox is not read first, so the
    # commit is what refuses their rows; the batch runs again with the read and acks them as duplicates.
    with CaptureQueriesContext(connection) as queries:
        decisions = apply_batch([_copy(d) for d in batch])
    assert [d.outcome for d in decisions] == ["duplicate", "duplicate"]
    assert _inbox_reads(queries) == 1
    assert any(q["sql"] == "ROLLBACK" for q in queries.captured_queries)
    assert InboxEntry.objects.count() == 2
    assert dict(TicketReplica.objects.values_list("id", "version")) == {"c1": 0, "c2": 0}
