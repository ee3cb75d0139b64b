"""The ``OUTBOX`` settings dict, with documented defaults.

Read a value with ``outbox_settings().BATCH_SIZE``. Unknown keys are an error
(system check ``outbox.E001``) so that a typo never silently keeps a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

from django.conf import settings

from outbox.errors import ConfigurationError


@dataclass(frozen=True)
class OutboxSettings:
    #: Prepended to every event name to form the NATS subject ("" keeps the course's names).
    SUBJECT_PREFIX: str = ""
    #: Prepended to every stream name; lets several environments share one NATS account.
    STREAM_PREFIX: str = ""
    #: Stream replicas (1 on a single server, 3 in a cluster).
    STREAM_REPLICAS: int = 1
    #: "file" or "memory".
    STREAM_STORAGE: str = "file"
    #: How long JetStream remembers a Nats-Msg-Id; must exceed the relay's worst retry gap.
    DUPLICATE_WINDOW: float = 300.0
    #: Retention of every stream (limits): messages older than this are removed (seconds or a
    #: timedelta; 0: no age limit), and the stream keeps at most this many bytes / messages
    #: (-1: no limit), discarding the oldest. Per stream in STREAMS.
    STREAM_MAX_AGE: timedelta = timedelta(days=30)
    STREAM_MAX_BYTES: int = -1
    STREAM_MAX_MSGS: int = -1
    #: Per-stream overrides, by stream name without STREAM_PREFIX:
    #: ``{"TICKETS": {"MAX_AGE": 86400 * 90, "MAX_BYTES": 10 * 2**30, "MAX_MSGS": -1}}``.
    STREAMS: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Rows claimed by one relay batch.
    BATCH_SIZE: int = 500
    #: Batches one relay keeps in flight: while one is on the wire, the next is claimed and the
    #: previous one marked. 1 = claim, publish, mark strictly in turn.
    PIPELINE_DEPTH: int = 4
    #: How relays share the outbox on PostgreSQL (see docs/relay.md):
    #: "partitions" - each relay owns hash partitions of the aggregates through session-level
    #: advisory locks (released when its session ends) and claims with a read-only query;
    #: "leases" - every claimed row is leased (lease_until/lease_owner) in the claim transaction.
    #: Use "leases" behind a transaction-pooling proxy (pgbouncer pool_mode=transaction), where
    #: session locks do not work. SQLite always uses leases. All relays of a database must agree.
    OWNERSHIP: str = "partitions"
    #: Seconds between a relay's checks of how many relays share the partitions (it takes or
    #: gives back partitions to hold about 1/n of them).
    REBALANCE_SECONDS: float = 1.0
    #: Frame JetStream publishes directly into nats-py's outgoing buffer (about a quarter of the
    #: CPU of ``publish_async``; needs nats-py's internal command buffer, checked at start-up).
    #: False uses the public ``Client.publish``.
    WIRE_PUBLISH: bool = True
    #: How long a claimed row belongs to its relay before another may reclaim it ("leases").
    LEASE_SECONDS: float = 30.0
    #: Seconds to wait for one PubAck.
    PUBLISH_TIMEOUT: float = 5.0
    #: Publish attempts before a row becomes dead.
    MAX_ATTEMPTS: int = 12
    #: Exponential backoff between attempts: BASE * 2**(attempt-1), capped, with jitter.
    BACKOFF_BASE: float = 0.5
    BACKOFF_MAX: float = 60.0
    #: Published rows older than this are purged by the beat task; dead rows never are.
    RETENTION: timedelta = timedelta(days=7)
    #: Rows deleted per purge statement.
    PURGE_BATCH: int = 5000
    #: Seconds a relay task keeps draining before it hands over to a fresh task.
    TASK_TIME_BUDGET: float = 20.0
    #: After draining, a relay task stays and follows new commits for this many idle seconds
    #: (within TASK_TIME_BUDGET): every kick also publishes a wake-up on Redis, and a following
    #: relay drains at once instead of waiting for Celery to deliver the next task. 0 turns it
    #: off; it needs a Redis broker.
    FOLLOW_SECONDS: float = 2.0
    #: Celery queue of the relay tasks.
    CELERY_QUEUE: str = "outbox"
    #: Seconds between beat sweeps (the backstop for lost kicks).
    SWEEP_INTERVAL: float = 5.0
    #: Kick the relay on commit (turn off to rely on the sweep alone). Used when WAKE is "kick",
    #: and by "notify" on a database without NOTIFY (SQLite).
    KICK_ON_COMMIT: bool = True
    #: Seconds between periodic ``outbox_reconcile`` runs by beat (0: off, the default), and how far
    #: back each looks (seconds or a timedelta; None: every retained published row).
    RECONCILE_INTERVAL: float = 0.0
    RECONCILE_WINDOW: timedelta | None = None
    #: How a commit wakes the relay. "notify" (PostgreSQL): a trigger on the outbox table sends a
    #: NOTIFY that PostgreSQL delivers at commit, and a relay loop in the Celery worker that LISTENs
    #: drains at once (the write path pays only its INSERT); on a database without NOTIFY it acts
    #: as "kick". "kick": the on-commit kick through Redis and a Celery task. "sweep": neither (the
    #: beat sweep alone).
    WAKE: str = "notify"
    #: Modules imported at start-up that register event contracts. None (the default): the
    #: ``events`` module of every installed app that has one (``myapp/events.py``).
    CONTRACT_MODULES: list[str] | None = None
    #: A Celery worker serves its relay counters to Prometheus on this port (None: no server).
    METRICS_PORT: int | None = None
    #: The address that server listens on (loopback unless opened on purpose).
    METRICS_ADDR: str = "127.0.0.1"
    #: ``/metrics`` answers requests from METRICS_ALLOW's networks without a login.
    METRICS_PUBLIC: bool = False
    #: ``/metrics`` answers a request carrying ``Authorization: Bearer <this>`` ("": no token works).
    METRICS_TOKEN: str = ""
    #: The networks METRICS_PUBLIC opens ``/metrics`` to (loopback, IPv4 and IPv6, by default).
    METRICS_ALLOW: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: OpenTelemetry (the ``[otel]`` extra): ``emit()`` records the current trace context in the row
    #: and the relay makes a publish span per traced row (outbox/tracing.py). False: neither, even
    #: with OpenTelemetry installed. Without the package it is off whatever this says.
    TRACING: bool = True


_KNOWN = {f.name for f in fields(OutboxSettings)}

#: The values of ``OUTBOX['WAKE']``.
WAKE_MODES = ("notify", "kick", "sweep")
#: The channel the outbox table's trigger (migration 0005) notifies and the relay loop LISTENs on.
NOTIFY_CHANNEL = "outbox_pending"


def wake_mode(conf: OutboxSettings, vendor: str) -> str:
    """How a commit wakes the relay on a database of ``vendor``: "notify" needs PostgreSQL and is
    "kick" elsewhere (SQLite has no NOTIFY)."""
    if conf.WAKE == "notify" and vendor != "postgresql":
        return "kick"
    return conf.WAKE


def unknown_keys() -> list[str]:
    raw: dict[str, Any] = getattr(settings, "OUTBOX", {}) or {}
    return sorted(set(raw) - _KNOWN)


def outbox_settings() -> OutboxSettings:
    raw: dict[str, Any] = dict(getattr(settings, "OUTBOX", {}) or {})
    bad = sorted(set(raw) - _KNOWN)
    if bad:
        raise ConfigurationError(f"Unknown OUTBOX setting(s): {', '.join(bad)}. Known: {', '.join(sorted(_KNOWN))}.")
    for key in ("RETENTION", "STREAM_MAX_AGE", "RECONCILE_WINDOW"):
        if isinstance(raw.get(key), int | float):
            raw[key] = timedelta(seconds=raw[key])
    return OutboxSettings(**raw)


#: Keys of one entry of ``OUTBOX['STREAMS']``.
STREAM_LIMIT_KEYS = ("MAX_AGE", "MAX_BYTES", "MAX_MSGS")


@dataclass(frozen=True)
class StreamLimits:
    """The retention limits of one stream: the defaults with that stream's overrides."""

    max_age: timedelta
    max_bytes: int
    max_msgs: int


def stream_limits(stream: str, conf: OutboxSettings | None = None) -> StreamLimits:
    """Limits of ``stream`` (its name without STREAM_PREFIX)."""
    conf = conf or outbox_settings()
    own = conf.STREAMS.get(stream, {})
    age = own.get("MAX_AGE", conf.STREAM_MAX_AGE)
    if isinstance(age, int | float):
        age = timedelta(seconds=age)
    return StreamLimits(
        max_age=age,
        max_bytes=int(own.get("MAX_BYTES", conf.STREAM_MAX_BYTES)),
        max_msgs=int(own.get("MAX_MSGS", conf.STREAM_MAX_MSGS)),
    )


@dataclass(frozen=True)
class NatsSettings:
    SERVERS: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    NAME: str = ""
    USER: str = ""
    PASSWORD: str = ""
    TOKEN: str = ""
    CREDENTIALS_FILE: str = ""
    TLS_CA_FILE: str = ""
    TLS_CERT_FILE: str = ""
    TLS_KEY_FILE: str = ""
    CONNECT_TIMEOUT: float = 2.0
    #: The server's HTTP monitoring address (``http://nats:8222``), read by ``outbox_streams`` to
    #: report how the server syncs its file store to disk; "" leaves that unreported.
    MONITOR_URL: str = ""


_NATS_KNOWN = {f.name for f in fields(NatsSettings)}


def nats_unknown_keys() -> list[str]:
    raw: dict[str, Any] = getattr(settings, "NATS", {}) or {}
    return sorted(set(raw) - _NATS_KNOWN)


def nats_settings() -> NatsSettings:
    raw: dict[str, Any] = dict(getattr(settings, "NATS", {}) or {})
    bad = sorted(set(raw) - _NATS_KNOWN)
    if bad:
        raise ConfigurationError(f"Unknown NATS setting(s): {', '.join(bad)}. Known: {', '.join(sorted(_NATS_KNOWN))}.")
    servers = raw.get("SERVERS")
    if isinstance(servers, str):
        raw["SERVERS"] = [s.strip() for s in servers.split(",") if s.strip()]
    return NatsSettings(**raw)
