"""Prometheus metrics of a ``listen`` process: what it applied, skipped and dead-lettered, its lag, its timings.

Served from the process itself with ``prometheus_client.start_http_server`` when
``LISTENERS['METRICS_PORT']`` (or ``listen --metrics-port``) is set, on
``METRICS_ADDR`` (loopback by default); nothing is served otherwise. Names:

* ``listeners_applied_total{consumer,subject}`` — events applied (any outcome word but the two below);
* ``listeners_skipped_total{consumer,subject,reason}`` — acked without effect: ``stale``, ``duplicate``;
* ``listeners_dead_total{consumer,subject,reason}`` — dead-lettered: ``invalid``, ``permanent``, ``data``,
  ``failed``, ``gap``;
* ``listeners_redeliveries_requested_total{consumer,subject,reason}`` — nak'ed: ``waiting`` (a version
  gap), ``retry`` (a handler error);
* ``listeners_consumer_pending{consumer}`` / ``listeners_consumer_ack_pending{consumer}`` — the durable's
  ``num_pending`` (not delivered yet: the lag) and ``num_ack_pending``, sampled every
  :data:`LAG_SAMPLE_INTERVAL` seconds from JetStream;
* ``listeners_batch_seconds{consumer}`` — one batch, from its arrival to its acks sent;
* ``listeners_publish_to_apply_seconds{consumer,subject}`` — an applied event's JetStream timestamp
  (when the stream stored it) to its batch's commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from listeners.delivery import ACK, NAK, TERM, Decision, Delivery
from listeners.errors import ListenerStartupError

logger = logging.getLogger("listeners.metrics")

#: Seconds between two samples of each durable's pending counts.
LAG_SAMPLE_INTERVAL = 5.0
#: Outcome words of acked events that had no effect.
SKIPPED = ("stale", "duplicate")

APPLIED = Counter("listeners_applied_total", "Events applied", ["consumer", "subject"])
SKIPPED_EVENTS = Counter(
    "listeners_skipped_total", "Events acked without effect (stale, duplicate)", ["consumer", "subject", "reason"]
)
DEAD = Counter("listeners_dead_total", "Events dead-lettered", ["consumer", "subject", "reason"])
REDELIVERIES = Counter(
    "listeners_redeliveries_requested_total",
    "Events handed back for a later delivery (waiting: version gap, retry: handler error)",
    ["consumer", "subject", "reason"],
)
PENDING = Gauge("listeners_consumer_pending", "Messages of the durable not delivered yet (sampled)", ["consumer"])
ACK_PENDING = Gauge(
    "listeners_consumer_ack_pending", "Messages of the durable delivered and not acked yet (sampled)", ["consumer"]
)
BATCH_SECONDS = Histogram("listeners_batch_seconds", "One batch: from its arrival to its acks", ["consumer"])
PUBLISH_TO_APPLY = Histogram(
    "listeners_publish_to_apply_seconds",
    "From the event's JetStream timestamp to the commit that applied it",
    ["consumer", "subject"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)


def serve(port: int, addr: str) -> None:
    """Start the endpoint (a daemon thread); a one-line ListenerStartupError when it cannot bind."""
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        raise ListenerStartupError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from exc
    logger.info("listener.metrics_server addr=%s port=%d", addr, port)


def observe_batch(
    consumer: str,
    msgs: Sequence[Msg],
    deliveries: Sequence[Delivery],
    decisions: Sequence[Decision],
    *,
    arrived: float,
    committed_at: float,
) -> None:
    """Count a committed batch's decisions; ``arrived`` is monotonic, ``committed_at`` wall-clock."""
    for msg, delivery, decision in zip(msgs, deliveries, decisions, strict=True):
        subject, outcome = delivery.event_name, decision.outcome
        if decision.action == ACK:
            if outcome in SKIPPED:
                SKIPPED_EVENTS.labels(consumer, subject, outcome).inc()
                continue
            APPLIED.labels(consumer, subject).inc()
            stored = _stored_at(msg)
            if stored is not None:
                PUBLISH_TO_APPLY.labels(consumer, subject).observe(max(committed_at - stored, 0.0))
        elif decision.action == TERM:
            DEAD.labels(consumer, subject, outcome.removeprefix("dead:")).inc()
        elif decision.action == NAK:
            REDELIVERIES.labels(consumer, subject, outcome).inc()
    BATCH_SECONDS.labels(consumer).observe(time.monotonic() - arrived)


def _stored_at(msg: Msg) -> float | None:
    try:
        return msg.metadata.timestamp.timestamp()
    except Exception:  # noqa: BLE001 - a message without JetStream metadata has no publish time
        return None


async def sample_lag(js: JetStreamContext, consumers: Sequence[tuple[str, str]], stop: asyncio.Event) -> None:
    """Every :data:`LAG_SAMPLE_INTERVAL` seconds until ``stop``: each (stream, durable)'s pending counts."""
    while not stop.is_set():
        for stream, durable in consumers:
            try:
                info = await js.consumer_info(stream, durable)
            except Exception as exc:  # noqa: BLE001 - NATS away: the gauges keep their last value
                logger.debug("listener.lag_sample_failed durable=%s error=%s", durable, exc)
                continue
            PENDING.labels(durable).set(info.num_pending or 0)
            ACK_PENDING.labels(durable).set(info.num_ack_pending or 0)
        try:
            await asyncio.wait_for(stop.wait(), timeout=LAG_SAMPLE_INTERVAL)
        except TimeoutError:
            pass
