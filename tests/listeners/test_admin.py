"""The listeners' admin: dead letters are fixed and replayed; the inbox and the replica are read-only."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from listeners.models import DeadLetter, DeadLetterStatus, InboxEntry
from ticketing.replica.models import TicketReplica

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:listeners_deadletter_changelist"
CONSUMER = "replica-TICKETS"


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """Outside DEBUG the site redirects HTTP to HTTPS; the test client speaks plain HTTP."""
    settings.SECURE_SSL_REDIRECT = False


def created_payload(ticket_id: str, **overrides) -> dict:
    return {"id": ticket_id, "version": 0, "title": "Concert", "price": 20, "userId": "user-1", **overrides}


def dead_letter(payload: dict | str, *, error: str = "handler failed 20 times: OperationalError") -> DeadLetter:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    event_id = str(uuid.uuid4())
    return DeadLetter.objects.create(
        consumer=CONSUMER,
        subject="ticket:created",
        event_id=event_id,
        stream="TICKETS",
        stream_sequence=7,
        payload=body,
        raw=body.encode(),
        headers={"Nats-Msg-Id": event_id, "event-name": "ticket:created"},
        error=error,
        deliveries=20,
    )


def change_url(letter: DeadLetter) -> str:
    return reverse("admin:listeners_deadletter_change", args=[letter.pk])


def replay(client, letters: list[DeadLetter]):
    return client.post(
        reverse(CHANGELIST), {"action": "replay", "_selected_action": [str(x.pk) for x in letters], "index": "0"}
    )


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def test_anonymous_user_is_sent_to_login_from_the_dead_letter_changelist(client):
    url = reverse(CHANGELIST)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert f"next={url}" in response["Location"]


def test_replay_action_applies_a_valid_dead_letter_to_the_replica_and_marks_it_replayed(admin_client):
    ticket_id = str(uuid.uuid4())
    letter = dead_letter(created_payload(ticket_id))

    response = replay(admin_client, [letter])

    assert response.status_code == 302
    replica = TicketReplica.objects.get(pk=ticket_id)
    assert (replica.title, replica.user_id, replica.version) == ("Concert", "user-1", 0)
    letter.refresh_from_db()
    assert letter.status == DeadLetterStatus.REPLAYED and letter.replayed_at is not None
    assert InboxEntry.objects.filter(consumer=CONSUMER, event_id=letter.event_id, outcome="applied").exists()
    assert messages_of(response) == [("success", "1 dead letter was replayed (applied 1).")]


def test_replay_action_leaves_an_invalid_dead_letter_dead_and_says_why(admin_client):
    good = dead_letter(created_payload(str(uuid.uuid4())))
    bad = dead_letter(created_payload(str(uuid.uuid4()), price="abc"), error="invalid message: price")

    response = replay(admin_client, [good, bad])

    assert response.status_code == 302
    bad.refresh_from_db()
    good.refresh_from_db()
    assert bad.status == DeadLetterStatus.DEAD and bad.replayed_at is None
    assert good.status == DeadLetterStatus.REPLAYED
    assert TicketReplica.objects.count() == 1
    assert DeadLetter.objects.count() == 2  # the failed replay did not dead-letter a second copy
    assert not InboxEntry.objects.filter(event_id=bad.event_id).exists()
    [success, error] = messages_of(response)
    assert success == ("success", "1 dead letter was replayed (applied 1).")
    assert error[0] == "error"
    assert error[1].startswith(f"1 dead letter could not be applied and stays dead: #{bad.pk} dead:invalid: ")
    assert "price" in error[1]


def test_replaying_an_already_replayed_letter_changes_nothing(admin_client):
    letter = dead_letter(created_payload(str(uuid.uuid4())))
    replay(admin_client, [letter])
    admin_client.get(reverse(CHANGELIST))  # shows (and so consumes) the first report

    response = replay(admin_client, [letter])

    assert messages_of(response) == [
        ("warning", "1 selected letter had already been replayed and was left as it is."),
    ]
    assert TicketReplica.objects.count() == 1
    assert InboxEntry.objects.count() == 1


def test_operator_fixes_the_payload_and_saves_and_replays_it(admin_client):
    ticket_id = str(uuid.uuid4())
    broken = json.dumps(created_payload(ticket_id, price=-5))
    letter = dead_letter(broken, error="invalid message: price must be a number >= 0")
    fixed = json.dumps(created_payload(ticket_id, price=5), indent=2)

    page = admin_client.get(change_url(letter))
    response = admin_client.post(change_url(letter), {"payload": fixed, "_replay": "Save and replay"})

    assert 'name="_replay"' in page.content.decode()
    assert response.status_code == 302 and response["Location"] == change_url(letter)
    letter.refresh_from_db()
    assert letter.payload == fixed
    assert bytes(letter.raw) == broken.encode()  # what was received stays on record
    assert letter.status == DeadLetterStatus.REPLAYED
    assert TicketReplica.objects.get(pk=ticket_id).price == 5
    assert ("success", "1 dead letter was replayed (applied 1).") in messages_of(response)


def test_saving_a_payload_that_breaks_the_contract_is_refused(admin_client):
    original = json.dumps(created_payload(str(uuid.uuid4()), price=-5))
    letter = dead_letter(original)

    response = admin_client.post(change_url(letter), {"payload": '{"id": "x", "title": ', "_save": "Save"})

    assert response.status_code == 200
    errors = " ".join(response.context["adminform"].form.errors["payload"])
    assert "Still not a valid ticket:created payload" in errors
    letter.refresh_from_db()
    assert letter.payload == original and letter.status == DeadLetterStatus.DEAD


def test_dead_letter_page_shows_error_and_headers_read_only_and_raw_bytes_not_editable(admin_client):
    letter = dead_letter(created_payload("t-1"), error="invalid message: <script>alert(1)</script>")

    response = admin_client.get(change_url(letter))

    html = response.content.decode()
    form = response.context["adminform"].form
    assert set(form.fields) == {"payload"}
    assert 'name="raw"' not in html and 'name="error"' not in html and 'name="headers"' not in html
    assert "bytes, not editable" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    assert "&quot;event-name&quot;: &quot;ticket:created&quot;" in html


def test_replayed_letter_payload_is_no_longer_editable(admin_client):
    letter = dead_letter(created_payload(str(uuid.uuid4())))
    replay(admin_client, [letter])

    response = admin_client.get(change_url(letter))

    assert "payload" not in response.context["adminform"].form.fields
    assert 'name="_replay"' not in response.content.decode()


def test_dead_letter_changelist_filters_and_searches(admin_client):
    first = dead_letter(created_payload("t-1"))
    second = dead_letter(created_payload("t-2"))
    replay(admin_client, [second])

    def listed(**params) -> set[int]:
        response = admin_client.get(reverse(CHANGELIST), params)
        assert response.status_code == 200
        return {x.pk for x in response.context["cl"].result_list}

    assert listed(status__exact="dead") == {first.pk}
    assert listed(status__exact="replayed") == {second.pk}
    assert listed(q=first.event_id) == {first.pk}
    assert listed(consumer=CONSUMER) == {first.pk, second.pk}


def test_inbox_and_replica_admin_are_read_only(admin_client):
    letter = dead_letter(created_payload("t-1"))
    replay(admin_client, [letter])
    entry = InboxEntry.objects.get()

    for name in ("listeners_inboxentry", "replica_ticketreplica"):
        assert admin_client.get(reverse(f"admin:{name}_changelist")).status_code == 200
        assert admin_client.get(reverse(f"admin:{name}_add")).status_code == 403
    inbox = admin_client.get(reverse("admin:listeners_inboxentry_changelist"), {"q": letter.event_id})
    assert [e.pk for e in inbox.context["cl"].result_list] == [entry.pk]
    change = admin_client.post(reverse("admin:replica_ticketreplica_change", args=["t-1"]), {"title": "Hacked"})
    assert change.status_code == 403
    assert TicketReplica.objects.get(pk="t-1").title == "Concert"
