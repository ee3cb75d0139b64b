"""System checks of the outbox configuration (ids outbox.E001...)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

from django.core.checks import CheckMessage, Error, Warning, register

from outbox.conf import (
    STREAM_LIMIT_KEYS,
    WAKE_MODES,
    nats_settings,
    nats_unknown_keys,
    outbox_settings,
    stream_limits,
    unknown_keys,
)
from outbox.contracts import registry


@register()
def check_outbox_settings(app_configs=None, **kwargs) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    bad = unknown_keys()
    if bad:
        errors.append(
            Error(f"Unknown OUTBOX setting(s): {', '.join(bad)}.", hint="See outbox/conf.py.", id="outbox.E001")
        )
        return errors
    bad = nats_unknown_keys()
    if bad:
        errors.append(Error(f"Unknown NATS setting(s): {', '.join(bad)}.", id="outbox.E002"))
        return errors
    conf = outbox_settings()
    if conf.BATCH_SIZE < 1 or conf.BATCH_SIZE > 10_000:
        errors.append(Error("OUTBOX['BATCH_SIZE'] must be between 1 and 10000.", id="outbox.E003"))
    if conf.MAX_ATTEMPTS < 1:
        errors.append(Error("OUTBOX['MAX_ATTEMPTS'] must be at least 1.", id="outbox.E004"))
    if conf.DUPLICATE_WINDOW <= conf.LEASE_SECONDS + conf.BACKOFF_MAX:
        errors.append(
            Warning(
                "OUTBOX['DUPLICATE_WINDOW'] is not longer than LEASE_SECONDS + BACKOFF_MAX: a re-publish after a "
                "crash or retry may be stored twice (listeners absorb it, but the stream grows).",
                id="outbox.W001",
            )
        )
    if conf.OWNERSHIP not in {"partitions", "leases"}:
        errors.append(
            Error(
                f"OUTBOX['OWNERSHIP'] is {conf.OWNERSHIP!r}.",
                hint="Use 'partitions' (default) or 'leases' (behind a transaction-pooling proxy).",
                id="outbox.E008",
            )
        )
    if conf.WAKE not in WAKE_MODES:
        errors.append(
            Error(
                f"OUTBOX['WAKE'] is {conf.WAKE!r}.",
                hint="Use 'notify' (default: PostgreSQL wakes the relay loop), 'kick' (Redis) or 'sweep'.",
                id="outbox.E014",
            )
        )
    if conf.PIPELINE_DEPTH < 1:
        errors.append(Error("OUTBOX['PIPELINE_DEPTH'] must be at least 1.", id="outbox.E009"))
    if conf.FOLLOW_SECONDS < 0 or conf.FOLLOW_SECONDS >= conf.TASK_TIME_BUDGET:
        errors.append(
            Error(
                f"OUTBOX['FOLLOW_SECONDS'] is {conf.FOLLOW_SECONDS}; it must be at least 0 (0: off) and "
                f"shorter than TASK_TIME_BUDGET ({conf.TASK_TIME_BUDGET}).",
                id="outbox.E010",
            )
        )
    if conf.STREAM_STORAGE not in {"file", "memory"}:
        errors.append(Error("OUTBOX['STREAM_STORAGE'] must be 'file' or 'memory'.", id="outbox.E005"))
    if conf.STREAM_REPLICAS not in {1, 2, 3, 4, 5}:
        errors.append(Error("OUTBOX['STREAM_REPLICAS'] must be between 1 and 5.", id="outbox.E006"))
    for server in nats_settings().SERVERS:
        parsed = urlparse(server if "://" in server else f"nats://{server}")
        if parsed.scheme not in {"nats", "tls", "ws", "wss"} or not parsed.hostname:
            errors.append(
                Error(
                    f"NATS_URL entry {server!r} is not a NATS URL.",
                    hint="Use nats://host:4222 (several servers separated by commas).",
                    id="outbox.E007",
                )
            )
        else:
            try:
                parsed.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                errors.append(Error(f"NATS_URL entry {server!r} has an invalid port.", id="outbox.E007"))
    for network in conf.METRICS_ALLOW:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            errors.append(Error(f"OUTBOX['METRICS_ALLOW'] entry {network!r} is not a network.", id="outbox.E015"))
    errors.extend(_stream_limit_errors(conf))
    errors.extend(_database_errors())
    if not registry.names():
        errors.append(
            Warning(
                "No event contracts are registered.",
                hint="Define them in an installed app's events.py, or list modules in OUTBOX['CONTRACT_MODULES'].",
                id="outbox.W002",
            )
        )
    return errors


def _stream_limit_errors(conf) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    if not isinstance(conf.STREAMS, dict):
        return [Error("OUTBOX['STREAMS'] must be a dict of stream name -> limits.", id="outbox.E011")]
    known = registry.streams()
    for stream, limits in conf.STREAMS.items():
        if not isinstance(limits, dict) or set(limits) - set(STREAM_LIMIT_KEYS):
            errors.append(
                Error(
                    f"OUTBOX['STREAMS'][{stream!r}] must be a dict with keys among {', '.join(STREAM_LIMIT_KEYS)}.",
                    id="outbox.E011",
                )
            )
            return errors
        if known and stream not in known:
            errors.append(
                Warning(
                    f"OUTBOX['STREAMS'] names stream {stream!r}, which no registered contract uses.",
                    hint=f"Streams of the registered contracts: {', '.join(sorted(known))}.",
                    id="outbox.W003",
                )
            )
    for stream in sorted(set(known) | set(conf.STREAMS)):
        try:
            limits = stream_limits(stream, conf)
        except (TypeError, ValueError):
            errors.append(Error(f"The limits of stream {stream!r} are not numbers.", id="outbox.E012"))
            continue
        age = limits.max_age.total_seconds()
        where = f"stream {stream!r}" if stream in conf.STREAMS else "OUTBOX['STREAM_MAX_AGE']"
        if age < 0 or (0 < age < conf.DUPLICATE_WINDOW):
            errors.append(
                Error(
                    f"The max age of {where} is {age:g} s; it must be 0 (no limit) or at least "
                    f"DUPLICATE_WINDOW ({conf.DUPLICATE_WINDOW:g} s), or JetStream refuses the stream.",
                    id="outbox.E012",
                )
            )
        for name, value in (("max bytes", limits.max_bytes), ("max messages", limits.max_msgs)):
            if value == 0 or value < -1:
                errors.append(
                    Error(
                        f"The {name} of stream {stream!r} is {value}; use -1 (no limit) or a positive number.",
                        id="outbox.E012",
                    )
                )
    return errors


def _database_errors() -> list[CheckMessage]:
    """On PostgreSQL the relay claims and marks through psycopg 3 cursors."""
    from django.db import connections

    if connections["default"].vendor != "postgresql":
        return []
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if not is_psycopg3:
        return [
            Error(
                "The outbox needs psycopg 3 on PostgreSQL; this project's database driver is psycopg2.",
                hint="pip install 'psycopg[binary]' (Django uses psycopg 3 when both are installed).",
                id="outbox.E013",
            )
        ]
    return []
