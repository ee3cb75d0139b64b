"""The write path: atomicity, optimistic concurrency, one event per committed change."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection, transaction

from outbox.models import OutboxEvent
from ticketing.errors import TicketConflict, TicketInvalid, TicketReserved
from ticketing.models import Ticket
from ticketing.services import ticket_create, ticket_reserve, ticket_update


def events_of(ticket) -> list[OutboxEvent]:
    return list(OutboxEvent.objects.filter(aggregate_type="ticket", aggregate_id=str(ticket.id)).order_by("seq"))


@pytest.mark.django_db
def test_create_commits_ticket_and_exactly_one_created_event_with_version_0():
    ticket = ticket_create(title="  Concert  ", price="20.5", user_id="alice")
    assert ticket.title == "Concert" and ticket.price == Decimal("20.50") and ticket.version == 0
    [event] = events_of(ticket)
    assert event.subject == "ticket:created"
    assert event.payload == {"id": str(ticket.id), "version": 0, "title": "Concert", "price": 20.5, "userId": "alice"}
    assert (event.aggregate_version, event.status) == (0, "pending")


@pytest.mark.django_db
def test_each_committed_update_emits_one_event_carrying_the_new_version():
    ticket = ticket_create(title="A", price="1", user_id="u")
    ticket_update(ticket_id=ticket.id, expected_version=0, price="2")
    ticket_update(ticket_id=ticket.id, expected_version=1, title="B")
    events = events_of(ticket)
    assert [(e.subject, e.aggregate_version, e.payload["version"]) for e in events] == [
        ("ticket:created", 0, 0),
        ("ticket:updated", 1, 1),
        ("ticket:updated", 2, 2),
    ]
    assert events[2].payload["title"] == "B" and events[2].payload["price"] == 2
    assert events[2].payload["orderId"] is None


@pytest.mark.django_db
def test_update_that_changes_nothing_writes_and_emits_nothing():
    ticket = ticket_create(title="A", price="1", user_id="u")
    same = ticket_update(ticket_id=ticket.id, expected_version=0, title="A", price="1.00")
    assert same.version == 0
    assert len(events_of(ticket)) == 1


@pytest.mark.django_db
def test_stale_expected_version_raises_conflict_and_writes_nothing():
    ticket = ticket_create(title="A", price="1", user_id="u")
    ticket_update(ticket_id=ticket.id, expected_version=0, price="2")
    with pytest.raises(TicketConflict, match="now at version 1"):
        ticket_update(ticket_id=ticket.id, expected_version=0, price="3")
    ticket.refresh_from_db()
    assert (ticket.price, ticket.version) == (Decimal("2.00"), 1)
    assert len(events_of(ticket)) == 2


@pytest.mark.django_db
def test_rollback_after_update_leaves_neither_change_nor_event():
    ticket = ticket_create(title="A", price="1", user_id="u")
    with pytest.raises(RuntimeError), transaction.atomic():
        ticket_update(ticket_id=ticket.id, expected_version=0, price="9")
        raise RuntimeError("after the write")
    ticket.refresh_from_db()
    assert (ticket.price, ticket.version) == (Decimal("1.00"), 0)
    assert len(events_of(ticket)) == 1


@pytest.mark.django_db
def test_reserved_ticket_cannot_be_edited():
    ticket = ticket_create(title="A", price="1", user_id="u")
    with transaction.atomic():
        ticket_reserve(ticket_id=ticket.id, order_id="order-1")
    with pytest.raises(TicketReserved, match="reserved by order order-1"):
        ticket_update(ticket_id=ticket.id, price="5")
    assert len(events_of(ticket)) == 2  # created + the reservation's ticket:updated


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"price": "-1"}, "price"),
        ({"price": "abc"}, "price"),
        ({"price": "1.234"}, "price"),
        ({"price": "NaN"}, "price"),
        ({"title": "x" * 10_000}, "title"),
        ({"title": "   "}, "title"),
        ({"user_id": ""}, "user_id"),
    ],
)
def test_invalid_input_is_refused_with_field_errors_and_nothing_written(changes, field):
    base = {"title": "A", "price": "1", "user_id": "u"}
    with pytest.raises(TicketInvalid) as info:
        ticket_create(**{**base, **changes})
    assert field in info.value.errors
    assert Ticket.objects.count() == 0 and OutboxEvent.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_updates_with_the_same_expected_version_have_exactly_one_winner():
    ticket = ticket_create(title="A", price="1", user_id="u")
    rounds, writers = 5, 4
    for version in range(rounds):
        barrier = threading.Barrier(writers)
        outcomes: list[str] = []

        def write(n: int, expected: int = version, barrier=barrier, outcomes=outcomes) -> None:
            try:
                barrier.wait()
                ticket_update(ticket_id=ticket.id, expected_version=expected, title=f"v{expected + 1} by {n}")
                outcomes.append("won")
            except TicketConflict:
                outcomes.append("conflict")
            finally:
                connection.close()

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["conflict"] * (writers - 1) + ["won"]
    events = events_of(ticket)
    assert [e.aggregate_version for e in events] == list(range(rounds + 1))
    ticket.refresh_from_db()
    assert ticket.version == rounds
