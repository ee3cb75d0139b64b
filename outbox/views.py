"""The Prometheus endpoint: staff only, or open to loopback with ``OUTBOX['METRICS_PUBLIC']``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox.conf import outbox_settings
from outbox.operations import sample_metrics


def metrics_view(request: HttpRequest) -> HttpResponse:
    allowed = request.user.is_authenticated and request.user.is_staff
    if not allowed and outbox_settings().METRICS_PUBLIC:
        allowed = request.META.get("REMOTE_ADDR", "").startswith("127.")
    if not allowed:
        return HttpResponseForbidden("metrics need a staff login (or OUTBOX_METRICS_PUBLIC=1 from loopback)\n")
    sample_metrics()
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
