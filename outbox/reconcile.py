"""Compare the retained published rows with what the streams hold, and republish what is missing.

The outbox keeps every published row (with its stream and stream sequence) for
``OUTBOX['RETENTION']``. A broker can lose acknowledged messages — a power loss before the
file store synced, a truncated block file, a stream deleted or purged by mistake — and
this is the one place that can tell. A row is *present* when the message at its stream
sequence carries its event id; *expired* when the stream's own limits may have removed it
(its age passed ``max_age``, or the stream has size or count limits and the row's sequence is
below the stream's first); *missing* otherwise. Missing rows go back to ``pending`` through
:func:`outbox.services.outbox_republish`, so the relay publishes them again in per-aggregate
order; listeners absorb copies through the inbox and the version rule.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from outbox.models import OutboxEvent, OutboxStatus

#: Messages fetched at once while checking a stream.
WINDOW = 256
#: The header that names the event when ``Nats-Msg-Id`` is a republish's own id.
EVENT_ID_HEADER = "event-id"


@dataclass
class StreamFindings:
    stream: str
    exists: bool = True
    first_seq: int = 0
    last_seq: int = 0
    present: int = 0
    expired: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass
class Findings:
    since: datetime | None
    checked: int = 0
    present: int = 0
    missing: int = 0
    expired: int = 0
    #: Published rows without a stream sequence: nothing to compare with.
    unknowable: int = 0
    streams: list[StreamFindings] = field(default_factory=list)
    republished: int = 0

    def missing_ids(self) -> list[str]:
        return [event_id for s in self.streams for event_id in s.missing]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat() if self.since else None
        for stream in data["streams"]:
            stream["missing"] = len(stream["missing"])
        data["missing_ids"] = self.missing_ids()
        return data


def published_rows(since: datetime | None) -> dict[str, list[tuple[str, int | None, datetime]]]:
    """Stream name -> (event id, stream sequence, published_at) of the published rows, by sequence."""
    rows = OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHED)
    if since is not None:
        rows = rows.filter(published_at__gte=since)
    by_stream: dict[str, list[tuple[str, int | None, datetime]]] = defaultdict(list)  # published_at is set
    for event_id, stream, seq, published_at in rows.order_by("stream", "stream_sequence").values_list(
        "id", "stream", "stream_sequence", "published_at"
    ):
        by_stream[stream].append((str(event_id), seq, published_at or timezone.now()))
    return by_stream


async def find_missing(js: JetStreamContext, *, since: datetime | None) -> Findings:
    """Check every published row (since ``since``) against its stream."""
    from asgiref.sync import sync_to_async

    findings = Findings(since=since)
    by_stream = await sync_to_async(published_rows, thread_sensitive=False)(since)
    now = timezone.now()
    for stream, rows in sorted(by_stream.items()):
        known = [(event_id, seq, at) for event_id, seq, at in rows if seq is not None and stream]
        findings.unknowable += len(rows) - len(known)
        findings.checked += len(known)
        if known:
            findings.streams.append(await _check_stream(js, stream, known, now))
    for item in findings.streams:
        findings.present += item.present
        findings.expired += item.expired
        findings.missing += len(item.missing)
    return findings


async def _check_stream(
    js: JetStreamContext, stream: str, rows: list[tuple[str, int, datetime]], now: datetime
) -> StreamFindings:
    result = StreamFindings(stream=stream)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        result.exists = False
        result.missing = [event_id for event_id, _, _ in rows]
        return result
    result.first_seq, result.last_seq = info.state.first_seq, info.state.last_seq
    config: StreamConfig = info.config
    to_fetch = []
    for event_id, seq, published_at in rows:
        if seq < info.state.first_seq and _limits_explain(config, published_at, now):
            result.expired += 1
        elif seq < info.state.first_seq or seq > info.state.last_seq:
            result.missing.append(event_id)
        else:
            to_fetch.append((event_id, seq, published_at))
    for start in range(0, len(to_fetch), WINDOW):
        window = to_fetch[start : start + WINDOW]
        held = await asyncio.gather(*(_event_id_at(js, stream, seq) for _, seq, _ in window))
        for (event_id, _seq, published_at), found in zip(window, held, strict=True):
            if found == event_id:
                result.present += 1
            elif found is None and _age_explains(config, published_at, now):
                result.expired += 1
            else:
                result.missing.append(event_id)
    return result


def _limits_explain(config: StreamConfig, published_at: datetime, now: datetime) -> bool:
    """The stream's own limits may have removed a message published then."""
    if _age_explains(config, published_at, now):
        return True
    return (config.max_msgs or -1) > 0 or (config.max_bytes or -1) > 0 or (config.max_msgs_per_subject or -1) > 0


def _age_explains(config: StreamConfig, published_at: datetime, now: datetime) -> bool:
    return bool(config.max_age) and published_at < now - timedelta(seconds=config.max_age or 0)


async def _event_id_at(js: JetStreamContext, stream: str, seq: int) -> str | None:
    """The event id of the message at ``seq`` (None when there is none)."""
    try:
        msg = await js.get_msg(stream, seq)
    except NotFoundError:
        return None
    headers = msg.headers or {}
    return headers.get(EVENT_ID_HEADER) or headers.get("Nats-Msg-Id")


def reconcile(*, since: datetime | None, dry_run: bool = False) -> Findings:
    """Check the published rows since ``since`` against the streams; unless ``dry_run``, send the
    missing ones back to the relay. One NATS connection of its own, opened and closed here."""
    from outbox.broker import connect
    from outbox.services import outbox_republish

    async def run() -> Findings:
        nc = await connect(name="outbox-reconcile")
        try:
            return await find_missing(nc.jetstream(timeout=10), since=since)
        finally:
            await nc.close()

    findings = asyncio.run(run())
    if findings.missing and not dry_run:
        by_stream = ", ".join(f"{s.stream}: {len(s.missing)}" for s in findings.streams if s.missing)
        findings.republished = outbox_republish(
            event_ids=findings.missing_ids(), reason=f"republished by outbox_reconcile: missing from {by_stream}"
        )
    return findings


def parse_since(text: str) -> datetime:
    """``90m``, ``2h``, ``7d`` (that long ago) or an ISO 8601 timestamp."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in units:
        return timezone.now() - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    value = datetime.fromisoformat(text)
    return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)
