"""The ``LISTENERS`` settings dict, read through one frozen object with documented defaults.

Read a value with ``listeners_settings().OPEN_PULL``. Unknown keys and values of the
wrong type are an error (system checks ``listeners.E001``/``E003``), so that a typo never
silently keeps a default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from django.conf import settings

from listeners.errors import ListenerConfigurationError


@dataclass(frozen=True)
class ListenersSettings:
    #: Modules imported at start-up that register listeners (``@listener``). None (the default):
    #: the ``handlers`` module of every installed app that has one (``myapp/handlers.py``).
    HANDLER_MODULES: tuple[str, ...] | None = None
    #: Keep pull requests open on each durable so messages arrive while a batch is applied
    #: (needs nats-py internals, checked when a consumer is bound). False pulls with the
    #: public ``PullSubscription.fetch()``: one round trip per batch, nothing prefetched.
    OPEN_PULL: bool = True
    #: Inbox rows older than this are deleted by ``listeners_purge_inbox`` and the beat task
    #: (seconds or a ``timedelta``; ``0``/None: kept forever). An event redelivered after its
    #: row was purged is applied again, so keep it longer than any redelivery can come late.
    INBOX_RETENTION: timedelta | None = timedelta(days=30)
    #: Inbox rows deleted per purge statement.
    INBOX_PURGE_BATCH: int = 5000
    #: A file the ``listen`` process rewrites with its status on every loop turn, for liveness
    #: and readiness probes (``listeners_health PATH``); None: none. ``listen --health-file`` wins.
    HEALTH_FILE: str | None = None
    #: Port of the ``listen`` process's Prometheus endpoint; 0: no endpoint.
    METRICS_PORT: int = 0
    #: Address that endpoint binds to: loopback unless you mean to expose it.
    METRICS_ADDR: str = "127.0.0.1"
    #: OpenTelemetry (the ``[otel]`` extra): a CONSUMER span per message, the child of the trace
    #: context the message carries (listeners/tracing.py). False: no spans even with OpenTelemetry
    #: installed. Without the package it is off whatever this says.
    TRACING: bool = True


KNOWN_KEYS = frozenset(f.name for f in fields(ListenersSettings))


def _raw() -> dict[str, Any]:
    return dict(getattr(settings, "LISTENERS", {}) or {})


def unknown_keys() -> list[str]:
    return sorted(set(_raw()) - KNOWN_KEYS)


def settings_problems() -> list[str]:
    """One sentence per malformed value (unknown keys apart)."""
    raw = _raw()
    problems = []
    modules = raw.get("HANDLER_MODULES")
    if modules is not None and (not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules)):
        problems.append("LISTENERS['HANDLER_MODULES'] must be a list of module names (or None: autodiscover).")
    if not isinstance(raw.get("OPEN_PULL", True), bool):
        problems.append("LISTENERS['OPEN_PULL'] must be True or False.")
    retention = raw.get("INBOX_RETENTION", 0)
    if retention is not None and (
        isinstance(retention, bool) or not isinstance(retention, int | float | timedelta) or _seconds(retention) < 0
    ):
        problems.append("LISTENERS['INBOX_RETENTION'] must be seconds or a timedelta, 0 or None to keep rows forever.")
    batch = raw.get("INBOX_PURGE_BATCH", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        problems.append("LISTENERS['INBOX_PURGE_BATCH'] must be a positive whole number of rows.")
    health = raw.get("HEALTH_FILE")
    if health is not None and (not isinstance(health, str) or not health):
        problems.append("LISTENERS['HEALTH_FILE'] must be a file path, or None.")
    port = raw.get("METRICS_PORT", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        problems.append("LISTENERS['METRICS_PORT'] must be a port number (0: no metrics endpoint).")
    if not isinstance(raw.get("TRACING", True), bool):
        problems.append("LISTENERS['TRACING'] must be True or False.")
    if not isinstance(raw.get("METRICS_ADDR", ""), str):
        problems.append("LISTENERS['METRICS_ADDR'] must be an address to bind, e.g. '127.0.0.1'.")
    return problems


def _seconds(value: int | float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def retention_of(value: Any) -> timedelta | None:
    """``INBOX_RETENTION`` as a timedelta, or None when rows are kept forever (``0`` or None)."""
    if value is None or _seconds(value) == 0:
        return None
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


def listeners_settings() -> ListenersSettings:
    """The ``LISTENERS`` setting, checked; raises :class:`ListenerConfigurationError` with one sentence."""
    bad = unknown_keys()
    if bad:
        raise ListenerConfigurationError(
            f"Unknown LISTENERS setting(s): {', '.join(bad)}. Known: {', '.join(sorted(KNOWN_KEYS))}."
        )
    problems = settings_problems()
    if problems:
        raise ListenerConfigurationError(" ".join(problems))
    raw = _raw()
    if raw.get("HANDLER_MODULES") is not None:
        raw["HANDLER_MODULES"] = tuple(raw["HANDLER_MODULES"])
    if "INBOX_RETENTION" in raw:
        raw["INBOX_RETENTION"] = retention_of(raw["INBOX_RETENTION"])
    return ListenersSettings(**raw)
