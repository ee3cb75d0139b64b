"""The relay: claim -> publish -> mark. The design and why it keeps its promises: docs/relay.md.

1. **Claim** (one read-only statement; no transaction stays open). Take pending rows in
   ``seq`` order from a bounded *window* at the front of the queue. A row is claimable
   when it is due, not leased by anyone, its aggregate has no dead row, no earlier row of
   its aggregate in the window fails any of that, and it is not already in one of our
   batches in flight. Every earlier unfinished row of an aggregate is in the window (the
   window is a prefix of the queue, in ``seq`` order), so the claimed rows of an aggregate
   are the next ones due, in version order: no anti-join over the table, no scan of
   published history.

   Who may claim what, on PostgreSQL (``OWNERSHIP = "partitions"``, the default): the
   aggregates are hashed into 64 partitions and a relay claims only from partitions its
   session holds an advisory lock on, so two relays never hold the same aggregate and
   the claim writes nothing. A relay holds about 1/n of the partitions when n relays run
   (rebalanced every ``REBALANCE_SECONDS``); its session ending (crash, kill, lost
   connection) releases them at once. Marks are fenced by that session being alive. With
   ``OWNERSHIP = "leases"`` (and always on SQLite) claims are serialised and every claimed
   row is leased (``lease_until``/``lease_owner``); marks are fenced by the lease owner and
   a crashed relay's rows come back when their leases expire.
2. **Publish** (no transaction open). Each aggregate's rows form a chain: its next row
   goes out when the PubAck of the previous one is in, so at most one message per
   aggregate is unacknowledged and a stream never holds version N+1 without N. Chains of
   different aggregates are pipelined, and a chain that continues an aggregate of an
   earlier batch in flight starts only once that batch's chain was published entirely.
   ``Nats-Msg-Id`` is the event id; a duplicate PubAck counts as success. A failure ends
   the chain; its later rows are not attempted.
3. **Mark** (one statement per outcome). Published rows get their stream sequence;
   failed rows get attempts, last_error and a backoff, or become dead.

:meth:`Relay.drain` keeps ``PIPELINE_DEPTH`` batches claimed and not yet marked; on
PostgreSQL claims and marks run on two worker sessions while the calling thread holds
the partitions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import os
import queue
import random
import re
import signal
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import msgspec
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from outbox import metrics
from outbox.broker import Broker, get_broker
from outbox.conf import OutboxSettings, outbox_settings
from outbox.contracts import registry
from outbox.errors import ConfigurationError, OutboxError, PublishError, UnknownSubjectError
from outbox.models import OutboxEvent
from outbox.streams import ensure_streams, nats_subject

logger = logging.getLogger("outbox.relay")

T = TypeVar("T")

#: Fault injection for the fault suite: "crash-after-publish" SIGKILLs the process after
#: the PubAcks arrived and before the rows are marked; "crash-after-claim" after the claim.
_FAULT = os.environ.get("OUTBOX_FAULT_INJECTION", "")

TABLE = OutboxEvent._meta.db_table

#: Hash partitions of the aggregates (PostgreSQL, OWNERSHIP="partitions"). A constant: every
#: relay of a database must map an aggregate to the same partition.
PARTITIONS = 64
#: First key of every advisory lock the relay takes ("obx0"); the second key is the partition,
#: or one of the two below.
LOCK_CLASS = 0x6F627830
_MEMBER_KEY = 1000  # shared lock held by every relay that is draining: counts the relays
_CLAIM_KEY = 1001  # transaction lock serialising lease-mode claims

#: The window of a claim: the oldest pending rows, this many times the batch size (plus the
#: rows of our batches in flight, which sit at the front of the queue).
WINDOW_FACTOR = 2


@dataclass(slots=True)
class ClaimedRow:
    id: str
    seq: int
    subject: str
    body: bytes
    headers: dict[str, str]
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int | None
    attempts: int
    partition: int = -1
    #: The ``seq`` of the row this one follows in its aggregate when that row is in one of our
    #: batches still in flight (None: every earlier row of the aggregate is published). It may go
    #: only after the chain that ends with that very row was published entirely.
    after: int | None = None


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


# --- database helpers -----------------------------------------------------------------


def _postgres() -> bool:
    return connection.vendor == "postgresql"


def _cursor() -> Any:
    """A cursor on Django's connection. On PostgreSQL a plain psycopg cursor: parameters are
    bound by the server (Django's default cursor quotes every array element client-side)."""
    if _postgres():
        import psycopg

        connection.ensure_connection()
        return psycopg.Cursor(connection.connection)
    return connection.cursor()


def _pk(value: str) -> Any:
    return OutboxEvent._meta.pk.get_db_prep_value(uuid.UUID(value), connection)


def _dt(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _placeholders(n: int) -> str:
    return ", ".join(["%s"] * n)


_decode_headers = msgspec.json.Decoder(dict[str, Any]).decode


def _row(r: tuple, *, partition: int = -1) -> ClaimedRow:
    """(id, seq, subject, payload text, headers text, type, id, version, attempts) -> ClaimedRow."""
    row_id = r[0] if len(r[0]) == 36 else str(uuid.UUID(r[0]))  # SQLite stores 32 hex digits
    return ClaimedRow(
        row_id, r[1], r[2], r[3].encode(), _decode_headers(r[4]) if r[4] else {}, r[5], r[6], r[7], r[8], partition
    )


# --- claim: partitions (PostgreSQL) ---------------------------------------------------

_HASH = "hashtextextended(o.aggregate_type || ':' || o.aggregate_id, 0)"

#: One read-only statement. ``w``: the window (oldest pending rows of our partitions) with an
#: ``ok`` flag per row and ``mine`` for rows of our batches in flight; ``c``: the ok rows not in
#: flight with no earlier not-ok row of their aggregate in the window, oldest first; then their
#: columns, fetched by ctid. A row in flight counts as ok: the rows after it may be claimed
#: (``after``: the aggregate's last row in flight, necessarily an earlier one), and the
#: publisher chains them behind it (they go only if the chain ending there was published entirely).
#: Aggregates are compared by a 64-bit hash: a collision can only hold a row back.
_OWNED_CLAIM = f"""
WITH w AS MATERIALIZED (
    SELECT s.tid, s.seq, s.h,
           s.ready AND s.h NOT IN (SELECT {_HASH} FROM {TABLE} o WHERE o.status = 'dead') AS ok,
           s.seq IN (SELECT unnest(string_to_array(%(inflight)s, ',')::bigint[])) AS mine
    FROM (
        SELECT o.ctid AS tid, o.seq, {_HASH} AS h,
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
       o.aggregate_version, o.attempts, (c.h & {PARTITIONS - 1})::int, t.after
FROM c JOIN {TABLE} o ON o.ctid = c.tid LEFT JOIN t ON t.h = c.h
ORDER BY c.seq
"""  # noqa: S608 - table name and constants only


def _claim_owned(
    cur: Any, *, limit: int, window: int | None, inflight: str, partitions: list[int] | None
) -> list[ClaimedRow]:
    """``inflight``: the seqs of our rows in flight, comma-separated (one parameter, parsed by the server)."""
    sql = _OWNED_CLAIM.format(
        partitions=f"AND ({_HASH} & {PARTITIONS - 1}) = ANY(%(partitions)s::int[])" if partitions is not None else "",
        window="LIMIT %(window)s" if window is not None else "",
    )
    params = {"now": timezone.now(), "inflight": inflight, "limit": limit, "window": window, "partitions": partitions}
    cur.execute(sql, params)
    rows = []
    for r in cur.fetchall():
        row = _row(r, partition=r[9])
        row.after = r[10]
        rows.append(row)
    return rows


class _Partitions:
    """The partitions this relay's database session holds (session-level advisory locks)."""

    def __init__(self, conf: OutboxSettings) -> None:
        self.conf = conf
        self.token = ""
        self.owned: set[int] = set()
        self.members = 1
        self.next_check = 0.0

    @property
    def joined(self) -> bool:
        return bool(self.token)

    def join(self, cur: Any) -> None:
        """Count ourselves among the relays; the token names this session (pid and start time)."""
        # A client that vanishes without closing its socket (host down) must not keep its
        # partitions for hours: have the server probe the connection.
        idle = str(max(1, int(self.conf.LEASE_SECONDS / 3)))
        cur.execute(
            "SELECT pg_advisory_lock_shared(%s, %s), "
            "set_config('tcp_keepalives_idle', %s, false), set_config('tcp_keepalives_interval', %s, false), "
            "set_config('tcp_keepalives_count', '3', false), "
            "(SELECT pid || '@' || backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
            [LOCK_CLASS, _MEMBER_KEY, idle, idle],
        )
        self.token = cur.fetchone()[4]
        self.rebalance(cur, busy=set())

    def rebalance(self, cur: Any, *, busy: set[int], greedy: bool = False) -> None:
        """Hold about PARTITIONS / relays partitions: give back extra ones not in flight, take free ones."""
        # The server's word on how many relays there are and which partitions this session holds.
        cur.execute(
            "SELECT count(*) FILTER (WHERE objid::bigint = %s), "
            "coalesce(array_agg(objid::int) FILTER (WHERE pid = pg_backend_pid() AND objid::bigint < %s), '{}') "
            "FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = %s AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [_MEMBER_KEY, PARTITIONS, LOCK_CLASS],
        )
        members, held = cur.fetchone()
        self.members = max(1, members)
        self.owned = set(held)
        share = PARTITIONS if greedy else math.ceil(PARTITIONS / self.members)
        if len(self.owned) > share:
            extra = sorted(self.owned - busy, reverse=True)[: len(self.owned) - share]
            if extra:
                cur.execute("SELECT pg_advisory_unlock(%s, p) FROM unnest(%s::int[]) AS p", [LOCK_CLASS, extra])
                self.owned.difference_update(extra)
        elif len(self.owned) < share:
            # Materialized, so that the lock function runs only for the rows LIMIT lets through
            # (pushed into the scan, it would lock every free partition).
            cur.execute(
                "WITH free AS MATERIALIZED (SELECT p FROM generate_series(0, %s) AS p WHERE p <> ALL(%s::int[]) "
                "ORDER BY random()) SELECT free.p FROM free WHERE pg_try_advisory_lock(%s, free.p) LIMIT %s",
                [PARTITIONS - 1, sorted(self.owned), LOCK_CLASS, share - len(self.owned)],
            )
            self.owned.update(r[0] for r in cur.fetchall())
        self.next_check = time.monotonic() + self.conf.REBALANCE_SECONDS

    def leave(self, cur: Any) -> None:
        owned, self.owned, self.token = sorted(self.owned), set(), ""
        cur.execute(
            "SELECT pg_advisory_unlock(%s, p) FROM unnest(%s::int[]) AS p",
            [LOCK_CLASS, owned],
        )
        cur.execute("SELECT pg_advisory_unlock_shared(%s, %s)", [LOCK_CLASS, _MEMBER_KEY])

    def others(self, cur: Any) -> int:
        """Relays draining right now, other than us."""
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = %s "
            "AND objid::bigint = %s AND objsubid = 2 AND pid <> pg_backend_pid() "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [LOCK_CLASS, _MEMBER_KEY],
        )
        return cur.fetchone()[0]


# --- claim: leases (any database) ------------------------------------------------------


def claim_batch(
    *, limit: int, lease_seconds: float, owner: str, exhaustive: bool = True, in_flight: int = 0
) -> list[ClaimedRow]:
    """Lease up to ``limit`` claimable rows to ``owner`` and return them in ``seq`` order.

    The lease mode (``OWNERSHIP = "leases"``, and SQLite): claims are serialised (an advisory
    transaction lock on PostgreSQL, the write lock on SQLite), the window walk runs here,
    and the rows are leased in the same short transaction. ``exhaustive=False`` looks at
    the window only: what a relay that already has a batch in flight wants; ``in_flight``
    rows of the caller's batches sit at the front of the queue and widen the window.
    """
    postgres = _postgres()
    with transaction.atomic(), _cursor() as cur:
        if postgres:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [LOCK_CLASS, _CLAIM_KEY])
        now = timezone.now()
        window = in_flight + int(limit * WINDOW_FACTOR)
        chosen = _walk_window(cur, now=now, limit=limit, window=window)
        if not chosen and exhaustive:
            chosen = _walk_window(cur, now=now, limit=limit, window=None)
        if not chosen:
            return []
        ids = [c[0] for c in chosen]
        keys = [_pk(i) for i in ids]
        lease = _dt(now + timedelta(seconds=lease_seconds))
        # Re-checked on the row: a concurrent write (e.g. the late mark of a relay whose lease
        # expired) may have changed it since the window was read.
        cur.execute(
            f"UPDATE {TABLE} SET lease_until = %s, lease_owner = %s "  # noqa: S608
            f"WHERE id IN ({_placeholders(len(keys))}) AND status = 'pending' AND next_attempt_at <= %s "
            "AND (lease_until IS NULL OR lease_until < %s)",
            [lease, owner, *keys, _dt(now), _dt(now)],
        )
        payload = "payload::text, headers::text" if postgres else "payload, headers"
        id_col = "id::text" if postgres else "id"
        cur.execute(
            f"SELECT {id_col}, seq, subject, {payload}, aggregate_type, aggregate_id, aggregate_version, attempts "  # noqa: S608
            f"FROM {TABLE} WHERE lease_owner = %s AND id IN ({_placeholders(len(keys))})",
            [owner, *keys],
        )
        leased = {r.id: r for r in map(_row, cur.fetchall())}
        rows, gaps = _contiguous(chosen, leased)
        if gaps:
            cur.execute(
                f"UPDATE {TABLE} SET lease_until = NULL, lease_owner = '' "  # noqa: S608
                f"WHERE lease_owner = %s AND id IN ({_placeholders(len(gaps))})",
                [owner, *[_pk(i) for i in gaps]],
            )
    return rows


def _walk_window(cur: Any, *, now: datetime, limit: int, window: int | None) -> list[tuple[str, tuple[str, str]]]:
    """(id, aggregate) of the claimable rows among the oldest ``window`` pending rows."""
    id_col = "o.id::text" if _postgres() else "o.id"
    cur.execute(
        f"""
        SELECT {id_col}, o.aggregate_type, o.aggregate_id,
               o.next_attempt_at <= %s AND (o.lease_until IS NULL OR o.lease_until < %s)
               AND NOT EXISTS (SELECT 1 FROM {TABLE} d WHERE d.status = 'dead'
                               AND d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id
                               AND d.seq < o.seq)
        FROM {TABLE} o WHERE o.status = 'pending' ORDER BY o.seq {"LIMIT %s" if window else ""}
        """,  # noqa: S608
        [_dt(now), _dt(now), *([window] if window else [])],
    )
    blocked: set[tuple[str, str]] = set()
    chosen = []
    for row_id, agg_type, agg_id, ok in cur.fetchall():
        key = (agg_type, agg_id)
        if key in blocked:
            continue
        if not ok:
            blocked.add(key)  # a row that is not due, leased, or behind a dead row stops its aggregate
            continue
        chosen.append((row_id if len(row_id) == 36 else str(uuid.UUID(row_id)), key))
        if len(chosen) >= limit:
            break
    return chosen


def _contiguous(
    chosen: list[tuple[str, tuple[str, str]]], leased: dict[str, ClaimedRow]
) -> tuple[list[ClaimedRow], list[str]]:
    """The leased rows that follow their aggregate's chain without a hole, and the others."""
    broken: set[tuple[str, str]] = set()
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


# --- publish --------------------------------------------------------------------------


class PublishRejected(Exception):  # noqa: N818 - a verdict, not a crash
    """The message can never be published as it is (too large, bad header): retrying cannot help."""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode

#: nats-py's rule for header names (RFC 7230 token characters).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans("", "", "\r\n")

#: Called as handler(token, stream, stream sequence, None) for a PubAck, or (token, "", 0, error) for a refusal.
AckHandler = Callable[[Any, str, int, "str | None"], None]


class JetStreamPublisher:
    """Pipelined JetStream publishes on one connection, each answered through a handler.

    A JetStream publish is a core NATS request: the message goes to the stream's subject
    with a reply subject, and the server answers there with a PubAck. nats-py's
    ``publish_async`` spends ~25 us of Python per message on bookkeeping (a semaphore
    wrapped in ``asyncio.wait_for``, random tokens, header regexes, a flush request per
    message). This keeps one wildcard reply subscription per connection, numbers its
    replies, frames the ``HPUB`` command itself and flushes once per burst.

    Per message: :meth:`reserve` a reply subject (with the handler its answer goes to),
    then :meth:`queue` it (wire path) or ``await`` :meth:`send` (public path); then
    :meth:`flush`. The PubAck, or the server's refusal (e.g. 503: no stream for this
    subject), arrives later through the handler. An answer that never comes (connection
    lost) is the caller's to time out, with :meth:`forget`.

    ``wire=True`` (when nats-py still has its command buffer, checked here) appends the
    framed command to nats-py's outgoing buffer, which its flusher task writes; otherwise
    the public ``Client.publish`` sends it, correct and about twice as expensive.
    """

    def __init__(self, nc: NATS, *, wire: bool = True) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._next = 0
        self._waiting: dict[str, tuple[AckHandler, Any]] = {}
        self._sub: Any = None

        self.wire = (
            wire
            and isinstance(getattr(nc, "_pending", None), list)
            and isinstance(getattr(nc, "_pending_data_size", None), int)
            and callable(getattr(nc, "_flush_pending", None))
        )

    @classmethod
    async def for_client(cls, nc: NATS, *, wire: bool = True) -> JetStreamPublisher:
        """The publisher of this connection (one reply subscription per connection).

        Callers get it in the order they asked (they wait on the same future), so batches
        submitted in order register their chains in order.
        """
        pending = _publishers.get(nc)
        if pending is None:
            pending = _publishers[nc] = asyncio.get_running_loop().create_future()
            publisher = cls(nc, wire=wire)
            try:
                publisher._sub = await nc.subscribe(publisher._prefix + "*", cb=publisher._on_reply)
                if publisher.wire:
                    publisher._take_replies_from_the_parser()
            except BaseException as exc:
                del _publishers[nc]
                pending.set_exception(exc)
                raise
            pending.set_result(publisher)
        publisher = await pending
        if not wire:
            publisher.wire = False
        return publisher

    async def _on_reply(self, msg: Msg) -> None:
        self._answer(msg.subject, msg.data, (msg.headers or {}).get("Status", ""))

    def _answer(self, subject: str, data: bytes, status: str) -> None:
        waiting = self._waiting.pop(subject, None)
        if waiting is None:
            return  # answered after it was given up on: the caller already counted it as failed
        handler, token = waiting
        if not data:
            reason = "no JetStream stream for this subject" if status == "503" else "empty PubAck"
            handler(token, "", 0, f"{reason} (status {status or '?'})")
            return
        try:
            ack = _decode_ack(data)
        except msgspec.DecodeError:
            handler(token, "", 0, f"unreadable PubAck: {data[:200]!r}")
            return
        if ack.error is not None:
            code = ack.error.get("err_code") or ack.error.get("code")
            handler(token, "", 0, f"JetStream refused the message ({code}): {ack.error.get('description', '')}")
            return
        handler(token, ack.stream, ack.seq, None)

    def _take_replies_from_the_parser(self) -> None:
        """Wire path: answer PubAcks straight from nats-py's protocol parser.

        nats-py turns every incoming message into a ``Msg``, queues it to the subscription's
        task and awaits the callback: a third of the relay's Python time per message. The
        parser hands each message to ``Client._process_msg(sid, subject, reply, data,
        headers)``; messages for our reply subscription are answered there and everything
        else goes on as before. Installed only when that method has exactly this signature.
        """
        nc, sid = self._nc, getattr(self._sub, "_id", None)
        original = getattr(nc, "_process_msg", None)
        try:
            params = list(inspect.signature(original).parameters) if original else []
        except (TypeError, ValueError):
            params = []
        if sid is None or params != ["sid", "subject", "reply", "data", "headers"]:
            return
        answer = self._answer

        async def _process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
            if msg_sid != sid:
                return await original(msg_sid, subject, reply, data, headers)
            status = headers[9:12].decode() if headers and not data else ""  # "NATS/1.0 503\r\n..."
            answer(subject.decode(), data, status)
            return None

        nc._process_msg = _process_msg  # noqa: SLF001

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    def check_size(self, header: bytes, payload: bytes) -> None:
        """PublishRejected if the server would refuse the message for its size (and drop the connection)."""
        size = len(header) + len(payload)
        if size > self._nc.max_payload:
            raise PublishRejected(
                f"payload too large for the server: {size} bytes with headers, max_payload is {self._nc.max_payload}"
            )

    def reserve(self, handler: AckHandler, token: Any) -> str:
        """A fresh reply subject; its answer goes to ``handler(token, ...)``."""
        self._next += 1
        reply = f"{self._prefix}{self._next}"
        self._waiting[reply] = (handler, token)
        return reply

    def queue(self, subject: str, reply: str, payload: bytes, header: bytes) -> None:
        """Append one framed ``HPUB`` to nats-py's outgoing buffer (wire path; see :meth:`flush`)."""
        command = b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
            subject.encode(),
            reply.encode(),
            len(header),
            len(header) + len(payload),
            header,
            payload,
        )
        nc = self._nc
        nc._pending.append(command)  # noqa: SLF001 - checked in __init__; see the class docstring
        nc._pending_data_size += len(command)  # noqa: SLF001

    async def send(self, subject: str, reply: str, payload: bytes, headers: dict[str, str]) -> None:
        """Publish one message through nats-py's public API (it flushes by itself)."""
        await self._nc.publish(subject, payload, reply=reply, headers=headers)

    async def flush(self) -> None:
        """Have nats-py write what :meth:`queue` appended."""
        if self.wire and self._nc.is_connected:
            await self._nc._flush_pending()  # noqa: SLF001

    def forget(self, reply: str) -> None:
        """Stop waiting for an answer (the caller gave up on it)."""
        self._waiting.pop(reply, None)


_publishers: weakref.WeakKeyDictionary[NATS, asyncio.Future[JetStreamPublisher]] = weakref.WeakKeyDictionary()


class _Tails:
    """Per aggregate, the last chain started for it on this event loop: the ``seq`` of its last
    row and its completion (True when every row of it was published), kept ``KEEP`` seconds after it was started.

    A chain of a later batch claimed while its predecessor was in flight names that row
    (``ClaimedRow.after``). It waits for the chain that ends with exactly that row, and goes only
    if that chain was published entirely. Any other record (an older chain of the aggregate, when
    the batch holding the predecessor never reached the publisher; none, long after) means the
    predecessor's fate is unknown here: the chain is skipped, its rows stay pending and a later
    claim takes them in order.
    """

    #: A record is needed only until the chains claimed behind it registered: within a claim's
    #: time of it (records of chains still in flight are never dropped). One dropped early only
    #: makes a follower skip (its rows stay pending). Kept short, the records of a relay touching
    #: 100,000 aggregates a minute no longer cost ~50 MiB.
    KEEP = 5.0

    def __init__(self) -> None:
        self._chains: dict[tuple[str, str], tuple[int, asyncio.Future[bool], float]] = {}

    def get(self, key: tuple[str, str], last_seq: int) -> asyncio.Future[bool] | None:
        """The completion of the chain of ``key`` that ended with row ``last_seq``, if it is the last one on record."""
        entry = self._chains.get(key)
        return entry[1] if entry and entry[0] == last_seq else None

    def put(self, key: tuple[str, str], last_seq: int, future: asyncio.Future[bool], now: float) -> None:
        self._chains.pop(key, None)  # re-insert: the dict stays in order of registration
        self._chains[key] = (last_seq, future, now)

    def prune(self, now: float) -> None:
        chains = self._chains
        while chains:
            key, (_seq, future, registered) = next(iter(chains.items()))
            if not future.done() or registered + self.KEEP > now:
                return
            del chains[key]


_loop_tails: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Tails] = weakref.WeakKeyDictionary()


def _tails_of(loop: asyncio.AbstractEventLoop) -> _Tails:
    tails = _loop_tails.get(loop)
    if tails is None:
        tails = _loop_tails[loop] = _Tails()
    return tails


_RESERVED = frozenset({"Nats-Msg-Id", "aggregate-type", "aggregate-id", "aggregate-version"})
_good_names: set[str] = set()


def _clean(value: Any) -> str:
    """A header value as nats-py sends it: stripped, without CR/LF."""
    if type(value) is not str:
        value = "" if value is None else str(value)
    elif value.isprintable():  # the usual case: one pass in C, no CR/LF in it
        return value.strip()
    return value.translate(_NEWLINES).strip()


def _header_block(row: ClaimedRow) -> bytes:
    """The message's ``NATS/1.0`` header block: the event's headers (correlation, causation),
    then ``Nats-Msg-Id`` and the aggregate. nats-py's rules: names are tokens, values lose CR/LF."""
    extra = ""
    if row.headers:
        parts = []
        for name, value in row.headers.items():
            if name not in _good_names:
                if name in _RESERVED or not name.strip():
                    continue
                if not _HEADER_NAME.fullmatch(name):
                    raise PublishRejected(f"invalid header name {name!r}")
                _good_names.add(name)
            parts.append(f"{name}: {_clean(value)}\r\n")
        extra = "".join(parts)
    version = "" if row.aggregate_version is None else f"aggregate-version: {row.aggregate_version}\r\n"
    return (
        f"NATS/1.0\r\n{extra}Nats-Msg-Id: {row.id}\r\naggregate-type: {_clean(row.aggregate_type)}\r\n"
        f"aggregate-id: {_clean(row.aggregate_id)}\r\n{version}\r\n"
    ).encode()


def _message_headers(row: ClaimedRow) -> dict[str, str]:
    headers = dict(row.headers)
    headers["Nats-Msg-Id"] = row.id
    headers["aggregate-type"] = row.aggregate_type
    headers["aggregate-id"] = row.aggregate_id
    if row.aggregate_version is not None:
        headers["aggregate-version"] = str(row.aggregate_version)
    return headers


class _Subjects(dict):
    """Event name -> NATS subject, checked against the contract registry once per name."""

    def __missing__(self, name: str) -> str:
        registry.get(name)  # UnknownSubjectError for an event nobody registered
        self[name] = subject = nats_subject(name)
        return subject


async def publish_rows(
    js: JetStreamContext | JetStreamPublisher,
    rows: list[ClaimedRow],
    *,
    timeout: float,
    wire: bool = True,
    subjects: dict[str, str] | None = None,
) -> PublishResult:
    """Publish claimed rows, each aggregate's rows as a chain; see the module docstring.

    A chain's next row is sent when the previous one's PubAck is in; chains of different
    aggregates are pipelined. Each message waits at most ``timeout`` seconds for its answer
    (nats.py leaves some server errors unanswered: issue 985). A failure ends its chain.
    """
    if isinstance(js, JetStreamPublisher):
        publisher = js
    else:
        publisher = await JetStreamPublisher.for_client(js._nc, wire=wire)  # noqa: SLF001 - nats-py keeps it private
    subjects = subjects if subjects is not None else _Subjects()
    loop = asyncio.get_running_loop()
    result = PublishResult()
    published = result.published
    chains: dict[tuple[str, str], deque[ClaimedRow]] = {}
    for row in rows:
        chains.setdefault((row.aggregate_type, row.aggregate_id), deque()).append(row)
    ready: deque[deque[ClaimedRow]] = deque()  # chains whose next row may go now
    outstanding: dict[str, str] = {}  # row id -> reply subject, for rows sent and not answered
    sent: deque[tuple[float, ClaimedRow]] = deque()  # in send order, for the timeouts
    wake = asyncio.Event()
    tails = _tails_of(loop)
    finishing: dict[tuple[str, str], asyncio.Future[bool]] = {}
    waiting = 0  # chains waiting for an earlier batch's chain of their aggregate

    def finish(key: tuple[str, str], ok: bool) -> None:
        future = finishing.pop(key, None)
        if future is not None:
            future.set_result(ok)

    def skip(key: tuple[str, str]) -> None:
        rest = chains.pop(key, None)
        if rest:
            result.skipped.extend(rest)
        finish(key, False)

    def fail(row: ClaimedRow, error: str, permanent: bool = False) -> None:
        result.failed.append((row, error, permanent))
        skip((row.aggregate_type, row.aggregate_id))

    def answered(row: ClaimedRow, stream: str, seq: int, error: str | None) -> None:
        if outstanding.pop(row.id, None) is None:
            return  # timed out already
        if error is None:
            published.append((row, stream, seq))
            key = (row.aggregate_type, row.aggregate_id)
            chain = chains.get(key)
            if chain:
                ready.append(chain)
            elif chain is not None:
                del chains[key]
                finish(key, True)
        else:
            fail(row, error)
        wake.set()

    def after(key: tuple[str, str], previous: asyncio.Future[bool]) -> None:
        nonlocal waiting
        waiting -= 1
        if key in chains:
            if not previous.cancelled() and previous.result():
                ready.append(chains[key])
            else:
                skip(key)  # the rows before these were not all published: these must wait
        wake.set()

    # Register every chain before the first await: batches started in order chain in order.
    # A chain that follows one in flight waits for it; when in any doubt (no record of the chain
    # ending with its predecessor: that batch never reached the publisher, or long ago) it does
    # not go: its rows stay pending for later.
    tails.prune(loop.time())
    for key, chain in list(chains.items()):
        predecessor = chain[0].after
        tail = None if predecessor is None else tails.get(key, predecessor)
        finishing[key] = future = loop.create_future()
        tails.put(key, chain[-1].seq, future, loop.time())
        if predecessor is None:
            ready.append(chain)  # every earlier row of the aggregate is published
        elif tail is None:
            skip(key)
        elif not tail.done():
            waiting += 1
            tail.add_done_callback(partial(after, key))
        elif not tail.cancelled() and tail.result():
            ready.append(chain)
        else:
            skip(key)

    try:
        while True:
            if ready:
                now = loop.time()
                connected = publisher.connected
                while ready:
                    row = ready.popleft().popleft()
                    reply = ""
                    try:
                        subject = subjects[row.subject]
                        if not connected:
                            raise PublishError("not connected to NATS")
                        header = _header_block(row)
                        publisher.check_size(header, row.body)
                        # Registered before sending: the answer may come while a send yields.
                        reply = outstanding[row.id] = publisher.reserve(answered, row)
                        if publisher.wire:
                            publisher.queue(subject, reply, row.body, header)
                        else:
                            await publisher.send(subject, reply, row.body, _message_headers(row))
                    except (PublishRejected, UnknownSubjectError) as exc:
                        fail(row, str(exc), True)
                        continue
                    except Exception as exc:  # noqa: BLE001 - connection-level failure: the row is retried
                        if reply:
                            publisher.forget(reply)
                            outstanding.pop(row.id, None)
                        fail(row, f"{type(exc).__name__}: {exc}")
                        continue
                    sent.append((now, row))
                try:
                    await publisher.flush()
                except Exception as exc:  # noqa: BLE001 - the connection broke under us
                    for reply in outstanding.values():
                        publisher.forget(reply)
                    unanswered = [r for _, r in sent if r.id in outstanding]
                    outstanding.clear()
                    for row in unanswered:
                        fail(row, f"{type(exc).__name__}: {exc}")
            if not outstanding:
                if ready:
                    continue
                if waiting:
                    # Only chains behind another batch's are left. That batch bounds its own waits.
                    wake.clear()
                    await wake.wait()
                    continue
                return result
            while sent[0][1].id not in outstanding:
                sent.popleft()  # answered
            wake.clear()
            delay = sent[0][0] + timeout - loop.time()
            if delay > 0 and not ready:
                try:
                    await asyncio.wait_for(wake.wait(), delay)
                except TimeoutError:
                    pass
            now = loop.time()
            while sent and sent[0][0] + timeout <= now:
                _sent_at, row = sent.popleft()
                reply = outstanding.pop(row.id, None)
                if reply is not None:
                    publisher.forget(reply)
                    fail(row, f"no PubAck within {timeout:.1f}s")
    finally:
        # Normally every chain is finished by now; when cancelled, the chains behind ours must not wait.
        for key in list(finishing):
            skip(key)


# --- mark -----------------------------------------------------------------------------


def mark_results(result: PublishResult, *, owner: str, conf: OutboxSettings, owned: bool = False) -> tuple[int, int]:
    """Write the outcome of a batch; returns (failed, dead).

    ``owned=False``: ``owner`` is the rows' lease owner, and every write checks it.
    ``owned=True`` (partitions): ``owner`` names the database session that holds the
    partitions ("pid@backend_start"), and every write checks that it is still alive: if it
    ended, its partitions may belong to another relay by now. Any session may run the mark.
    """
    postgres = _postgres()
    now = timezone.now()
    failures = []
    dead = 0
    for row, error, permanent in result.failed:
        attempt = row.attempts + 1
        is_dead = permanent or attempt >= conf.MAX_ATTEMPTS
        dead += int(is_dead)
        failures.append((row, "dead" if is_dead else "pending", error[:2000], now + _backoff(attempt, conf)))
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
    release = [] if owned else result.skipped
    statements = bool(result.published) + bool(failures) + bool(release)
    if not statements:
        return 0, 0
    # Not inside a caller's transaction: its commit is not ours to make asynchronous.
    async_commit = _ASYNC_COMMIT + ", " if postgres and not connection.in_atomic_block else ""
    fence = (
        "o.status = 'pending' AND EXISTS (SELECT 1 FROM pg_stat_activity a "
        "WHERE a.pid = split_part(%(owner)s, '@', 1)::int "
        "AND a.backend_start = split_part(%(owner)s, '@', 2)::timestamptz)"
        if owned
        else "o.lease_owner = %(owner)s"
    )
    with transaction.atomic() if statements > 1 else nullcontext(), _cursor() as cur:
        if result.published and postgres:
            streams = {st for _, st, _ in result.published}
            cur.execute(
                f"""
                UPDATE {TABLE} AS o SET status = 'published', published_at = %(now)s, stream = v.stream,
                    stream_sequence = v.sseq, lease_until = NULL, lease_owner = '',
                    attempts = o.attempts + 1, last_error = ''
                FROM {async_commit}
                     (SELECT unnest(string_to_array(%(ids)s, ',')::uuid[]) AS id,
                             unnest(string_to_array(%(sseqs)s, ',')::bigint[]) AS sseq,
                             {"%(stream)s::text" if len(streams) == 1 else "unnest(string_to_array(%(streams)s, ' '))"}
                             AS stream) AS v
                WHERE o.id = v.id AND {fence}
                """,  # noqa: S608
                {
                    "now": now,
                    "ids": ",".join([r.id for r, _, _ in result.published]),
                    "sseqs": ",".join([str(s) for _, _, s in result.published]),
                    "stream": next(iter(streams)),
                    "streams": " ".join([st for _, st, _ in result.published]),
                    "owner": owner,
                },
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
                    attempts = attempts + 1, last_error = ''
                WHERE id = %s AND lease_owner = %s
                """,  # noqa: S608
                [(_dt(now), st, s, _pk(r.id), owner) for r, st, s in result.published],
            )
        if failures and postgres:
            cur.execute(
                f"""
                UPDATE {TABLE} AS o SET status = v.status, attempts = o.attempts + 1, last_error = v.error,
                    next_attempt_at = v.next_at, lease_until = NULL, lease_owner = ''
                FROM {async_commit} (SELECT unnest(%(ids)s::uuid[]) AS id, unnest(%(statuses)s::text[]) AS status,
                             unnest(%(errors)s::text[]) AS error, unnest(%(next)s::timestamptz[]) AS next_at) AS v
                WHERE o.id = v.id AND {fence}
                """,  # noqa: S608
                {
                    "ids": [f[0].id for f in failures],
                    "statuses": [f[1] for f in failures],
                    "errors": [f[2] for f in failures],
                    "next": [f[3] for f in failures],
                    "owner": owner,
                },
            )
        elif failures:
            cur.executemany(
                f"""
                UPDATE {TABLE} SET status = %s, attempts = attempts + 1, last_error = %s,
                    next_attempt_at = %s, lease_until = NULL, lease_owner = ''
                WHERE id = %s AND lease_owner = %s
                """,  # noqa: S608
                [(f[1], f[2], _dt(f[3]), _pk(f[0].id), owner) for f in failures],
            )
        if release:
            keys = [_pk(r.id) for r in release]
            cur.execute(
                f"UPDATE {TABLE} SET lease_until = NULL, lease_owner = '' "  # noqa: S608
                f"WHERE lease_owner = %s AND id IN ({_placeholders(len(keys))})",
                [owner, *keys],
            )
    return len(result.failed), dead


#: Marks and leases commit without waiting for the WAL flush (``synchronous_commit = off`` for
#: that transaction only). A mark lost in a database crash (the last ~0.6 s of them) leaves its
#: rows pending: they are published again and JetStream's dedup window absorbs the copies,
#: exactly as after a relay crash between publish and mark. Not waiting for the disk halves
#: the mark's latency on this machine.
_ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"


def _backoff(attempt: int, conf: OutboxSettings) -> timedelta:
    return timedelta(seconds=backoff_seconds(attempt, conf))


# --- the loop -------------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    owner: str
    owned: bool
    rows: list[ClaimedRow]
    future: concurrent.futures.Future | None
    error: Exception | None
    timeout: float
    started_at: float
    seqs: str = ""  # the rows' seqs, comma-separated: what the next claims must leave alone
    deadline: float = 0.0  # monotonic time by which the publish must have answered
    marking: bool = False


class Relay:
    """Drains the outbox. One instance per process; cheap to call repeatedly."""

    def __init__(self, *, broker: Broker | None = None, conf: OutboxSettings | None = None) -> None:
        self.conf = conf or outbox_settings()
        if self.conf.OWNERSHIP not in {"partitions", "leases"}:
            raise ConfigurationError(
                f"OUTBOX['OWNERSHIP'] is {self.conf.OWNERSHIP!r}; use 'partitions' (the default) or 'leases'."
            )
        self.broker = broker or get_broker()
        self._streams_ready = False
        self._partitions = _Partitions(self.conf)
        self._subjects = _Subjects()
        #: The worker sessions of ``_drain_sessions``, kept from one drain to the next: opening two
        #: database connections (and threads) per drain cost more than a small drain itself.
        self._sessions: list[_Session] = []
        self._following = False
        weakref.finalize(self, _close_sessions, self._sessions)  # a Relay dropped without close_sessions()

    def ensure_streams(self) -> None:
        reports = self.broker.call(lambda js: ensure_streams(js), timeout=15)
        for report in reports:
            if report.action != "unchanged":
                logger.info("outbox.stream name=%s action=%s drift=%s", report.name, report.action, report.drift)
        self._streams_ready = True

    def _owned(self) -> bool:
        return self.conf.OWNERSHIP == "partitions" and _postgres()

    # A batch is claim -> start publishing -> collect the PubAcks -> mark. run_batch() does the
    # four in sequence; drain() keeps PIPELINE_DEPTH batches in flight. That is safe because a
    # claim never takes a row of an aggregate that has a row in one of our batches in flight.

    def _claim(self, inflight: deque[_Batch], *, exhaustive: bool) -> _Batch | None:
        """Claim a batch on this thread's connection and start publishing it."""
        if self._owned():
            job = self._owned_job(inflight, exhaustive=exhaustive)
            if job is None:
                return None
            with _cursor() as cur:
                rows = job(cur)
            return self._started(self._partitions.token, True, rows)
        owner = uuid.uuid4().hex
        rows = claim_batch(
            limit=self.conf.BATCH_SIZE,
            lease_seconds=self.conf.LEASE_SECONDS,
            owner=owner,
            exhaustive=exhaustive,
            in_flight=sum(len(b.rows) for b in inflight),
        )
        return self._started(owner, False, rows)

    def _owned_job(self, inflight: deque[_Batch], *, exhaustive: bool) -> Callable[[Any], list[ClaimedRow]] | None:
        """A claim of our partitions, runnable on any session: it reads, and only the session that
        holds the partitions marks. Partitions are rebalanced here, never while a claim runs."""
        parts = self._partitions
        if time.monotonic() >= parts.next_check:
            with _cursor() as cur:
                parts.rebalance(cur, busy={r.partition for b in inflight for r in b.rows})
        if not parts.owned:
            return None
        limit = self.conf.BATCH_SIZE
        partitions = None if len(parts.owned) == PARTITIONS else sorted(parts.owned)
        seqs = ",".join([b.seqs for b in inflight if b.seqs])
        window = sum(len(b.rows) for b in inflight) + int(limit * WINDOW_FACTOR)

        def job(cur: Any) -> list[ClaimedRow]:
            rows = _claim_owned(cur, limit=limit, window=window, inflight=seqs, partitions=partitions)
            if not rows and exhaustive:
                rows = _claim_owned(cur, limit=limit, window=None, inflight=seqs, partitions=partitions)
            return rows

        return job

    def _started(self, owner: str, owned: bool, rows: list[ClaimedRow]) -> _Batch | None:
        if not rows:
            return None
        if _FAULT == "crash-after-claim":
            os.kill(os.getpid(), signal.SIGKILL)
        return self._start(owner, owned, rows)

    def _start(self, owner: str, owned: bool, rows: list[ClaimedRow]) -> _Batch:
        started_at = time.perf_counter()
        longest = max(map(len, _chains(rows).values()))
        # A chain may wait for the chains of earlier batches in flight before its own turn.
        timeout = self.conf.PUBLISH_TIMEOUT * (longest + 1) * max(1, self.conf.PIPELINE_DEPTH) + 5
        try:
            if not self._streams_ready:
                self.ensure_streams()
            subjects, conf = self._subjects, self.conf

            async def publish(nc: NATS) -> PublishResult:
                publisher = await JetStreamPublisher.for_client(nc, wire=conf.WIRE_PUBLISH)
                return await publish_rows(publisher, rows, timeout=conf.PUBLISH_TIMEOUT, subjects=subjects)

            future = self.broker.submit_client(publish)
        except (PublishError, OutboxError, OSError) as exc:
            future, error = None, exc
        else:
            error = None
        seqs = ",".join([str(r.seq) for r in rows]) if owned else ""
        return _Batch(owner, owned, rows, future, error, timeout, started_at, seqs, time.monotonic() + timeout)

    def _collect(self, batch: _Batch) -> PublishResult:
        error = batch.error
        if batch.future is not None:
            try:
                return self.broker.result(batch.future, timeout=max(0.0, batch.deadline - time.monotonic()))
            except (PublishError, OutboxError, OSError) as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - nats-py raises assorted types when it cannot connect
                logger.warning("outbox.publish_failed error=%r", exc, exc_info=True)
                error = exc
        # NATS unreachable: the head of each aggregate carries the failure and backs off.
        heads = [chain[0] for chain in _chains(batch.rows).values()]
        head_ids = {r.id for r in heads}
        return PublishResult(
            failed=[(r, str(error) or type(error).__name__, False) for r in heads],
            skipped=[r for r in batch.rows if r.id not in head_ids],
        )

    def _mark(self, batch: _Batch, result: PublishResult) -> BatchReport:
        if _FAULT == "crash-after-publish" and result.published:
            os.kill(os.getpid(), signal.SIGKILL)
        failed, dead = mark_results(result, owner=batch.owner, conf=self.conf, owned=batch.owned)
        report = BatchReport(
            claimed=len(batch.rows),
            published=len(result.published),
            failed=failed,
            dead=dead,
            skipped=len(result.skipped),
            duration_ms=(time.perf_counter() - batch.started_at) * 1000,
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

    def _join(self) -> None:
        if self._owned() and not self._partitions.joined:
            with _cursor() as cur:
                self._partitions.join(cur)

    def _leave(self, *, force: bool = False) -> None:
        if not self._partitions.joined or (self._following and not force):
            return  # a following relay keeps its partitions from one drain to the next
        try:
            with _cursor() as cur:
                self._partitions.leave(cur)
        except Exception:  # noqa: BLE001 - a broken session released its locks when it ended
            logger.debug("outbox.leave_failed", exc_info=True)
            self._partitions.owned, self._partitions.token = set(), ""

    def run_batch(self) -> BatchReport:
        """Claim, publish and mark one batch."""
        self._join()
        try:
            batch = self._claim(deque(), exhaustive=True)
            if batch is None and self._owned():
                with _cursor() as cur:  # alone, or the others hold the partitions with work: try them all
                    self._partitions.rebalance(cur, busy=set(), greedy=True)
                batch = self._claim(deque(), exhaustive=True)
            if batch is None:
                return BatchReport()
            return self._mark(batch, self._collect(batch))
        finally:
            self._leave()

    def drain(
        self,
        *,
        time_budget: float | None = None,
        on_batch: Any = None,
        stop: Callable[[], bool] | None = None,
    ) -> BatchReport:
        """Run pipelined batches until nothing is claimable, NATS fails, the budget is spent or ``stop()``.

        Inside a caller's transaction (or on SQLite) everything runs on this thread's session:
        other sessions could not see the caller's uncommitted rows.
        """
        if not OutboxEvent.objects.filter(status="pending", next_attempt_at__lte=timezone.now()).exists():
            return BatchReport()  # an idle poll: no locks taken, no session opened
        if _postgres() and not connection.in_atomic_block:
            return self._drain_sessions(time_budget=time_budget, on_batch=on_batch, stop=stop)
        self._join()
        try:
            return self._drain_serial(time_budget=time_budget, on_batch=on_batch, stop=stop)
        finally:
            self._leave()

    def _drain_serial(
        self, *, time_budget: float | None, on_batch: Any, stop: Callable[[], bool] | None
    ) -> BatchReport:
        """One session: batch N+1 is claimed while N is on the wire, then N is marked."""
        total = BatchReport()
        deadline = time.monotonic() + time_budget if time_budget else None
        depth = max(1, self.conf.PIPELINE_DEPTH)
        inflight: deque[_Batch] = deque()
        stopping = False
        blocked = False  # the last claim found nothing: claim again only after a batch is marked
        try:
            while True:
                while not stopping and len(inflight) < depth and not (blocked and inflight):
                    batch = self._claim(inflight, exhaustive=not inflight)
                    if batch is None and not inflight and self._owned():
                        with _cursor() as cur:  # take every free partition (relays that left), look again
                            self._partitions.rebalance(cur, busy=set(), greedy=True)
                        batch = self._claim(inflight, exhaustive=True)
                    blocked = batch is None
                    if batch is None:
                        break
                    inflight.append(batch)
                if not inflight:
                    return total
                batch = inflight.popleft()
                result = self._collect(batch)
                report = self._mark(batch, result)
                blocked = False
                stopping = self._account(total, report, result, on_batch, deadline, stop) or stopping
        finally:
            for batch in inflight:  # only on an exception: stop publishing what will not be marked
                if batch.future is not None:
                    batch.future.cancel()

    def _drain_sessions(
        self, *, time_budget: float | None, on_batch: Any, stop: Callable[[], bool] | None
    ) -> BatchReport:
        """PostgreSQL: claims and marks run on worker sessions, in their own threads, while this
        thread keeps the pipeline full. At most one claim runs at a time (it leaves alone the rows
        of every batch not yet marked); marks of different batches run side by side (batches are
        aggregate-disjoint). With partitions, this thread's session holds them and is the fence."""
        total = BatchReport()
        deadline = time.monotonic() + time_budget if time_budget else None
        depth = max(1, self.conf.PIPELINE_DEPTH)
        owned = self._owned()
        inflight: deque[_Batch] = deque()  # claimed and not yet marked, oldest first
        marking: dict[concurrent.futures.Future, tuple[_Batch, PublishResult]] = {}
        claiming: concurrent.futures.Future | None = None
        sessions = self._sessions
        stopping = False
        blocked = False  # the last claim found nothing: claim again only after a batch is marked
        self._join()
        try:
            while True:
                room = len(inflight) < depth and not stopping and not (blocked and inflight)
                if claiming is None and room:
                    if not inflight:
                        # Nothing in flight: claim here (an idle poll opens no other session).
                        batch = self._claim(inflight, exhaustive=True)
                        if batch is None and owned:
                            # Nothing in our partitions: take every free one (relays that left), look again.
                            with _cursor() as cur:
                                self._partitions.rebalance(cur, busy=set(), greedy=True)
                            batch = self._claim(inflight, exhaustive=True)
                        if batch is None:
                            return total
                        inflight.append(batch)
                        continue
                    job = self._claim_job(inflight)
                    if job is None:
                        blocked = True
                    else:
                        if not sessions:
                            sessions.extend(_Session(f"outbox-db-{n}") for n in range(2))
                        claiming = sessions[0].submit(job)
                # Wait for a claim, the oldest unmarked publish, or a mark.
                publishing = [b for b in inflight if not b.marking]
                waits = [f for f in [claiming, *marking] if f is not None]
                waits += [b.future for b in publishing[:1] if b.future is not None]
                if publishing and publishing[0].future is None:
                    waits = []  # its publish never started: mark it now
                if waits:
                    timeout = max(0.0, publishing[0].deadline - time.monotonic()) if publishing else None
                    concurrent.futures.wait(waits, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
                if claiming is not None and claiming.done():
                    batch, claiming = claiming.result(), None
                    blocked = batch is None
                    if batch is not None:
                        inflight.append(batch)
                for future in [f for f in marking if f.done()]:
                    batch, result = marking.pop(future)
                    report = future.result()
                    inflight.remove(batch)
                    blocked = False
                    stopping = self._account(total, report, result, on_batch, deadline, stop) or stopping
                if publishing:
                    batch = publishing[0]
                    if batch.future is None or batch.future.done() or time.monotonic() >= batch.deadline:
                        result = self._collect(batch)
                        batch.marking = True
                        quiet = min(sessions, key=lambda s: s.queued) if sessions else None
                        if quiet is None:
                            report = self._mark(batch, result)
                            inflight.remove(batch)
                            blocked = False
                            stopping = self._account(total, report, result, on_batch, deadline, stop) or stopping
                        else:
                            marking[quiet.submit(partial(self._mark, batch, result))] = (batch, result)
                if not inflight and claiming is None and stopping:
                    return total
        except BaseException:
            # Drop queued work, stop publishing what will not be marked; the sessions may be broken.
            for future in [claiming, *marking]:
                if future is not None:
                    future.cancel()
            for batch in inflight:
                if batch.future is not None and not batch.marking:
                    batch.future.cancel()
            self.close_sessions()
            self._leave(force=True)
            raise
        finally:
            self._leave()

    def follow(
        self, wakeups: Any, *, idle: float, until: float, stop: Callable[[], bool] = lambda: False
    ) -> tuple[BatchReport, bool]:
        """Drain on every wake-up until ``idle`` seconds pass without one, the monotonic time
        ``until``, ``stop()``, or NATS refuses everything. Returns (what was drained, out of time).

        ``wakeups`` (outbox.wake.Wakeups) must be subscribed before the caller's last drain began,
        so that no commit falls between that drain and the first wait.
        """
        total = BatchReport()
        # Partitions stay held between the drains of a follow (no join and leave per wake-up);
        # rebalancing goes on inside the drains, so other relays still get their share.
        self._following = True
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    return total, True
                if not wakeups.wait(min(idle, left), stop):
                    return total, until - time.monotonic() <= 0
                report = self.drain(time_budget=until - time.monotonic())
                _accumulate(total, report)
                if report.failed and not report.published:
                    return total, False  # NATS refuses: the rows back off, the sweep takes them later
        finally:
            self._following = False
            self._leave()

    def close_sessions(self) -> None:
        """Stop the worker sessions (their threads and database connections)."""
        _close_sessions(self._sessions)

    def _claim_job(self, inflight: deque[_Batch]) -> Callable[[], _Batch | None] | None:
        """A claim to run on a worker session; None when we hold no partitions right now."""
        if self._owned():
            owned_job = self._owned_job(inflight, exhaustive=False)
            if owned_job is None:
                return None
            token = self._partitions.token

            def job() -> _Batch | None:
                with _cursor() as cur:
                    rows = owned_job(cur)
                return self._started(token, True, rows)

            return job
        return partial(self._claim, deque(inflight), exhaustive=False)

    def _account(
        self,
        total: BatchReport,
        report: BatchReport,
        result: PublishResult,
        on_batch: Any,
        deadline: float | None,
        stop: Callable[[], bool] | None,
    ) -> bool:
        """Add a marked batch to the totals; True when the drain should stop claiming."""
        _accumulate(total, report)
        if on_batch is not None:
            on_batch(report)
        broken = not result.published and bool(result.failed)  # NATS refuses everything
        out_of_time = deadline is not None and time.monotonic() > deadline
        return broken or out_of_time or (stop is not None and stop())

    def held_elsewhere(self) -> bool:
        """Is another relay working on rows this one could not claim (so waiting may help)?"""
        if self._owned():
            with _cursor() as cur:
                return self._partitions.others(cur) > 0
        return OutboxEvent.objects.filter(status="pending", lease_until__gt=timezone.now()).exists()


class _Session:
    """A worker thread with its own database session (Django's connections are per thread)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.queued = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.queued += 1
        self._jobs.put((job, future))
        return future

    def _run(self) -> None:
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                job, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(self._attempt(job))
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                        future.set_exception(exc)
                self.queued -= 1
        finally:
            connection.close()

    @staticmethod
    def _attempt(job: Callable[[], T]) -> T:
        try:
            return job()
        except _SESSION_ERRORS:
            if connection.connection is not None and connection.is_usable():
                raise  # the session is fine: the statement itself failed
            # The session ended while it sat idle between drains (terminated by the server, the
            # network dropped it): once more on a new one. A claim only reads; a mark is a
            # conditional update, so running it again after an unknown outcome changes nothing.
            connection.close()
            return job()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


try:  # the claims and marks use psycopg cursors directly (see _cursor): its errors are not wrapped
    import psycopg

    _SESSION_ERRORS: tuple[type[Exception], ...] = (
        OperationalError,
        InterfaceError,
        psycopg.OperationalError,
        psycopg.InterfaceError,
    )
except ImportError:  # pragma: no cover - SQLite only
    _SESSION_ERRORS = (OperationalError, InterfaceError)


def _close_sessions(sessions: list[_Session]) -> None:
    closing = list(sessions)
    sessions.clear()
    for session in closing:
        session.close()


def _chains(rows: list[ClaimedRow]) -> dict[tuple[str, str], list[ClaimedRow]]:
    chains: dict[tuple[str, str], list[ClaimedRow]] = {}
    for row in rows:
        chains.setdefault((row.aggregate_type, row.aggregate_id), []).append(row)
    return chains


def _accumulate(total: BatchReport, report: BatchReport) -> None:
    total.claimed += report.claimed
    total.published += report.published
    total.failed += report.failed
    total.dead += report.dead
    total.skipped += report.skipped
