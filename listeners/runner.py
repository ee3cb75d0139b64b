"""The asyncio side of a listener process: durable pull consumers, fetch, ack.

The event loop owns the single NATS connection. Each durable consumer keeps about a
batch of pull credit open (:class:`OpenPull`), so messages arrive while the batch
before them is applied; a batch is what has arrived, from one message to ``--batch``.
It is handed to :func:`listeners.processing.apply_batch` on Django's thread-sensitive
executor (one synchronous ``atomic`` per batch); messages are acked, nak'ed or
terminated only after that call returned, i.e. after the commit.

Failures and what they cost:

* a message the listener cannot apply is decided in :mod:`listeners.processing`
  (nak with a delay, or dead letter + term);
* a batch the *database* could not take (connection lost, commit failed) is retried
  here, in place, with the messages kept in progress (the batch and what was
  delivered behind it): a database outage does not spend JetStream deliveries, so it
  can never push a message past ``max_deliver``;
* a NATS outage is ridden out by the client's reconnection; pull requests the server
  forgot are renewed after a reconnect or once they must have expired, and an ack
  lost on the way is a redelivery the inbox absorbs;
* on the first SIGINT/SIGTERM the runner stops fetching, finishes and acks the
  batch in hand, hands back (nak) what the client had buffered but not started —
  including what was still on the wire — and flushes the acks before closing — so a
  restart finds every message at once instead of after ``ack_wait``.

Fault injection: ``LISTENERS_TEST_CRASH_AFTER_COMMIT=N`` makes the process SIGKILL
itself right after its N-th batch committed and before any of it is acked. It exists
for the fault tests (the crash window of "applied but not acked"); never set it in
production.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connections
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from listeners.base import Listener
from listeners.errors import ListenerStartupError
from listeners.processing import ACK, NAK, TERM, Decision, Delivery, apply_batch
from outbox.broker import connect, connect_options
from outbox.contracts import registry
from outbox.errors import OutboxError
from outbox.streams import ensure_streams, event_name_from_subject, nats_subject, stream_name

logger = logging.getLogger("listeners.runner")

_DURABLE_BAD = re.compile(r"[^A-Za-z0-9_-]+")
#: Environment variable of the crash-after-commit fault hook (see the module docstring).
CRASH_AFTER_COMMIT_ENV = "LISTENERS_TEST_CRASH_AFTER_COMMIT"
#: Upper bound of the pause between two attempts at a batch the database refused.
BATCH_RETRY_MAX = 5.0
#: Seconds after its expiry when a pull request that was never answered is taken for lost (NATS restarted).
PULL_GRACE = 0.5
#: Seconds between two ``close_old_connections()`` before a batch. Each one costs a ``SELECT 1``
#: round trip (``CONN_HEALTH_CHECKS``) at the batch's BEGIN; a connection that served a batch
#: a moment ago needs none. After an idle second, or a failed attempt, the batch checks first.
DB_CHECK_INTERVAL = 1.0


def durable_slug(text: str) -> str:
    return _DURABLE_BAD.sub("-", text).strip("-")


@dataclass
class ConsumerPlan:
    stream: str
    durable: str
    subjects: list[str]  # event names
    filter_subjects: list[str] | None  # NATS subjects; None = the whole stream
    listeners: dict[str, type[Listener]]
    ack_wait: float
    max_deliver: int
    #: NATS subject -> event name, a cache of :func:`event_name_from_subject` (it reads the settings).
    event_names: dict[str, str] = field(default_factory=dict)


def plan_consumers(
    listener_classes: list[type[Listener]],
    *,
    requested: list[str],
    durable: str | None = None,
    multi_filter: bool = True,
) -> list[ConsumerPlan]:
    """One durable consumer per (group, stream); split per subject where the server cannot filter on several."""
    grouped: dict[tuple[str, str], dict[str, type[Listener]]] = {}
    for cls in listener_classes:
        for name in cls.subjects:
            if name not in requested:
                continue
            key = (cls.group, registry.get(name).stream)
            grouped.setdefault(key, {})[name] = cls
    plans = []
    for (group, stream), by_name in sorted(grouped.items()):
        stream_all = sorted(registry.streams()[stream])
        names = sorted(by_name)
        base = durable or group
        if len(grouped) > 1 and durable:
            base = f"{durable}-{stream}"
        # nats-server < 2.10 filters on one subject per consumer: split a partial set.
        single = names == stream_all or len(names) == 1 or multi_filter
        chunks = [names] if single else [[n] for n in names]
        for chunk in chunks:
            whole = chunk == stream_all
            suffix = stream if whole else "_".join(durable_slug(n) for n in chunk)
            name = base if durable and len(chunks) == 1 and len(grouped) == 1 else f"{base}-{suffix}"
            classes = [by_name[n] for n in chunk]
            plans.append(
                ConsumerPlan(
                    stream=stream_name(stream),
                    durable=durable_slug(name),
                    subjects=chunk,
                    filter_subjects=None if whole else [nats_subject(n) for n in chunk],
                    listeners={n: by_name[n] for n in chunk},
                    ack_wait=max(c.ack_wait for c in classes),
                    max_deliver=max(c.max_deliver for c in classes),
                )
            )
    return plans


@dataclass
class RunStats:
    handled: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, decision: Decision) -> None:
        self.handled += 1
        self.outcomes[decision.outcome] = self.outcomes.get(decision.outcome, 0) + 1


class PullError(Exception):
    """JetStream answered a pull request with an error status (503: no such consumer, 409: conflict ...)."""


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

    def __init__(self, nc: NATS, psub, *, expires: float) -> None:
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
        """End the subscription without losing a delivery; nak every message no batch took. Returns how many."""
        try:
            # UNSUB first, the subscription still registered: what the server sent before it
            # reads the UNSUB lands in the queue; the PING round trip makes sure it has landed.
            await self.nc._send_unsubscribe(self.sub._id)
            await self.nc.flush(timeout=5)
        finally:
            self._receive()
            returned = 0
            while self.ready:
                await _safe(self.ready.popleft().nak())
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


class ListenerRunner:
    def __init__(
        self,
        listener_classes: list[type[Listener]],
        *,
        subjects: list[str],
        durable: str | None = None,
        batch: int = 100,
        max_messages: int | None = None,
        idle_exit: float | None = None,
        from_start: bool = False,
        reset: bool = False,
        fetch_timeout: float = 1.0,
        ack_wait: float | None = None,
    ) -> None:
        self.listener_classes = listener_classes
        self.subjects = subjects
        self.durable = durable
        self.batch = batch
        self.max_messages = max_messages
        self.idle_exit = idle_exit
        self.from_start = from_start
        self.reset = reset
        self.fetch_timeout = fetch_timeout
        self.ack_wait = ack_wait
        self.stats = RunStats()
        self._stop = asyncio.Event()
        self._last_activity = time.monotonic()
        self._batches = 0
        self._db_checked_at = -math.inf
        self._crash_after = _crash_after_commit()
        self._stop_task: asyncio.Future | None = None
        self.nc: NATS | None = None
        self.plans: list[ConsumerPlan] = []

    def stop(self) -> None:
        """Stop fetching; the batch in hand is finished and acked, then the connection drains."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def connect(self) -> JetStreamContext:
        """Connect, ensure the streams and the durable consumers; one-line ListenerStartupError on failure."""
        try:
            # The first connection is tried a bounded number of times: an operator must hear that
            # NATS is unreachable. Once connected, reconnection is as configured (forever by default).
            self.nc = await connect(
                name=f"listener-{'-'.join(durable_slug(s) for s in self.subjects)}", max_reconnect_attempts=1
            )
            self.nc.options["max_reconnect_attempts"] = connect_options()["max_reconnect_attempts"]
        except OutboxError as exc:
            raise ListenerStartupError(str(exc)) from exc
        try:
            js = self.nc.jetstream(timeout=5)
            await ensure_streams(js)
            version = self.nc.connected_server_version
            multi_filter = (version.major, version.minor) >= (2, 10)
            self.plans = plan_consumers(
                self.listener_classes, requested=self.subjects, durable=self.durable, multi_filter=multi_filter
            )
            if self.ack_wait is not None:
                for plan in self.plans:
                    plan.ack_wait = self.ack_wait
            for plan in self.plans:
                await self._ensure_consumer(js, plan, initial=True)
        except Exception as exc:
            await self._close()
            raise ListenerStartupError(
                f"cannot set up the streams and consumers on NATS: {type(exc).__name__}: {exc}"
            ) from exc
        logger.info("listener.ready consumers=%s", ",".join(f"{p.stream}/{p.durable}" for p in self.plans) or "none")
        return js

    def _consumer_config(self, plan: ConsumerPlan) -> ConsumerConfig:
        config = ConsumerConfig(
            durable_name=plan.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=plan.ack_wait,
            # Unlimited on the server: the listener counts deliveries and dead-letters the message
            # itself. A server-side limit drops a message *silently* when its last delivery lands
            # on a process that dies before acking (found by the soak: SIGKILLs burn deliveries).
            max_deliver=-1,
            max_ack_pending=max(1000, self.batch * 4),
        )
        if plan.filter_subjects and len(plan.filter_subjects) == 1:
            config.filter_subject = plan.filter_subjects[0]
        elif plan.filter_subjects:
            config.filter_subjects = plan.filter_subjects
        return config

    async def _ensure_consumer(self, js: JetStreamContext, plan: ConsumerPlan, *, initial: bool = False) -> None:
        """Create the durable, or bring its editable settings (ack wait, deliveries, pending) up to date.

        ``--from-start`` deletes the consumer (and this consumer's inbox) only when the
        process starts — never again on a reconnect.
        """
        config = self._consumer_config(plan)
        if initial and self.from_start:
            try:
                await js.delete_consumer(plan.stream, plan.durable)
            except NotFoundError:
                pass
            await sync_to_async(_forget, thread_sensitive=True)(plan, self.reset)
            logger.warning("listener.from_start stream=%s durable=%s reset=%s", plan.stream, plan.durable, self.reset)
        try:
            info = await js.consumer_info(plan.stream, plan.durable)
        except NotFoundError:
            await js.add_consumer(plan.stream, config)
            logger.info("listener.consumer_created stream=%s durable=%s", plan.stream, plan.durable)
            return
        current = info.config
        drift = {
            name: (getattr(current, name), getattr(config, name))
            for name in ("ack_wait", "max_deliver", "max_ack_pending")
            if abs((getattr(current, name) or 0) - (getattr(config, name) or 0)) > 0.001
        }
        if drift:
            # The same create call updates a durable's editable fields; filter and policy stay as they are.
            updated = current.evolve(**{name: new for name, (_, new) in drift.items()})
            await js.add_consumer(plan.stream, updated)
            logger.info("listener.consumer_updated stream=%s durable=%s drift=%s", plan.stream, plan.durable, drift)

    async def run(self) -> RunStats:
        js = await self.connect()
        try:
            tasks = [asyncio.create_task(self._consume(js, plan)) for plan in self.plans]
            await asyncio.gather(*tasks)
        finally:
            if self._stop_task is not None:
                self._stop_task.cancel()
            await self._close()
            await sync_to_async(connections.close_all, thread_sensitive=True)()
        return self.stats

    async def _close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            # Acks are plain publishes: flush them to the server before closing.
            try:
                await asyncio.wait_for(self.nc.flush(), timeout=5)
            except Exception:  # noqa: BLE001 - closing anyway; unacked messages are redelivered
                logger.warning("listener.flush_failed: unacked messages will be redelivered")
            await self.nc.close()

    def _done(self) -> bool:
        return (
            self._stop.is_set()
            or (self.max_messages is not None and self.stats.handled >= self.max_messages)
            or (self.idle_exit is not None and time.monotonic() - self._last_activity > self.idle_exit)
        )

    async def _consume(self, js: JetStreamContext, plan: ConsumerPlan) -> None:
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        assert self.nc is not None
        pull = OpenPull(self.nc, psub, expires=self.fetch_timeout)
        failures = 0
        try:
            while not self._done():
                want = max(self._want(0), 1)
                try:
                    msgs = await pull.next_batch(want, wait=self._wait_limit(), stop=self._stop_waiter())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - NATS restarting: reconnect is automatic
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        logger.warning(
                            "listener.fetch_failed durable=%s error=%s", plan.durable, str(exc) or type(exc).__name__
                        )
                    await self._pause(min(0.1 * failures, 2.0))
                    if failures % 20 == 0:
                        try:
                            await self._ensure_consumer(js, plan)
                        except Exception as exc2:  # noqa: BLE001
                            logger.debug("listener.ensure_consumer_failed error=%s", exc2)
                    continue
                failures = 0
                if not msgs:
                    continue
                self._last_activity = time.monotonic()
                if not self.stopping:
                    # Ask for the next batch now: it is delivered while this one is applied.
                    await _safe(pull.renew(self._want(len(msgs))))
                await self._process(plan, msgs, pull)
                self._last_activity = time.monotonic()
        finally:
            await self._hand_back(pull, plan)

    def _want(self, in_hand: int) -> int:
        """The next batch's size: ``--batch``, or what is left of ``--max-messages`` beside the messages in hand."""
        if self.max_messages is None:
            return self.batch
        return max(0, min(self.batch, self.max_messages - self.stats.handled - in_hand))

    def _wait_limit(self) -> float:
        """How long one wait for messages may last before the loop looks at its exit conditions again."""
        if self.idle_exit is None:
            return self.fetch_timeout
        return max(0.0, min(self.fetch_timeout, self._last_activity + self.idle_exit - time.monotonic()) + 0.01)

    def _stop_waiter(self) -> asyncio.Future:
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop.wait())
        return self._stop_task

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _hand_back(self, pull: OpenPull, plan: ConsumerPlan) -> None:
        """Nak the messages the client holds that no batch took, including those still on the way.

        The pull requests stay open on the server until they expire; the subscription is
        closed in two steps so that none of their messages is lost in between: UNSUB
        (the server delivers nothing more once it has read it), a PING round trip (what
        it sent before has arrived), then every buffered message is handed back. A plain
        nak makes them available at once; unacked, they would wait ``ack_wait``.
        """
        if self.nc is None or self.nc.is_closed:
            return
        returned = 0
        try:
            returned = await pull.close()
        except Exception as exc:  # noqa: BLE001 - the connection may be gone; redelivery covers it
            logger.debug("listener.unsubscribe_failed durable=%s error=%s", plan.durable, exc)
        if returned:
            logger.info("listener.handed_back durable=%s messages=%d", plan.durable, returned)

    async def _process(self, plan: ConsumerPlan, msgs: list[Msg], pull: OpenPull) -> None:
        names = plan.event_names  # NATS subject -> event name, filled as subjects are met
        deliveries = []
        for msg in msgs:
            meta = msg.metadata
            name = names.get(msg.subject)
            if name is None:
                name = names[msg.subject] = event_name_from_subject(msg.subject)
            deliveries.append(
                Delivery(
                    name,
                    msg.data or b"",
                    msg.headers or {},  # read-only below: no copy
                    meta.stream,
                    meta.sequence.stream,
                    meta.num_delivered,
                    plan.durable,
                    plan.listeners.get(name),
                )
            )
        decisions = await self._apply_until_committed(plan, msgs, deliveries, pull)
        if decisions is None:
            return
        self._batches += 1
        if self._crash_after and self._batches >= self._crash_after:
            logger.critical("listener.fault_injection %s: SIGKILL after commit, before ack", CRASH_AFTER_COMMIT_ENV)
            os.kill(os.getpid(), signal.SIGKILL)
        stats = self.stats
        for msg, decision in zip(msgs, decisions, strict=True):
            action = decision.action
            try:
                if action == ACK:
                    await msg.ack()
                elif action == NAK:
                    await msg.nak(delay=decision.delay)
                elif action == TERM:
                    await msg.term()
            except Exception as exc:  # noqa: BLE001 - an ack lost to a reconnect means a redelivery the inbox absorbs
                logger.debug("listener.ack_failed error=%s", exc)
            if action != NAK:
                stats.add(decision)

    async def _apply_until_committed(
        self, plan: ConsumerPlan, msgs: list[Msg], deliveries: list[Delivery], pull: OpenPull
    ) -> list[Decision] | None:
        """Run the batch transaction; retry it in place while the database refuses it.

        Nothing was committed when it raised, so trying again is safe. The messages are
        kept "in progress" meanwhile — the batch and those buffered behind it — so
        JetStream neither redelivers them nor counts deliveries; the pause between two
        attempts stays under ``ack_wait``. Asked to stop, the runner hands them back
        instead (None).
        """
        attempt = 0
        while True:
            try:
                return await self._apply_in_thread(plan, msgs, deliveries, pull, check=attempt > 0)
            except Exception as exc:  # noqa: BLE001 - database down or commit failed: nothing was committed
                attempt += 1
                if attempt in (1, 2, 10) or attempt % 50 == 0:
                    logger.error(
                        "listener.batch_failed durable=%s messages=%d attempt=%d error=%s: %s",
                        plan.durable,
                        len(msgs),
                        attempt,
                        type(exc).__name__,
                        exc,
                    )
                if self.stopping:
                    for msg in msgs:
                        await _safe(msg.nak(delay=1.0))
                    return None
                for msg in (*msgs, *pull.buffered()):
                    await _safe(msg.in_progress())
                await self._pause(min(0.2 * 2 ** min(attempt, 10), BATCH_RETRY_MAX, plan.ack_wait / 2))

    async def _apply_in_thread(
        self, plan: ConsumerPlan, msgs: list[Msg], deliveries: list[Delivery], pull: OpenPull, *, check: bool
    ) -> list[Decision]:
        """One attempt at the batch transaction; while it lasts long, its messages are kept in progress.

        A batch waiting on a lock (or a slow commit) for longer than ``ack_wait`` would
        otherwise be redelivered while still in hand, and so would the messages the
        open pull delivered behind it: each redelivery spends a delivery. Every
        ``ack_wait / 2`` the batch and the buffered messages are marked in progress.

        The connection is checked first (``close_old_connections()``) when ``check`` (a
        retry) or when it has not been for :data:`DB_CHECK_INTERVAL`.
        """
        now = time.monotonic()
        if check or now - self._db_checked_at >= DB_CHECK_INTERVAL:
            check, self._db_checked_at = True, now
        work = asyncio.ensure_future(sync_to_async(_apply, thread_sensitive=True)(deliveries, check=check))
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait((work,), timeout=plan.ack_wait / 2)
            if done:
                return work.result()
            held = (*msgs, *pull.buffered())
            for msg in held:
                await _safe(msg.in_progress())
            logger.warning(
                "listener.batch_slow durable=%s messages=%d seconds=%.1f: %d message(s) kept in progress",
                plan.durable,
                len(msgs),
                time.monotonic() - started,
                len(held),
            )


def _crash_after_commit() -> int:
    value = os.environ.get(CRASH_AFTER_COMMIT_ENV, "").strip()
    try:
        return max(int(value), 0) if value else 0
    except ValueError:
        return 0


def _apply(deliveries: list[Delivery], *, check: bool = True) -> list[Decision]:
    if check:
        close_old_connections()
    return apply_batch(deliveries)


def _forget(plan: ConsumerPlan, reset: bool) -> None:
    """``--from-start``: forget what this consumer applied (and with ``--reset`` what it built), atomically."""
    from django.db import transaction

    from listeners.models import InboxEntry

    with transaction.atomic():
        InboxEntry.objects.filter(consumer=plan.durable).delete()
        if reset:
            for cls in set(plan.listeners.values()):
                cls().reset()


async def _safe(coro) -> None:
    try:
        await coro
    except Exception as exc:  # noqa: BLE001 - an ack lost to a reconnect means a redelivery the inbox absorbs
        logger.debug("listener.ack_failed error=%s", exc)
