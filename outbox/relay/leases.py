"""Claim by leases (``OWNERSHIP = "leases"``, and always on SQLite): claims are serialised, the
window is walked here, and the chosen rows are leased to the batch in the same short transaction.

Use it behind a transaction-pooling proxy (pgbouncer ``pool_mode=transaction``), where session
locks do not work. Marks are fenced by the lease owner; a crashed relay's rows come back when
their leases expire.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from outbox.relay.database import (
    LOCK_CLASS,
    TABLE,
    WINDOW_FACTOR,
    claimed_row,
    cursor,
    db_datetime,
    db_id,
    event_id,
    is_postgres,
    placeholders,
)
from outbox.relay.rows import AggregateKey, ClaimedRow

#: Second key of the transaction-level advisory lock that serialises lease claims (PostgreSQL).
CLAIM_KEY = 1001


def claim_leased_batch(
    *, limit: int, lease_seconds: float, owner: str, exhaustive: bool = True, in_flight: int = 0
) -> list[ClaimedRow]:
    """Lease up to ``limit`` claimable rows to ``owner`` and return them in ``seq`` order.

    Claims are serialised (an advisory transaction lock on PostgreSQL, the write lock on SQLite).
    ``exhaustive=False`` looks at the window only: what a relay that already has a batch in flight
    wants; ``in_flight`` rows of the caller's batches sit at the front of the queue and widen the window.
    """
    postgres = is_postgres()
    with transaction.atomic(), cursor() as cur:
        if postgres:
            # With the claim's plan settings for this transaction only (the session may be a caller's).
            cur.execute(
                "SELECT pg_advisory_xact_lock(%s, %s), set_config('enable_bitmapscan', 'off', true), "
                "set_config('enable_seqscan', 'off', true)",
                [LOCK_CLASS, CLAIM_KEY],
            )
        now = timezone.now()
        window = in_flight + int(limit * WINDOW_FACTOR)
        chosen = walk_window(cur, now=now, limit=limit, window=window)
        if not chosen and exhaustive:
            chosen = walk_window(cur, now=now, limit=limit, window=None)
        if not chosen:
            return []
        ids = [c[0] for c in chosen]
        keys = [db_id(i) for i in ids]
        lease = db_datetime(now + timedelta(seconds=lease_seconds))
        # Re-checked on the row: a concurrent write (e.g. the late mark of a relay whose lease
        # expired) may have changed it since the window was read.
        cur.execute(
            f"UPDATE {TABLE} SET lease_until = %s, lease_owner = %s "  # noqa: S608
            f"WHERE id IN ({placeholders(len(keys))}) AND status = 'pending' AND next_attempt_at <= %s "
            "AND (lease_until IS NULL OR lease_until < %s)",
            [lease, owner, *keys, db_datetime(now), db_datetime(now)],
        )
        payload = "payload::text, headers::text" if postgres else "payload, headers"
        id_col = "id::text" if postgres else "id"
        cur.execute(
            f"SELECT {id_col}, seq, subject, {payload}, aggregate_type, aggregate_id, aggregate_version, attempts "  # noqa: S608
            f"FROM {TABLE} WHERE lease_owner = %s AND id IN ({placeholders(len(keys))})",
            [owner, *keys],
        )
        leased = {r.id: r for r in map(claimed_row, cur.fetchall())}
        rows, gaps = contiguous_rows(chosen, leased)
        if gaps:
            cur.execute(
                f"UPDATE {TABLE} SET lease_until = NULL, lease_owner = '' "  # noqa: S608
                f"WHERE lease_owner = %s AND id IN ({placeholders(len(gaps))})",
                [owner, *[db_id(i) for i in gaps]],
            )
    return rows


def walk_window(cur: Any, *, now: datetime, limit: int, window: int | None) -> list[tuple[str, AggregateKey]]:
    """(id, aggregate) of the claimable rows among the oldest ``window`` pending rows."""
    id_col = "o.id::text" if is_postgres() else "o.id"
    cur.execute(
        f"""
        SELECT {id_col}, o.aggregate_type, o.aggregate_id,
               o.next_attempt_at <= %s AND (o.lease_until IS NULL OR o.lease_until < %s)
               AND NOT EXISTS (SELECT 1 FROM {TABLE} d WHERE d.status = 'dead'
                               AND d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id
                               AND d.seq < o.seq)
        FROM {TABLE} o WHERE o.status = 'pending' ORDER BY o.seq {"LIMIT %s" if window else ""}
        """,  # noqa: S608
        [db_datetime(now), db_datetime(now), *([window] if window else [])],
    )
    blocked: set[AggregateKey] = set()
    chosen = []
    for row_id, agg_type, agg_id, ok in cur.fetchall():
        key = (agg_type, agg_id)
        if key in blocked:
            continue
        if not ok:
            blocked.add(key)  # a row that is not due, leased, or behind a dead row stops its aggregate
            continue
        chosen.append((event_id(row_id), key))
        if len(chosen) >= limit:
            break
    return chosen


def contiguous_rows(
    chosen: list[tuple[str, AggregateKey]], leased: dict[str, ClaimedRow]
) -> tuple[list[ClaimedRow], list[str]]:
    """The leased rows that follow their aggregate's chain without a hole, and the ids of the
    others (leased after a hole: to be released)."""
    broken: set[AggregateKey] = set()
    rows, gaps = [], []
    for row_id, key in chosen:
        row = leased.get(row_id)
        if row is None or key in broken:
            broken.add(key)
            if row is not None:
                gaps.append(row_id)
            continue
        rows.append(row)
    return rows, gaps
