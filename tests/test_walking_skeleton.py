"""The thin path end to end: ticket write -> outbox -> relay -> JetStream -> listener -> replica."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import transaction

from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay import Relay
from outbox.streams import stream_name
from tests.helpers import read_stream
from ticketing.models import Ticket
from ticketing.replica.models import TicketReplica
from ticketing.services import ticket_create, ticket_update

pytestmark = pytest.mark.django_db(transaction=True)


def test_ticket_created_then_updated_reaches_replica_with_same_fields_and_version():
    ticket = ticket_create(title="Concert", price="20", user_id="user-1")
    ticket = ticket_update(ticket_id=ticket.id, expected_version=0, title="Concert (late show)", price="25.50")

    report = Relay().drain()
    assert report.published == 2
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.PUBLISHED}

    messages = read_stream(stream_name("TICKETS"))
    assert [m["data"]["version"] for m in messages] == [0, 1]
    assert [m["headers"]["Nats-Msg-Id"] for m in messages] == [str(e.id) for e in OutboxEvent.objects.order_by("seq")]

    call_command("listen", "ticket:created", "ticket:updated", "--max-messages", "2", "--idle-exit", "60")

    replica = TicketReplica.objects.get(pk=str(ticket.id))
    assert (replica.title, replica.price, replica.version) == ("Concert (late show)", Decimal("25.50"), 1)


def test_exception_inside_transaction_after_ticket_write_leaves_neither_ticket_nor_outbox_row():
    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        ticket_create(title="Doomed", price="5", user_id="user-1")
        assert Ticket.objects.count() == 1 and OutboxEvent.objects.count() == 1
        raise Boom

    assert Ticket.objects.count() == 0
    assert OutboxEvent.objects.count() == 0


def test_listen_command_with_max_messages_exits_cleanly_after_that_many():
    for n in range(3):
        ticket_create(title=f"T{n}", price="1", user_id="u")
    Relay().drain()

    call_command("listen", "ticket:created", "--max-messages", "2", "--idle-exit", "60")
    assert TicketReplica.objects.count() == 2

    call_command("listen", "ticket:created", "--max-messages", "1", "--idle-exit", "60")
    assert TicketReplica.objects.count() == 3
