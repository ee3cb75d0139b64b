"""The database connection's health as the listener sees it: when a batch checks it first, and whether it was lost.

A lost connection is never the event's fault: the apply algorithm raises
:class:`TransactionBroken` for it, and the run loop retries the whole batch in place
without spending a JetStream delivery.
"""

from __future__ import annotations

import math
import time

from django.db import InterfaceError, OperationalError, close_old_connections, transaction

from listeners.errors import TransactionBroken

#: Seconds between two connection checks before a batch. Each one costs a ``SELECT 1``
#: round trip (``CONN_HEALTH_CHECKS``) at the batch's BEGIN; a connection that served a batch
#: a moment ago needs none. After an idle interval, or a failed attempt, the batch checks first.
DB_CHECK_INTERVAL = 1.0


class ConnectionCheckSchedule:
    """Decides whether the next batch checks its connection first (``close_old_connections()``)."""

    def __init__(self) -> None:
        self.checked_at = -math.inf

    def due(self, *, retry: bool) -> bool:
        """True after a failed attempt (``retry``) or when the last check is :data:`DB_CHECK_INTERVAL` old."""
        now = time.monotonic()
        if retry or now - self.checked_at >= DB_CHECK_INTERVAL:
            self.checked_at = now
            return True
        return False


def replace_unusable_connection() -> None:
    """Close the connection if it is unusable or past its age, so the next query opens a fresh one."""
    close_old_connections()


def ensure_committable(cause: BaseException | None = None) -> None:
    """Raise TransactionBroken when the batch transaction can no longer commit.

    A message's failure is contained by its savepoint. When the connection itself is
    gone, rolling back to the savepoint fails and Django only marks the transaction
    for rollback, which ``atomic`` then performs *silently* at exit: the decisions of
    the messages before would say "applied" for work that was never committed.
    """
    conn = transaction.get_connection()
    if conn.needs_rollback or conn.closed_in_transaction:
        reason = cause or "marked for rollback"
        raise TransactionBroken(f"the batch transaction cannot commit any more: {reason}") from cause


def ensure_connected(cause: BaseException) -> None:
    """Raise TransactionBroken when the connection itself failed (not a statement of the batch).

    Without a savepoint, nothing else tells the two apart in time: Django reconnects
    while it closes the transaction, and the next attempt would run — quietly — on a
    new connection. A lost connection is the run loop's to retry, and to report.
    """
    if connection_lost(cause):
        raise TransactionBroken(f"the batch transaction cannot commit any more: {cause}") from cause


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is gone (rather than one statement failing)."""
    raw = transaction.get_connection().connection
    if raw is None or getattr(raw, "broken", False) or getattr(raw, "closed", False):
        return True
    if isinstance(exc, InterfaceError):
        return True
    driver_error = exc.__cause__
    if isinstance(exc, OperationalError) and hasattr(driver_error, "sqlstate"):
        # The server's message can be read before the closed socket is: go by the error too.
        # No SQLSTATE: the client lost the server; 08: connection exception; 57P: the session
        # was terminated (admin or crash shutdown). Deadlocks, timeouts ... have their own.
        sqlstate = driver_error.sqlstate  # type: ignore[union-attr]
        return sqlstate is None or sqlstate.startswith(("08", "57P"))
    return False
