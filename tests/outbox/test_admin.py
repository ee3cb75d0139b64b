"""The outbox admin: read-only rows, cheap filters and search, and actions that call the services."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from outbox.models import OutboxEvent, OutboxStatus
from outbox.streams import stream_name
from tests.helpers import free_port, read_stream
from ticketing.services import ticket_create

CHANGELIST = "admin:outbox_outboxevent_changelist"


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """Outside DEBUG the site redirects HTTP to HTTPS; the test client speaks plain HTTP."""
    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture
def no_kick(settings):
    """Only the admin action publishes in these tests: no relay task is queued on commit."""
    settings.OUTBOX = {**settings.OUTBOX, "KICK_ON_COMMIT": False}


def make_event(
    *,
    status: str = OutboxStatus.PENDING,
    subject: str = "ticket:created",
    aggregate_type: str = "ticket",
    aggregate_id: str | None = None,
    version: int = 0,
    **fields,
) -> OutboxEvent:
    aggregate_id = aggregate_id or str(uuid.uuid4())
    payload = {"id": aggregate_id, "version": version, "title": "Concert", "price": 20, "userId": "user-1"}
    if status == OutboxStatus.PUBLISHED:
        fields.setdefault("published_at", timezone.now())
        fields.setdefault("stream_sequence", 1)
    return OutboxEvent.objects.create(
        subject=subject,
        payload=payload,
        headers={"correlation-id": "corr-1"},
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        aggregate_version=version,
        status=status,
        **fields,
    )


def listed(client, **params) -> set[uuid.UUID]:
    response = client.get(reverse(CHANGELIST), params)
    assert response.status_code == 200
    return {e.id for e in response.context["cl"].result_list}


def run_action(client, action: str, events: list[OutboxEvent]):
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [str(e.pk) for e in events], "index": "0"},
    )


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


@pytest.mark.django_db
def test_anonymous_user_is_sent_to_login_from_the_outbox_changelist(client):
    url = reverse(CHANGELIST)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert f"next={url}" in response["Location"]


@pytest.mark.django_db
def test_outbox_changelist_shows_counts_per_status_on_top(admin_client):
    for _ in range(3):
        make_event()
    make_event(status=OutboxStatus.DEAD, attempts=12, last_error="boom")
    make_event(status=OutboxStatus.PUBLISHED)
    make_event(status=OutboxStatus.PUBLISHED)

    response = admin_client.get(reverse(CHANGELIST))

    counts = {item["label"]: item["count"] for item in response.context["outbox_summary"]}
    assert counts == {"Pending": 3, "Dead": 1, "Published": 2}
    html = response.content.decode()
    assert 'id="outbox-summary"' in html
    assert '<a href="?status__exact=dead"' in html
    assert not response.context["cl"].show_full_result_count


@pytest.mark.django_db
def test_outbox_changelist_filters_by_status_subject_and_aggregate_type(admin_client):
    pending = make_event()
    dead = make_event(status=OutboxStatus.DEAD)
    published = make_event(status=OutboxStatus.PUBLISHED)
    updated = make_event(subject="ticket:updated", version=1)
    order = make_event(subject="order:cancelled", aggregate_type="order")

    assert listed(admin_client, status__exact="dead") == {dead.id}
    assert listed(admin_client, status__exact="published") == {published.id}
    assert listed(admin_client, status__exact="pending") == {pending.id, updated.id, order.id}
    assert listed(admin_client, subject="ticket:updated") == {updated.id}
    assert listed(admin_client, aggregate_type="order") == {order.id}
    assert listed(admin_client, aggregate_type="ticket", status__exact="pending") == {pending.id, updated.id}


@pytest.mark.django_db
def test_outbox_changelist_searches_exact_event_id_and_aggregate_id(admin_client):
    first = make_event(aggregate_id="ticket-a")
    second = make_event(aggregate_id="ticket-a", version=1, subject="ticket:updated")
    other = make_event(aggregate_id="ticket-b")

    assert listed(admin_client, q=str(other.id)) == {other.id}
    assert listed(admin_client, q=f"  {first.id}  ") == {first.id}
    assert listed(admin_client, q="ticket-a") == {first.id, second.id}
    assert listed(admin_client, q="ticket") == set()  # exact matches only
    assert listed(admin_client, q="not-a-uuid") == set()


@pytest.mark.django_db
def test_outbox_event_page_is_read_only_with_pretty_json(admin_client):
    event = make_event(status=OutboxStatus.DEAD, attempts=12, last_error="nats: timeout")
    url = reverse("admin:outbox_outboxevent_change", args=[event.pk])

    page = admin_client.get(url)
    change = admin_client.post(url, {"subject": "ticket:updated", "status": "published"})
    add = admin_client.get(reverse("admin:outbox_outboxevent_add"))
    delete = admin_client.post(reverse("admin:outbox_outboxevent_delete", args=[event.pk]), {"post": "yes"})

    assert page.status_code == 200
    html = page.content.decode()
    assert "View outbox event" in html and 'name="_save"' not in html
    assert "<pre" in html and "&quot;title&quot;: &quot;Concert&quot;,\n" in html  # indented, one key a line
    assert "&quot;correlation-id&quot;: &quot;corr-1&quot;" in html
    assert "nats: timeout" in html
    assert (change.status_code, add.status_code, delete.status_code) == (403, 403, 403)
    event.refresh_from_db()
    assert (event.subject, event.status) == ("ticket:created", OutboxStatus.DEAD)


@pytest.mark.django_db
def test_requeue_action_turns_selected_dead_events_into_pending(admin_client):
    dead = make_event(status=OutboxStatus.DEAD, attempts=12, last_error="nats: timeout")
    published = make_event(status=OutboxStatus.PUBLISHED)

    response = run_action(admin_client, "requeue_dead", [dead, published])

    assert response.status_code == 302
    dead.refresh_from_db()
    published.refresh_from_db()
    assert (dead.status, dead.attempts) == (OutboxStatus.PENDING, 0)
    assert published.status == OutboxStatus.PUBLISHED
    assert messages_of(response) == [
        ("success", "1 dead event was requeued; the relay publishes it next."),
        ("warning", "1 selected event was not dead and was left as it is."),
    ]


@pytest.mark.django_db
def test_retry_now_action_makes_backing_off_pending_events_due(admin_client):
    later = timezone.now() + timedelta(minutes=10)
    waiting = [make_event(attempts=3, next_attempt_at=later) for _ in range(2)]

    response = run_action(admin_client, "retry_now", waiting)

    assert response.status_code == 302
    now = timezone.now()
    assert all(e.next_attempt_at <= now for e in OutboxEvent.objects.filter(pk__in=[w.pk for w in waiting]))
    assert messages_of(response) == [
        ("success", "2 pending events are due now; the relay was asked to publish them."),
    ]


@pytest.mark.django_db(transaction=True)
def test_publish_now_action_publishes_pending_events_to_jetstream(admin_client, no_kick):
    ticket_create(title="Concert", price="20", user_id="user-1")
    ticket_create(title="Opera", price="40", user_id="user-2")
    events = list(OutboxEvent.objects.order_by("seq"))
    assert {e.status for e in events} == {OutboxStatus.PENDING}

    # The selection only starts the action; the relay batch takes every due event.
    response = run_action(admin_client, "publish_now", events[:1])

    assert response.status_code == 302
    assert messages_of(response) == [("success", "2 events were published to JetStream.")]
    stored = {e.id: e for e in OutboxEvent.objects.all()}
    assert {e.status for e in stored.values()} == {OutboxStatus.PUBLISHED}
    messages = {m["headers"]["Nats-Msg-Id"]: m for m in read_stream(stream_name("TICKETS"))}
    for event_id, event in stored.items():
        assert messages[str(event_id)]["seq"] == event.stream_sequence
        assert messages[str(event_id)]["data"] == event.payload


@pytest.mark.django_db(transaction=True)
def test_publish_now_action_with_nats_unreachable_reports_the_error_and_keeps_events(admin_client, no_kick, settings):
    settings.NATS = {**settings.NATS, "SERVERS": [f"nats://127.0.0.1:{free_port()}"], "CONNECT_TIMEOUT": 0.5}
    ticket_create(title="Concert", price="20", user_id="user-1")
    event = OutboxEvent.objects.get()

    response = run_action(admin_client, "publish_now", [event])

    assert response.status_code == 302
    [(level, text)] = messages_of(response)
    assert level == "error"
    assert "No event was published" in text and "No event was lost" in text
    event.refresh_from_db()
    assert event.status == OutboxStatus.PENDING
    assert event.attempts == 1 and event.last_error
    assert event.last_error in text


@pytest.mark.django_db
def test_view_only_staff_sees_events_but_gets_no_actions(client, django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_outboxevent"))
    client.force_login(user)
    event = make_event(status=OutboxStatus.DEAD)

    page = client.get(reverse(CHANGELIST))
    attempt = run_action(client, "requeue_dead", [event])

    assert page.status_code == 200 and event.id in {e.id for e in page.context["cl"].result_list}
    assert page.context["action_form"] is None and "requeue_dead" not in page.content.decode()
    assert attempt.status_code == 200  # the POST is not taken as an action: the list is shown again
    event.refresh_from_db()
    assert event.status == OutboxStatus.DEAD
