"""The ticket admin writes only through the services, and refuses stale or reserved edits."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.messages import get_messages
from django.db import transaction
from django.urls import reverse

import ticketing.admin
from outbox.models import OutboxEvent
from ticketing.models import Ticket
from ticketing.services import ticket_create, ticket_reserve, ticket_update

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:ticketing_ticket_changelist"


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """Outside DEBUG the site redirects HTTP to HTTPS; the test client speaks plain HTTP."""
    settings.SECURE_SSL_REDIRECT = False


def change_url(ticket: Ticket) -> str:
    return reverse("admin:ticketing_ticket_change", args=[ticket.pk])


def add_url() -> str:
    return reverse("admin:ticketing_ticket_add")


def events_of(ticket: Ticket) -> list[OutboxEvent]:
    return list(OutboxEvent.objects.filter(aggregate_type="ticket", aggregate_id=str(ticket.pk)).order_by("seq"))


def rendered_version(client, ticket: Ticket) -> int:
    """Open the change page as a person would and return the version its form carries."""
    response = client.get(change_url(ticket))
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert form.fields["expected_version"].widget.is_hidden
    return form["expected_version"].value()


def edit(client, ticket: Ticket, *, version: int, **changes):
    data = {"title": ticket.title, "price": str(ticket.price), "user_id": ticket.user_id, "expected_version": version}
    data.update(changes)
    return client.post(change_url(ticket), {**data, "_save": "Save"})


def form_errors(response) -> dict[str, list[str]]:
    return response.context["adminform"].form.errors


def non_field_errors(response) -> str:
    return " ".join(response.context["adminform"].form.non_field_errors())


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def test_anonymous_user_is_sent_to_login_from_the_ticket_changelist(client):
    url = reverse(CHANGELIST)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert f"next={url}" in response["Location"]


def test_adding_a_ticket_creates_it_with_exactly_one_outbox_event(admin_client):
    response = admin_client.post(
        add_url(), {"title": "Concert", "price": "20.50", "user_id": "user-1", "_save": "Save"}
    )

    assert response.status_code == 302
    ticket = Ticket.objects.get()
    assert (ticket.title, ticket.price, ticket.user_id, ticket.version) == ("Concert", Decimal("20.50"), "user-1", 0)
    events = events_of(ticket)
    assert OutboxEvent.objects.count() == 1
    assert [(e.subject, e.aggregate_version) for e in events] == [("ticket:created", 0)]
    assert events[0].payload["title"] == "Concert" and events[0].payload["userId"] == "user-1"
    assert any("ticket:created event is in the outbox" in m for m in messages_of(response))


def test_editing_a_ticket_bumps_its_version_and_writes_one_more_outbox_event(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    version = rendered_version(admin_client, ticket)
    assert version == 0

    response = edit(admin_client, ticket, version=version, title="Concert (late show)", price="25.50")

    assert response.status_code == 302
    ticket.refresh_from_db()
    assert (ticket.title, ticket.price, ticket.version) == ("Concert (late show)", Decimal("25.50"), 1)
    events = events_of(ticket)
    assert [(e.subject, e.aggregate_version) for e in events] == [("ticket:created", 0), ("ticket:updated", 1)]
    assert events[-1].payload["title"] == "Concert (late show)"
    assert rendered_version(admin_client, ticket) == 1


def test_saving_an_unchanged_ticket_writes_no_event(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")

    response = edit(admin_client, ticket, version=rendered_version(admin_client, ticket))

    assert response.status_code == 302
    ticket.refresh_from_db()
    assert ticket.version == 0
    assert len(events_of(ticket)) == 1
    assert any("no event was written" in m for m in messages_of(response))


def test_stale_edit_is_refused_with_a_conflict_message_and_nothing_written(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    version = rendered_version(admin_client, ticket)  # tab 1 opens the page
    ticket_update(ticket_id=ticket.id, expected_version=0, title="Changed in tab 2")  # tab 2 saves first

    response = edit(admin_client, ticket, version=version, title="My change from tab 1")

    assert response.status_code == 200
    message = non_field_errors(response)
    assert "changed by someone else" in message
    assert "you edited version 0, it is now at version 1" in message
    assert "Nothing was saved" in message
    assert "Changed in tab 2" in message  # what the ticket reads now, to merge by hand
    ticket.refresh_from_db()
    assert (ticket.title, ticket.version) == ("Changed in tab 2", 1)
    assert len(events_of(ticket)) == 2
    # The person's input is kept on the page.
    assert response.context["adminform"].form["title"].value() == "My change from tab 1"
    assert 'value="My change from tab 1"' in response.content.decode()


def test_conflict_raised_by_the_service_at_save_time_is_shown_and_nothing_written(admin_client, monkeypatch):
    """Another writer commits between the form's check and the service's lock."""
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    version = rendered_version(admin_client, ticket)
    real_update = ticketing.admin.ticket_update
    calls = []

    def update_after_another_writer(**kwargs):
        calls.append(kwargs)
        real_update(ticket_id=kwargs["ticket_id"], title="Changed by the other writer")
        return real_update(**kwargs)

    monkeypatch.setattr(ticketing.admin, "ticket_update", update_after_another_writer)

    response = edit(admin_client, ticket, version=version, title="My change")

    assert len(calls) == 1 and calls[0]["expected_version"] == 0
    assert response.status_code == 200
    message = non_field_errors(response)
    assert "changed by someone else" in message and "it is now at version 1" in message
    assert "Nothing was saved" in message
    assert response.context["adminform"].form["title"].value() == "My change"
    # The admin's whole transaction rolled back: neither the refused edit nor anything after it was written.
    ticket.refresh_from_db()
    assert (ticket.title, ticket.version) == ("Concert", 0)
    assert len(events_of(ticket)) == 1
    assert not any("successfully" in m for m in messages_of(response))


BAD_INPUTS = [
    pytest.param("price", "-1", "greater than or equal to 0", id="negative-price"),
    pytest.param("price", "abc", "Enter a number", id="non-numeric-price"),
    pytest.param("price", "1.234", "decimal place", id="three-decimals"),
    pytest.param("title", "x" * 10_000, "at most 200 characters", id="10000-character-title"),
    pytest.param("title", "   ", "required", id="blank-title"),
]


@pytest.mark.parametrize(("field", "value", "error"), BAD_INPUTS)
def test_bad_input_on_add_is_a_form_error_and_writes_nothing(admin_client, field, value, error):
    data = {"title": "Concert", "price": "20", "user_id": "user-1", field: value, "_save": "Save"}

    response = admin_client.post(add_url(), data)

    assert response.status_code == 200
    assert error in " ".join(form_errors(response)[field])
    assert Ticket.objects.count() == 0
    assert OutboxEvent.objects.count() == 0


@pytest.mark.parametrize(("field", "value", "error"), BAD_INPUTS)
def test_bad_input_on_edit_is_a_form_error_and_writes_nothing(admin_client, field, value, error):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")

    response = edit(admin_client, ticket, version=rendered_version(admin_client, ticket), **{field: value})

    assert response.status_code == 200
    assert error in " ".join(form_errors(response)[field])
    ticket.refresh_from_db()
    assert (ticket.title, ticket.price, ticket.version) == ("Concert", Decimal("20.00"), 0)
    assert len(events_of(ticket)) == 1


def test_edit_without_the_rendered_version_is_refused(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")

    response = admin_client.post(
        change_url(ticket), {"title": "New", "price": "20", "user_id": "user-1", "expected_version": "x"}
    )

    assert response.status_code == 200
    assert "Nothing was saved" in non_field_errors(response)
    ticket.refresh_from_db()
    assert (ticket.title, ticket.version) == ("Concert", 0)


def reserve(ticket: Ticket, order_id: str = "order-1") -> None:
    with transaction.atomic():
        ticket_reserve(ticket_id=ticket.id, order_id=order_id)


def test_reserved_ticket_page_is_read_only_and_says_why(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    reserve(ticket)

    response = admin_client.get(change_url(ticket))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Reserved by order order-1" in html
    assert "cannot be edited" in html
    form = response.context["adminform"].form
    assert not {"title", "price", "user_id"} & set(form.fields)
    assert 'name="title"' not in html and 'name="_save"' not in html


def test_edit_of_a_ticket_reserved_since_the_page_was_opened_is_refused(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    version = rendered_version(admin_client, ticket)
    reserve(ticket)

    response = edit(admin_client, ticket, version=version, title="My change")

    assert response.status_code == 200
    message = non_field_errors(response)
    assert "reserved by order order-1" in message and "Nothing was saved" in message
    ticket.refresh_from_db()
    assert (ticket.title, ticket.order_id, ticket.version) == ("Concert", "order-1", 1)
    assert [e.subject for e in events_of(ticket)] == ["ticket:created", "ticket:updated"]


def test_tickets_cannot_be_deleted_from_the_admin(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")

    page = admin_client.get(reverse(CHANGELIST))
    delete = admin_client.post(reverse("admin:ticketing_ticket_delete", args=[ticket.pk]), {"post": "yes"})

    assert page.status_code == 200
    assert "delete_selected" not in page.content.decode()  # no bulk delete action either
    assert delete.status_code == 403
    assert Ticket.objects.filter(pk=ticket.pk).exists()
    assert ticketing.admin.TicketAdmin.__doc__ and "ticket:deleted" in ticketing.admin.TicketAdmin.__doc__


def test_ticket_change_page_lists_its_outbox_events_with_links(admin_client):
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    ticket_update(ticket_id=ticket.id, expected_version=0, price="30")
    other = ticket_create(title="Other", price="1", user_id="user-2")

    response = admin_client.get(change_url(ticket))

    rows = response.context["outbox_event_rows"]
    assert [(r["event"].subject, r["event"].aggregate_version) for r in rows] == [
        ("ticket:updated", 1),
        ("ticket:created", 0),
    ]
    html = response.content.decode()
    for event in events_of(ticket):
        assert reverse("admin:outbox_outboxevent_change", args=[event.pk]) in html
    for event in events_of(other):
        assert reverse("admin:outbox_outboxevent_change", args=[event.pk]) not in html
    assert "Pending" in html  # the status badge
    assert f"aggregate_type=ticket&amp;q={ticket.pk}" in html


def test_ticket_changelist_searches_title_user_and_id_and_filters_reserved(admin_client):
    concert = ticket_create(title="Concert", price="20", user_id="user-1")
    opera = ticket_create(title="Opera", price="40", user_id="user-2")
    ballet = ticket_create(title="Ballet", price="60", user_id="user-3")
    reserve(opera)

    def found(**params) -> set[str]:
        response = admin_client.get(reverse(CHANGELIST), params)
        assert response.status_code == 200
        return {t.title for t in response.context["cl"].result_list}

    assert found(q="conc") == {"Concert"}
    assert found(q="user-3") == {"Ballet"}
    assert found(q=str(concert.pk)) == {"Concert"}
    assert found(reserved="yes") == {"Opera"}
    assert found(reserved="no") == {"Concert", "Ballet"}
    assert found(q=str(ballet.pk), reserved="yes") == set()
