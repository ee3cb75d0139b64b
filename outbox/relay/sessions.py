"""Worker sessions: threads with their own Django database connection, on which a draining relay
runs its claims and marks while the calling thread keeps the pipeline full (and, with partitions,
holds them)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from django.db import connection

from outbox.relay.database import SESSION_ERRORS

T = TypeVar("T")


class WorkerSession:
    """A worker thread with its own database session (Django's connections are per thread)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        #: Jobs submitted and not finished: the caller gives a mark to the least busy session.
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
        except SESSION_ERRORS:
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


def close_sessions(sessions: list[WorkerSession]) -> None:
    """Stop every session of the list (their threads and connections) and empty it."""
    closing = list(sessions)
    sessions.clear()
    for session in closing:
        session.close()
