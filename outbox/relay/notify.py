"""The relay loop that PostgreSQL wakes: :class:`RelayLoop` LISTENs on the outbox's channel and
drains the moment a commit with events lands.

A statement-level trigger on the outbox table (migration 0005) calls ``pg_notify`` for every
INSERT statement; PostgreSQL delivers the notification when the writer's transaction commits
(identical notifications of one transaction fold into one), so the writer pays no round trip
for it. The loop runs on a thread of its own, with its own database session (autocommit, as
psycopg's ``notifies()`` needs): it LISTENs, drains, waits for a notification or ``poll``
seconds, drains again, and holds its partitions in between. A lost notification (the session
dropped, the worker restarted) costs at most ``poll`` seconds, never an event: the loop drains
on every poll, after every reconnect, and the beat sweep stays the backstop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connection

from outbox.conf import NOTIFY_CHANNEL, outbox_settings

logger = logging.getLogger("outbox.relay.notify")

#: Seconds between two looks at the stop flag while waiting.
SLICE = 0.25


class Notifications:
    """The notifications of one LISTENing psycopg connection."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def wait(self, timeout: float, stop: Callable[[], bool]) -> bool:
        """True as soon as a notification is here (and takes the others already received), False
        after ``timeout`` seconds without one or once ``stop()`` says so."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or stop():
                return False
            if any(True for _ in self.raw.notifies(timeout=min(left, SLICE), stop_after=1)):
                for _ in self.raw.notifies(timeout=0):
                    pass  # those received meanwhile: one drain covers them all
                return True


class RelayLoop:
    """Runs :meth:`Relay.serve <outbox.relay.loop.Relay.serve>` on a thread until :meth:`stop`."""

    def __init__(self, *, poll: float | None = None, name: str = "outbox-relay-loop") -> None:
        conf = outbox_settings()
        #: Seconds between drains when no notification comes (a lost one waits at most this long).
        self.poll = poll if poll is not None else conf.SWEEP_INTERVAL
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the loop to stop after the batches in flight; True when it did within ``timeout``."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """The thread's body: serve until stopped; a lost session (or NATS trouble) is logged, and
        after a short pause the loop connects again, LISTENs again and drains what it missed."""
        from outbox.relay.loop import Relay

        relay = Relay()
        pause = 0.1
        try:
            while not self._stop.is_set():
                try:
                    self._serve(relay)
                    pause = 0.1
                except Exception as exc:  # noqa: BLE001 - the loop outlives a broken session or broker
                    logger.warning("outbox.relay_loop_error error=%r; listening again in %.1fs", exc, pause)
                    relay.close_sessions()
                    connection.close()
                    self._stop.wait(pause)
                    pause = min(pause * 2, self.poll)
        finally:
            relay.close_sessions()
            connection.close()

    def _serve(self, relay: Any) -> None:
        connection.ensure_connection()
        raw = connection.connection
        raw.execute(f"LISTEN {NOTIFY_CHANNEL}")
        logger.info("outbox.relay_loop listening channel=%s poll=%s", NOTIFY_CHANNEL, self.poll)
        relay.serve(Notifications(raw), poll=self.poll, stop=self._stop.is_set)
