"""NATS connections, and the boundary between synchronous Django code and asyncio.

nats-py is asyncio; Celery tasks and Django services are synchronous. Each process
that publishes owns one :class:`Broker`: a daemon thread running an event loop that
holds the process's single NATS connection. Synchronous code hands it coroutines
with :meth:`Broker.call` and waits for the result with a bound. The database is
never touched from the loop thread, and NATS is never touched from the caller's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from outbox.conf import NatsSettings, nats_settings
from outbox.errors import ConfigurationError, PublishError

logger = logging.getLogger("outbox.broker")

T = TypeVar("T")


def connect_options(conf: NatsSettings | None = None, *, name: str = "") -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` from the NATS settings."""
    conf = conf or nats_settings()
    if not conf.SERVERS:
        raise ConfigurationError("NATS_URL is empty; give at least one server, e.g. nats://127.0.0.1:4222")
    opts: dict[str, Any] = {
        "servers": list(conf.SERVERS),
        "name": conf.NAME or name or f"outbox-{os.getpid()}",
        "connect_timeout": conf.CONNECT_TIMEOUT,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
    }
    if conf.USER:
        opts["user"] = conf.USER
        opts["password"] = conf.PASSWORD
    if conf.TOKEN:
        opts["token"] = conf.TOKEN
    if conf.CREDENTIALS_FILE:
        opts["user_credentials"] = conf.CREDENTIALS_FILE
    if conf.TLS_CA_FILE or conf.TLS_CERT_FILE:
        context = ssl.create_default_context(cafile=conf.TLS_CA_FILE or None)
        if conf.TLS_CERT_FILE:
            context.load_cert_chain(conf.TLS_CERT_FILE, conf.TLS_KEY_FILE or None)
        opts["tls"] = context
    return opts


async def connect(*, name: str = "", conf: NatsSettings | None = None, **overrides: Any) -> NATS:
    """Open a NATS connection; raises PublishError with the servers tried when none answers."""
    opts = connect_options(conf, name=name)
    opts.update(overrides)

    async def _quiet(exc: Exception) -> None:
        logger.warning("nats: %s", exc)

    opts.setdefault("error_cb", _quiet)
    reconnects = opts["max_reconnect_attempts"]
    # The first connection is not retried forever: an operator must hear that NATS is unreachable.
    # Each server gets two tries; once connected, reconnection is as configured (forever by default).
    opts["max_reconnect_attempts"] = 1
    try:
        nc = await nats.connect(**opts)
    except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types here
        servers = ", ".join(opts["servers"])
        raise PublishError(f"cannot connect to NATS at {servers}: {exc or type(exc).__name__}") from exc
    nc.options["max_reconnect_attempts"] = reconnects
    return nc


class Broker:
    """One NATS connection per process, driven by a private event-loop thread."""

    def __init__(self, *, name: str = "outbox-relay") -> None:
        self.name = name
        self.pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="outbox-nats", daemon=True)
        self._thread.start()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()

    def submit_client(self, factory: Callable[[NATS], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Like :meth:`submit`, with the connection itself (the relay frames its own publishes)."""

        async def runner() -> T:
            await self.jetstream()
            assert self._nc is not None
            return await factory(self._nc)

        return asyncio.run_coroutine_threadsafe(runner(), self._loop)

    def submit(self, factory: Callable[[JetStreamContext], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Start ``factory(js)`` on the loop thread; the caller collects it with :meth:`result`."""

        async def runner() -> T:
            js = await self.jetstream()
            return await factory(js)

        return asyncio.run_coroutine_threadsafe(runner(), self._loop)

    @staticmethod
    def result(future: concurrent.futures.Future[T], *, timeout: float) -> T:
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise PublishError(f"NATS did not answer within {timeout:.1f}s") from exc

    def call(self, factory: Callable[[JetStreamContext], Awaitable[T]], *, timeout: float) -> T:
        """Run ``factory(js)`` on the loop thread and wait at most ``timeout`` seconds."""
        return self.result(self.submit(factory), timeout=timeout)

    async def jetstream(self) -> JetStreamContext:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await connect(name=f"{self.name}-{self.pid}")
                self._js = self._nc.jetstream(timeout=5, publish_async_max_pending=8000)
            assert self._js is not None
            return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def close(self) -> None:
        async def _close() -> None:
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.drain()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
            except Exception:  # noqa: BLE001
                logger.debug("closing NATS failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)


_broker: Broker | None = None
_broker_lock = threading.Lock()


def get_broker() -> Broker:
    """The process's broker; a forked child gets a fresh one (sockets do not survive fork)."""
    global _broker
    with _broker_lock:
        if _broker is None or _broker.pid != os.getpid():
            _broker = Broker()
        return _broker


def reset_broker() -> None:
    global _broker
    with _broker_lock:
        if _broker is not None and _broker.pid == os.getpid():
            _broker.close()
        _broker = None
