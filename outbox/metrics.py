"""Prometheus metrics of the outbox: the relay's counters, and gauges of the database that
``outbox.operations.sample_metrics()`` refreshes (served by ``/metrics`` and a worker's metrics server)."""

from prometheus_client import Counter, Gauge, Histogram

PUBLISHED = Counter("outbox_published_total", "Outbox events published to JetStream")
PUBLISH_FAILURES = Counter("outbox_publish_failures_total", "Failed publish attempts")
DEAD = Counter("outbox_dead_total", "Outbox events that became dead")
BACKLOG = Gauge("outbox_backlog", "Pending outbox events (sampled by the sweep)")
OLDEST_PENDING_AGE = Gauge("outbox_oldest_pending_age_seconds", "Age of the oldest pending event (sampled)")
DEAD_ROWS = Gauge("outbox_dead_rows", "Dead outbox events waiting for an operator (sampled)")
PUBLISHED_LAST_MINUTE = Gauge("outbox_published_last_minute", "Events published in the last minute (sampled)")
RELAYS_DRAINING = Gauge(
    "outbox_relays_draining",
    "Relays draining right now, from their partition locks (sampled; NaN in lease mode and on SQLite)",
)
#: The relay's stages, per batch: the claim query, the publish (from its start until every
#: acknowledgement or failure is in, pipeline waits included) and the mark.
STAGE_SECONDS = Histogram(
    "outbox_relay_stage_seconds",
    "Time one relay batch spends in a stage (claim, publish, mark)",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
#: The three children, made once (on the first scrape already, at zero).
CLAIM_SECONDS = STAGE_SECONDS.labels("claim")
PUBLISH_SECONDS = STAGE_SECONDS.labels("publish")
MARK_SECONDS = STAGE_SECONDS.labels("mark")
