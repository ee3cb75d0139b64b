"""The tickets service listening to the orders service.

Consume-transform-produce: the inbox row, the ticket change and the new
``ticket:updated`` outbox event commit in one transaction, so a crash anywhere
neither loses the update nor publishes it twice. An order record keeps each
order's latest version: a cancel that arrives before its create wins, and the
late create is acked without effect.
"""

from __future__ import annotations

from listeners.base import Context, Listener
from listeners.registry import listener
from ticketing.events import OrderCancelled, OrderCreated
from ticketing.models import OrderRecord
from ticketing.services import ticket_release, ticket_reserve

TICKETS_GROUP = "tickets"


def _newer(order_id: str, version: int, ticket_id: str, status: str) -> bool:
    """Record the order at ``version``; False when a same-or-newer version was already seen."""
    record = OrderRecord.objects.select_for_update().filter(pk=order_id).first()
    if record is not None and record.version >= version:
        return False
    OrderRecord.objects.update_or_create(
        pk=order_id, defaults={"version": version, "status": status, "ticket_id": ticket_id}
    )
    return True


@listener
class OrderCreatedListener(Listener):
    subjects = ("order:created",)
    group = TICKETS_GROUP

    def handle(self, event: OrderCreated, ctx: Context) -> str:
        if not _newer(event.id, event.version, event.ticket.id, event.status):
            return "stale"
        if event.status == "cancelled":
            return "ignored"
        return "applied" if ticket_reserve(ticket_id=event.ticket.id, order_id=event.id) else "unchanged"


@listener
class OrderCancelledListener(Listener):
    subjects = ("order:cancelled",)
    group = TICKETS_GROUP

    def handle(self, event: OrderCancelled, ctx: Context) -> str:
        if not _newer(event.id, event.version, event.ticket.id, "cancelled"):
            return "stale"
        return "applied" if ticket_release(ticket_id=event.ticket.id, order_id=event.id) else "unchanged"
