"""The admin's operations page: channels, clients and the flow of events at a glance.

Wired in ``outbox/urls.py`` as ``admin.site.admin_view(operations_view)``, so it
needs a staff login like every admin page, and the permission to view outbox events. The data comes from
:mod:`outbox.operations` (shared with ``manage.py nats_status``); this module only
shapes it for the template, including the inline SVG of events published per minute.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from outbox.operations import BEHIND_PENDING, STALL_AFTER, format_duration, operations_snapshot
from outbox.views import VIEW_PERMISSION

CHART_WIDTH = 1000
CHART_HEIGHT = 140
CHART_LABEL_SPACE = 18


def throughput_chart(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the per-minute throughput: server-rendered SVG, no JavaScript."""
    peak = max((b["count"] for b in buckets), default=0)
    slot = CHART_WIDTH / max(len(buckets), 1)
    plot = CHART_HEIGHT - CHART_LABEL_SPACE
    bars = []
    for i, bucket in enumerate(buckets):
        height = (bucket["count"] / peak * (plot - 4)) if peak else 0
        if bucket["count"] and height < 2:
            height = 2  # one event must still be visible
        bars.append(
            {
                "x": round(i * slot + 1, 2),
                "y": round(plot - height, 2),
                "width": round(max(slot - 2, 1), 2),
                "height": round(height, 2),
                "count": bucket["count"],
                "minute": bucket["minute"],
            }
        )
    ticks = []
    for i in range(0, len(buckets), 15):
        ticks.append({"x": round(i * slot + 1, 2), "minute": buckets[i]["minute"]})
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "plot_height": plot,
        "top": 4,  # the peak bar's top: plot - (plot - 4)
        "label_y": CHART_HEIGHT - 4,
        "bars": bars,
        "ticks": ticks,
        "peak": peak,
        "total": sum(b["count"] for b in buckets),
    }


def _refresh_seconds(request: HttpRequest) -> int | None:
    raw = request.GET.get("refresh", "")
    if raw.isdigit() and 2 <= int(raw) <= 600:
        return int(raw)
    return None


def operations_view(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied("the operations page needs the permission to view outbox events")
    snapshot = operations_snapshot()
    nats = snapshot["nats"]
    for consumer in nats["consumers"]:
        consumer["idle_human"] = format_duration(consumer["idle_seconds"])
        consumer["lag_human"] = format_duration(consumer["lag_seconds"])
    for relay in snapshot["relays"]["relays"]:
        relay["connected_human"] = format_duration(relay["connected_seconds"])
        relay["state_human"] = format_duration(relay["state_seconds"])
    context = {
        **admin.site.each_context(request),
        "title": "Operations dashboard",
        "snap": snapshot,
        "nats": nats,
        "chart": throughput_chart(snapshot["throughput"]),
        "behind_count": sum(1 for c in nats["consumers"] if c["state"] == "behind"),
        "max_lag": max(nats["consumers"], key=lambda c: c["lag_seconds"] or 0, default=None),
        "behind_pending": BEHIND_PENDING,
        "stall_after_human": format_duration(STALL_AFTER),
        "oldest_pending_human": format_duration(snapshot["outbox"]["oldest_pending_age"]),
        "failing_for_human": format_duration(snapshot["outbox"]["failing_for"]),
        "refresh": _refresh_seconds(request),
    }
    return TemplateResponse(request, "admin/outbox/operations.html", context)
