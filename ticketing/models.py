"""The ticket domain model. Writes go through ticketing.services, never save() elsewhere."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models


class Ticket(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    title = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal("0"))])
    user_id = models.CharField("user id", max_length=200)
    #: 0 on creation, +1 on every committed change; the version of the last event emitted.
    version = models.PositiveIntegerField(default=0, editable=False)
    #: Set while an order holds the ticket; a reserved ticket cannot be edited.
    order_id = models.CharField("order id", max_length=200, null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=models.Q(price__gte=0), name="ticket_price_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.title} ({self.price})"

    @property
    def is_reserved(self) -> bool:
        return bool(self.order_id)


class OrderRecord(models.Model):
    """What the tickets service knows of an order: its latest version, so late or
    out-of-order order events (a cancel before its create) cannot re-reserve a ticket."""

    id = models.CharField(primary_key=True, max_length=200)
    ticket_id = models.CharField(max_length=200)
    version = models.PositiveIntegerField()
    status = models.CharField(max_length=32)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"order {self.id} v{self.version} ({self.status})"
