"""The invariant checker itself: green on a healthy system, and it catches each kind of breach."""

from __future__ import annotations

import asyncio

import nats
import pytest
from django.core.management import CommandError, call_command

from listeners.models import InboxEntry
from outbox.models import OutboxEvent
from outbox.relay import Relay
from outbox.streams import stream_name
from ticketing.replica.models import TicketReplica
from ticketing.services import ticket_create, ticket_update
from ticketing.verify import verify

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def healthy():
    tickets = [ticket_create(title=f"T{n}", price="1", user_id="u") for n in range(3)]
    ticket_update(ticket_id=tickets[0].id, expected_version=0, price="2")
    Relay().drain()
    call_command("listen", "ticket:created", "ticket:updated", "--max-messages", "4", "--idle-exit", "60")
    report = verify()
    assert report.ok, report.render()
    return tickets


def test_checker_passes_on_a_healthy_system_and_the_command_exits_0(healthy, capsys):
    call_command("outbox_verify")
    assert "invariants: OK" in capsys.readouterr().out


def test_checker_catches_a_replica_that_differs_from_the_source(healthy):
    TicketReplica.objects.filter(pk=str(healthy[1].id)).update(price="99")
    assert "replica_differs" in verify().breaches
    with pytest.raises(CommandError, match="breach"):
        call_command("outbox_verify")


def test_checker_catches_an_event_never_applied(healthy):
    InboxEntry.objects.filter(event_id=str(OutboxEvent.objects.order_by("seq").last().id)).delete()
    assert "not_applied" in verify().breaches


def test_checker_catches_an_event_stuck_pending(healthy):
    OutboxEvent.objects.filter(pk=OutboxEvent.objects.order_by("seq").first().pk).update(status="pending")
    assert "pending_when_quiet" in verify().breaches


def test_checker_catches_an_event_lost_from_the_stream(healthy):
    import os

    async def delete_first() -> None:
        nc = await nats.connect(os.environ["NATS_URL"])
        await nc.jetstream().delete_msg(stream_name("TICKETS"), 1)
        await nc.close()

    asyncio.run(delete_first())
    assert "lost_in_stream" in verify().breaches


def test_checker_catches_a_change_without_its_event(healthy):
    OutboxEvent.objects.filter(aggregate_id=str(healthy[0].id), aggregate_version=1).delete()
    assert "event_per_change" in verify().breaches


def test_checker_catches_versions_out_of_order_in_the_stream_and_says_where_each_sits():
    import json
    import os

    from outbox.streams import ensure_streams, nats_subject

    ticket = ticket_create(title="T", price="1", user_id="u")
    ticket_update(ticket_id=ticket.id, expected_version=0, price="2")
    v1 = OutboxEvent.objects.get(aggregate_id=str(ticket.id), aggregate_version=1)

    async def publish_v1_first() -> None:
        nc = await nats.connect(os.environ["NATS_URL"])
        await ensure_streams(nc.jetstream())
        await nc.jetstream().publish(
            nats_subject(v1.subject), json.dumps(v1.payload).encode(), headers={"Nats-Msg-Id": str(v1.id)}
        )
        await nc.close()

    asyncio.run(publish_v1_first())
    Relay().drain()  # v0 goes in after v1; v1 is a duplicate of what is already there
    details = verify().breaches["stream_order"]
    assert details == [
        f"ticket {ticket.id} entered the stream as versions [1, 0]: "
        "v1 at seq 1 (PubAck said 1) before v0 at seq 2 (PubAck said 2)"
    ]
