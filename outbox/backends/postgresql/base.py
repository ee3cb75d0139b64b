"""Django's PostgreSQL backend, with the outbox rows a transaction emits sent in its COMMIT's round trip.

``ENGINE = "outbox.backends.postgresql"`` in place of ``django.db.backends.postgresql`` (README:
"The write path"). With Django's own backend, ``emit()`` sends its INSERT at once: a round trip of
its own in the caller's transaction, the larger part of what an event adds to a short write. With
this one, ``emit()`` leaves the INSERT on the connection, and the COMMIT sends it as one query,
``INSERT ...; COMMIT``. The row and the business change still commit together or not at all.

- If the transaction sends another statement first (a query, a savepoint, a lock), the rows go
  just before it, in one query of their own: that statement, and everything after it, sees them.
- A rollback discards the rows not yet sent. A savepoint's statement sends the rows emitted before
  it, so rolling back to it takes back exactly the rows emitted inside.
- An INSERT that fails raises from the statement that sent it, or from the commit, as Django's
  ``IntegrityError``/``DatabaseError``; ``transaction.atomic`` then rolls the transaction back.
- Statements sent on the raw psycopg connection (``connection.connection``), not through a Django
  cursor, do not send the rows first.

Any code may queue a statement the same way (``connection.send_with_next(sql, params)`` where
``connection.sends_with_next_statement`` is true): the listeners queue a batch's inbox INSERT.
Values are bound client-side (psycopg's ``ClientCursor``), as Django's default cursors bind them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base

try:
    import psycopg
except ImportError as exc:  # Django's backend also runs on psycopg2; this one sends its query with psycopg 3
    raise ImproperlyConfigured(
        "ENGINE 'outbox.backends.postgresql' needs psycopg 3 (pip install 'psycopg[binary]'); "
        "with psycopg2 use 'django.db.backends.postgresql'"
    ) from exc

logger = logging.getLogger("django.db.backends")

#: One deferred statement: its SQL (``%s`` placeholders) and parameters.
Deferred = tuple[str, Sequence[Any]]


class DatabaseWrapper(base.DatabaseWrapper):
    #: ``emit()`` (and a listener batch's inbox INSERT) go through ``send_with_next()`` where this is true.
    sends_with_next_statement = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Deferred] = []
        self.execute_wrappers.insert(0, self._send_deferred_first)

    def send_with_next(self, sql: str, params: Sequence[Any]) -> None:
        """Queue ``sql`` until the next statement or the commit, whichever comes first."""
        self._deferred.append((sql, params))

    @property
    def deferred_statements(self) -> int:
        """How many queued statements are not sent yet (0 after any statement, commit or rollback)."""
        return len(self._deferred)

    def _send(self, *, commit: bool) -> None:
        queued, self._deferred = self._deferred, []
        started = time.monotonic()
        with psycopg.ClientCursor(self.connection) as cursor:
            statements = [cursor.mogrify(sql, params) for sql, params in queued]
            if commit:
                statements.append("COMMIT")
            query = "; ".join(statements)
            try:
                # Without parameters a ClientCursor sends one simple-protocol query: one round trip.
                cursor.execute(query)
            finally:
                if self.queries_logged:  # as Django's debug cursor logs (debug toolbar, assertNumQueries)
                    duration = time.monotonic() - started
                    self.queries_log.append({"sql": query, "time": f"{duration:.3f}"})
                    logger.debug(
                        "(%.3f) %s; alias=%s",
                        duration,
                        query,
                        self.alias,
                        extra={"duration": duration, "sql": query, "alias": self.alias},
                    )

    def _send_deferred_first(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        if self._deferred:
            with self.wrap_database_errors:
                self._send(commit=False)
        return execute(sql, params, many, context)

    def _commit(self) -> None:
        if not self._deferred or self.connection is None:
            return super()._commit()  # type: ignore[misc]  # private, not in django-stubs
        with self.wrap_database_errors:  # (the debug log shows "INSERT ...; COMMIT" as one query)
            self._send(commit=True)
        return None

    def _rollback(self) -> None:
        self._deferred.clear()
        return super()._rollback()  # type: ignore[misc]  # private, not in django-stubs

    def close(self) -> None:
        self._deferred.clear()
        super().close()

    def connect(self) -> None:
        self._deferred.clear()
        super().connect()
