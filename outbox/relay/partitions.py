"""Claim by partitions (PostgreSQL, ``OWNERSHIP = "partitions"``): the aggregates' hash partitions,
the session-level advisory locks that say which relay holds which, their rebalancing, and the
read-only claim of the held partitions' oldest claimable rows.

Two relays never hold the same partition, so they never hold the same aggregate, and the claim
writes nothing. A relay's session ending (crash, kill, lost connection) releases its partitions at
once. Marks are fenced by that session being alive (outbox/relay/marks.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from django.utils import timezone

from outbox.conf import OutboxSettings
from outbox.relay.database import LOCK_CLASS, TABLE, WINDOW_FACTOR, claimed_row
from outbox.relay.rows import ClaimedRow

#: Hash partitions of the aggregates. A constant: every relay of a database must map an
#: aggregate to the same partition.
PARTITIONS = 64
#: Second key of the shared advisory lock every draining relay holds: counts the relays.
MEMBER_KEY = 1000

#: An aggregate's 64-bit hash, computed by the server (``o`` is the outbox table's alias). Its
#: partition is ``hash & (PARTITIONS - 1)``.
AGGREGATE_HASH = "hashtextextended(o.aggregate_type || ':' || o.aggregate_id, 0)"

#: One read-only statement. ``w``: the window (oldest pending rows of our partitions) with an
#: ``ok`` flag per row and ``mine`` for rows of our batches in flight; ``c``: the ok rows not in
#: flight with no earlier not-ok row of their aggregate in the window, oldest first; then their
#: columns, fetched by ctid. A row in flight counts as ok: the rows after it may be claimed
#: (``after``: the aggregate's last row in flight, necessarily an earlier one), and the
#: publisher chains them behind it (they go only if the chain ending there was published entirely).
#: Aggregates are compared by a 64-bit hash: a collision can only hold a row back. The last
#: column counts the window's rows: fewer than asked for means the claim saw every pending row.
CLAIM_SQL = f"""
WITH w AS MATERIALIZED (
    SELECT s.tid, s.seq, s.h,
           s.ready AND s.h NOT IN (SELECT {AGGREGATE_HASH} FROM {TABLE} o WHERE o.status = 'dead') AS ok,
           s.seq IN (SELECT unnest(string_to_array(%(inflight)s, ',')::bigint[])) AS mine
    FROM (
        SELECT o.ctid AS tid, o.seq, {AGGREGATE_HASH} AS h,
               (o.next_attempt_at <= %(now)s AND (o.lease_until IS NULL OR o.lease_until < %(now)s)) AS ready
        FROM {TABLE} o
        WHERE o.status = 'pending' {{partitions}}
        ORDER BY o.seq
        {{window}}
    ) AS s
), c AS (
    SELECT w.tid, w.seq, w.h FROM w
    WHERE w.ok AND NOT w.mine AND NOT EXISTS (SELECT 1 FROM w AS b WHERE NOT b.ok AND b.h = w.h AND b.seq < w.seq)
    ORDER BY w.seq
    LIMIT %(limit)s
), t AS (
    SELECT m.h, max(m.seq) AS after FROM w AS m WHERE m.mine GROUP BY m.h
)
SELECT o.id::text, o.seq, o.subject, o.payload::text, o.headers::text, o.aggregate_type, o.aggregate_id,
       o.aggregate_version, o.attempts, (c.h & {PARTITIONS - 1})::int, t.after, (SELECT count(*) FROM w)::int
FROM c JOIN {TABLE} o ON o.ctid = c.tid LEFT JOIN t ON t.h = c.h
ORDER BY c.seq
"""  # noqa: S608 - table name and constants only


def claim_from_partitions(
    cur: Any, *, limit: int, window: int | None, inflight: str, partitions: list[int] | None
) -> list[ClaimedRow]:
    """Run :data:`CLAIM_SQL`. ``inflight``: the seqs of our rows in flight, comma-separated (one
    parameter, parsed by the server); ``partitions``: the held ones, None for all of them."""
    return claim_partitions(cur, limit=limit, window=window, inflight=inflight, partitions=partitions)[0]


def claim_partitions(
    cur: Any, *, limit: int, window: int | None, inflight: str, partitions: list[int] | None
) -> tuple[list[ClaimedRow], bool]:
    """:func:`claim_from_partitions`, and whether the claim saw everything: it returned fewer
    rows than ``limit`` and its window held every pending row of the partitions. Then nothing
    more is claimable until another commit (or a backoff ends): what it left, it left for a
    reason — in flight, backing off, behind a dead row."""
    sql = CLAIM_SQL.format(
        partitions=f"AND ({AGGREGATE_HASH} & {PARTITIONS - 1}) = ANY(%(partitions)s::int[])"
        if partitions is not None
        else "",
        window="LIMIT %(window)s" if window is not None else "",
    )
    params = {"now": timezone.now(), "inflight": inflight, "limit": limit, "window": window, "partitions": partitions}
    # A claim with nothing of ours in flight (the one that follows a wake-up) is prepared: a relay
    # with partitions has a session of its own, and planning was three quarters of the statement.
    # Not the claims behind batches in flight: planned for their parameters, the server knows how
    # many seqs ``inflight`` holds and hashes them; a generic plan guesses 10 and, on a table with
    # no statistics, compared every window row with every seq in flight (20 ms per claim).
    cur.execute(sql, params, prepare=not inflight)
    rows = []
    seen = 0
    for r in cur.fetchall():
        row = claimed_row(r, partition=r[9])
        row.after = r[10]
        seen = r[11]
        rows.append(row)
    complete = len(rows) < limit and (window is None or seen < window)
    return rows, complete


class Partitions:
    """The partitions this relay's database session holds (session-level advisory locks)."""

    def __init__(self, conf: OutboxSettings) -> None:
        self.conf = conf
        #: The session holding the partitions, "pid@backend_start" ("" before :meth:`join`): the
        #: owner every mark of a partition batch names, and checks is still alive.
        self.owner = ""
        #: The partitions held, as last read from the server (or changed by us since).
        self.held: set[int] = set()
        self.members = 1
        self.next_check = 0.0

    @property
    def joined(self) -> bool:
        return bool(self.owner)

    def join(self, cur: Any) -> None:
        """Count ourselves among the relays and take our share of the partitions."""
        # A client that vanishes without closing its socket (host down) must not keep its
        # partitions for hours: have the server probe the connection.
        idle = str(max(1, int(self.conf.LEASE_SECONDS / 3)))
        cur.execute(
            "SELECT pg_advisory_lock_shared(%s, %s), "
            "set_config('tcp_keepalives_idle', %s, false), set_config('tcp_keepalives_interval', %s, false), "
            "set_config('tcp_keepalives_count', '3', false), "
            "(SELECT pid || '@' || backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
            [LOCK_CLASS, MEMBER_KEY, idle, idle],
        )
        self.owner = cur.fetchone()[4]
        self.rebalance(cur, busy=set())

    def rebalance(self, cur: Any, *, busy: set[int], greedy: bool = False) -> None:
        """Hold about PARTITIONS / relays partitions: give back extra ones not ``busy`` (rows in
        flight), take free ones. ``greedy``: take every free partition (relays that left)."""
        # The server's word on how many relays there are and which partitions this session holds.
        cur.execute(
            "SELECT count(*) FILTER (WHERE objid::bigint = %s), "
            "coalesce(array_agg(objid::int) FILTER (WHERE pid = pg_backend_pid() AND objid::bigint < %s), '{}') "
            "FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = %s AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [MEMBER_KEY, PARTITIONS, LOCK_CLASS],
        )
        members, held = cur.fetchone()
        self.members = max(1, members)
        self.held = set(held)
        share = PARTITIONS if greedy else math.ceil(PARTITIONS / self.members)
        if len(self.held) > share:
            extra = sorted(self.held - busy, reverse=True)[: len(self.held) - share]
            if extra:
                cur.execute("SELECT pg_advisory_unlock(%s, p) FROM unnest(%s::int[]) AS p", [LOCK_CLASS, extra])
                self.held.difference_update(extra)
        elif len(self.held) < share:
            # Materialized, so that the lock function runs only for the rows LIMIT lets through
            # (pushed into the scan, it would lock every free partition).
            cur.execute(
                "WITH free AS MATERIALIZED (SELECT p FROM generate_series(0, %s) AS p WHERE p <> ALL(%s::int[]) "
                "ORDER BY random()) SELECT free.p FROM free WHERE pg_try_advisory_lock(%s, free.p) LIMIT %s",
                [PARTITIONS - 1, sorted(self.held), LOCK_CLASS, share - len(self.held)],
            )
            self.held.update(r[0] for r in cur.fetchall())
        self.next_check = time.monotonic() + self.conf.REBALANCE_SECONDS

    def leave(self, cur: Any) -> None:
        """Give back every partition and the membership lock."""
        held, self.held, self.owner = sorted(self.held), set(), ""
        cur.execute("SELECT pg_advisory_unlock(%s, p) FROM unnest(%s::int[]) AS p", [LOCK_CLASS, held])
        cur.execute("SELECT pg_advisory_unlock_shared(%s, %s)", [LOCK_CLASS, MEMBER_KEY])

    def forget(self) -> None:
        """The session is gone, and its locks with it."""
        self.held, self.owner = set(), ""

    def other_relays(self, cur: Any) -> int:
        """Relays draining right now, other than us."""
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = %s "
            "AND objid::bigint = %s AND objsubid = 2 AND pid <> pg_backend_pid() "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [LOCK_CLASS, MEMBER_KEY],
        )
        return cur.fetchone()[0]

    @property
    def rebalance_due(self) -> bool:
        return time.monotonic() >= self.next_check

    def claim_job(
        self, *, inflight_seqs: str, inflight_rows: int, exhaustive: bool
    ) -> Callable[[Any], tuple[list[ClaimedRow], bool]] | None:
        """A claim of the held partitions, runnable on any session (``job(cursor)``): it reads, and
        only the session that holds the partitions marks. None when we hold no partition.

        ``inflight_seqs``/``inflight_rows``: the seqs (comma-separated) and number of our rows in
        flight. ``exhaustive``: look past the window when it has nothing. Rebalance before, when it
        is due, never while a claim runs.
        """
        if not self.held:
            return None
        limit = self.conf.BATCH_SIZE
        partitions = None if len(self.held) == PARTITIONS else sorted(self.held)
        window = inflight_rows + int(limit * WINDOW_FACTOR)

        def job(cur: Any) -> tuple[list[ClaimedRow], bool]:
            claim = claim_partitions(cur, limit=limit, window=window, inflight=inflight_seqs, partitions=partitions)
            if not claim[0] and exhaustive:
                claim = claim_partitions(cur, limit=limit, window=None, inflight=inflight_seqs, partitions=partitions)
            return claim

        return job
