"""Prometheus metrics of the relay (exposed by ``outbox_metrics`` / the worker)."""

from prometheus_client import Counter, Gauge

PUBLISHED = Counter("outbox_published_total", "Outbox events published to JetStream")
PUBLISH_FAILURES = Counter("outbox_publish_failures_total", "Failed publish attempts")
DEAD = Counter("outbox_dead_total", "Outbox events that became dead")
BACKLOG = Gauge("outbox_backlog", "Pending outbox events (sampled by the sweep)")
OLDEST_PENDING_AGE = Gauge("outbox_oldest_pending_age_seconds", "Age of the oldest pending event (sampled)")
