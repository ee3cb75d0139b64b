"""System checks of the outbox configuration (ids outbox.E001...)."""

from __future__ import annotations

from urllib.parse import urlparse

from django.core.checks import Error, Warning, register

from outbox.conf import nats_settings, nats_unknown_keys, outbox_settings, unknown_keys
from outbox.contracts import registry


@register()
def check_outbox_settings(app_configs=None, **kwargs):  # noqa: ARG001
    errors = []
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
    if not registry.names():
        errors.append(
            Warning(
                "No event contracts are registered.",
                hint="List modules in OUTBOX['CONTRACT_MODULES'].",
                id="outbox.W002",
            )
        )
    return errors
