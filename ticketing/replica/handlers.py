"""The replica listeners: a copy of tickets, kept from ticket events.

This module knows tickets only through the event contracts, exactly as a second
service would. Both listeners are :class:`VersionedReplicaListener` s of one model,
so a fetched batch of ticket events is applied as a set (one locking SELECT, one
INSERT, one UPDATE and one inbox INSERT), falling back to one event at a time only
when the set cannot be applied.
"""

from __future__ import annotations

from typing import Any

from listeners.base import Context, VersionedReplicaListener
from listeners.registry import listener
from ticketing.events import TicketCreated, TicketUpdated
from ticketing.replica.models import TicketReplica

REPLICA_GROUP = "replica"


class _TicketReplicaListener(VersionedReplicaListener):
    group = REPLICA_GROUP
    model = TicketReplica
    creation_subjects = ("ticket:created",)

    def replica_fields(self, event: TicketCreated | TicketUpdated) -> dict[str, Any]:
        return {
            "title": event.title,
            "price": event.price,
            "user_id": event.user_id,
            "order_id": getattr(event, "order_id", None),
        }

    def reset(self) -> int:
        deleted, _ = TicketReplica.objects.all().delete()
        return deleted


@listener
class TicketCreatedListener(_TicketReplicaListener):
    subjects = ("ticket:created",)

    def handle(self, event: TicketCreated, ctx: Context) -> str:
        return super().handle(event, ctx)


@listener
class TicketUpdatedListener(_TicketReplicaListener):
    subjects = ("ticket:updated",)

    def handle(self, event: TicketUpdated, ctx: Context) -> str:
        return super().handle(event, ctx)
