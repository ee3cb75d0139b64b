"""The asyncio side of a listener process: durable pull consumers, fetch, ack.

The event loop owns the single NATS connection. Each fetched batch is handed to
:func:`listeners.processing.apply_batch` on Django's thread-sensitive executor (one
synchronous ``atomic`` per batch); messages are acked, nak'ed or terminated only
after that call returned, i.e. after the commit.

Failures and what they cost:

* a message the listener cannot apply is decided in :mod:`listeners.processing`
  (nak with a delay, or dead letter + term);
* a batch the *database* could not take (connection lost, commit failed) is retried
  here, in place, with the messages kept in progress: a database outage does not
  spend JetStream deliveries, so it can never push a message past ``max_deliver``;
* a NATS outage is ridden out by the client's reconnection; fetches fail quietly
  and resume, and an ack lost on the way is a redelivery the inbox absorbs;
* on the first SIGINT/SIGTERM the runner stops fetching, finishes and acks the
  batch in hand, hands back (nak) what the client had buffered but not started, and
  flushes the acks before closing — so a restart finds every message at once instead
  of after ``ack_wait``.

Fault injection: ``LISTENERS_TEST_CRASH_AFTER_COMMIT=N`` makes the process SIGKILL
itself right after its N-th batch committed and before any of it is acked. It exists
for the fault tests (the crash window of "applied but not acked"); never set it in
production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field

import nats.errors
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
#: Bound on the wait for the answer to a ``no_wait`` pull (the server answers at once).
NO_WAIT_TIMEOUT = 2.0


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
        self._crash_after = _crash_after_commit()
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
        failures = 0
        try:
            while not self._done():
                want = self.batch
                if self.max_messages is not None:
                    want = max(1, min(want, self.max_messages - self.stats.handled))
                try:
                    msgs = await self._fetch(psub, want)
                except nats.errors.TimeoutError:
                    continue
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
                await self._process(plan, msgs)
                self._last_activity = time.monotonic()
        finally:
            await self._hand_back(psub, plan)

    async def _fetch(self, psub, want: int) -> list[Msg]:
        """What the stream holds now (up to ``want``) at once; when it holds nothing, wait for the next message.

        ``psub.fetch(n)`` on an idle consumer leaves a pull for ``n`` open and, once the
        first message arrives, waits for the other ``n - 1`` until its timeout: a lone
        event would sit up to ``fetch_timeout`` before being applied. Here a busy stream
        is pulled with ``no_wait`` (a full batch when there is one, less when there is
        not), and an idle one with a pull for ONE message, which returns on arrival;
        whatever else arrived meanwhile joins it.
        """
        msgs = await self._available(psub, want)
        if msgs is None:  # a client without the attributes used below: its own fetch
            return await psub.fetch(want, timeout=self.fetch_timeout)
        if msgs:
            return msgs
        msgs = await psub.fetch(1, timeout=self.fetch_timeout)
        if want > 1:
            msgs += await self._available(psub, want - len(msgs)) or []
        return msgs

    async def _available(self, psub, want: int) -> list[Msg] | None:
        """One ``no_wait`` pull: the messages the consumer can deliver right now, at most ``want``."""
        sub, subject, inbox = getattr(psub, "_sub", None), getattr(psub, "_nms", None), getattr(psub, "_deliver", None)
        if not hasattr(sub, "_pending_queue") or not subject or not inbox or self.nc is None:
            return None
        await self.nc.publish(subject, _pull_request(want), reply=inbox)
        queue = sub._pending_queue
        msgs: list[Msg] = []
        try:
            while len(msgs) < want:
                if queue.empty():
                    msg = await sub.next_msg(timeout=NO_WAIT_TIMEOUT)
                else:  # what next_msg does, without a task and a timer per message
                    msg = queue.get_nowait()
                    sub._pending_size -= len(msg.data)
                    queue.task_done()
                if msg.headers and msg.headers.get("Status"):
                    # 404 no messages / 408 expired / 409 ...: this pull (or an older one) is over.
                    break
                msgs.append(msg)
        except nats.errors.TimeoutError:
            pass  # what did not arrive in time stays queued for the next pull
        return msgs

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _hand_back(self, psub, plan: ConsumerPlan) -> None:
        """Nak the messages the client buffered for a fetch that never handed them to us.

        A pull can deliver a little after ``fetch`` returned; such messages sit in the
        subscription's queue. Unacked, they would wait ``ack_wait`` before anyone got
        them again; a plain nak makes them available at once.
        """
        if self.nc is None or self.nc.is_closed:
            return
        queue = getattr(getattr(psub, "_sub", None), "_pending_queue", None)
        try:
            await psub.unsubscribe()
        except Exception as exc:  # noqa: BLE001 - the connection may be gone; redelivery covers it
            logger.debug("listener.unsubscribe_failed durable=%s error=%s", plan.durable, exc)
        returned = 0
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if msg.reply and not (msg.headers or {}).get("Status"):
                await _safe(msg.nak())
                returned += 1
        if returned:
            logger.info("listener.handed_back durable=%s messages=%d", plan.durable, returned)

    async def _process(self, plan: ConsumerPlan, msgs: list[Msg]) -> None:
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
        decisions = await self._apply_until_committed(plan, msgs, deliveries)
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
        self, plan: ConsumerPlan, msgs: list[Msg], deliveries: list[Delivery]
    ) -> list[Decision] | None:
        """Run the batch transaction; retry it in place while the database refuses it.

        Nothing was committed when it raised, so trying again is safe. The messages are
        kept "in progress" meanwhile, so JetStream neither redelivers them nor counts
        deliveries. Asked to stop, the runner hands them back instead (None).
        """
        attempt = 0
        while True:
            try:
                return await sync_to_async(_apply, thread_sensitive=True)(deliveries)
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
                for msg in msgs:
                    await _safe(msg.in_progress())
                await self._pause(min(0.2 * 2 ** min(attempt, 10), BATCH_RETRY_MAX))


def _pull_request(batch: int) -> bytes:
    return b'{"batch":%d,"no_wait":true}' % batch


def _crash_after_commit() -> int:
    value = os.environ.get(CRASH_AFTER_COMMIT_ENV, "").strip()
    try:
        return max(int(value), 0) if value else 0
    except ValueError:
        return 0


def _apply(deliveries: list[Delivery]) -> list[Decision]:
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
