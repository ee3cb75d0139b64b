"""Listener bookkeeping: the inbox and dead letters."""

from __future__ import annotations

from django.db import models


class InboxEntry(models.Model):
    """One row per (consumer, event) applied: written in the handler's transaction."""

    consumer = models.CharField(max_length=200)
    event_id = models.CharField(max_length=64)
    subject = models.CharField(max_length=200)
    stream_sequence = models.BigIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=32)
    processed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "inbox entry"
        verbose_name_plural = "inbox"
        constraints = [models.UniqueConstraint(fields=["consumer", "event_id"], name="inbox_once_per_consumer")]
        indexes = [
            # The purge (oldest first) and the admin's list (newest first).
            models.Index(fields=["processed_at"], name="inbox_processed_at"),
            # The admin's filters, each with the list's order.
            models.Index(fields=["consumer", "processed_at"], name="inbox_consumer_processed"),
            models.Index(fields=["subject", "processed_at"], name="inbox_subject_processed"),
            # Outcomes other than "applied" are rare: a small index for filtering on them.
            models.Index(
                fields=["outcome", "processed_at"],
                name="inbox_outcome_processed",
                condition=~models.Q(outcome="applied"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.consumer} {self.subject} {self.event_id}"


class DeadLetterStatus(models.TextChoices):
    DEAD = "dead", "Dead"
    REPLAYED = "replayed", "Replayed"


class DeadLetter(models.Model):
    """A message a listener gave up on: kept with the reason, replayable from the admin."""

    consumer = models.CharField(max_length=200)
    subject = models.CharField(max_length=200)
    event_id = models.CharField(max_length=64, blank=True, default="")
    stream = models.CharField(max_length=100, blank=True, default="")
    stream_sequence = models.BigIntegerField(null=True, blank=True)
    #: The message body as text (invalid UTF-8 replaced); editable so an operator can fix it before a replay.
    payload = models.TextField(blank=True, default="")
    #: The exact bytes received.
    raw = models.BinaryField(blank=True, default=b"")
    headers = models.JSONField(default=dict, blank=True)
    error = models.TextField()
    deliveries = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=16, choices=DeadLetterStatus.choices, default=DeadLetterStatus.DEAD)
    created_at = models.DateTimeField(auto_now_add=True)
    replayed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"], name="deadletter_status_created")]

    def __str__(self) -> str:
        return f"{self.consumer} {self.subject} #{self.stream_sequence} ({self.status})"
