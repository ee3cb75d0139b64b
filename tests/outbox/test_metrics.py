"""The Prometheus endpoint: staff only (or loopback when explicitly opened), live numbers."""

from __future__ import annotations

import pytest

from tests.helpers import insert_ticket_events


@pytest.mark.django_db
def test_metrics_endpoint_requires_a_staff_login(client, settings):
    settings.OUTBOX = {**settings.OUTBOX, "METRICS_PUBLIC": False}
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_metrics_endpoint_reports_the_backlog_to_staff(admin_client):
    insert_ticket_events(aggregates=3, per_aggregate=2)
    body = admin_client.get("/metrics").content.decode()
    assert "outbox_backlog 6.0" in body
    assert "outbox_dead_rows 0.0" in body


@pytest.mark.django_db
def test_metrics_endpoint_can_be_opened_to_loopback_only(client, settings):
    settings.OUTBOX = {**settings.OUTBOX, "METRICS_PUBLIC": True}
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403
