"""Reads and writes of the inbox table: which events a consumer has applied, recording new ones, forgetting them.

An inbox row (``consumer``, ``event_id`` unique) commits with the effect of its event
or not at all; its unique constraint is the last line against a second copy of the
same event applied concurrently. Rows older than ``LISTENERS['INBOX_RETENTION']`` are
purged (:func:`inbox_purge`): a copy of an event redelivered after that is applied again,
unless its listener's own rule (the version rule of a replica) makes it stale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from listeners.base import Listener
from listeners.conf import listeners_settings
from listeners.delivery import Delivery, event_id_of
from listeners.models import InboxEntry
from listeners.sets import rows_source, set_cursor

logger = logging.getLogger("listeners.inbox")

#: (consumer, event id) pairs known to be in the inbox.
Applied = set[tuple[str, str]]

#: InboxEntry.outcome length.
OUTCOME_MAX = 32


def inbox_read_batch(deliveries: Sequence[Delivery]) -> Applied:
    """(consumer, event id) of the batch already in the inbox: one query for the whole batch."""
    consumers = sorted({d.consumer for d in deliveries})
    event_ids = sorted({event_id_of(d) for d in deliveries})
    if transaction.get_connection().vendor != "postgresql":  # SQLite (the demo): the portable query
        return set(
            InboxEntry.objects.filter(consumer__in=consumers, event_id__in=event_ids).values_list(
                "consumer", "event_id"
            )
        )
    with set_cursor() as cursor:
        # Arrays, not IN (...): one parameter per list, whatever the batch size.
        cursor.execute(
            f"SELECT consumer, event_id FROM {InboxEntry._meta.db_table} "  # noqa: S608 - the model's table
            "WHERE consumer = ANY(%s::varchar[]) AND event_id = ANY(%s::varchar[])",
            [consumers, event_ids],
        )
        return set(cursor.fetchall())


def inbox_has(consumer: str, event_id: str, applied: Applied | None = None) -> bool:
    """Whether the consumer applied the event: from ``applied`` when the batch read it, else one query."""
    if applied is not None:
        return (consumer, event_id) in applied
    return InboxEntry.objects.filter(consumer=consumer, event_id=event_id).exists()


def inbox_record(*, consumer: str, event_id: str, subject: str, stream_sequence: int | None, outcome: str) -> None:
    """One inbox row (the per-message path, inside the message's savepoint)."""
    InboxEntry.objects.create(
        consumer=consumer,
        event_id=event_id,
        subject=subject,
        stream_sequence=stream_sequence,
        outcome=outcome[:OUTCOME_MAX],
    )


def inbox_record_set(rows: Sequence[tuple[Delivery, str, str]], *, with_commit: bool = False) -> None:
    """The inbox rows of a set — (delivery, event id, outcome) — in one INSERT, in order (their ids follow it).

    ``with_commit``: nothing else of the transaction follows but its COMMIT; on
    ``outbox.backends.postgresql`` the INSERT then travels in the COMMIT's query (one round trip
    less), and a row recorded before makes the commit fail with IntegrityError (see apply_batch).
    """
    if not rows:
        return
    now = timezone.now()
    exprs, source, params = rows_source(
        [
            ("event_id", "varchar", [event_id for _, event_id, _ in rows]),
            ("consumer", "varchar", [delivery.consumer for delivery, _, _ in rows]),
            ("subject", "varchar", [delivery.event_name for delivery, _, _ in rows]),
            ("stream_sequence", "bigint", [delivery.stream_sequence for delivery, _, _ in rows]),
            ("outcome", "varchar", [outcome[:OUTCOME_MAX] for _, _, outcome in rows]),
            ("processed_at", "timestamptz", [now] * len(rows)),
        ]
    )
    sql = (
        f"INSERT INTO {InboxEntry._meta.db_table} "  # noqa: S608 - the model's table
        "(event_id, consumer, subject, stream_sequence, outcome, processed_at) "
        f"SELECT {', '.join(exprs)} FROM {source} ORDER BY v._n"
    )
    connection = transaction.get_connection()
    if with_commit and getattr(connection, "sends_with_next_statement", False):
        connection.send_with_next(sql, params)
        return
    with set_cursor() as cursor:
        cursor.execute(sql, params)


def inbox_forget_consumer(*, consumer: str, reset: Iterable[type[Listener]] = ()) -> None:
    """Forget what ``consumer`` applied — and what the ``reset`` listeners built — in one transaction.

    ``listen --from-start`` (and ``--reset``): the stream is then applied again from its start.
    """
    with transaction.atomic():
        InboxEntry.objects.filter(consumer=consumer).delete()
        for cls in set(reset):
            cls().reset()


@dataclass(frozen=True)
class PurgeReport:
    #: Rows deleted (with ``dry_run``: rows that would be).
    rows: int
    #: Rows processed before this instant were (or would be) deleted; None: retention is off.
    cutoff: datetime | None
    #: DELETE statements run.
    batches: int = 0


def inbox_purge(*, older_than: timedelta | None = None, batch: int | None = None, dry_run: bool = False) -> PurgeReport:
    """Delete inbox rows processed more than ``older_than`` ago (default ``INBOX_RETENTION``), in bounded batches.

    Each batch is its own short statement: the oldest ``batch`` ids by ``processed_at`` (its
    index), then a DELETE of those ids, so no long transaction holds the table while a listener
    writes to it. Nothing is deleted when retention is off (``INBOX_RETENTION`` 0/None) and no
    ``older_than`` is given. ``dry_run`` counts instead.
    """
    conf = listeners_settings()
    age = older_than if older_than is not None else conf.INBOX_RETENTION
    if age is None:
        return PurgeReport(0, None)
    cutoff = timezone.now() - age
    old = InboxEntry.objects.filter(processed_at__lt=cutoff)
    if dry_run:
        return PurgeReport(old.count(), cutoff)
    size = batch or conf.INBOX_PURGE_BATCH
    total = batches = 0
    while True:
        ids = list(old.order_by("processed_at").values_list("id", flat=True)[:size])
        if not ids:
            break
        deleted, _ = InboxEntry.objects.filter(id__in=ids).delete()
        total += deleted
        batches += 1
        if len(ids) < size:
            break
    if total:
        logger.info("listener.inbox_purged rows=%d batches=%d cutoff=%s", total, batches, cutoff.isoformat())
    return PurgeReport(total, cutoff, batches)
