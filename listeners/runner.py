"""The asyncio side of a listener process: durable pull consumers, fetch, ack.

The event loop owns the single NATS connection. Each fetched batch is handed to
:func:`listeners.processing.apply_batch` on Django's thread-sensitive executor (one
synchronous ``atomic`` per batch); messages are acked, nak'ed or terminated only
after that call returned, i.e. after the commit.
"""

from __future__ import annotations

import asyncio
import logging
import re
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
from listeners.processing import ACK, NAK, TERM, Decision, Delivery, apply_batch
from outbox.broker import connect
from outbox.contracts import registry
from outbox.streams import ensure_streams, event_name_from_subject, nats_subject, stream_name

logger = logging.getLogger("listeners.runner")

_DURABLE_BAD = re.compile(r"[^A-Za-z0-9_-]+")


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
        self.stats = RunStats()
        self._stop = asyncio.Event()
        self._last_activity = time.monotonic()
        self.nc: NATS | None = None
        self.plans: list[ConsumerPlan] = []

    def stop(self) -> None:
        """Stop fetching; the batch in hand is finished and acked, then the connection drains."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def connect(self) -> JetStreamContext:
        self.nc = await connect(name=f"listener-{'-'.join(durable_slug(s) for s in self.subjects)}")
        js = self.nc.jetstream(timeout=5)
        await ensure_streams(js)
        version = self.nc.connected_server_version
        multi_filter = (version.major, version.minor) >= (2, 10)
        self.plans = plan_consumers(
            self.listener_classes, requested=self.subjects, durable=self.durable, multi_filter=multi_filter
        )
        for plan in self.plans:
            await self._ensure_consumer(js, plan)
        return js

    async def _ensure_consumer(self, js: JetStreamContext, plan: ConsumerPlan) -> None:
        config = ConsumerConfig(
            durable_name=plan.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=plan.ack_wait,
            max_deliver=plan.max_deliver,
            max_ack_pending=max(1000, self.batch * 4),
        )
        if plan.filter_subjects and len(plan.filter_subjects) == 1:
            config.filter_subject = plan.filter_subjects[0]
        elif plan.filter_subjects:
            config.filter_subjects = plan.filter_subjects
        if self.from_start:
            try:
                await js.delete_consumer(plan.stream, plan.durable)
            except NotFoundError:
                pass
            await sync_to_async(_forget, thread_sensitive=True)(plan, self.reset)
        try:
            await js.consumer_info(plan.stream, plan.durable)
        except NotFoundError:
            await js.add_consumer(plan.stream, config)
            logger.info("listener.consumer_created stream=%s durable=%s", plan.stream, plan.durable)

    async def run(self) -> RunStats:
        js = await self.connect()
        try:
            tasks = [asyncio.create_task(self._consume(js, plan)) for plan in self.plans]
            await asyncio.gather(*tasks)
        finally:
            if self.nc is not None and not self.nc.is_closed:
                # Acks are plain publishes: flush them to the server before closing.
                try:
                    await asyncio.wait_for(self.nc.flush(), timeout=5)
                except Exception:  # noqa: BLE001 - closing anyway; unacked messages are redelivered
                    logger.warning("listener.flush_failed: unacked messages will be redelivered")
                await self.nc.close()
            await sync_to_async(connections.close_all, thread_sensitive=True)()
        return self.stats

    def _done(self) -> bool:
        return (
            self._stop.is_set()
            or (self.max_messages is not None and self.stats.handled >= self.max_messages)
            or (self.idle_exit is not None and time.monotonic() - self._last_activity > self.idle_exit)
        )

    async def _consume(self, js: JetStreamContext, plan: ConsumerPlan) -> None:
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        failures = 0
        while not self._done():
            want = self.batch
            if self.max_messages is not None:
                want = max(1, min(want, self.max_messages - self.stats.handled))
            try:
                msgs = await psub.fetch(want, timeout=self.fetch_timeout)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS restarting: reconnect is automatic
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("listener.fetch_failed durable=%s error=%s", plan.durable, exc or type(exc).__name__)
                await asyncio.sleep(min(0.1 * failures, 2.0))
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

    async def _process(self, plan: ConsumerPlan, msgs: list[Msg]) -> None:
        deliveries = []
        for msg in msgs:
            meta = msg.metadata
            name = event_name_from_subject(msg.subject)
            deliveries.append(
                Delivery(
                    event_name=name,
                    data=msg.data or b"",
                    headers=dict(msg.headers or {}),
                    stream=meta.stream,
                    stream_sequence=meta.sequence.stream,
                    deliveries=meta.num_delivered,
                    consumer=plan.durable,
                    listener=plan.listeners.get(name),
                )
            )
        try:
            decisions = await sync_to_async(_apply, thread_sensitive=True)(deliveries)
        except Exception as exc:  # noqa: BLE001 - database down: nothing committed, redeliver soon
            logger.error("listener.batch_failed durable=%s messages=%d error=%s", plan.durable, len(msgs), exc)
            for msg in msgs:
                await _safe(msg.nak(delay=1.0))
            await asyncio.sleep(0.5)
            return
        for msg, decision in zip(msgs, decisions, strict=True):
            if decision.action == ACK:
                await _safe(msg.ack())
            elif decision.action == NAK:
                await _safe(msg.nak(delay=decision.delay))
            elif decision.action == TERM:
                await _safe(msg.term())
            if decision.action != NAK:
                self.stats.add(decision)


def _apply(deliveries: list[Delivery]) -> list[Decision]:
    close_old_connections()
    return apply_batch(deliveries)


def _forget(plan: ConsumerPlan, reset: bool) -> None:
    from listeners.models import InboxEntry

    InboxEntry.objects.filter(consumer=plan.durable).delete()
    if reset:
        for cls in set(plan.listeners.values()):
            cls().reset()


async def _safe(coro) -> None:
    try:
        await coro
    except Exception as exc:  # noqa: BLE001 - an ack lost to a reconnect means a redelivery the inbox absorbs
        logger.debug("listener.ack_failed error=%s", exc)
