"""Wake-ups for a relay that follows new commits (``OUTBOX['FOLLOW_SECONDS']``).

Every relay kick (outbox/kick.py) also publishes an empty message on a Redis channel of
the relay's queue. A relay task that has drained the outbox stays for up to
``FOLLOW_SECONDS`` of quiet and drains again on each wake-up, instead of leaving the
next commit to the Celery round trip (the kick's task waits in the queue behind it and
finds little to do). Wake-ups are only a shortcut: a kick still enqueues a task when
none is queued, so a lost wake-up (Redis pub/sub delivers at most once) costs latency,
never an event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from outbox.celery_broker import redis_broker_url
from outbox.conf import OutboxSettings, outbox_settings

logger = logging.getLogger("outbox.wake")

_clients: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


def wake_channel(conf: OutboxSettings | None = None) -> str:
    conf = conf or outbox_settings()
    return f"outbox:wake:{conf.STREAM_PREFIX}{conf.CELERY_QUEUE}"


def follow_enabled() -> bool:
    """Following needs a Redis broker (the wake-ups travel through it)."""
    return outbox_settings().FOLLOW_SECONDS > 0 and redis_broker_url() is not None


def _client() -> Any:
    import redis

    url = redis_broker_url()
    if url is None:
        raise RuntimeError("wake-ups need a Redis broker")
    key = (os.getpid(), url)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=1)
        return client


class Wakeups:
    """A subscription to the wake-up channel, active when the constructor returns."""

    SLICE = 0.25  # seconds between checks of the caller's stop condition while waiting

    def __init__(self) -> None:
        self._pubsub = _client().pubsub()
        self._pubsub.subscribe(wake_channel())
        # The confirmation: wake-ups published from now on reach us.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "subscribe":
                return
        self.close()
        raise TimeoutError("Redis did not confirm the wake-up subscription")

    def wait(self, timeout: float, stop: Callable[[], bool]) -> bool:
        """True as soon as a wake-up arrives (and swallows the others already here); False after
        ``timeout`` seconds without one, or once ``stop()`` says so."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or stop():
                return False
            message = self._pubsub.get_message(timeout=min(left, self.SLICE))
            if message is not None and message["type"] == "message":
                while self._pubsub.get_message(timeout=0) is not None:
                    pass
                return True

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:  # the connection may be gone already
            logger.debug("closing the wake-up subscription failed", exc_info=True)
