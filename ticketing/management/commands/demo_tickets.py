"""The demo's steps: change tickets through the services, then show source and replica side by side."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from rich.console import Console
from rich.table import Table

from listeners.models import InboxEntry
from outbox import emit
from outbox.models import OutboxEvent
from ticketing.events import OrderCreated, OrderTicket
from ticketing.models import Ticket
from ticketing.replica.models import TicketReplica
from ticketing.services import ticket_create, ticket_update


class Command(BaseCommand):
    help = "Create and update a few tickets, reserve one through an order event, and wait for the replica to match."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the replica")

    def handle(self, *args, **options) -> None:
        console = Console(highlight=False, width=130)
        console.print("[bold]1. tickets change through the services (ticket + outbox row in one transaction)[/]")
        concert = ticket_create(title="Concert", price="20.00", user_id="alice")
        match = ticket_create(title="Football match", price="45.00", user_id="bob")
        play = ticket_create(title="Theatre play", price="30.00", user_id="carol")
        concert = ticket_update(ticket_id=concert.id, expected_version=0, price="25.00")
        concert = ticket_update(ticket_id=concert.id, expected_version=1, title="Concert (late show)")
        play = ticket_update(ticket_id=play.id, expected_version=0, price="27.50")
        written = OutboxEvent.objects.filter(
            aggregate_type="ticket", aggregate_id__in=[str(concert.id), str(match.id), str(play.id)]
        )
        for event in written.order_by("seq"):
            console.print(f"   {_describe(event, {})}  in the outbox")

        console.print("[bold]2. the orders service reserves a ticket: order:created -> ticket:updated with orderId[/]")
        order_id = f"order-{uuid.uuid4().hex[:8]}"
        with transaction.atomic():
            emit(
                OrderCreated(
                    id=order_id,
                    version=0,
                    status="created",
                    user_id="dave",
                    expires_at=(datetime.now(UTC) + timedelta(minutes=15)).isoformat(),
                    ticket=OrderTicket(id=str(match.id), price=match.price),
                )
            )

        ids = [str(t.id) for t in (concert, match, play)]
        console.print("[bold]3. the relay publishes, the listeners apply each event once (event -> ticket)[/]")
        shown: set[str] = set()
        deadline = time.monotonic() + options["timeout"]
        while True:
            _show_applied(console, ids, order_id, shown)
            source = {str(t.id): t for t in Ticket.objects.filter(id__in=ids)}
            replica = {r.id: r for r in TicketReplica.objects.filter(id__in=ids)}
            if _equal(source, replica) and source[str(match.id)].order_id == order_id:
                _show_applied(console, ids, order_id, shown)
                break
            if time.monotonic() > deadline:
                _show(console, ids, source, replica)
                raise CommandError("the replica did not catch up with the source in time")
            time.sleep(0.1)
        _show(console, ids, source, replica)
        console.print("[bold green]replica == source[/] for every ticket (title, price, user, order, version)")


def _ticket_of(event: OutboxEvent) -> str:
    if event.aggregate_type == "ticket":
        return event.aggregate_id
    return str((event.payload.get("ticket") or {}).get("id", ""))


def _show_applied(console: Console, ids: list[str], order_id: str, shown: set[str]) -> None:
    """One line per event a listener applied since the last call: the event id (as the listeners
    log it, event_id=...) next to the ticket it is about (the id column of the table below)."""
    events = {
        str(e.id): e
        for e in OutboxEvent.objects.filter(aggregate_id__in=[*ids, order_id]).only(
            "id", "subject", "aggregate_type", "aggregate_id", "aggregate_version", "payload"
        )
    }
    titles = dict(Ticket.objects.filter(id__in=ids).values_list("id", "title"))
    applied = InboxEntry.objects.filter(event_id__in=list(events)).exclude(event_id__in=shown)
    for entry in applied.order_by("processed_at", "id"):
        console.print(f"   {_describe(events[entry.event_id], titles)}  {entry.outcome} by {entry.consumer}")
        shown.add(entry.event_id)


def _describe(event: OutboxEvent, titles: dict) -> str:
    ticket = _ticket_of(event)
    title = event.payload.get("title") or (titles.get(uuid.UUID(ticket), "") if ticket else "")
    version = f"v{event.aggregate_version}"
    return f"{event.subject:<15} {version:<3} ticket {ticket[:8]} {title!r:<23} event {str(event.id)[:8]}"


def _row(t) -> tuple:
    return (t.title, t.price, t.user_id, t.order_id or None, t.version)


def _equal(source: dict, replica: dict) -> bool:
    return set(source) == set(replica) and all(_row(source[k]) == _row(replica[k]) for k in source)


def _show(console: Console, ids: list[str], source: dict, replica: dict) -> None:
    table = Table(title="tickets: source (ticketing) | replica (listeners)")
    for col in ("id", "title", "price", "order", "v", "replica title", "price", "order", "v", "same"):
        table.add_column(col)
    for key in ids:
        s, r = source.get(key), replica.get(key)
        left = [s.title, str(s.price), s.order_id or "-", str(s.version)] if s else ["-"] * 4
        right = [r.title, str(r.price), r.order_id or "-", str(r.version)] if r else ["-"] * 4
        same = "[green]yes[/]" if s and r and _row(s) == _row(r) else "[red]no[/]"
        table.add_row(key[:8], *left, *right, same)
    console.print(table)
