"""Prometheus metrics of the relay (exposed by ``outbox_metrics`` / the worker)."""

from prometheus_client import Counter, Gauge

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


def sample() -> None:
    """Refresh the database-derived gauges (the web endpoint and the beat sweep call this)."""
    from outbox.selectors import outbox_backlog, outbox_relays_draining

    backlog = outbox_backlog()
    BACKLOG.set(backlog.pending)
    OLDEST_PENDING_AGE.set(backlog.oldest_pending_age or 0)
    DEAD_ROWS.set(backlog.dead)
    PUBLISHED_LAST_MINUTE.set(backlog.published_last_minute)
    draining = outbox_relays_draining()
    # Leases name batches, not relays: no number rather than a wrong one.
    RELAYS_DRAINING.set(float("nan") if draining is None else draining)
