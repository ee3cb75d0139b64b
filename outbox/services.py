"""Write services of the outbox app (admin actions and commands call these)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from uuid import UUID

from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from outbox.conf import outbox_settings
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay.messages import REPUBLISH_HEADER

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
            failing_since=None,
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


_REPUBLISH_SQL = f"""
UPDATE {OutboxEvent._meta.db_table}
SET status = 'pending', attempts = 0, next_attempt_at = now(), lease_until = NULL, lease_owner = '',
    published_at = NULL, stream_sequence = NULL, republished = republished + 1, last_error = %s,
    headers = headers || jsonb_build_object('event-id', id::text, '{REPUBLISH_HEADER}', (republished + 1)::text)
WHERE id = ANY(%s::uuid[]) AND status = 'published'
"""  # noqa: S608 - model table and constants only


def outbox_republish(*, event_ids: Iterable[UUID | str], reason: str) -> int:
    """Published rows whose message the stream no longer holds go back to pending (and the relay is kicked).

    The relay publishes them again in per-aggregate order (their ``seq`` is unchanged), each with a
    republish id of its own (``Nats-Msg-Id`` ``<id>:r<n>``, see outbox/relay/messages.py) so the
    stream's duplicate window cannot swallow the copy; the ``event-id`` header keeps the plain id,
    which listeners key their inbox by.
    """
    ids = [str(i) for i in event_ids]
    count = 0
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                for start in range(0, len(ids), 10_000):
                    cursor.execute(_REPUBLISH_SQL, [reason, ids[start : start + 10_000]])
                    count += cursor.rowcount
            if count:
                transaction.on_commit(_kick, robust=True)
            logger.info("outbox.republished count=%d reason=%s", count, reason)
            return count
        rows = OutboxEvent.objects.select_for_update().filter(id__in=ids, status=OutboxStatus.PUBLISHED)
        for row in rows.only("id", "headers", "republished"):
            republished = row.republished + 1
            count += OutboxEvent.objects.filter(pk=row.pk, status=OutboxStatus.PUBLISHED).update(
                status=OutboxStatus.PENDING,
                attempts=0,
                next_attempt_at=Now(),
                lease_until=None,
                lease_owner="",
                published_at=None,
                stream_sequence=None,
                republished=republished,
                headers={**row.headers, "event-id": str(row.pk), REPUBLISH_HEADER: str(republished)},
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
