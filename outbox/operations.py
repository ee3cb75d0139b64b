"""Selectors of the operations view: channels, clients and the flow of events.

One module feeds both the admin page (``/admin/operations/``) and ``manage.py
nats_status``, so they never disagree:

* :func:`nats_overview` -- every JetStream stream the contract registry declares
  (the *channels*) and every durable consumer on them (the *clients*), with a
  ``state`` per consumer: ``ok``, ``idle`` (caught up, no recent delivery) or
  ``behind`` (more than ``BEHIND_PENDING`` messages waiting, or messages waiting
  and no delivery for ``STALL_AFTER`` seconds).
* :func:`nats_snapshot` -- the same from synchronous code: one short connection,
  every NATS call bounded by ``timeout`` in total; an unreachable server gives an
  ``error`` string instead of an exception.
* :func:`operations_snapshot` -- the database side (backlog, the relays draining and
  what they hold, throughput per minute, dead rows on both sides) plus :func:`nats_snapshot`.
* :func:`sample_metrics` -- the database-derived gauges of ``outbox.metrics``, refreshed.

Dead letters of the listeners are read through the app registry, not imported:
``outbox`` must not depend on ``listeners`` (it works without that app installed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.db.models import Count
from django.db.models.functions import TruncMinute
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from outbox import metrics
from outbox.broker import connect
from outbox.conf import nats_settings
from outbox.errors import PublishError
from outbox.models import OutboxEvent, OutboxStatus
from outbox.selectors import outbox_backlog, outbox_relays, outbox_relays_draining, stream_summaries

#: Seconds allowed for the whole NATS part (connect + every info request).
NATS_TIMEOUT = 2.0
#: A consumer with more undelivered messages than this is behind.
BEHIND_PENDING = 100
#: A consumer with work waiting and no delivery for this many seconds is behind (stalled).
STALL_AFTER = 120.0
#: Rows listed per dead-letter table.
DEAD_LIMIT = 20


async def nats_overview(
    js: Any,
    *,
    now: datetime | None = None,
    behind_pending: int = BEHIND_PENDING,
    stall_after: float = STALL_AFTER,
) -> dict[str, Any]:
    """Streams of the registry and the durable consumers on each (JSON-serialisable)."""
    now = now or timezone.now()
    streams = await stream_summaries(js)
    consumers: list[dict[str, Any]] = []
    for stream in streams:
        if not stream["exists"]:
            continue
        infos = await js.consumers_info(stream["stream"])
        for info in sorted(infos, key=lambda i: i.name):
            row = _consumer_row(info, now=now, behind_pending=behind_pending, stall_after=stall_after)
            row["lag_seconds"] = await consumer_lag_seconds(js, info, now=now)
            consumers.append(row)
    return {"streams": streams, "consumers": consumers}


async def consumer_lag_seconds(js: Any, info: Any, *, now: datetime) -> float | None:
    """How far behind a consumer is in time: the age of the oldest message it has not acked yet
    (the first one after its ack floor that its filter takes); 0 when it has nothing to do, None
    when the stream cannot tell (the message is gone, a server error).

    With several filter subjects it is the first message of the stream after the floor, whatever
    its subject: an upper bound of the lag, close to it whenever the listener keeps up."""
    if not (info.num_pending or 0) + (info.num_ack_pending or 0):
        return 0.0
    config = info.config
    filters = list(config.filter_subjects or []) or ([config.filter_subject] if config.filter_subject else [])
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    try:
        msg = await js.get_msg(
            info.stream_name, seq=floor + 1, subject=filters[0] if len(filters) == 1 else ">", next=True
        )
    except Exception:  # noqa: BLE001 - the lag is a hint; the rest of the row stands without it
        return None
    if msg.time is None:
        return None
    return max(0.0, round((now - msg.time).total_seconds(), 3))


def _consumer_row(info: Any, *, now: datetime, behind_pending: int, stall_after: float) -> dict[str, Any]:
    config = info.config
    filters = list(config.filter_subjects or []) or ([config.filter_subject] if config.filter_subject else [])
    delivered = info.delivered
    last_active = delivered.last_active if delivered is not None else None
    idle_for = (now - last_active).total_seconds() if last_active else None
    pending = info.num_pending or 0
    ack_pending = info.num_ack_pending or 0
    reasons = []
    if pending > behind_pending:
        reasons.append(f"{pending} pending > {behind_pending}")
    waiting_work = pending + ack_pending > 0
    if waiting_work:
        reference = last_active or info.created
        quiet = (now - reference).total_seconds() if reference else None
        if quiet is not None and quiet > stall_after:
            reasons.append(
                f"no delivery for {format_duration(quiet)} with work waiting"
                if last_active
                else f"nothing delivered in {format_duration(quiet)} with work waiting"
            )
    if reasons:
        state = "behind"
    elif idle_for is not None and idle_for > stall_after:
        state = "idle"
    else:
        state = "ok"
    return {
        "stream": info.stream_name,
        "name": info.name,
        "durable": bool(config.durable_name),
        "filter_subjects": filters,
        "num_pending": pending,
        "num_ack_pending": ack_pending,
        "num_redelivered": info.num_redelivered or 0,
        "num_waiting": info.num_waiting or 0,
        "delivered_stream_seq": delivered.stream_seq if delivered else 0,
        "ack_floor_stream_seq": info.ack_floor.stream_seq if info.ack_floor else 0,
        "last_active": last_active.isoformat() if last_active else None,
        "idle_seconds": round(idle_for, 1) if idle_for is not None else None,
        "max_deliver": config.max_deliver,
        "ack_wait": config.ack_wait,
        "state": state,
        "reasons": reasons,
    }


async def _nats_part(timeout: float) -> dict[str, Any]:
    conf = nats_settings()
    failures: list[str] = []

    async def collect(exc: Exception) -> None:
        # Not logged: the caller reports the failure, and `nats_status --json` keeps stdout clean.
        failures.append(str(exc) or type(exc).__name__)

    try:
        nc = await connect(
            name="operations-view",
            connect_timeout=min(conf.CONNECT_TIMEOUT, timeout),
            # One short look: try each server twice, never loop waiting for it.
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=collect,
        )
    except PublishError as exc:
        raise PublishError(f"{exc} ({failures[-1]})" if failures else str(exc)) from exc
    try:
        js = nc.jetstream(timeout=timeout)
        overview = await nats_overview(js)
        version, url = nc.connected_server_version, nc.connected_url
        overview["server"] = {
            "version": f"{version.major}.{version.minor}.{version.patch}",
            # host:port only: a URL may carry credentials.
            "address": f"{url.hostname}:{url.port}" if url else None,
        }
        return overview
    finally:
        await nc.close()


def nats_snapshot(*, timeout: float = NATS_TIMEOUT) -> dict[str, Any]:
    """:func:`nats_overview` from synchronous code; never raises for an unreachable server.

    Returns ``{"streams", "consumers", "server", "error"}``; ``error`` is None on success
    and a sentence naming the servers otherwise (the lists are then empty).
    """

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(_nats_part(timeout), timeout)

    try:
        result = _run(bounded)
    except TimeoutError:
        servers = ", ".join(nats_settings().SERVERS)
        return _nats_error(f"NATS at {servers} did not answer within {timeout:g}s")
    except Exception as exc:  # noqa: BLE001 - any failure here means "NATS part unavailable"
        return _nats_error(str(exc) or type(exc).__name__)
    result["error"] = None
    return result


def _nats_error(message: str) -> dict[str, Any]:
    return {"streams": [], "consumers": [], "server": None, "error": message}


def _run(factory: Any) -> Any:
    """``asyncio.run`` here, or in a helper thread when this thread already runs a loop (ASGI)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m 05s``, ``2h 07m``, ``3d 4h``; ``-`` for None."""
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


# --- the database side ----------------------------------------------------------------


def published_per_minute(*, minutes: int = 60, now: datetime | None = None) -> list[dict[str, Any]]:
    """Events published in each of the last ``minutes`` minutes, oldest first, zeros included."""
    now = now or timezone.now()
    end = now.replace(second=0, microsecond=0)
    start = end - timedelta(minutes=minutes - 1)
    rows = (
        OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHED, published_at__gte=start)
        .annotate(minute=TruncMinute("published_at"))
        .values("minute")
        .annotate(n=Count("id"))
    )
    counts = {row["minute"]: row["n"] for row in rows}
    minutes_ = [start + timedelta(minutes=i) for i in range(minutes)]
    return [{"minute": minute, "count": counts.get(minute, 0)} for minute in minutes_]


def _admin_url(name: str, *args: Any, query: str = "") -> str | None:
    try:
        url = reverse(name, args=args)
    except NoReverseMatch:  # the model is not registered with the admin (yet)
        return None
    return f"{url}?{query}" if query else url


def dead_outbox_events(*, limit: int = DEAD_LIMIT) -> list[dict[str, Any]]:
    rows = OutboxEvent.objects.filter(status=OutboxStatus.DEAD).order_by("-created_at", "-seq")[:limit]
    return [
        {
            "id": str(row.id),
            "subject": row.subject,
            "aggregate": f"{row.aggregate_type}:{row.aggregate_id}",
            "version": row.aggregate_version,
            "attempts": row.attempts,
            "error": row.last_error,
            "created_at": row.created_at,
            "url": _admin_url("admin:outbox_outboxevent_change", row.pk),
        }
        for row in rows
    ]


def dead_listener_letters(*, limit: int = DEAD_LIMIT) -> list[dict[str, Any]] | None:
    """Dead letters of the listeners, newest first; None when the listeners app is not installed."""
    if not apps.is_installed("listeners"):
        return None
    model = apps.get_model("listeners", "DeadLetter")
    rows = model.objects.filter(status="dead").order_by("-created_at", "-pk")[:limit]
    return [
        {
            "id": row.pk,
            "consumer": row.consumer,
            "subject": row.subject,
            "event_id": row.event_id,
            "stream_sequence": row.stream_sequence,
            "deliveries": row.deliveries,
            "error": row.error,
            "created_at": row.created_at,
            "url": _admin_url("admin:listeners_deadletter_change", row.pk),
        }
        for row in rows
    ]


def operations_snapshot(*, timeout: float = NATS_TIMEOUT, dead_limit: int = DEAD_LIMIT) -> dict[str, Any]:
    """Everything the operations page shows. The database part never depends on NATS answering."""
    now = timezone.now()
    letters = dead_listener_letters(limit=dead_limit)
    listeners_installed = letters is not None
    dead_letter_total = (
        apps.get_model("listeners", "DeadLetter").objects.filter(status="dead").count() if listeners_installed else 0
    )
    return {
        "generated_at": now,
        "outbox": outbox_backlog().as_dict(),
        "relays": outbox_relays(now=now).as_dict(),
        "throughput": published_per_minute(now=now),
        "dead_outbox": dead_outbox_events(limit=dead_limit),
        "dead_outbox_changelist": _admin_url("admin:outbox_outboxevent_changelist", query="status__exact=dead"),
        "dead_letters": letters or [],
        "dead_letters_total": dead_letter_total,
        "dead_letters_changelist": _admin_url("admin:listeners_deadletter_changelist", query="status__exact=dead"),
        "listeners_installed": listeners_installed,
        "nats": nats_snapshot(timeout=timeout),
    }


def sample_metrics() -> None:
    """Refresh the database-derived gauges (the web endpoint and the beat sweep call this)."""
    backlog = outbox_backlog()
    metrics.BACKLOG.set(backlog.pending)
    metrics.OLDEST_PENDING_AGE.set(backlog.oldest_pending_age or 0)
    metrics.DEAD_ROWS.set(backlog.dead)
    metrics.PUBLISHED_LAST_MINUTE.set(backlog.published_last_minute)
    draining = outbox_relays_draining()
    # Leases name batches, not relays: no number rather than a wrong one.
    metrics.RELAYS_DRAINING.set(float("nan") if draining is None else draining)
