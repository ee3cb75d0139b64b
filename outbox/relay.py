"""The relay: claim -> publish -> mark.

1. **Claim** (one short transaction). Take the *heads* of aggregates: pending rows
   whose lease is free, whose backoff has elapsed, and that have no earlier
   unfinished (pending or dead) row of the same aggregate, with
   ``FOR UPDATE SKIP LOCKED``. Holding an aggregate's head means owning the
   aggregate, so the head's contiguous pending successors are claimed with it.
   Every claimed row gets a lease (``lease_until``) and a fencing token
   (``lease_owner``). The transaction commits before any NATS traffic.
2. **Publish** (no transaction open). Rows go out in *rounds*: round k carries the
   k-th claimed row of every aggregate, pipelined with ``publish_async``; the next
   round starts when every PubAck of this one is in. An aggregate whose row failed
   drops out of later rounds, so a stream never holds version N+1 without N.
   ``Nats-Msg-Id`` is the event id; a duplicate PubAck counts as success.
3. **Mark** (one short transaction). Published rows get their stream sequence;
   failed rows get attempts, last_error and a backoff (or become dead); rows of a
   failed aggregate that were not attempted are released. Every write checks the
   fencing token, so a relay whose lease expired cannot overwrite its successor.

A relay killed anywhere leaves leased rows that any relay reclaims after
``LEASE_SECONDS``; JetStream's dedup window absorbs the re-publish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import signal
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext

from outbox import metrics
from outbox.broker import Broker, get_broker
from outbox.conf import OutboxSettings, outbox_settings
from outbox.contracts import registry
from outbox.errors import OutboxError, PublishError, UnknownSubjectError
from outbox.models import OutboxEvent
from outbox.streams import ensure_streams, nats_subject

logger = logging.getLogger("outbox.relay")

#: Fault injection for the fault suite: "crash-after-publish" SIGKILLs the process after
#: the PubAcks arrived and before the rows are marked; "crash-after-claim" after the claim.
_FAULT = os.environ.get("OUTBOX_FAULT_INJECTION", "")

TABLE = OutboxEvent._meta.db_table


@dataclass
class ClaimedRow:
    id: uuid.UUID
    seq: int
    subject: str
    body: bytes
    headers: dict[str, str]
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int | None
    attempts: int


@dataclass
class PublishResult:
    published: list[tuple[ClaimedRow, str, int]] = field(default_factory=list)  # row, stream, seq
    failed: list[tuple[ClaimedRow, str, bool]] = field(default_factory=list)  # row, error, permanent
    skipped: list[ClaimedRow] = field(default_factory=list)


@dataclass
class BatchReport:
    claimed: int = 0
    published: int = 0
    failed: int = 0
    dead: int = 0
    skipped: int = 0
    duration_ms: float = 0.0


def backoff_seconds(attempt: int, conf: OutboxSettings) -> float:
    """Exponential backoff with full jitter in the upper half, capped."""
    ceiling = min(conf.BACKOFF_MAX, conf.BACKOFF_BASE * (2 ** max(attempt - 1, 0)))
    return ceiling / 2 + random.random() * ceiling / 2  # noqa: S311 - jitter, not crypto


# --- claim ----------------------------------------------------------------------------


def _pk(value: uuid.UUID) -> Any:
    return OutboxEvent._meta.pk.get_db_prep_value(value, connection)


def _dt(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _placeholders(n: int) -> str:
    return ", ".join(["%s"] * n)


def claim_batch(*, limit: int, lease_seconds: float, owner: str, exhaustive: bool = True) -> list[ClaimedRow]:
    """Claim up to ``limit`` rows in one short transaction and return them in publish order.

    ``exhaustive=False`` only looks at the oldest pending rows (a bounded window): cheap, and
    what a relay that already has a batch in flight wants.
    """
    postgres = connection.vendor == "postgresql"
    lock_heads = "FOR UPDATE SKIP LOCKED" if postgres else ""
    payload_col = "payload::text, headers::text" if postgres else "payload, headers"
    with transaction.atomic():
        now = timezone.now()
        with connection.cursor() as cur:
            # First look only at the oldest pending rows (a bounded window, so a deep backlog on
            # few aggregates does not make every claim scan it); when none of those is claimable
            # (their aggregates are busy or blocked), look at the whole backlog.
            heads = _heads(cur, now=now, limit=limit, window=limit * WINDOW_FACTOR, lock=lock_heads)
            if not heads and exhaustive:
                heads = _heads(cur, now=now, limit=limit, window=None, lock=lock_heads)
            if not heads:
                return []
            ids = [h[0] for h in heads]
            room = limit - len(heads)
            if room > 0:
                ids.extend(_claim_followers(cur, heads, room, now, postgres))
            lease = _dt(now + timedelta(seconds=lease_seconds))
            if postgres:
                # One round trip: lease the rows and read what to publish.
                cur.execute(
                    f"""
                    UPDATE {TABLE} SET lease_until = %s, lease_owner = %s WHERE id = ANY(%s)
                    RETURNING id, seq, subject, {payload_col}, aggregate_type, aggregate_id,
                              aggregate_version, attempts
                    """,  # noqa: S608
                    [lease, owner, ids],
                )
            else:
                cur.execute(
                    f"UPDATE {TABLE} SET lease_until = %s, lease_owner = %s "  # noqa: S608
                    f"WHERE id IN ({_placeholders(len(ids))})",
                    [lease, owner, *ids],
                )
                cur.execute(
                    f"""
                    SELECT id, seq, subject, {payload_col}, aggregate_type, aggregate_id, aggregate_version, attempts
                    FROM {TABLE} WHERE id IN ({_placeholders(len(ids))})
                    """,  # noqa: S608
                    ids,
                )
            rows = sorted(cur.fetchall(), key=lambda r: r[1])
    return [
        ClaimedRow(
            id=r[0] if isinstance(r[0], uuid.UUID) else uuid.UUID(str(r[0])),
            seq=r[1],
            subject=r[2],
            body=r[3].encode() if isinstance(r[3], str) else json.dumps(r[3]).encode(),
            headers=json.loads(r[4]) if isinstance(r[4], str) else (r[4] or {}),
            aggregate_type=r[5],
            aggregate_id=r[6],
            aggregate_version=r[7],
            attempts=r[8],
        )
        for r in rows
    ]


WINDOW_FACTOR = 4


def _heads(cur: Any, *, now: datetime, limit: int, window: int | None, lock: str) -> list[tuple]:
    window_sql = (
        f"AND o.id IN (SELECT w.id FROM {TABLE} w WHERE w.status = 'pending' ORDER BY w.seq LIMIT %s)" if window else ""
    )
    cur.execute(
        f"""
        SELECT o.id, o.aggregate_type, o.aggregate_id, o.seq FROM {TABLE} o
        WHERE o.status = 'pending'
          {window_sql}
          AND o.next_attempt_at <= %s
          AND (o.lease_until IS NULL OR o.lease_until < %s)
          AND NOT EXISTS (
            SELECT 1 FROM {TABLE} p
            WHERE p.aggregate_type = o.aggregate_type AND p.aggregate_id = o.aggregate_id
              AND p.status <> 'published' AND p.seq < o.seq)
        ORDER BY o.seq
        LIMIT %s
        {lock}
        """,  # noqa: S608 - table name is a constant
        [*([window] if window else []), _dt(now), _dt(now), limit],
    )
    return cur.fetchall()


def _claim_followers(cur: Any, heads: list[tuple], room: int, now: datetime, postgres: bool) -> list[Any]:
    """The contiguous ready successors of each claimed head (its aggregate is ours now).

    No row lock is needed: only the relay holding an aggregate's head may take its
    successors, and every write-back is fenced by the lease owner.
    """
    head_seq = {(h[1], h[2]): h[3] for h in heads}
    per_aggregate = max(1, -(-room // len(heads)))
    params: list[Any] = []
    if postgres:
        values = ", ".join(["(%s, %s, %s::bigint)"] * len(heads))
        for h in heads:
            params.extend([h[1], h[2], h[3]])
        cur.execute(
            f"""
            SELECT f.id, f.aggregate_type, f.aggregate_id, f.seq, f.status, f.ready
            FROM (VALUES {values}) AS h(t, a, s)
            CROSS JOIN LATERAL (
                SELECT p.id, p.aggregate_type, p.aggregate_id, p.seq, p.status, p.next_attempt_at <= %s AS ready
                FROM {TABLE} p
                WHERE p.aggregate_type = h.t AND p.aggregate_id = h.a AND p.status <> 'published' AND p.seq > h.s
                ORDER BY p.seq
                LIMIT %s
            ) AS f
            ORDER BY f.seq
            """,  # noqa: S608
            [*params, _dt(now), per_aggregate],
        )
    else:
        conditions = " OR ".join(["(aggregate_type = %s AND aggregate_id = %s AND seq > %s)"] * len(heads))
        for h in heads:
            params.extend([h[1], h[2], h[3]])
        cur.execute(
            f"""
            SELECT id, aggregate_type, aggregate_id, seq, status, next_attempt_at <= %s
            FROM {TABLE} WHERE status <> 'published' AND ({conditions}) ORDER BY seq LIMIT %s
            """,  # noqa: S608
            [_dt(now), *params, room * 4],
        )
    blocked: set[tuple[str, str]] = set()
    taken: list[Any] = []
    for row_id, agg_type, agg_id, _seq, status, ready in cur.fetchall():
        key = (agg_type, agg_id)
        if key in blocked or key not in head_seq:
            continue
        if status != "pending" or not ready:
            blocked.add(key)  # a dead or backing-off row stops its aggregate here
            continue
        taken.append(row_id)
        if len(taken) >= room:
            break
    return taken


# --- publish --------------------------------------------------------------------------


def _rounds(rows: list[ClaimedRow]) -> list[list[ClaimedRow]]:
    per_aggregate: OrderedDict[tuple[str, str], list[ClaimedRow]] = OrderedDict()
    for row in rows:
        per_aggregate.setdefault((row.aggregate_type, row.aggregate_id), []).append(row)
    depth = max(len(v) for v in per_aggregate.values())
    return [[v[k] for v in per_aggregate.values() if len(v) > k] for k in range(depth)]


def _message_headers(row: ClaimedRow) -> dict[str, str]:
    headers = {str(k): str(v) for k, v in row.headers.items()}
    headers["Nats-Msg-Id"] = str(row.id)
    headers["aggregate-type"] = row.aggregate_type
    headers["aggregate-id"] = row.aggregate_id
    if row.aggregate_version is not None:
        headers["aggregate-version"] = str(row.aggregate_version)
    return headers


async def publish_rows(js: JetStreamContext, rows: list[ClaimedRow], *, timeout: float) -> PublishResult:
    """Publish claimed rows round by round; see the module docstring."""
    result = PublishResult()
    failed_aggregates: set[tuple[str, str]] = set()
    for batch in _rounds(rows):
        pending: list[tuple[ClaimedRow, asyncio.Future]] = []
        for row in batch:
            key = (row.aggregate_type, row.aggregate_id)
            if key in failed_aggregates:
                result.skipped.append(row)
                continue
            try:
                registry.get(row.subject)
                # No wait_stall: it wraps every call in asyncio.wait_for (5x slower); a batch never
                # exceeds the context's publish_async_max_pending, so the semaphore never blocks.
                future = await js.publish_async(nats_subject(row.subject), row.body, headers=_message_headers(row))
            except MaxPayloadError as exc:
                failed_aggregates.add(key)
                result.failed.append((row, f"payload too large for the server: {exc}", True))
                continue
            except UnknownSubjectError as exc:
                failed_aggregates.add(key)
                result.failed.append((row, str(exc), True))
                continue
            except Exception as exc:  # noqa: BLE001 - connection-level failure: the row is retried
                failed_aggregates.add(key)
                result.failed.append((row, f"{type(exc).__name__}: {exc}", False))
                continue
            pending.append((row, future))
        if not pending:
            continue
        # Each wait is bounded: nats.py leaves a future unresolved on some server errors (issue 985).
        futures = [f for _, f in pending]
        done, not_done = await asyncio.wait(futures, timeout=timeout)
        for future in not_done:
            future.cancel()
        for row, future in pending:
            key = (row.aggregate_type, row.aggregate_id)
            if future in not_done:
                failed_aggregates.add(key)
                result.failed.append((row, f"no PubAck within {timeout:.1f}s", False))
                continue
            exc = future.exception()
            if exc is not None:
                failed_aggregates.add(key)
                result.failed.append((row, f"{type(exc).__name__}: {exc}", False))
                continue
            ack = future.result()
            result.published.append((row, ack.stream, ack.seq))
    return result


# --- mark -----------------------------------------------------------------------------


def mark_results(result: PublishResult, *, owner: str, conf: OutboxSettings) -> tuple[int, int]:
    """Write the outcome of a batch; returns (failed, dead)."""
    dead = 0
    postgres = connection.vendor == "postgresql"
    now = timezone.now()
    with transaction.atomic(), connection.cursor() as cur:
        if result.published:
            if postgres:
                cur.execute(
                    f"""
                    UPDATE {TABLE} AS o SET status = 'published', published_at = %s, stream = v.stream,
                        stream_sequence = v.sseq, lease_until = NULL, lease_owner = '',
                        attempts = o.attempts + 1, last_error = ''
                    FROM (SELECT unnest(%s::uuid[]) AS id, unnest(%s::bigint[]) AS sseq,
                                 unnest(%s::text[]) AS stream) AS v
                    WHERE o.id = v.id AND o.lease_owner = %s
                    """,  # noqa: S608
                    [
                        now,
                        [r.id for r, _, _ in result.published],
                        [s for _, _, s in result.published],
                        [st for _, st, _ in result.published],
                        owner,
                    ],
                )
            else:
                cur.executemany(
                    f"""
                    UPDATE {TABLE} SET status = 'published', published_at = %s, stream = %s,
                        stream_sequence = %s, lease_until = NULL, lease_owner = '',
                        attempts = attempts + 1, last_error = ''
                    WHERE id = %s AND lease_owner = %s
                    """,  # noqa: S608
                    [(_dt(now), st, s, _pk(r.id), owner) for r, st, s in result.published],
                )
        for row, error, permanent in result.failed:
            attempt = row.attempts + 1
            is_dead = permanent or attempt >= conf.MAX_ATTEMPTS
            dead += int(is_dead)
            cur.execute(
                f"""
                UPDATE {TABLE} SET status = %s, attempts = attempts + 1, last_error = %s,
                    next_attempt_at = %s, lease_until = NULL, lease_owner = ''
                WHERE id = %s AND lease_owner = %s
                """,  # noqa: S608
                [
                    "dead" if is_dead else "pending",
                    error[:2000],
                    _dt(now + timedelta(seconds=backoff_seconds(attempt, conf))),
                    _pk(row.id),
                    owner,
                ],
            )
            log = logger.error if is_dead else logger.warning
            log(
                "outbox.%s event_id=%s subject=%s aggregate=%s:%s attempt=%d error=%s",
                "dead" if is_dead else "retry",
                row.id,
                row.subject,
                row.aggregate_type,
                row.aggregate_id,
                attempt,
                error,
            )
        if result.skipped:
            ids = [_pk(r.id) for r in result.skipped]
            cur.execute(
                f"UPDATE {TABLE} SET lease_until = NULL, lease_owner = '' "  # noqa: S608
                f"WHERE lease_owner = %s AND id IN ({_placeholders(len(ids))})",
                [owner, *ids],
            )
    return len(result.failed), dead


# --- the loop -------------------------------------------------------------------------


class Relay:
    """Drains the outbox. One instance per process; cheap to call repeatedly."""

    def __init__(self, *, broker: Broker | None = None, conf: OutboxSettings | None = None) -> None:
        self.conf = conf or outbox_settings()
        self.broker = broker or get_broker()
        self._streams_ready = False

    def ensure_streams(self) -> None:
        reports = self.broker.call(lambda js: ensure_streams(js), timeout=15)
        for report in reports:
            if report.action != "unchanged":
                logger.info("outbox.stream name=%s action=%s drift=%s", report.name, report.action, report.drift)
        self._streams_ready = True

    # A batch is claim -> start publishing -> collect the PubAcks -> mark. run_batch() does the
    # four in sequence; drain() overlaps them: batch N+1 is claimed while N is on the wire, and
    # N is marked while N+1 is. That is safe because a claimed batch holds its aggregates (their
    # heads are leased), so the next claim can only take other aggregates.

    def _claim(self, *, exhaustive: bool = True) -> tuple[str, list[ClaimedRow]]:
        owner = uuid.uuid4().hex
        rows = claim_batch(
            limit=self.conf.BATCH_SIZE, lease_seconds=self.conf.LEASE_SECONDS, owner=owner, exhaustive=exhaustive
        )
        if rows and _FAULT == "crash-after-claim":
            os.kill(os.getpid(), signal.SIGKILL)
        return owner, rows

    def _start(self, rows: list[ClaimedRow]) -> tuple[concurrent.futures.Future | None, Exception | None, float]:
        timeout = self.conf.PUBLISH_TIMEOUT * (len(_rounds(rows)) + 1) + 5
        try:
            if not self._streams_ready:
                self.ensure_streams()
            future = self.broker.submit(lambda js: publish_rows(js, rows, timeout=self.conf.PUBLISH_TIMEOUT))
        except (PublishError, OutboxError, OSError) as exc:
            return None, exc, timeout
        return future, None, timeout

    def _collect(self, rows: list[ClaimedRow], started: tuple) -> PublishResult:
        future, error, timeout = started
        if future is not None:
            try:
                return self.broker.result(future, timeout=timeout)
            except (PublishError, OutboxError, OSError) as exc:
                error = exc
        # NATS unreachable: the head of each aggregate carries the failure and backs off.
        heads = _first_per_aggregate(rows)
        head_ids = {r.id for r in heads}
        return PublishResult(
            failed=[(r, str(error), False) for r in heads],
            skipped=[r for r in rows if r.id not in head_ids],
        )

    def _mark(self, owner: str, rows: list[ClaimedRow], result: PublishResult, started_at: float) -> BatchReport:
        if _FAULT == "crash-after-publish" and result.published:
            os.kill(os.getpid(), signal.SIGKILL)
        failed, dead = mark_results(result, owner=owner, conf=self.conf)
        report = BatchReport(
            claimed=len(rows),
            published=len(result.published),
            failed=failed,
            dead=dead,
            skipped=len(result.skipped),
            duration_ms=(time.perf_counter() - started_at) * 1000,
        )
        metrics.PUBLISHED.inc(report.published)
        if failed:
            metrics.PUBLISH_FAILURES.inc(failed)
        if dead:
            metrics.DEAD.inc(dead)
        logger.debug(
            "outbox.batch claimed=%d published=%d failed=%d dead=%d skipped=%d ms=%.1f",
            report.claimed,
            report.published,
            report.failed,
            report.dead,
            report.skipped,
            report.duration_ms,
        )
        return report

    def run_batch(self) -> BatchReport:
        """Claim, publish and mark one batch."""
        started_at = time.perf_counter()
        owner, rows = self._claim()
        if not rows:
            return BatchReport()
        result = self._collect(rows, self._start(rows))
        return self._mark(owner, rows, result, started_at)

    def drain(self, *, time_budget: float | None = None, on_batch: Any = None) -> BatchReport:
        """Run pipelined batches until nothing is claimable, NATS fails, or the budget is spent."""
        total = BatchReport()
        deadline = time.monotonic() + time_budget if time_budget else None
        inflight: tuple | None = None  # (owner, rows, started, started_at)
        stopping = False
        pipeline = True
        while True:
            if inflight is not None:
                early: tuple[str, list[ClaimedRow]] = ("", [])
                if pipeline and not stopping:
                    early = self._claim(exhaustive=False)
                    # Empty: our own batch holds the front of the queue; claim after marking instead.
                    pipeline = bool(early[1])
                early_at = time.perf_counter()
                result = self._collect(inflight[1], inflight[2])
                broken = not result.published and bool(result.failed)
                following = None
                if early[1]:
                    if broken:  # NATS just failed: hand the freshly claimed rows back untouched.
                        mark_results(PublishResult(skipped=early[1]), owner=early[0], conf=self.conf)
                    else:
                        following = (early[0], early[1], self._start(early[1]), early_at)
                report = self._mark(inflight[0], inflight[1], result, inflight[3])
                _accumulate(total, report)
                if on_batch is not None:
                    on_batch(report)
                stopping = stopping or broken or (deadline is not None and time.monotonic() > deadline)
                inflight = following
                if inflight is not None:
                    continue
            if stopping:
                return total
            owner, rows = self._claim()
            if not rows:
                return total
            inflight = (owner, rows, self._start(rows), time.perf_counter())
            pipeline = True


def _accumulate(total: BatchReport, report: BatchReport) -> None:
    total.claimed += report.claimed
    total.published += report.published
    total.failed += report.failed
    total.dead += report.dead
    total.skipped += report.skipped


def _first_per_aggregate(rows: list[ClaimedRow]) -> list[ClaimedRow]:
    seen: set[tuple[str, str]] = set()
    first = []
    for row in rows:
        key = (row.aggregate_type, row.aggregate_id)
        if key not in seen:
            seen.add(key)
            first.append(row)
    return first
