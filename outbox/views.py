"""The Prometheus endpoint: staff only, or open to loopback when OUTBOX_METRICS_PUBLIC=1."""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox.operations import sample_metrics


def metrics_view(request: HttpRequest) -> HttpResponse:
    allowed = request.user.is_authenticated and request.user.is_staff
    if not allowed and os.environ.get("OUTBOX_METRICS_PUBLIC") == "1":
        allowed = request.META.get("REMOTE_ADDR", "").startswith("127.")
    if not allowed:
        return HttpResponseForbidden("metrics need a staff login (or OUTBOX_METRICS_PUBLIC=1 from loopback)\n")
    sample_metrics()
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
