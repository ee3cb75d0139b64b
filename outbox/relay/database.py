"""What the claims and marks share about the database: the table, the advisory-lock key space, the
claim window, a server-binding cursor on a plan-stable session, value adapters, row decoding, and
the errors of a lost session."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any

import msgspec
from django.db import InterfaceError, OperationalError, connection

from outbox.models import OutboxEvent
from outbox.relay.rows import ClaimedRow

try:  # the claims and marks use psycopg cursors directly (see cursor()): its errors are not wrapped
    import psycopg
except ImportError:  # pragma: no cover - SQLite only
    psycopg = None  # type: ignore[assignment]

TABLE = OutboxEvent._meta.db_table

#: First key of every advisory lock the relay takes ("obx0"). Second keys: a partition number
#: (below ``partitions.PARTITIONS``), ``partitions.MEMBER_KEY``, ``leases.CLAIM_KEY``.
LOCK_CLASS = 0x6F627830

#: The window of a claim: the oldest pending rows, this many times the batch size (plus the
#: rows of our batches in flight, which sit at the front of the queue).
WINDOW_FACTOR = 2

#: Errors that may mean the session itself is gone (terminated by the server, network dropped).
SESSION_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
if psycopg is not None:
    SESSION_ERRORS += (psycopg.OperationalError, psycopg.InterfaceError)


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


#: Set once on every session the relay claims on (outside a caller's transaction). The claims
#: must walk the partial index ``outbox_pending_seq`` in ``seq`` order and stop after the window
#: whatever the planner believes about the pending set: with missing or stale statistics it
#: expects a handful of pending rows and would otherwise read every one of them through a bitmap
#: heap scan and sort them (docs/relay.md, "Plans that do not depend on statistics").
PLAN_SETTINGS = "SELECT set_config('enable_bitmapscan', 'off', false), set_config('enable_seqscan', 'off', false)"

#: psycopg's threshold on the relay's sessions when Django left it at None (which prepares nothing):
#: no statement reaches it, so only what runs with ``prepare=True`` is prepared — the claims and
#: marks of partition ownership, which always has a session of its own (leases may sit behind a
#: transaction pooler, where a prepared statement does not survive the transaction). Planning the
#: claim cost 0.4 ms of server CPU, three quarters of the whole statement.
EXPLICIT_ONLY = 1 << 30

_tuned = threading.local()


def cursor() -> Any:
    """A cursor on Django's connection. On PostgreSQL a plain psycopg cursor: parameters are
    bound by the server (Django's default cursor quotes every array element client-side); the
    session gets :data:`PLAN_SETTINGS` the first time (not inside a caller's transaction) and
    may prepare statements (:data:`EXPLICIT_ONLY`)."""
    if is_postgres():
        connection.ensure_connection()
        raw = connection.connection
        if getattr(_tuned, "session", None) is not raw and not connection.in_atomic_block:
            raw.execute(PLAN_SETTINGS)
            if raw.prepare_threshold is None:
                raw.prepare_threshold = EXPLICIT_ONLY
            _tuned.session = raw
        return psycopg.Cursor(raw)
    return connection.cursor()


def db_id(value: str) -> Any:
    """An event id as the database stores it."""
    return OutboxEvent._meta.pk.get_db_prep_value(uuid.UUID(value), connection)


def db_datetime(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def placeholders(n: int) -> str:
    return ", ".join(["%s"] * n)


def event_id(value: str) -> str:
    """An id as text with dashes (SQLite stores 32 hex digits)."""
    return value if len(value) == 36 else str(uuid.UUID(value))


_decode_headers = msgspec.json.Decoder(dict[str, Any]).decode


def claimed_row(r: tuple, *, partition: int = -1) -> ClaimedRow:
    """(id, seq, subject, payload text, headers text, type, id, version, attempts) -> ClaimedRow."""
    return ClaimedRow(
        event_id(r[0]),
        r[1],
        r[2],
        r[3].encode(),
        _decode_headers(r[4]) if r[4] else {},
        r[5],
        r[6],
        r[7],
        r[8],
        partition,
    )
