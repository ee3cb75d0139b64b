"""Coalesced relay kicks.

Every commit that emitted events kicks the relay. With a Redis broker a short-lived
``SET NX`` flag lets only the first kick of a burst enqueue a task; the task clears
the flag when it starts, so commits that land while it drains enqueue at most one
follow-up. A kick that cannot reach Redis is dropped with a warning: the write
already committed, and the beat sweep publishes the row later.

The committing thread does not wait for Redis: :func:`kick_relay_after_commit` (the
on-commit hook of :func:`outbox.emit`) hands the kick to this process's kicker
thread and returns. The kicker makes every kick *after* the commits that asked for
it, so a kick covers each of them exactly as a kick made by the committing thread
would: its ``SET NX`` either enqueues a task, which drains after the commit, or
finds the flag of a task that has not started yet (it clears the flag before it
drains). Commits that ask while a kick is in flight get one more kick after it.
At interpreter exit the kicker finishes the kicks it was asked for.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from typing import Any

from celery import current_app
from django.core.signals import setting_changed
from django.db import connection

from outbox.celery_broker import redis_broker_url
from outbox.conf import NOTIFY_CHANNEL, OutboxSettings, outbox_settings, wake_mode

logger = logging.getLogger("outbox.kick")

_FLAG_TTL_MS = 2000
#: The relay task (outbox/tasks.py), found by name in Celery's registry: the tasks use this
#: module, so this module does not import them (outbox.apps imports them at start-up).
RELAY_TASK = "outbox.relay"
#: Seconds an exiting process waits for the kicks its commits asked for (Redis timeouts are 0.25 s).
_EXIT_FLUSH_SECONDS = 5.0
_local = threading.local()
_conf: OutboxSettings | None = None


def _settings() -> OutboxSettings:
    """``outbox_settings()``, read once: every commit asks (like DRF's api_settings, reset on change)."""
    global _conf
    conf = _conf
    if conf is None:
        conf = _conf = outbox_settings()
    return conf


def _forget_settings(*, setting: str, **_: Any) -> None:
    global _conf
    if setting == "OUTBOX":
        _conf = None


setting_changed.connect(_forget_settings)


def _flag_key(conf: OutboxSettings | None = None) -> str:
    conf = conf or _settings()
    return f"outbox:kick:{conf.STREAM_PREFIX}{conf.CELERY_QUEUE}"


def _redis() -> Any | None:
    url = redis_broker_url()
    if url is None:
        return None
    client = getattr(_local, "redis", None)
    if client is None or getattr(_local, "redis_url", None) != url:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        _local.redis = client
        _local.redis_url = url
    return client


def _wake_channel(conf: OutboxSettings | None) -> str:
    """The wake-up channel of a following relay (outbox/wake.py); "" when following is off."""
    conf = conf or _settings()
    if conf.FOLLOW_SECONDS <= 0:
        return ""
    from outbox.wake import wake_channel

    return wake_channel(conf)


def _set_flag(client: Any, key: str, wake: str = "") -> bool:
    """``SET key 1 NX PX ttl``: True when this call set the flag. With ``wake``, in the same round
    trip, ``PUBLISH wake ""``: a relay task that follows new commits drains at once.

    Sent on a connection of this thread's own, with the commands packed once: a third of the
    CPU of ``client.set()`` (pool checkout, packing, health check), which every commit pays.
    A connection error or timeout disconnects it (the next kick reconnects) and raises.
    """
    pid = os.getpid()
    cached = getattr(_local, "flag", None)
    # A forked child must not talk on its parent's socket: replies would cross.
    if cached is None or cached[0] is not client or cached[1] != (key, wake) or cached[2] != pid:
        connection = client.connection_pool.make_connection()
        commands: list[tuple[Any, ...]] = [("SET", key, b"1", "NX", "PX", _FLAG_TTL_MS)]
        if wake:
            commands.append(("PUBLISH", wake, b""))
        packed = connection.pack_commands(commands)
        cached = (client, (key, wake), pid, connection, packed, len(commands))
        _local.flag = cached
    connection, packed, replies = cached[3], cached[4], cached[5]
    try:
        connection.send_packed_command(packed, check_health=False)
        first = connection.read_response()
        for _ in range(replies - 1):
            connection.read_response()
    except Exception:
        # Whatever went wrong, an unread reply must not meet the next kick: start afresh.
        _local.flag = None
        connection.disconnect()
        raise
    return first is not None


def clear_kick_flag() -> None:
    client = _redis()
    if client is None:
        return
    try:
        client.delete(_flag_key())
    except Exception:  # Redis down only costs a redundant kick
        logger.debug("could not clear the kick flag", exc_info=True)


def kicks_on_commit(vendor: str) -> bool:
    """Do commits on a database of ``vendor`` kick the relay (``WAKE`` "kick", or "notify" without NOTIFY)?"""
    conf = _settings()
    return conf.KICK_ON_COMMIT and wake_mode(conf, vendor) == "kick"


def kick_relay() -> bool:
    """Wake the relay: enqueue a relay task unless one is already queued (``WAKE`` "kick"), or send
    the relay loop's NOTIFY (``WAKE`` "notify" on PostgreSQL: rows that became due without an
    INSERT, e.g. requeued). Never raises."""
    conf = _settings()
    if wake_mode(conf, connection.vendor) == "notify":
        try:
            with connection.cursor() as cur:
                cur.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
            return True
        except Exception as exc:  # noqa: BLE001 - the loop's own poll and the sweep are the backstop
            logger.warning("relay notify failed (%s); the relay loop's poll will publish the event", exc)
            return False
    if not conf.KICK_ON_COMMIT or conf.WAKE == "sweep":
        return False
    return _enqueue(conf)


def _enqueue(conf: OutboxSettings | None = None) -> bool:
    client = _redis()
    key = _flag_key(conf)
    try:
        if client is not None and not _set_flag(client, key, _wake_channel(conf)):
            return False
        current_app.tasks[RELAY_TASK].apply_async(retry=False)
        return True
    except Exception as exc:  # noqa: BLE001 - the write committed; the sweep is the backstop
        logger.warning("relay kick failed (%s); the beat sweep will publish the event", exc)
        if client is not None:
            try:
                client.delete(key)
            except Exception:  # noqa: BLE001, S110
                pass
        return False


class _Kicker:
    """One daemon thread per process that makes the kicks commits ask for, in order after them.

    A commit puts an ask on a queue (a C ``SimpleQueue``: no Python lock on the commit's path).
    The thread takes every ask queued so far, then kicks once: each of those commits happened
    before the kick started, so the kick covers them; an ask queued during the kick gets the
    next one. ``flush()`` queues a marker behind the asks and waits until a kick that started
    after them is done.
    """

    def __init__(self) -> None:
        self._asks: queue.SimpleQueue[threading.Event | None] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ask(self) -> None:
        self._asks.put(None)
        if self._thread is None and not self._start():
            self._take_and_kick()  # no thread can start (interpreter exiting): kick here, still after the commit

    def _start(self) -> bool:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="outbox-kicker", daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    return False
                self._thread = thread
        return True

    def _run(self) -> None:
        while True:
            try:
                self._take_and_kick(self._asks.get())
            except BaseException:  # _enqueue never raises; keep the thread whatever happens
                logger.exception("relay kick crashed")

    def _take_and_kick(self, first: threading.Event | None = None) -> None:
        taken = [first]
        while True:
            try:
                taken.append(self._asks.get_nowait())
            except queue.Empty:
                break
        try:
            if any(item is None for item in taken):
                _enqueue()
        finally:
            for item in taken:
                if item is not None:
                    item.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every kick asked for so far was made; False when ``timeout`` ran out first."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._asks.put(done)
        return done.wait(timeout)


_kicker = _Kicker()


def _new_kicker_after_fork() -> None:
    # The parent's kicker thread does not exist in the child: start afresh (a thread on the first ask).
    global _kicker
    _kicker = _Kicker()


os.register_at_fork(after_in_child=_new_kicker_after_fork)


def kick_relay_after_commit() -> None:
    """The on-commit hook of :func:`outbox.emit`: the kicker thread kicks the relay; never waits for Redis."""
    if kicks_on_commit(connection.vendor):
        _kicker.ask()


def flush_kicks(timeout: float = _EXIT_FLUSH_SECONDS) -> bool:
    """Wait until the kicks this process's commits asked for were made (tests, exit)."""
    return _kicker.flush(timeout)


atexit.register(lambda: _kicker.flush(_EXIT_FLUSH_SECONDS))
