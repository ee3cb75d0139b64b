"""The local read model of tickets: written only by the replica listeners."""

from __future__ import annotations

from django.db import models


class TicketReplica(models.Model):
    """This service's copy of tickets, kept by TicketCreatedListener / TicketUpdatedListener."""

    id = models.CharField(primary_key=True, max_length=200)
    title = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=12, decimal_places=2)
    user_id = models.CharField(max_length=200)
    order_id = models.CharField(max_length=200, null=True, blank=True)
    version = models.PositiveIntegerField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "ticket replica"

    def __str__(self) -> str:
        return f"{self.title} v{self.version}"
