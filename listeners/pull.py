"""The pull: batches of messages from one durable consumer, and handing back what no batch took.

This is the only module of the listener that touches nats-py internals (attributes whose
names start with ``_``): :class:`OpenPull` keeps pull requests open on the server and
reads the subscription's queue directly. :func:`open_pull_missing` checks, when a
consumer is bound, that the internals it needs are there; when they are not (a nats-py
release that changed them) or ``LISTENERS['OPEN_PULL']`` is false, :func:`make_pull`
returns a :class:`FetchPull`, built on the public ``PullSubscription.fetch()`` alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Protocol

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

logger = logging.getLogger("listeners.runner")

#: Seconds after its expiry when a pull request that was never answered is taken for lost (NATS restarted).
PULL_GRACE = 0.5


class PullError(Exception):
    """JetStream answered a pull request with an error status (503: no such consumer, 409: conflict ...)."""


class Pull(Protocol):
    """What the run loop needs from a pull, whichever way it is implemented."""

    async def next_batch(self, want: int, *, wait: float, stop: asyncio.Future) -> list[Msg]: ...

    async def renew(self, want: int) -> None: ...

    def buffered(self) -> list[Msg]: ...

    async def close(self) -> int: ...


async def quietly(coro: Awaitable[object]) -> None:
    """Await an ack, nak, in-progress or pull request whose loss is harmless (a reconnect: a redelivery)."""
    try:
        await coro
    except Exception as exc:  # noqa: BLE001 - an ack lost to a reconnect means a redelivery the inbox absorbs
        logger.debug("listener.ack_failed error=%s", exc)


def open_pull_missing(nc: NATS, psub: JetStreamContext.PullSubscription) -> str | None:
    """The nats-py internal :class:`OpenPull` needs and this nats-py lacks, or None when all are there."""
    sub = getattr(psub, "_sub", None)
    checks = {
        "PullSubscription._sub": sub is not None,
        "PullSubscription._nms": isinstance(getattr(psub, "_nms", None), str),
        "PullSubscription._deliver": isinstance(getattr(psub, "_deliver", None), str),
        "Subscription._pending_queue": isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue),
        "Subscription._pending_size": isinstance(getattr(sub, "_pending_size", None), int),
        "Subscription._id": isinstance(getattr(sub, "_id", None), int),
        "Client._send_unsubscribe": callable(getattr(nc, "_send_unsubscribe", None)),
    }
    missing = [name for name, ok in checks.items() if not ok]
    return ", ".join(missing) or None


def make_pull(nc: NATS, psub: JetStreamContext.PullSubscription, *, expires: float, prefer_open: bool) -> Pull:
    """An :class:`OpenPull` when wanted and nats-py has what it needs, else the public-API :class:`FetchPull`."""
    if prefer_open:
        missing = open_pull_missing(nc, psub)
        if missing is None:
            return OpenPull(nc, psub, expires=expires)
        logger.warning(
            "listener.pull_fallback nats-py lacks %s: fetching with the public PullSubscription.fetch() "
            "(one round trip per batch, nothing prefetched)",
            missing,
        )
    return FetchPull(psub)


class OpenPull:
    """Pull requests kept open on a durable consumer, so that messages reach the client before a batch asks.

    A ``no_wait`` pull before each batch costs a round trip to the server, and while a
    batch is applied no pull is open, so nothing is delivered. Instead about one batch
    of credit is kept open: an expiring request (``expires``) for what is missing,
    renewed when what the open requests still owe falls to half a batch — they owe
    one message less per delivery, and what a request did not deliver when it ended
    (``408`` with ``Nats-Pending-Messages``) — and from nothing when they have all
    expired or the connection was re-established (a restarted server forgot them).
    A batch is what has arrived, at least one message and at most ``want``: the first
    message starts it, later ones form the next.
    """

    def __init__(self, nc: NATS, psub: JetStreamContext.PullSubscription, *, expires: float) -> None:
        self.nc = nc
        self.psub = psub
        self.sub = psub._sub
        self.queue: asyncio.Queue = self.sub._pending_queue
        self.expires = expires
        self.ready: deque[Msg] = deque()  # delivered, in no batch yet
        self.owed = 0  # messages the open requests may still deliver
        self.lapse = 0.0  # monotonic: every open request has expired on the server by then
        self.reconnects = nc.stats["reconnects"]
        self.error: str | None = None

    async def next_batch(self, want: int, *, wait: float, stop: asyncio.Future) -> list[Msg]:
        """Up to ``want`` delivered messages; waits up to ``wait`` seconds (or until ``stop``) for the first."""
        self._receive()
        if not self.ready:
            await self.renew(want)
            if self.error is None:
                await self._wait(min(wait, max(self.lapse - time.monotonic(), 0.0)), stop)
                if stop.done():
                    return []  # what arrived with the stop is handed back, not started
        error, self.error = self.error, None
        if not self.ready and error is not None:
            raise PullError(error)
        ready = self.ready
        return [ready.popleft() for _ in range(min(want, len(ready)))]

    async def renew(self, want: int) -> None:
        """Keep about ``want`` messages coming: ask for what is missing when it is half a batch or more."""
        now = time.monotonic()
        reconnects = self.nc.stats["reconnects"]
        if reconnects != self.reconnects or now >= self.lapse:
            self.reconnects = reconnects
            self.owed = 0
        missing = want - self.owed - len(self.ready)
        if missing <= 0 or (self.owed and missing < want - want // 2):
            return
        await self.nc.publish(
            self.psub._nms,
            b'{"batch":%d,"expires":%d}' % (missing, int(self.expires * 1e9)),
            reply=self.psub._deliver,
        )
        self.owed += missing
        self.lapse = now + self.expires + PULL_GRACE

    def buffered(self) -> list[Msg]:
        """The delivered messages no batch has taken yet."""
        self._receive()
        return list(self.ready)

    async def close(self) -> int:
        """End the subscription without losing a delivery; nak every message no batch took. Returns how many.

        The pull requests stay open on the server until they expire, so the subscription
        is closed in two steps: UNSUB (the server delivers nothing more once it has read
        it), a PING round trip (what it sent before has arrived), then every buffered
        message is handed back. A plain nak makes them available at once; unacked, they
        would wait ``ack_wait``.
        """
        try:
            # UNSUB first, the subscription still registered: what the server sent before it
            # reads the UNSUB lands in the queue; the PING round trip makes sure it has landed.
            await self.nc._send_unsubscribe(self.sub._id)
            await self.nc.flush(timeout=5)
        finally:
            self._receive()
            returned = 0
            while self.ready:
                await quietly(self.ready.popleft().nak())
                returned += 1
            await self.psub.unsubscribe()
        return returned

    async def _wait(self, timeout: float, stop: asyncio.Future) -> None:
        """Wait for the next delivery (or status), at most ``timeout`` seconds; return early on ``stop``."""
        getter = asyncio.ensure_future(self.queue.get())
        try:
            await asyncio.wait((getter, stop), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if getter.done() and not getter.cancelled():
                self._note(getter.result())
            else:
                getter.cancel()
        self._receive()

    def _receive(self) -> None:
        queue = self.queue
        while not queue.empty():
            self._note(queue.get_nowait())

    def _note(self, msg: Msg) -> None:
        self.sub._pending_size -= len(msg.data)
        self.queue.task_done()
        status = msg.headers.get("Status") if msg.headers else None
        if not status:
            self.owed = max(self.owed - 1, 0)
            self.ready.append(msg)
            return
        if status == "100":  # idle heartbeat
            return
        # A request ended: what it did not deliver is no longer owed.
        undelivered = msg.headers.get("Nats-Pending-Messages")  # type: ignore[union-attr]
        self.owed = max(self.owed - int(undelivered), 0) if undelivered and undelivered.isdigit() else 0
        if status not in ("404", "408"):  # 404: nothing (no_wait), 408: expired; the rest is trouble
            description = msg.headers.get("Description", "")  # type: ignore[union-attr]
            self.error = f"{status} {description}".strip()


class FetchPull:
    """The fallback pull on nats-py's public API: one ``fetch()`` per batch, no credit kept open.

    It costs a round trip per batch and prefetches nothing; a stop hands back what the
    fetch in flight returned, but not what was still on the wire when the subscription
    ended (those wait ``ack_wait``, then are redelivered).
    """

    def __init__(self, psub: JetStreamContext.PullSubscription) -> None:
        self.psub = psub

    async def next_batch(self, want: int, *, wait: float, stop: asyncio.Future) -> list[Msg]:
        """Up to ``want`` messages, waiting up to ``wait`` seconds for the first; none once ``stop`` is done."""
        if stop.done():
            return []
        fetch = asyncio.ensure_future(self.psub.fetch(want, timeout=max(wait, 0.01)))
        await asyncio.wait((fetch, stop), return_when=asyncio.FIRST_COMPLETED)
        msgs = await self._result(fetch)
        if stop.done():
            for msg in msgs:  # arrived with the stop: handed back, not started
                await quietly(msg.nak())
            return []
        return msgs

    async def renew(self, want: int) -> None:
        """Nothing to renew: each batch asks for itself."""

    def buffered(self) -> list[Msg]:
        """Nothing is delivered outside a fetch."""
        return []

    async def close(self) -> int:
        await self.psub.unsubscribe()
        return 0

    @staticmethod
    async def _result(fetch: asyncio.Future) -> list[Msg]:
        try:
            return await fetch
        except (TimeoutError, nats.errors.TimeoutError):
            return []
