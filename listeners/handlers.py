"""The listeners this service runs: its copy of tickets, kept from ticket events.

This module knows tickets only through the event contracts, exactly as a second
service would.
"""

from __future__ import annotations

from listeners.base import Context, Listener, version_decision
from listeners.errors import NotYet
from listeners.models import TicketReplica
from listeners.registry import listener
from ticketing.events import TicketCreated, TicketUpdated

REPLICA_GROUP = "replica"


class _TicketReplicaListener(Listener):
    group = REPLICA_GROUP

    def _apply(self, event: TicketCreated | TicketUpdated, *, creation: bool) -> str:
        current = TicketReplica.objects.select_for_update().filter(pk=event.id).first()
        decision = version_decision(
            held=current.version if current else None, incoming=event.version, creation=creation
        )
        if decision == "stale":
            return "stale"
        if decision == "gap":
            held = current.version if current else "nothing"
            raise NotYet(f"ticket {event.id}: holds {held}, got version {event.version}")
        fields = {
            "title": event.title,
            "price": event.price,
            "user_id": event.user_id,
            "order_id": getattr(event, "order_id", None),
            "version": event.version,
        }
        # The row is already locked (or absent): one UPDATE or one INSERT, no second lookup.
        if current is None:
            TicketReplica.objects.create(id=event.id, **fields)
        else:
            for name, value in fields.items():
                setattr(current, name, value)
            current.save(update_fields=[*fields, "updated_at"])
        return "applied"

    def reset(self) -> int:
        deleted, _ = TicketReplica.objects.all().delete()
        return deleted


@listener
class TicketCreatedListener(_TicketReplicaListener):
    subjects = ("ticket:created",)

    def handle(self, event: TicketCreated, ctx: Context) -> str:
        return self._apply(event, creation=True)


@listener
class TicketUpdatedListener(_TicketReplicaListener):
    subjects = ("ticket:updated",)

    def handle(self, event: TicketUpdated, ctx: Context) -> str:
        return self._apply(event, creation=False)
