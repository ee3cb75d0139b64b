"""Consume-transform-produce: order events reserve and release tickets through the outbox, exactly once."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import transaction

from listeners.models import InboxEntry
from outbox import emit
from outbox.models import OutboxEvent
from outbox.relay import Relay
from outbox.streams import stream_name
from tests.helpers import listen_crashing_after_commit, manage, read_stream_fast, wait_for
from ticketing.events import OrderCancelled, OrderCreated, OrderTicket
from ticketing.models import Ticket
from ticketing.replica.models import TicketReplica
from ticketing.services import ticket_create

pytestmark = pytest.mark.django_db(transaction=True)


def order_created(order_id: str, ticket: Ticket, version: int = 0) -> OrderCreated:
    return OrderCreated(
        id=order_id,
        version=version,
        status="created",
        user_id="buyer",
        expires_at=(datetime.now(UTC) + timedelta(minutes=15)).isoformat(),
        ticket=OrderTicket(id=str(ticket.id), price=ticket.price),
    )


def publish(*events) -> None:
    for event in events:
        with transaction.atomic():
            emit(event)
    Relay().drain()


def ticket_updates(ticket: Ticket) -> list[OutboxEvent]:
    return list(
        OutboxEvent.objects.filter(subject="ticket:updated", aggregate_id=str(ticket.id)).order_by("aggregate_version")
    )


def listen_orders(n: int) -> None:
    call_command("listen", "order:created", "order:cancelled", "--max-messages", str(n), "--idle-exit", "60")


def test_order_created_reserves_the_ticket_with_one_ticket_updated_in_outbox_stream_and_replica():
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    publish(order_created("order-1", ticket))
    listen_orders(1)

    ticket.refresh_from_db()
    assert (ticket.order_id, ticket.version) == ("order-1", 1)
    [update] = ticket_updates(ticket)
    assert update.payload["orderId"] == "order-1" and update.aggregate_version == 1
    assert update.headers["causation-id"] == str(OutboxEvent.objects.get(subject="order:created").id)

    Relay().drain()
    tickets_stream = read_stream_fast(stream_name("TICKETS"))
    assert [(m["data"]["version"], m["data"].get("orderId")) for m in tickets_stream] == [(0, None), (1, "order-1")]
    call_command("listen", "ticket:created", "ticket:updated", "--max-messages", "2", "--idle-exit", "60")
    replica = TicketReplica.objects.get(pk=str(ticket.id))
    assert (replica.order_id, replica.version) == ("order-1", 1)


def test_order_cancelled_releases_the_ticket_and_emits_the_next_version():
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    publish(
        order_created("order-1", ticket), OrderCancelled(id="order-1", version=1, ticket=OrderTicket(id=str(ticket.id)))
    )
    listen_orders(2)
    ticket.refresh_from_db()
    assert (ticket.order_id, ticket.version) == (None, 2)
    assert [(e.aggregate_version, e.payload["orderId"]) for e in ticket_updates(ticket)] == [(1, "order-1"), (2, None)]


def test_tickets_listener_killed_after_commit_before_ack_makes_no_second_update_on_redelivery(logs):
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    publish(order_created("order-1", ticket))
    crashed = listen_crashing_after_commit("order:created", "order:cancelled", batches=1, log=logs / "crash.log")
    assert crashed.wait(120) == -9, (logs / "crash.log").read_text()
    assert len(ticket_updates(ticket)) == 1  # committed before the crash

    again = manage(
        "listen", "order:created", "order:cancelled", "--max-messages", "1", "--idle-exit", "60", log=logs / "again.log"
    )
    assert again.wait(120) == 0, (logs / "again.log").read_text()
    assert "duplicate=1" in (logs / "again.log").read_text()
    ticket.refresh_from_db()
    assert ticket.version == 1
    assert len(ticket_updates(ticket)) == 1
    assert InboxEntry.objects.filter(subject="order:created").count() == 1


def test_cancel_arriving_before_create_ends_consistent_and_duplicates_of_either_are_absorbed():
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    cancel = OrderCancelled(id="order-1", version=1, ticket=OrderTicket(id=str(ticket.id)))
    create = order_created("order-1", ticket)
    # Out of order, and each twice (a second emit = a re-publish with a new event id).
    publish(cancel, create, cancel, create)
    listen_orders(4)
    ticket.refresh_from_db()
    assert (ticket.order_id, ticket.version) == (None, 0), "a late create must not reserve a cancelled order's ticket"
    assert ticket_updates(ticket) == []
    outcomes = sorted(InboxEntry.objects.filter(subject__startswith="order:").values_list("outcome", flat=True))
    assert outcomes == ["stale", "stale", "stale", "unchanged"]


def test_reserving_a_ticket_held_by_another_order_changes_nothing_and_is_acked():
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    publish(order_created("order-1", ticket), order_created("order-2", ticket))
    listen_orders(2)
    ticket.refresh_from_db()
    assert (ticket.order_id, ticket.version) == ("order-1", 1)
    assert len(ticket_updates(ticket)) == 1
    assert set(InboxEntry.objects.values_list("outcome", flat=True)) == {"applied", "unchanged"}


def test_publish_command_reserves_a_ticket_end_to_end(capsys):
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    data = {
        "id": "order-9",
        "version": 0,
        "status": "created",
        "userId": "buyer",
        "expiresAt": "2030-01-01T00:00:00Z",
        "ticket": {"id": str(ticket.id), "price": 20},
    }
    call_command("publish", "order:created", "--data", json.dumps(data))
    event_id = capsys.readouterr().out.strip()
    assert OutboxEvent.objects.get(pk=event_id).subject == "order:created"
    Relay().drain()
    listen_orders(1)
    ticket.refresh_from_db()
    assert ticket.order_id == "order-9"
    wait_for(lambda: len(ticket_updates(ticket)) == 1, what="the reservation's ticket:updated")
