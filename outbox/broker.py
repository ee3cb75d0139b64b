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
import importlib.util
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from outbox.conf import NatsSettings, nats_settings
from outbox.errors import ConfigurationError, PublishError
from outbox.redact import redact, redact_url

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
        if importlib.util.find_spec("nkeys") is None:
            # nats-py imports nkeys only when it signs the server's nonce; say so before connecting.
            raise ConfigurationError("NATS_CREDS is set but the nkeys package is not installed; install nats-py[nkeys]")
        opts["user_credentials"] = conf.CREDENTIALS_FILE
    if conf.TLS_CA_FILE or conf.TLS_CERT_FILE:
        context = ssl.create_default_context(cafile=conf.TLS_CA_FILE or None)
        if conf.TLS_CERT_FILE:
            context.load_cert_chain(conf.TLS_CERT_FILE, conf.TLS_KEY_FILE or None)
        opts["tls"] = context
    return opts


async def connect(*, name: str = "", conf: NatsSettings | None = None, **overrides: Any) -> NATS:
    """Open a NATS connection; raises PublishError naming the servers and why none accepted us.

    nats-py reports a refused first connection as "no servers available"; the reason
    (authorization violation, certificate not trusted, connection refused) only reaches
    the error callback, so the callback's errors of the first attempt go into the message.
    The first attempt is bounded: after a failed TLS handshake nats-py 2.16 waits forever
    for the broken socket to close, so a TLS error ends the attempt at once.
    """
    opts = connect_options(conf, name=name)
    opts.update(overrides)

    async def _quiet(exc: Exception) -> None:
        logger.warning("nats: %s", exc)

    report = opts.get("error_cb") or _quiet
    seen: list[BaseException] = []
    fatal = asyncio.Event()
    connecting = True

    async def _error_cb(exc: Exception) -> None:
        if connecting:
            seen.append(exc)
            if isinstance(exc, ssl.SSLError):
                fatal.set()
        await report(exc)

    opts["error_cb"] = _error_cb
    reconnects = opts["max_reconnect_attempts"]
    # The first connection is not retried forever: an operator must hear that NATS is unreachable.
    # Each server gets two tries; once connected, reconnection is as configured (forever by default).
    opts["max_reconnect_attempts"] = 1
    servers = ", ".join(redact_url(server) for server in opts["servers"])
    bound = 2 * len(opts["servers"]) * (opts["connect_timeout"] + opts["reconnect_time_wait"]) + opts["connect_timeout"]
    attempt = asyncio.ensure_future(nats.connect(**opts))
    gave_up = asyncio.ensure_future(fatal.wait())
    try:
        await asyncio.wait({attempt, gave_up}, timeout=bound, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled by our caller: nobody will collect the attempt
        _abandon(attempt)
        raise
    finally:
        gave_up.cancel()
        connecting = False
    if not attempt.done():
        _abandon(attempt)
        why = seen[-1] if seen else TimeoutError(f"no answer within {bound:.0f}s")
        raise PublishError(redact(f"cannot connect to NATS at {servers}: {_refusal(why, seen)}"))
    try:
        nc = attempt.result()
    except Exception as exc:  # nats-py raises several unrelated types here
        raise PublishError(redact(f"cannot connect to NATS at {servers}: {_refusal(exc, seen)}")) from exc
    nc.options["max_reconnect_attempts"] = reconnects
    return nc


def _abandon(attempt: asyncio.Future[NATS]) -> None:
    """Cancel a first connection nobody waits for; close it if it got through, retrieve its error."""

    def settle(task: asyncio.Future[NATS]) -> None:
        if not task.cancelled() and task.exception() is None:
            asyncio.ensure_future(task.result().close())

    if attempt.done():
        settle(attempt)
    else:
        attempt.add_done_callback(settle)
        attempt.cancel()


def _refusal(exc: BaseException, seen: list[BaseException]) -> str:
    """One line on why the first connection failed: credentials and TLS before "no servers"."""
    errors = [e for e in [*seen, exc] if not isinstance(e, nats.errors.NoServersError)]
    auth = [e for e in errors if isinstance(e, nats.errors.AuthorizationError) or "authorization" in str(e).lower()]
    tls = [e for e in errors if isinstance(e, ssl.SSLError) or "tls" in str(e).lower()]
    if auth:
        return f"{auth[-1]} (check NATS_USER/NATS_PASSWORD, NATS_TOKEN or NATS_CREDS)"
    if tls:
        return f"{' '.join(str(tls[-1]).split())} (check NATS_TLS_CA, NATS_TLS_CERT/NATS_TLS_KEY and the URL's scheme)"
    chosen = errors[-1] if errors else exc
    return " ".join(str(chosen).split()) or type(chosen).__name__


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
            except Exception:
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
