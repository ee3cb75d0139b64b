"""The run loop of a listener process: connect, consume every planned durable, apply each batch, ack after the commit.

The event loop owns the single NATS connection. Each durable consumer is read through
a pull (:mod:`listeners.pull`), so messages arrive while the batch before them is
applied; a batch is what has arrived, from one message to ``--batch``. It is handed to
:func:`listeners.apply.apply_batch` on Django's thread-sensitive executor (one
synchronous ``atomic`` per batch); messages are acked, nak'ed or terminated only after
that call returned, i.e. after the commit.

Failures and what they cost:

* a message the listener cannot apply is decided in :mod:`listeners.apply`
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

Before a batch is applied the runner calls the :data:`listeners.hooks.BEFORE_APPLY` hooks,
between the commit and the acks the :data:`listeners.hooks.AFTER_COMMIT` hooks (none by
default; the fault tests add ones that kill the process there), and at each turn of a
consumer's loop the :data:`listeners.hooks.LOOP_TURN` hooks and the health file
(:mod:`listeners.health`). Its metrics are :mod:`listeners.metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from asgiref.sync import sync_to_async
from django.db import connections
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from listeners import metrics
from listeners.apply import apply_batch
from listeners.base import Listener
from listeners.conf import listeners_settings
from listeners.consumers import consumer_ensure, consumer_start_over
from listeners.db_health import ConnectionCheckSchedule, replace_unusable_connection
from listeners.delivery import ACK, NAK, TERM, Decision, Delivery, RunStats
from listeners.errors import ListenerStartupError
from listeners.health import HealthFile
from listeners.hooks import AFTER_COMMIT, BEFORE_APPLY, LOOP_TURN, call_hooks
from listeners.plan import ConsumerPlan, durable_slug, plan_consumers, subjects_by_stream
from listeners.pull import Pull, make_pull, quietly
from listeners.stream_check import CLUSTER_SETTLE, StreamNotReady, streams_check
from outbox.broker import connect, connect_options
from outbox.errors import OutboxError
from outbox.streams import event_name_from_subject

logger = logging.getLogger("listeners.runner")

#: Upper bound of the pause between two attempts at a batch the database refused.
BATCH_RETRY_MAX = 5.0


def apply_batch_after_check(deliveries: list[Delivery], *, check: bool) -> list[Decision]:
    """The batch transaction, run in Django's thread; with ``check``, the connection is checked first."""
    if check:
        replace_unusable_connection()
    return apply_batch(deliveries)


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
        health_file: str | None = None,
        metrics_port: int | None = None,
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
        conf = listeners_settings()
        self.open_pull = conf.OPEN_PULL
        health_file = health_file or conf.HEALTH_FILE
        self.health = HealthFile(health_file) if health_file else None
        self.metrics_port = conf.METRICS_PORT if metrics_port is None else metrics_port
        self.metrics_addr = conf.METRICS_ADDR
        self._stop = asyncio.Event()
        self._last_activity = time.monotonic()
        self._batches = 0
        self._db_check = ConnectionCheckSchedule()
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
        """Connect, check the streams, ensure the durable consumers; one-line ListenerStartupError on failure.

        The streams belong to the producers: a listener only checks that each one it consumes
        exists and takes its subjects (:mod:`listeners.stream_check`), and never writes one.
        """
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
            needed = subjects_by_stream(self.listener_classes, requested=self.subjects)
            # Given several servers (a cluster), "no such stream" may come from a node without a quorum.
            settle = CLUSTER_SETTLE if len(self.nc.servers) > 1 else 0.0
            stream_subjects = await streams_check(js, needed, settle=settle)
            version = self.nc.connected_server_version
            self.plans = plan_consumers(
                self.listener_classes,
                requested=self.subjects,
                durable=self.durable,
                multi_filter=(version.major, version.minor) >= (2, 10),
                stream_subjects=stream_subjects,
            )
            if self.ack_wait is not None:
                for plan in self.plans:
                    plan.ack_wait = self.ack_wait
            for plan in self.plans:
                if self.from_start:
                    await consumer_start_over(js, plan, reset=self.reset)
                await consumer_ensure(js, plan, batch=self.batch)
        except StreamNotReady:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise ListenerStartupError(
                f"cannot check the streams and set up the consumers on NATS: {type(exc).__name__}: {exc}"
            ) from exc
        logger.info("listener.ready consumers=%s", ",".join(f"{p.stream}/{p.durable}" for p in self.plans) or "none")
        return js

    async def bind(self, js: JetStreamContext, plan: ConsumerPlan) -> Pull:
        """Subscribe to the planned durable and open a pull on it."""
        assert self.nc is not None
        psub = await js.pull_subscribe_bind(durable=plan.durable, stream=plan.stream)
        return make_pull(self.nc, psub, expires=self.fetch_timeout, prefer_open=self.open_pull)

    async def run(self) -> RunStats:
        if self.health:
            self.health.start()
        if self.metrics_port:
            metrics.serve(self.metrics_port, self.metrics_addr)
        js = await self.connect()
        if self.health:
            self.health.plan([plan.durable for plan in self.plans])
        sampler = None
        try:
            if self.metrics_port:
                consumers = [(plan.stream, plan.durable) for plan in self.plans]
                sampler = asyncio.create_task(metrics.sample_lag(js, consumers, self._stop))
            tasks = [asyncio.create_task(self._consume(js, plan)) for plan in self.plans]
            await asyncio.gather(*tasks)
        finally:
            for task in (self._stop_task, sampler):
                if task is not None:
                    task.cancel()
            if self.health:
                self.health.stopped()
            await self.close()
            await sync_to_async(connections.close_all, thread_sensitive=True)()
        return self.stats

    async def close(self) -> None:
        """Flush the acks to the server, then close the connection."""
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
        pull = await self.bind(js, plan)
        failures = 0
        try:
            while not self._done():
                self._turn(plan)
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
                            await consumer_ensure(js, plan, batch=self.batch)
                        except Exception as exc2:  # noqa: BLE001
                            logger.debug("listener.ensure_consumer_failed error=%s", exc2)
                    continue
                failures = 0
                if not msgs:
                    continue
                self._last_activity = time.monotonic()
                if not self.stopping:
                    # Ask for the next batch now: it is delivered while this one is applied.
                    await quietly(pull.renew(self._want(len(msgs))))
                await self._process(plan, msgs, pull)
                self._last_activity = time.monotonic()
        finally:
            await self.hand_back(pull, plan)

    def _turn(self, plan: ConsumerPlan) -> None:
        """A turn of a consumer's loop: the liveness signal (health file) and the LOOP_TURN hooks."""
        if self.health:
            connected = self.nc is not None and self.nc.is_connected
            self.health.turn(plan.durable, connected=connected, stopping=self.stopping)
        call_hooks(LOOP_TURN, durable=plan.durable)

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

    async def hand_back(self, pull: Pull, plan: ConsumerPlan) -> None:
        """Close the pull, handing back (nak) the messages the client holds that no batch took."""
        if self.nc is None or self.nc.is_closed:
            return
        returned = 0
        try:
            returned = await pull.close()
        except Exception as exc:  # noqa: BLE001 - the connection may be gone; redelivery covers it
            logger.debug("listener.unsubscribe_failed durable=%s error=%s", plan.durable, exc)
        if returned:
            logger.info("listener.handed_back durable=%s messages=%d", plan.durable, returned)

    async def _process(self, plan: ConsumerPlan, msgs: list[Msg], pull: Pull) -> None:
        arrived = time.monotonic()
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
                    msg.subject,
                )
            )
        call_hooks(BEFORE_APPLY, durable=plan.durable, messages=len(msgs))
        decisions = await self._apply_until_committed(plan, msgs, deliveries, pull)
        if decisions is None:
            return
        committed_at = time.time()
        self._batches += 1
        call_hooks(AFTER_COMMIT, batches=self._batches, durable=plan.durable, messages=len(msgs))
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
        if self.metrics_port:
            metrics.observe_batch(plan.durable, msgs, deliveries, decisions, arrived=arrived, committed_at=committed_at)

    async def _apply_until_committed(
        self, plan: ConsumerPlan, msgs: list[Msg], deliveries: list[Delivery], pull: Pull
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
                return await self._apply_in_thread(plan, msgs, deliveries, pull, retry=attempt > 0)
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
                        await quietly(msg.nak(delay=1.0))
                    return None
                for msg in (*msgs, *pull.buffered()):
                    await quietly(msg.in_progress())
                await self._pause(min(0.2 * 2 ** min(attempt, 10), BATCH_RETRY_MAX, plan.ack_wait / 2))

    async def _apply_in_thread(
        self, plan: ConsumerPlan, msgs: list[Msg], deliveries: list[Delivery], pull: Pull, *, retry: bool
    ) -> list[Decision]:
        """One attempt at the batch transaction; while it lasts long, its messages are kept in progress.

        A batch waiting on a lock (or a slow commit) for longer than ``ack_wait`` would
        otherwise be redelivered while still in hand, and so would the messages the
        open pull delivered behind it: each redelivery spends a delivery. Every
        ``ack_wait / 2`` the batch and the buffered messages are marked in progress.
        """
        check = self._db_check.due(retry=retry)
        work = asyncio.ensure_future(
            sync_to_async(apply_batch_after_check, thread_sensitive=True)(deliveries, check=check)
        )
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait((work,), timeout=plan.ack_wait / 2)
            if done:
                return work.result()
            held = (*msgs, *pull.buffered())
            for msg in held:
                await quietly(msg.in_progress())
            logger.warning(
                "listener.batch_slow durable=%s messages=%d seconds=%.1f: %d message(s) kept in progress",
                plan.durable,
                len(msgs),
                time.monotonic() - started,
                len(held),
            )
