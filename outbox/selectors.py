"""Read-only queries about the outbox (the status command and the admin use these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from django.db.models import Count, Min, Q
from django.utils import timezone

from outbox.models import OutboxEvent, OutboxStatus


@dataclass
class Backlog:
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    published_last_minute: int = 0
    published_last_hour: int = 0
    oldest_pending_age: float | None = None
    per_subject: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outbox_backlog(*, per_subject: bool = False) -> Backlog:
    now = timezone.now()
    unfinished = OutboxEvent.objects.exclude(status=OutboxStatus.PUBLISHED)
    agg = unfinished.aggregate(
        pending=Count("id", filter=Q(status=OutboxStatus.PENDING)),
        in_flight=Count("id", filter=Q(status=OutboxStatus.PENDING, lease_until__gt=now)),
        dead=Count("id", filter=Q(status=OutboxStatus.DEAD)),
        oldest=Min("created_at", filter=Q(status=OutboxStatus.PENDING)),
    )
    published = OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHED, published_at__gte=now - timedelta(hours=1))
    counts = published.aggregate(
        hour=Count("id"), minute=Count("id", filter=Q(published_at__gte=now - timedelta(minutes=1)))
    )
    backlog = Backlog(
        pending=agg["pending"],
        in_flight=agg["in_flight"],
        dead=agg["dead"],
        published_last_minute=counts["minute"],
        published_last_hour=counts["hour"],
        oldest_pending_age=(now - agg["oldest"]).total_seconds() if agg["oldest"] else None,
    )
    if per_subject:
        rows = OutboxEvent.objects.values("subject", "status").annotate(n=Count("id")).order_by("subject")
        for row in rows:
            backlog.per_subject.setdefault(row["subject"], {})[row["status"]] = row["n"]
    return backlog


def outbox_events_for_aggregate(*, aggregate_type: str, aggregate_id: str, limit: int = 50):
    return OutboxEvent.objects.filter(aggregate_type=aggregate_type, aggregate_id=aggregate_id).order_by("-seq")[:limit]


async def stream_summaries(js: Any) -> list[dict[str, Any]]:
    """Message count and last sequence of each stream the registry declares."""
    from nats.js.errors import NotFoundError

    from outbox.streams import desired_configs

    result = []
    for config in desired_configs():
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            result.append({"stream": config.name, "exists": False, "subjects": config.subjects})
            continue
        result.append(
            {
                "stream": config.name,
                "exists": True,
                "subjects": info.config.subjects,
                "messages": info.state.messages,
                "bytes": info.state.bytes,
                "first_seq": info.state.first_seq,
                "last_seq": info.state.last_seq,
                "consumers": info.state.consumer_count,
                "replicas": info.config.num_replicas,
            }
        )
    return result
