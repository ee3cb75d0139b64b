"""Streams derived from the contract registry, created and updated idempotently.

Streams belong to the producing side: the relay (at worker start) and ``manage.py
outbox_streams`` create and update them; a listener only checks that its streams exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from outbox.conf import OutboxSettings, outbox_settings, stream_limits
from outbox.contracts import registry
from outbox.errors import PublishError


def nats_subject(event_name: str, conf: OutboxSettings | None = None) -> str:
    return f"{(conf or outbox_settings()).SUBJECT_PREFIX}{event_name}"


def event_name_from_subject(subject: str, conf: OutboxSettings | None = None) -> str:
    prefix = (conf or outbox_settings()).SUBJECT_PREFIX
    return subject[len(prefix) :] if prefix and subject.startswith(prefix) else subject


def stream_name(stream: str, conf: OutboxSettings | None = None) -> str:
    return f"{(conf or outbox_settings()).STREAM_PREFIX}{stream}"


def stream_for_event(event_name: str) -> str:
    return stream_name(registry.get(event_name).stream)


def desired_configs(conf: OutboxSettings | None = None) -> list[StreamConfig]:
    conf = conf or outbox_settings()
    configs = []
    for stream, names in sorted(registry.streams().items()):
        limits = stream_limits(stream, conf)
        configs.append(
            StreamConfig(
                name=stream_name(stream, conf),
                description=f"Outbox events: {', '.join(names)}",
                subjects=[nats_subject(n, conf) for n in names],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE if conf.STREAM_STORAGE == "file" else StorageType.MEMORY,
                discard=DiscardPolicy.OLD,
                duplicate_window=conf.DUPLICATE_WINDOW,
                num_replicas=conf.STREAM_REPLICAS,
                max_age=limits.max_age.total_seconds(),
                max_bytes=limits.max_bytes,
                max_msgs=limits.max_msgs,
            )
        )
    return configs


@dataclass
class StreamReport:
    name: str
    action: str  # created | updated | unchanged
    drift: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _drift(current: StreamConfig, desired: StreamConfig) -> dict[str, tuple[Any, Any]]:
    diffs: dict[str, tuple[Any, Any]] = {}
    if sorted(current.subjects or []) != sorted(desired.subjects or []):
        diffs["subjects"] = (current.subjects, desired.subjects)
    for attr in ("retention", "storage", "num_replicas", "discard"):
        if getattr(current, attr) != getattr(desired, attr):
            diffs[attr] = (getattr(current, attr), getattr(desired, attr))
    for attr in ("duplicate_window", "max_age"):
        if abs((getattr(current, attr) or 0) - (getattr(desired, attr) or 0)) > 0.001:
            diffs[attr] = (getattr(current, attr), getattr(desired, attr))
    for attr in ("max_bytes", "max_msgs"):
        # The server reports "no limit" as -1; nats-py leaves an unset limit as None.
        if _limit(getattr(current, attr)) != _limit(getattr(desired, attr)):
            diffs[attr] = (getattr(current, attr), getattr(desired, attr))
    return diffs


def _limit(value: int | None) -> int:
    return -1 if value is None or value < 0 else value


async def ensure_streams(js: JetStreamContext, *, apply: bool = True) -> list[StreamReport]:
    """Create missing streams and bring drifted ones back to the desired config.

    Storage and retention cannot be changed on an existing stream; such drift is
    reported and left for an operator (the stream would have to be recreated).

    JetStream failures are raised as :class:`PublishError` naming the stream: in a
    cluster without a meta leader (no quorum, an election under way) the API answers
    503 "temporarily unavailable" or not at all, and callers — the relay records it on
    the rows it could not publish — must see an outbox error, not a raw nats-py one.
    """
    reports = []
    for desired in desired_configs():
        try:
            reports.append(await _ensure_stream(js, desired, apply=apply))
        except (APIError, nats.errors.Error, TimeoutError) as exc:
            raise PublishError(f"cannot set up stream {desired.name}: {_jetstream_failure(exc)}") from exc
    return reports


async def _ensure_stream(js: JetStreamContext, desired: StreamConfig, *, apply: bool) -> StreamReport:
    name = desired.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        if apply:
            await js.add_stream(desired)
        return StreamReport(name, "created" if apply else "missing")
    current = info.config
    drift = _drift(current, desired)
    if not drift:
        return StreamReport(name, "unchanged")
    fixable = {k: v for k, v in drift.items() if k not in {"storage", "retention"}}
    if apply and fixable:
        merged = current.evolve(
            subjects=desired.subjects,
            duplicate_window=desired.duplicate_window,
            num_replicas=desired.num_replicas,
            discard=desired.discard,
            description=desired.description,
            max_age=desired.max_age,
            max_bytes=desired.max_bytes,
            max_msgs=desired.max_msgs,
        )
        await js.update_stream(merged)
    action = "updated" if apply and fixable else "drift"
    return StreamReport(name, action, drift)


def _jetstream_failure(exc: BaseException) -> str:
    if isinstance(exc, APIError) and exc.description:
        hint = " (no JetStream meta leader: is a majority of the cluster up?)" if exc.err_code == 10008 else ""
        return f"{exc.description} (code {exc.code}, err_code {exc.err_code}){hint}"
    if isinstance(exc, TimeoutError):
        return "JetStream did not answer in time (is it enabled, and is a majority of the cluster up?)"
    return str(exc) or type(exc).__name__


def server_durability(monitor_url: str, *, timeout: float = 2.0) -> str:
    """One line on how the server syncs its file store, read from its monitoring ``/varz``."""
    import json
    import urllib.request
    from urllib.parse import urlparse

    if urlparse(monitor_url).scheme not in {"http", "https"}:
        return f"durability: unknown (NATS MONITOR_URL {monitor_url!r} is not an http(s) address)"
    try:
        with urllib.request.urlopen(f"{monitor_url.rstrip('/')}/varz", timeout=timeout) as response:  # noqa: S310
            config = (json.load(response).get("jetstream") or {}).get("config") or {}
    except (OSError, ValueError) as exc:
        return f"durability: unknown (cannot read {monitor_url}/varz: {exc})"
    if config.get("sync_always"):
        return "durability: sync_interval always (every acknowledged message is on disk)"
    interval = config.get("sync_interval")
    if interval is None:
        return "durability: unknown (this server does not report sync_interval; nats-server 2.10+ does)"
    return (
        f"durability: the server syncs to disk every {interval / 1e9:g}s: a power loss or OS crash can lose "
        "messages acknowledged since (set jetstream { sync_interval: always }, or run outbox_reconcile)"
    )
