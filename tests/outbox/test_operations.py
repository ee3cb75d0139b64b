"""The operations selectors, the admin's operations page and ``manage.py nats_status``.

Real PostgreSQL and real JetStream; NATS "unreachable" is a free loopback port nobody listens on.
"""

from __future__ import annotations

import json
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from nats.js.api import ConsumerConfig, ConsumerInfo, SequenceInfo

from outbox.admin_views import throughput_chart
from outbox.models import OutboxEvent, OutboxStatus
from outbox.operations import (
    _consumer_row,
    format_duration,
    nats_snapshot,
    operations_snapshot,
    published_per_minute,
)
from outbox.relay import Relay
from outbox.streams import stream_name
from tests.helpers import PYTHON, ROOT, free_port, subprocess_env
from ticketing.services import ticket_create

OPERATIONS_URL = "/admin/operations/"


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """The suite runs with production settings; the test client speaks plain HTTP."""
    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture
def nats_down():
    """Settings pointing at a loopback port with no server behind it."""
    url = f"nats://127.0.0.1:{free_port()}"
    with override_settings(NATS=dict(settings.NATS, SERVERS=[url])):
        yield url


def _two_tickets_published_and_one_consumed() -> None:
    ticket_create(title="Opera", price="30", user_id="u1")
    ticket_create(title="Ballet", price="25", user_id="u2")
    assert Relay().drain().published == 2
    call_command(
        "listen", "ticket:created", "ticket:updated", "--max-messages", "1", "--batch", "1", "--idle-exit", "30"
    )


# --- selectors ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_nats_snapshot_lists_registry_streams_and_the_durable_consumer_with_its_pending_count():
    _two_tickets_published_and_one_consumed()

    snap = nats_snapshot()

    assert snap["error"] is None
    streams = {s["stream"]: s for s in snap["streams"]}
    tickets = streams[stream_name("TICKETS")]
    assert tickets["exists"] and tickets["messages"] == 2 and tickets["last_seq"] == 2
    assert stream_name("ORDERS") in streams  # declared by the registry, whether created yet or not
    (consumer,) = [c for c in snap["consumers"] if c["stream"] == stream_name("TICKETS")]
    assert consumer["name"] == "replica-TICKETS"
    assert (consumer["num_pending"], consumer["num_ack_pending"], consumer["delivered_stream_seq"]) == (1, 0, 1)
    assert consumer["last_active"] is not None and consumer["state"] == "ok"
    json.dumps(snap)  # the command prints it as is


@pytest.mark.django_db(transaction=True)
def test_a_consumers_lag_is_the_age_of_its_oldest_unacknowledged_message_and_zero_when_caught_up(admin_client):
    before = timezone.now()
    _two_tickets_published_and_one_consumed()  # the second message waits
    (consumer,) = [c for c in nats_snapshot()["consumers"] if c["stream"] == stream_name("TICKETS")]
    assert 0 < consumer["lag_seconds"] <= (timezone.now() - before).total_seconds()
    html = admin_client.get(OPERATIONS_URL).content.decode()
    assert 'id="card-lag"' in html and "Largest lag &middot; replica-TICKETS" in html

    call_command("listen", "ticket:created", "ticket:updated", "--max-messages", "1", "--idle-exit", "30")
    (consumer,) = [c for c in nats_snapshot()["consumers"] if c["stream"] == stream_name("TICKETS")]
    assert consumer["lag_seconds"] == 0.0
    assert 'id="card-lag"' not in admin_client.get(OPERATIONS_URL).content.decode()


@pytest.mark.django_db
def test_nats_snapshot_marks_registry_streams_not_created_yet_as_missing():
    snap = nats_snapshot()

    assert snap["error"] is None and snap["consumers"] == []
    assert {s["stream"]: s["exists"] for s in snap["streams"]} == {
        stream_name("ORDERS"): False,
        stream_name("TICKETS"): False,
    }


def _info(*, pending: int, ack_pending: int = 0, last_active: datetime | None, created: datetime) -> ConsumerInfo:
    return ConsumerInfo(
        name="replica-TICKETS",
        stream_name="TICKETS",
        config=ConsumerConfig(durable_name="replica-TICKETS", filter_subject="ticket:created"),
        created=created,
        delivered=SequenceInfo(consumer_seq=5, stream_seq=5, last_active=last_active),
        ack_floor=SequenceInfo(consumer_seq=5, stream_seq=5),
        num_ack_pending=ack_pending,
        num_redelivered=0,
        num_waiting=1,
        num_pending=pending,
    )


@pytest.mark.parametrize(
    ("pending", "ack_pending", "active_ago", "state"),
    [
        (0, 0, 5, "ok"),  # caught up and recently active
        (0, 0, 3600, "idle"),  # caught up, no traffic: healthy, just quiet
        (101, 0, 1, "behind"),  # more pending than the threshold
        (3, 0, 600, "behind"),  # work waiting, nothing delivered for long: stalled
        (0, 2, 600, "behind"),  # delivered but never acked for long
        (5, 0, None, "behind"),  # never delivered anything although work waits
    ],
)
def test_consumer_state_is_behind_on_too_many_pending_or_on_work_waiting_without_delivery(
    pending, ack_pending, active_ago, state
):
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    last = now - timedelta(seconds=active_ago) if active_ago is not None else None
    info = _info(pending=pending, ack_pending=ack_pending, last_active=last, created=now - timedelta(hours=2))

    row = _consumer_row(info, now=now, behind_pending=100, stall_after=120)

    assert row["state"] == state
    assert bool(row["reasons"]) == (state == "behind")
    assert row["filter_subjects"] == ["ticket:created"]


@pytest.mark.django_db
def test_published_per_minute_has_sixty_buckets_with_counts_in_their_minute():
    ticket = ticket_create(title="Jazz", price="10", user_id="u")
    ticket_create(title="Blues", price="10", user_id="u")
    now = timezone.now().replace(second=30, microsecond=0)
    rows = list(OutboxEvent.objects.all())
    OutboxEvent.objects.filter(pk=rows[0].pk).update(status=OutboxStatus.PUBLISHED, published_at=now)
    OutboxEvent.objects.filter(pk=rows[1].pk).update(
        status=OutboxStatus.PUBLISHED, published_at=now - timedelta(minutes=5)
    )
    assert ticket

    buckets = published_per_minute(now=now)

    assert len(buckets) == 60
    assert buckets[-1]["count"] == 1 and buckets[-6]["count"] == 1
    assert sum(b["count"] for b in buckets) == 2
    chart = throughput_chart(buckets)
    drawn = [bar for bar in chart["bars"] if bar["height"] > 0]
    assert len(drawn) == 2 and chart["peak"] == 1 and chart["total"] == 2


def test_format_duration_reads_like_a_person_would_say_it():
    assert [format_duration(s) for s in (None, 2.5, 42, 185, 7620, 3 * 86400 + 4 * 3600)] == [
        "-",
        "2.5s",
        "42s",
        "3m 05s",
        "2h 07m",
        "3d 4h",
    ]


@pytest.mark.django_db
def test_operations_snapshot_keeps_the_database_part_when_nats_is_unreachable(nats_down):
    ticket = ticket_create(title="Gig", price="5", user_id="u")
    OutboxEvent.objects.filter(aggregate_id=str(ticket.id)).update(status=OutboxStatus.DEAD, last_error="gave up")

    snap = operations_snapshot(timeout=2)

    assert snap["nats"]["error"] and nats_down in snap["nats"]["error"]
    assert snap["nats"]["streams"] == [] and snap["nats"]["consumers"] == []
    assert snap["outbox"]["dead"] == 1
    assert [row["aggregate"] for row in snap["dead_outbox"]] == [f"ticket:{ticket.id}"]


def test_nats_snapshot_gives_up_after_its_timeout_when_a_server_accepts_but_never_answers():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever sends INFO
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        with override_settings(NATS=dict(settings.NATS, SERVERS=[url])):
            snap = nats_snapshot(timeout=0.5)

    assert snap["streams"] == [] and snap["consumers"] == []
    assert url in snap["error"]


# --- the admin page -------------------------------------------------------------------


@pytest.mark.django_db
def test_operations_page_needs_a_staff_login(client, django_user_model):
    response = client.get(OPERATIONS_URL)
    assert response.status_code == 302 and reverse("admin:login") in response["Location"]

    user = django_user_model.objects.create_user("clerk", password="pw-not-staff-123")
    client.force_login(user)
    response = client.get(OPERATIONS_URL)
    assert response.status_code == 302 and reverse("admin:login") in response["Location"]


@pytest.mark.django_db
def test_admin_index_links_to_the_operations_dashboard(admin_client):
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert 'id="operations-link"' in html and f'href="{OPERATIONS_URL}"' in html
    assert reverse("operations") == OPERATIONS_URL


@pytest.mark.django_db
def test_operations_page_shows_a_banner_and_still_the_database_figures_when_nats_is_unreachable(
    admin_client, nats_down
):
    ticket = ticket_create(title="Gig", price="5", user_id="u")
    OutboxEvent.objects.filter(aggregate_id=str(ticket.id)).update(
        status=OutboxStatus.DEAD, attempts=12, last_error="nats: timeout"
    )

    response = admin_client.get(OPERATIONS_URL)

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="nats-unreachable"' in html and "NATS is unreachable" in html
    assert nats_down in html  # the banner names the server it tried
    assert "Unavailable while NATS is unreachable." in html
    assert response.context["snap"]["outbox"]["dead"] == 1
    assert f"ticket:{ticket.id}" in html and "nats: timeout" in html
    assert "<svg" in html


@pytest.mark.django_db(transaction=True)
def test_operations_page_shows_streams_consumers_chart_and_dead_rows_on_both_sides(admin_client):
    from listeners.models import DeadLetter

    _two_tickets_published_and_one_consumed()
    dead_ticket = ticket_create(title="Doomed", price="1", user_id="u")
    dead_event = OutboxEvent.objects.get(aggregate_id=str(dead_ticket.id))
    OutboxEvent.objects.filter(pk=dead_event.pk).update(status=OutboxStatus.DEAD, last_error="boom")
    letter = DeadLetter.objects.create(
        consumer="replica-TICKETS", subject="ticket:updated", error="handler exploded", deliveries=20
    )

    response = admin_client.get(OPERATIONS_URL)

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="nats-unreachable"' not in html
    assert f'data-stream="{stream_name("TICKETS")}"' in html
    assert 'data-consumer="replica-TICKETS"' in html
    assert response.context["chart"]["total"] == 2
    assert html.count('<rect class="bar"') >= 1
    assert f'data-event="{dead_event.pk}"' in html and f'data-dead-letter="{letter.pk}"' in html
    assert "handler exploded" in html
    # Links to the admin pages of the rows, when those models are registered with the admin.
    links = (("admin:outbox_outboxevent_change", dead_event.pk), ("admin:listeners_deadletter_change", letter.pk))
    for name, pk in links:
        try:
            url = reverse(name, args=[pk])
        except Exception:  # noqa: BLE001 - that admin is not registered in this checkout
            continue
        assert f'href="{url}"' in html


# --- nats_status ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_nats_status_json_lists_the_streams_and_consumers():
    _two_tickets_published_and_one_consumed()
    out = StringIO()

    call_command("nats_status", "--json", stdout=out)

    doc = json.loads(out.getvalue())
    assert doc["error"] is None
    assert stream_name("TICKETS") in [s["stream"] for s in doc["streams"]]
    consumer = next(c for c in doc["consumers"] if c["stream"] == stream_name("TICKETS"))
    assert consumer["name"] == "replica-TICKETS" and consumer["num_pending"] == 1
    assert consumer["lag_seconds"] > 0  # the unconsumed message waits


@pytest.mark.django_db(transaction=True)
def test_nats_status_prints_tables_of_channels_and_clients():
    _two_tickets_published_and_one_consumed()
    out = StringIO()

    call_command("nats_status", stdout=out)

    text = out.getvalue()
    assert "channels" in text and "clients" in text
    assert stream_name("TICKETS") in text and "replica-TICKETS" in text
    header = next(line for line in text.splitlines() if "consumer" in line and "ack pending" in line)
    assert " lag " in header  # the consumer's lag in time, next to its counts


def test_nats_status_fails_with_a_clear_message_when_nats_is_unreachable(nats_down):
    with pytest.raises(CommandError) as excinfo:
        call_command("nats_status", stdout=StringIO())

    assert excinfo.value.returncode == 1
    assert str(excinfo.value).startswith("NATS unreachable:") and nats_down in str(excinfo.value)


def test_nats_status_json_exits_1_with_the_error_field_and_clean_stdout_when_nats_is_unreachable():
    url = f"nats://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "nats_status", "--json"],
        cwd=ROOT,
        env=subprocess_env(NATS_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 1
    doc = json.loads(proc.stdout)  # nothing but the document on stdout
    assert doc["streams"] == [] and doc["consumers"] == [] and url in doc["error"]
    assert "NATS unreachable" in proc.stderr
