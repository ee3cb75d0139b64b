"""Prometheus metrics of the relay (exposed by ``outbox_metrics`` / the worker)."""

from prometheus_client import Counter, Gauge

PUBLISHED = Counter("outbox_published_total", "Outbox events published to JetStream")
PUBLISH_FAILURES = Counter("outbox_publish_failures_total", "Failed publish attempts")
DEAD = Counter("outbox_dead_total", "Outbox events that became dead")
BACKLOG = Gauge("outbox_backlog", "Pending outbox events (sampled by the sweep)")
OLDEST_PENDING_AGE = Gauge("outbox_oldest_pending_age_seconds", "Age of the oldest pending event (sampled)")
DEAD_ROWS = Gauge("outbox_dead_rows", "Dead outbox events waiting for an operator (sampled)")
PUBLISHED_LAST_MINUTE = Gauge("outbox_published_last_minute", "Events published in the last minute (sampled)")


def sample() -> None:
    """Refresh the database-derived gauges (the web endpoint and the beat sweep call this)."""
    from outbox.selectors import outbox_backlog

    backlog = outbox_backlog()
    BACKLOG.set(backlog.pending)
    OLDEST_PENDING_AGE.set(backlog.oldest_pending_age or 0)
    DEAD_ROWS.set(backlog.dead)
    PUBLISHED_LAST_MINUTE.set(backlog.published_last_minute)
