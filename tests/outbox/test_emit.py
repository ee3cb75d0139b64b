"""outbox.emit: only inside a transaction, only registered and valid events."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import transaction

from outbox import emit, event_context
from outbox.contracts import Event, registry
from outbox.errors import InvalidPayloadError, NotInTransactionError, UnknownSubjectError, UnrelayedDatabaseError
from outbox.models import OutboxEvent
from ticketing.events import TicketCreated, TicketUpdated


def created(**overrides) -> TicketCreated:
    data = {"id": "t-1", "version": 0, "title": "Concert", "price": Decimal("10.00"), "user_id": "alice"}
    return TicketCreated(**{**data, **overrides})


@pytest.mark.django_db(transaction=True)
def test_emit_outside_a_transaction_raises_and_writes_nothing():
    with pytest.raises(NotInTransactionError, match=r"transaction\.atomic"):
        emit(created())
    assert OutboxEvent.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_emit_refuses_a_database_no_relay_reads_and_writes_nothing():
    with transaction.atomic(), pytest.raises(UnrelayedDatabaseError, match=r"using='replica'.*'default' database only"):
        emit(created(), using="replica")
    assert OutboxEvent.objects.count() == 0


@pytest.mark.django_db
def test_emit_writes_one_row_with_aggregate_and_headers():
    with transaction.atomic(), event_context(correlation_id="corr-1", causation_id="cause-1"):
        row = emit(created(version=3))
    row.refresh_from_db()
    assert (row.subject, row.aggregate_type, row.aggregate_id, row.aggregate_version) == (
        "ticket:created",
        "ticket",
        "t-1",
        3,
    )
    assert row.headers["correlation-id"] == "corr-1" and row.headers["causation-id"] == "cause-1"
    assert row.seq > 0 and row.status == "pending" and row.attempts == 0


@pytest.mark.django_db
def test_rows_get_increasing_sequence_numbers_from_the_database():
    with transaction.atomic():
        rows = [emit(created(id=f"t-{n}")) for n in range(5)]
    seqs = [OutboxEvent.objects.get(pk=r.pk).seq for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


@pytest.mark.django_db
def test_emit_refuses_an_unregistered_event_class():
    class Stray(Event, frozen=True):
        id: str

    with pytest.raises(UnknownSubjectError), transaction.atomic():
        emit(Stray(id="x"))
    assert OutboxEvent.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "make",
    [
        lambda: created(price=Decimal("-1")),
        lambda: created(title=""),
        lambda: created(title="x" * 201),
        lambda: created(version=-1),
        lambda: created(user_id=""),
        lambda: TicketUpdated(id="t", version="1", title="A", price=Decimal(1), user_id="u"),  # wrong type
    ],
)
def test_emit_refuses_a_payload_that_breaks_its_contract(make):
    # Refused when built (a price check in __post_init__) or when emitted (types, lengths): never written.
    with pytest.raises((InvalidPayloadError, ValueError)), transaction.atomic():
        emit(make())
    assert OutboxEvent.objects.count() == 0


def test_contract_decode_accepts_the_course_json_and_rejects_wrong_types():
    contract = registry.get("ticket:updated")
    event = contract.decode(b'{"id":"a","version":2,"title":"T","price":12.5,"userId":"u","orderId":"o"}')
    assert (event.version, event.price, event.order_id) == (2, Decimal("12.5"), "o")
    with pytest.raises(InvalidPayloadError, match="version"):
        contract.decode(b'{"id":"a","version":"2","title":"T","price":1,"userId":"u"}')
    with pytest.raises(InvalidPayloadError, match="not valid JSON"):
        contract.decode(b"\xff\xfe not json")


@pytest.mark.django_db
def test_emit_writes_every_column_as_the_orm_would_and_returns_the_stored_row():
    # emit() writes with its own INSERT on PostgreSQL; a row made by Model.objects.create from the same
    # values must not differ in any column but the identity, the sequence and the timestamps.
    with transaction.atomic(), event_context(correlation_id="corr-1"):
        row = emit(created(version=3, price=Decimal("12.50")), headers={"x-extra": "1"})
        orm = OutboxEvent.objects.create(
            subject=row.subject,
            payload=row.payload,
            headers=row.headers,
            aggregate_type=row.aggregate_type,
            aggregate_id=row.aggregate_id,
            aggregate_version=row.aggregate_version,
        )
    varying = {"id", "seq", "created_at", "next_attempt_at"}
    stored = OutboxEvent.objects.values().get(pk=row.pk)
    assert {k: v for k, v in stored.items() if k not in varying} == {
        k: v for k, v in OutboxEvent.objects.values().get(pk=orm.pk).items() if k not in varying
    }
    assert stored["payload"] == {"id": "t-1", "version": 3, "title": "Concert", "price": 12.5, "userId": "alice"}
    assert stored["headers"] == {"correlation-id": "corr-1", "x-extra": "1"}
    # The returned instance is the stored row: what emit() wrote is on it, the columns the database
    # filled are deferred and load on first access. It is not "adding" (a save() would UPDATE).
    assert row.get_deferred_fields() == {"seq", "created_at", "next_attempt_at", "republished"}
    assert {f.attname: getattr(row, f.attname) for f in OutboxEvent._meta.concrete_fields} == stored
    assert row.seq < orm.seq
    assert not row._state.adding and row._state.db == "default"


@pytest.mark.django_db
def test_emit_writes_without_the_model_save_machinery():
    # One INSERT on the caller's connection, no Model.save(): save signals do not fire for outbox rows
    # (nothing may hang behaviour on them; see STYLE.md on signals).
    from django.db import connection
    from django.db.models.signals import post_save, pre_save
    from django.test.utils import CaptureQueriesContext

    saved = []

    def record(sender, **kwargs):
        saved.append(sender)

    pre_save.connect(record, sender=OutboxEvent)
    post_save.connect(record, sender=OutboxEvent)
    try:
        with CaptureQueriesContext(connection) as queries, transaction.atomic():
            emit(created())
    finally:
        pre_save.disconnect(record, sender=OutboxEvent)
        post_save.disconnect(record, sender=OutboxEvent)
    assert saved == []
    assert [q["sql"].split()[0] for q in queries.captured_queries if "outbox_outboxevent" in q["sql"]] == ["INSERT"]


@pytest.mark.django_db
def test_event_ids_are_uuid7_carrying_the_millisecond_they_were_emitted():
    import time
    import uuid

    ids = []
    for n in range(3):
        before = time.time_ns() // 1_000_000
        with transaction.atomic():
            ids.append((before, emit(created(id=f"t-{n}")).id, time.time_ns() // 1_000_000))
        while time.time_ns() // 1_000_000 == ids[-1][2]:  # the next one in a later millisecond
            time.sleep(0.0005)
    for before, event_id, after in ids:
        assert isinstance(event_id, uuid.UUID) and event_id.version == 7 and event_id.variant == uuid.RFC_4122
        assert before <= event_id.int >> 80 <= after
    # Time-ordered: ids of later milliseconds sort after earlier ones, as text and in the database.
    assert [i for _, i, _ in ids] == sorted(i for _, i, _ in ids)
    stored = list(OutboxEvent.objects.order_by("id").values_list("id", flat=True))
    assert stored == [i for _, i, _ in ids]
