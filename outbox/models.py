"""The outbox table.

A row is written by :func:`outbox.emit` in the same transaction as the business
change, then published by the relay. Rows move ``pending -> published`` or, after
``MAX_ATTEMPTS`` failures, ``pending -> dead`` (visible, requeue-able, never
deleted automatically). A pending row with ``lease_until`` in the future is *in
flight*: a relay claimed it and is publishing it.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from outbox.ids import uuid7


class OutboxStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PUBLISHED = "published", "Published"
    DEAD = "dead", "Dead"


class OutboxEvent(models.Model):
    #: The event's identity everywhere: primary key, Nats-Msg-Id and the consumers' inbox key. A UUIDv7
    #: (time-ordered, outbox/ids.py), so new rows' index entries stay together however long the history.
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    #: Commit-independent ordering key from a database sequence (filled by the database).
    seq = models.BigIntegerField(db_default=0, editable=False, unique=True)
    subject = models.CharField(max_length=200)
    payload = models.JSONField()
    headers = models.JSONField(default=dict, blank=True)
    aggregate_type = models.CharField(max_length=100)
    aggregate_id = models.CharField(max_length=200)
    aggregate_version = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=OutboxStatus.choices, default=OutboxStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_default=Now())
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=100, blank=True, default="")
    last_error = models.TextField(blank=True, default="")
    #: When the publish failures of this pending row began (cleared when it is published or requeued):
    #: how long the relay has been failing, in ``outbox_status`` and the dashboard.
    failing_since = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    published_at = models.DateTimeField(null=True, blank=True)
    stream = models.CharField(max_length=100, blank=True, default="")
    stream_sequence = models.BigIntegerField(null=True, blank=True)
    #: Times ``outbox_reconcile`` found the published event missing from its stream and sent it back
    #: to the relay. A republished row goes out with ``Nats-Msg-Id`` ``<id>:r<n>`` (the stream may
    #: still remember the plain id as a duplicate) and an ``event-id`` header carrying the plain id.
    republished = models.PositiveIntegerField(db_default=0, editable=False)

    class Meta:
        verbose_name = "outbox event"
        indexes = [
            # The relay's window: pending rows in commit-independent order. Published rows leave it,
            # so the claim never reads history (their entries are skipped until vacuum drops them).
            models.Index(fields=["seq"], name="outbox_pending_seq", condition=Q(status="pending")),
            # "Does this aggregate have a dead row?" — holds back its later rows. Usually empty.
            models.Index(
                fields=["aggregate_type", "aggregate_id", "seq"],
                name="outbox_dead_agg",
                condition=Q(status="dead"),
            ),
            models.Index(fields=["aggregate_type", "aggregate_id"], name="outbox_aggregate"),
            models.Index(fields=["published_at"], name="outbox_published_at", condition=Q(status="published")),
        ]

    def __str__(self) -> str:
        return f"{self.subject} {self.aggregate_type}:{self.aggregate_id} v{self.aggregate_version} ({self.status})"
