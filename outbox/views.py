"""The Prometheus endpoint, guarded: a user allowed to view outbox events, a bearer token
(``OUTBOX['METRICS_TOKEN']``, what Prometheus' ``authorization`` sends), or — with
``OUTBOX['METRICS_PUBLIC']`` — a client in ``OUTBOX['METRICS_ALLOW']``'s networks."""

from __future__ import annotations

import hmac
import ipaddress

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox.conf import outbox_settings
from outbox.operations import sample_metrics

#: The permission that opens /metrics and the operations page to a logged-in user.
VIEW_PERMISSION = "outbox.view_outboxevent"


def client_in(networks: list[str], address: str) -> bool:
    """Is ``address`` (IPv4, IPv6, or IPv4 mapped into IPv6) in one of ``networks``?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip in ipaddress.ip_network(network, strict=False) for network in networks)


def metrics_allowed(request: HttpRequest) -> bool:
    conf = outbox_settings()
    if request.user.is_authenticated and request.user.has_perm(VIEW_PERMISSION):
        return True
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if conf.METRICS_TOKEN and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].strip().encode(), conf.METRICS_TOKEN.encode())
    return conf.METRICS_PUBLIC and client_in(conf.METRICS_ALLOW, request.META.get("REMOTE_ADDR", ""))


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not metrics_allowed(request):
        return HttpResponseForbidden(
            "metrics need a login allowed to view outbox events, a bearer token (OUTBOX['METRICS_TOKEN']), "
            "or OUTBOX['METRICS_PUBLIC'] from a network in OUTBOX['METRICS_ALLOW']\n"
        )
    sample_metrics()
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
