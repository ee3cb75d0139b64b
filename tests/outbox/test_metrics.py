"""The Prometheus endpoint and the operations page: who gets in, live numbers; credentials kept out of URLs."""

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


@pytest.mark.django_db
def test_ipv6_loopback_and_mapped_ipv4_loopback_count_as_loopback(client, settings):
    settings.OUTBOX = {**settings.OUTBOX, "METRICS_PUBLIC": True}
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::ffff:127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::ffff:10.0.0.1").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="2001:db8::1").status_code == 403


@pytest.mark.django_db
def test_an_allow_list_of_networks_replaces_loopback(client, settings):
    settings.OUTBOX = {**settings.OUTBOX, "METRICS_PUBLIC": True, "METRICS_ALLOW": ["10.20.0.0/16"]}
    assert client.get("/metrics", REMOTE_ADDR="10.20.3.4").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


@pytest.mark.django_db
def test_prometheus_gets_in_with_the_bearer_token_and_only_with_it(client, settings):
    settings.OUTBOX = {**settings.OUTBOX, "METRICS_TOKEN": "s3cret-token"}
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 200
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_a_staff_user_without_the_view_permission_gets_neither_metrics_nor_the_operations_page(client):
    from django.contrib.auth.models import Permission, User
    from django.urls import reverse

    user = User.objects.create_user("ops", password="x", is_staff=True)
    client.force_login(user)
    assert client.get("/metrics").status_code == 403
    assert client.get(reverse("operations")).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_outboxevent"))
    client.force_login(User.objects.get(pk=user.pk))
    assert client.get("/metrics").status_code == 200
    assert client.get(reverse("operations")).status_code == 200


def test_credentials_are_taken_out_of_urls_in_messages_and_log_lines():
    import logging

    from outbox.redact import RedactFilter, redact, redact_url

    assert redact_url("nats://app:pa55@nats:4222") == "nats://app:***@nats:4222"
    assert redact_url("nats://t0ken@nats:4222") == "nats://***@nats:4222"
    assert redact_url("nats://nats:4222") == "nats://nats:4222"
    text = "cannot connect to NATS at nats://app:pa55@a:4222, tls://tok@b:4222: refused"
    assert redact(text) == "cannot connect to NATS at nats://app:***@a:4222, tls://***@b:4222: refused"
    record = logging.LogRecord("outbox", logging.WARNING, __file__, 1, "kick via %s failed", ("redis://:pw@r/0",), None)
    assert RedactFilter().filter(record) and record.getMessage() == "kick via redis://:***@r/0 failed"


@pytest.mark.django_db
def test_a_failed_connection_stores_no_credentials_in_last_error():
    from django.conf import settings as django_settings
    from django.test import override_settings

    from outbox.models import OutboxEvent
    from outbox.relay import Relay
    from tests.helpers import free_port
    from ticketing.services import ticket_create

    url = f"nats://app:pa55word@127.0.0.1:{free_port()}"
    with override_settings(NATS=dict(django_settings.NATS, SERVERS=[url], CONNECT_TIMEOUT=0.5)):
        ticket_create(title="T", price="1", user_id="u")
        relay = Relay()
        try:
            relay.run_batch()
        finally:
            relay.broker.close()
    error = OutboxEvent.objects.get().last_error
    assert "cannot connect to NATS at nats://app:***@127.0.0.1" in error and "pa55word" not in error


@pytest.mark.django_db(transaction=True)
def test_a_running_relay_worker_serves_its_counters_and_the_timings_of_claim_publish_and_mark(tmp_path):
    """The Celery worker's own endpoint (OUTBOX['METRICS_PORT']): what it published, and a histogram
    per stage of its batches."""
    from tests.helpers import celery_worker, free_port, stop, subprocess_env, wait_for
    from tests.listeners.test_metrics import scrape, value
    from ticketing.services import ticket_create

    port = free_port()
    worker = celery_worker(env=subprocess_env(OUTBOX_METRICS_PORT=str(port)), log=tmp_path / "worker.log")
    try:
        wait_for(lambda: scrape(port), timeout=90, what="the worker's metrics endpoint")
        for n in range(5):
            ticket_create(title=f"T{n}", price="1", user_id="u")

        def published_all():
            samples = scrape(port)
            return value(samples, "outbox_published_total") == 5 and samples

        samples = wait_for(published_all, timeout=60, interval=0.5, what="five events published by the worker")
    finally:
        stop(worker)
    for stage in ("claim", "publish", "mark"):
        count = value(samples, "outbox_relay_stage_seconds_count", stage=stage)
        assert count and count >= 1, stage
        assert value(samples, "outbox_relay_stage_seconds_sum", stage=stage) > 0
        assert value(samples, "outbox_relay_stage_seconds_bucket", stage=stage, le="+Inf") == count
