"""Write services of the outbox app (admin actions and commands call these)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from uuid import UUID

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from outbox.conf import outbox_settings
from outbox.models import OutboxEvent, OutboxStatus

logger = logging.getLogger("outbox.services")


def outbox_requeue(*, event_ids: Iterable[UUID | str]) -> int:
    """Dead rows back to pending, attempts reset; published and pending rows are untouched."""
    ids = list(event_ids)
    with transaction.atomic():
        count = OutboxEvent.objects.filter(id__in=ids, status=OutboxStatus.DEAD).update(
            status=OutboxStatus.PENDING,
            attempts=0,
            next_attempt_at=Now(),
            lease_until=None,
            lease_owner="",
        )
        if count:
            transaction.on_commit(_kick, robust=True)
    logger.info("outbox.requeued count=%d", count)
    return count


def outbox_retry_now(*, event_ids: Iterable[UUID | str]) -> int:
    """Pending rows waiting on backoff become due now (and the relay is kicked)."""
    ids = list(event_ids)
    with transaction.atomic():
        count = OutboxEvent.objects.filter(id__in=ids, status=OutboxStatus.PENDING).update(
            next_attempt_at=Now(), lease_until=None, lease_owner=""
        )
        transaction.on_commit(_kick, robust=True)
    return count


def outbox_republish(*, event_ids: Iterable[UUID | str], reason: str) -> int:
    """Published rows whose message the stream no longer holds go back to pending (and the relay is kicked).

    The relay publishes them again in per-aggregate order, each with a republish id of its own
    (``Nats-Msg-Id`` ``<id>:r<n>``) so the stream's duplicate window cannot swallow the copy.
    """
    ids = list(event_ids)
    with transaction.atomic():
        count = OutboxEvent.objects.filter(id__in=ids, status=OutboxStatus.PUBLISHED).update(
            status=OutboxStatus.PENDING,
            attempts=0,
            next_attempt_at=Now(),
            lease_until=None,
            lease_owner="",
            published_at=None,
            stream_sequence=None,
            republished=F("republished") + 1,
            last_error=reason,
        )
        if count:
            transaction.on_commit(_kick, robust=True)
    logger.info("outbox.republished count=%d reason=%s", count, reason)
    return count


def outbox_relay_batch() -> int:
    """Run one relay batch in this process; returns the number of events published."""
    from outbox.relay import Relay

    return Relay().run_batch().published


def outbox_purge_published(*, older_than=None, batch: int | None = None) -> int:
    """Delete published rows older than the retention, in bounded batches. Dead rows are kept."""
    conf = outbox_settings()
    cutoff = timezone.now() - (older_than if older_than is not None else conf.RETENTION)
    size = batch or conf.PURGE_BATCH
    total = 0
    while True:
        ids = list(
            OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHED, published_at__lt=cutoff)
            .order_by("published_at")
            .values_list("id", flat=True)[:size]
        )
        if not ids:
            break
        deleted, _ = OutboxEvent.objects.filter(id__in=ids, status=OutboxStatus.PUBLISHED).delete()
        total += deleted
    if total:
        logger.info("outbox.purged count=%d cutoff=%s", total, cutoff.isoformat())
    return total


def _kick() -> None:
    from outbox.kick import kick_relay

    kick_relay()
