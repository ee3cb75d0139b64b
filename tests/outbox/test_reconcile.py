"""outbox_reconcile: a stream that lost published events gets them back, and listeners end equal to the source.

Real PostgreSQL and NATS. Each scenario publishes ticket events through the relay, makes the broker
lose some (the stream deleted and recreated, messages removed from the middle, a nats-server killed
and its newest block file truncated), runs ``outbox_reconcile --dry-run`` (exit 1, the loss named),
then ``outbox_reconcile``, drains the relay, lets the replica listener catch up and runs the
invariant checker: nothing lost, nothing applied twice, the replica equal to the source.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import nats
import nats.js.errors
import pytest
from django.conf import settings
from django.core.management import call_command

from outbox.models import OutboxEvent, OutboxStatus
from outbox.reconcile import parse_since
from outbox.relay import Relay
from outbox.streams import stream_name
from tests.helpers import stop, wait_for
from tests.listeners.helpers import settled, start_listener
from ticketing.replica.models import TicketReplica
from ticketing.services import ticket_create, ticket_update
from ticketing.verify import verify

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]
SUBJECTS = ("ticket:created", "ticket:updated")


def nats_url() -> str:
    return settings.NATS["SERVERS"][0]


def run(coro):
    return asyncio.run(coro)


async def _with_js(fn):
    nc = await nats.connect(nats_url())
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def tickets_with_history(count: int = 3, updates: int = 2) -> list:
    tickets = [ticket_create(title=f"T{n}", price="1", user_id="u") for n in range(count)]
    for ticket in tickets:
        for version in range(updates):
            ticket_update(ticket_id=ticket.id, expected_version=version, price=str(version + 2))
    return tickets


def publish_all() -> None:
    Relay().drain()
    assert not OutboxEvent.objects.exclude(status=OutboxStatus.PUBLISHED).exists()


def reconcile(*args: str) -> tuple[int, dict]:
    out = io.StringIO()
    try:
        call_command("outbox_reconcile", "--json", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(out.getvalue())


def replica_settled() -> bool:
    from ticketing.models import Ticket

    source = {str(t.id): t.version for t in Ticket.objects.all()}
    return source == dict(TicketReplica.objects.values_list("id", "version"))


def consumer_done() -> bool:
    """The replica's durable exists, has delivered everything and holds nothing unacknowledged."""
    try:
        return settled()
    except nats.js.errors.NotFoundError:
        return False


def catch_up(logs: Path) -> None:
    """The replica listener (a child process) until its durable is drained and the replica equals the source."""
    listener = start_listener(*SUBJECTS, log=logs / "listener.log")
    try:
        wait_for(lambda: consumer_done() and replica_settled(), timeout=90, what="the listener to catch up")
    finally:
        assert stop(listener) == 0, (logs / "listener.log").read_text()


def assert_repaired(missing: int, logs: Path) -> None:
    code, found = reconcile("--dry-run")
    assert code == 1 and found["missing"] == missing, found
    code, found = reconcile()
    assert code == 0 and found["republished"] == missing, found
    publish_all()
    code, found = reconcile("--dry-run")
    assert code == 0 and found["missing"] == 0 and found["present"] == found["checked"], found
    catch_up(logs)
    report = verify()
    assert report.ok, report.render()
    assert report.counts["stream_repaired"] == missing


def test_a_deleted_and_recreated_stream_gets_every_event_back(logs):
    tickets_with_history()
    publish_all()
    catch_up(logs)  # the listener applied everything once, before the loss
    events = OutboxEvent.objects.count()

    run(_with_js(lambda js: js.delete_stream(stream_name("TICKETS"))))
    call_command("outbox_streams", stdout=io.StringIO())  # an operator recreates it, empty

    assert_repaired(events, logs)
    # The listener saw every event twice (before and after) and applied each once.
    assert OutboxEvent.objects.filter(republished=1).count() == events


def test_messages_removed_from_the_middle_come_back_and_a_listener_waiting_on_the_gap_gets_them(logs):
    tickets = tickets_with_history()
    publish_all()
    lost = list(
        OutboxEvent.objects.filter(aggregate_id__in=[str(tickets[0].id), str(tickets[1].id)], aggregate_version=1)
    )
    for row in lost:
        run(_with_js(lambda js, seq=row.stream_sequence: js.delete_msg(stream_name("TICKETS"), seq)))

    # A listener now applies v0, then waits on the gap before v2 of those two tickets.
    listener = start_listener(*SUBJECTS, log=logs / "waiting.log")
    try:
        wait_for(
            lambda: (
                TicketReplica.objects.filter(pk=str(tickets[2].id), version=2).exists()
                and set(
                    TicketReplica.objects.filter(pk__in=[str(t.id) for t in tickets[:2]]).values_list(
                        "version", flat=True
                    )
                )
                == {0}
            ),
            timeout=60,
            what="the listener to apply everything but the two gaps",
        )
        code, found = reconcile()  # within the duplicate window: the copies need their own Nats-Msg-Id
        assert code == 0 and found["missing"] == 2 and found["republished"] == 2, found
        publish_all()
        wait_for(replica_settled, timeout=90, what="the waiting listener to get the missing versions")
    finally:
        assert stop(listener) == 0
    report = verify()
    assert report.ok, report.render()


def test_a_nats_server_killed_with_its_newest_block_truncated_loses_events_that_reconcile_restores(private_nats, logs):
    tickets_with_history(count=4, updates=3)
    publish_all()
    events = OutboxEvent.objects.count()
    private_nats.kill()
    blocks = sorted(
        (Path(private_nats.store) / "jetstream").rglob(f"{stream_name('TICKETS')}/msgs/*.blk"),
        key=lambda p: int(p.stem),
    )
    assert blocks, list(Path(private_nats.store).rglob("*"))
    newest = blocks[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write at the crash
    for index in (Path(private_nats.store) / "jetstream").rglob(f"{stream_name('TICKETS')}/msgs/*.idx"):
        index.unlink()
    private_nats.start()

    held = run(_with_js(lambda js: js.stream_info(stream_name("TICKETS")))).state.messages
    assert held < events, "the truncation lost nothing; the test needs it to"
    assert_repaired(events - held, logs)


def test_the_periodic_task_republishes_what_a_stream_lost():
    from outbox.tasks import reconcile as reconcile_task

    tickets_with_history(count=1, updates=1)
    publish_all()
    lost = OutboxEvent.objects.get(aggregate_version=1)
    run(_with_js(lambda js: js.delete_msg(stream_name("TICKETS"), lost.stream_sequence)))
    assert reconcile_task.apply().get() == 1
    lost.refresh_from_db()
    assert lost.status == OutboxStatus.PENDING and lost.republished == 1
    assert lost.headers["event-id"] == str(lost.pk) and lost.headers["republish"] == "1"


def test_since_takes_a_duration_or_a_timestamp():
    assert parse_since("2h") < parse_since("90m") < parse_since("30s")
    assert parse_since("2026-01-02T03:04:05+00:00").isoformat() == "2026-01-02T03:04:05+00:00"
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_an_unreachable_nats_is_a_one_line_error():
    from django.core.management import CommandError
    from django.test import override_settings

    from tests.helpers import free_port

    unreachable = dict(settings.NATS, SERVERS=[f"nats://127.0.0.1:{free_port()}"])
    with override_settings(NATS=unreachable), pytest.raises(CommandError, match="cannot connect to NATS"):
        call_command("outbox_reconcile")
