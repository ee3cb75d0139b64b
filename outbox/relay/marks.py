"""Marking results: write a batch's outcome back to its rows, every write fenced so that a relay
that lost its rows cannot overwrite them.

Published rows get their stream and stream sequence; failed rows get an attempt, the error, the
time the failures began and a backoff — or become dead: at once for a permanent refusal, after
``MAX_ATTEMPTS`` for an unknown one, never for a transient one (outbox/relay/failures.py). A
failure mark writes the attempt count the claim saw plus one, not ``attempts + 1``: retried after
an unknown outcome, it writes the same. On PostgreSQL one ``UPDATE ... FROM unnest(...)`` per
outcome, committed without waiting for the WAL flush.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from datetime import timedelta

from django.db import connection, transaction
from django.utils import timezone

from outbox.conf import OutboxSettings
from outbox.redact import redact
from outbox.relay.database import TABLE, cursor, db_datetime, db_id, is_postgres, placeholders
from outbox.relay.failures import PERMANENT, UNKNOWN
from outbox.relay.rows import PublishResult

logger = logging.getLogger("outbox.relay")

#: Marks and leases commit without waiting for the WAL flush (``synchronous_commit = off`` for
#: that transaction only). A mark lost in a database crash leaves its rows pending: they are
#: published again and JetStream's dedup window absorbs the copies, exactly as after a relay
#: crash between publish and mark (docs/relay.md, "Every event in the stream exactly once").
ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"


#: "Still pending", as the marks' fence writes it: a value the planner knows only when the statement
#: runs, so that it cannot match the partial index ``outbox_pending_seq`` and must find the batch's
#: rows by primary key. With ``'pending'`` written out and no statistics on the table (a backlog
#: bulk-loaded after an outage), the planner believed the pending set tiny and hash-joined the
#: batch against a full scan of that index: 84 ms per mark of 100 rows in a 100,000-row backlog,
#: 4 ms this way (docs/relay.md, "Plans that do not depend on statistics").
PENDING = "(SELECT 'pending')"

#: A partition mark writes only rows still pending, while the session holding the partitions
#: ("pid@backend_start") is alive. ``pg_stat_get_activity(pid)`` reads that one backend's entry: a
#: third of the CPU of the ``pg_stat_activity`` view, which reads every backend and joins two catalogs.
PARTITION_FENCE = (
    f"o.status = {PENDING} AND EXISTS (SELECT 1 FROM pg_stat_get_activity(split_part(%(owner)s, '@', 1)::int) a "  # noqa: S608 - constants only
    "WHERE a.backend_start = split_part(%(owner)s, '@', 2)::timestamptz)"
)


def backoff_seconds(attempt: int, conf: OutboxSettings) -> float:
    """Exponential backoff with full jitter in the upper half, capped."""
    ceiling = min(conf.BACKOFF_MAX, conf.BACKOFF_BASE * (2 ** max(attempt - 1, 0)))
    return ceiling / 2 + random.random() * ceiling / 2  # noqa: S311 - jitter, not crypto


def published_sql(*, async_commit: str, fence: str, one_stream: bool) -> str:
    """The PostgreSQL mark of a batch's published rows: one ``UPDATE ... FROM unnest(...)``."""
    streams = "%(stream)s::text" if one_stream else "unnest(string_to_array(%(streams)s, ' '))"
    return f"""
        UPDATE {TABLE} AS o SET status = 'published', published_at = %(now)s, stream = v.stream,
            stream_sequence = v.sseq, lease_until = NULL, lease_owner = '',
            attempts = o.attempts + 1, last_error = '', failing_since = NULL
        FROM {async_commit}
             (SELECT unnest(string_to_array(%(ids)s, ',')::uuid[]) AS id,
                     unnest(string_to_array(%(sseqs)s, ',')::bigint[]) AS sseq,
                     {streams} AS stream) AS v
        WHERE o.id = v.id AND {fence}
        """  # noqa: S608 - table name and constants only


def mark_results(
    result: PublishResult, *, owner: str, conf: OutboxSettings, by_partitions: bool = False
) -> tuple[int, int]:
    """Write the outcome of a batch; returns (failed, dead).

    ``by_partitions=False``: ``owner`` is the rows' lease owner, and every write checks it.
    ``by_partitions=True``: ``owner`` names the database session that holds the
    partitions ("pid@backend_start"), and every write checks that it is still alive: if it
    ended, its partitions may belong to another relay by now. Any session may run the mark.
    """
    postgres = is_postgres()
    now = timezone.now()
    failures = []
    dead = 0
    for row, failure in result.failed:
        attempt, error = row.attempts + 1, redact(failure.reason)
        is_dead = failure.kind == PERMANENT or (failure.kind == UNKNOWN and attempt >= conf.MAX_ATTEMPTS)
        dead += int(is_dead)
        next_at = now + timedelta(seconds=backoff_seconds(attempt, conf))
        failures.append((row, "dead" if is_dead else "pending", error[:2000], next_at, attempt))
        log = logger.error if is_dead else logger.warning
        log(
            "outbox.%s event_id=%s subject=%s aggregate=%s:%s attempt=%d kind=%s error=%s",
            "dead" if is_dead else "retry",
            row.id,
            row.subject,
            row.aggregate_type,
            row.aggregate_id,
            attempt,
            failure.kind,
            error,
        )
    release = [] if by_partitions else result.skipped
    statements = bool(result.published) + bool(failures) + bool(release)
    if not statements:
        return 0, 0
    # Not inside a caller's transaction: its commit is not ours to make asynchronous.
    async_commit = ASYNC_COMMIT + ", " if postgres and not connection.in_atomic_block else ""
    fence = PARTITION_FENCE if by_partitions else "o.lease_owner = %(owner)s"
    # Partition marks run on the relay's own sessions: prepared, as its claims are (relay/database.py).
    prepare = by_partitions and postgres
    with transaction.atomic() if statements > 1 else nullcontext(), cursor() as cur:
        if result.published and postgres:
            streams = {st for _, st, _ in result.published}
            cur.execute(
                published_sql(async_commit=async_commit, fence=fence, one_stream=len(streams) == 1),
                {
                    "now": now,
                    "ids": ",".join([r.id for r, _, _ in result.published]),
                    "sseqs": ",".join([str(s) for _, _, s in result.published]),
                    "stream": next(iter(streams)),
                    "streams": " ".join([st for _, st, _ in result.published]),
                    "owner": owner,
                },
                prepare=prepare,
            )
            if cur.rowcount != len(result.published):
                logger.warning(
                    "outbox.fenced marked=%d of %d published: the rows were taken over by another relay",
                    cur.rowcount,
                    len(result.published),
                )
        elif result.published:
            cur.executemany(
                f"""
                UPDATE {TABLE} SET status = 'published', published_at = %s, stream = %s,
                    stream_sequence = %s, lease_until = NULL, lease_owner = '',
                    attempts = attempts + 1, last_error = '', failing_since = NULL
                WHERE id = %s AND lease_owner = %s
                """,  # noqa: S608
                [(db_datetime(now), st, s, db_id(r.id), owner) for r, st, s in result.published],
            )
        if failures and postgres:
            cur.execute(
                f"""
                UPDATE {TABLE} AS o SET status = v.status, attempts = v.attempts, last_error = v.error,
                    next_attempt_at = v.next_at, lease_until = NULL, lease_owner = '',
                    failing_since = COALESCE(o.failing_since, %(now)s)
                FROM {async_commit} (SELECT unnest(%(ids)s::uuid[]) AS id, unnest(%(statuses)s::text[]) AS status,
                             unnest(%(errors)s::text[]) AS error, unnest(%(next)s::timestamptz[]) AS next_at,
                             unnest(%(attempts)s::int[]) AS attempts) AS v
                WHERE o.id = v.id AND {fence}
                """,  # noqa: S608
                {
                    "ids": [f[0].id for f in failures],
                    "statuses": [f[1] for f in failures],
                    "errors": [f[2] for f in failures],
                    "next": [f[3] for f in failures],
                    "attempts": [f[4] for f in failures],
                    "now": now,
                    "owner": owner,
                },
                prepare=prepare,
            )
        elif failures:
            cur.executemany(
                f"""
                UPDATE {TABLE} SET status = %s, attempts = %s, last_error = %s,
                    next_attempt_at = %s, lease_until = NULL, lease_owner = '',
                    failing_since = COALESCE(failing_since, %s)
                WHERE id = %s AND lease_owner = %s
                """,  # noqa: S608
                [(f[1], f[4], f[2], db_datetime(f[3]), db_datetime(now), db_id(f[0].id), owner) for f in failures],
            )
        if release:
            keys = [db_id(r.id) for r in release]
            cur.execute(
                f"UPDATE {TABLE} SET lease_until = NULL, lease_owner = '' "  # noqa: S608
                f"WHERE lease_owner = %s AND id IN ({placeholders(len(keys))})",
                [owner, *keys],
            )
    return len(result.failed), dead
