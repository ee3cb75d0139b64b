"""Streams belong to the producers: a listener checks the streams it consumes, and never creates or changes one.

Real NATS JetStream: the producer's streams are created the producer's way
(``outbox.streams.ensure_streams``); a listener that finds a stream missing, or not
taking a subject it needs, exits 1 with one line that says what to run.
"""

from __future__ import annotations

import asyncio
import io

import pytest
from django.core.management import call_command
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from listeners.models import DeadLetter
from listeners.stream_check import StreamNotReady, streams_check, subject_matches
from outbox.contracts import registry
from outbox.streams import nats_subject, stream_name
from tests.listeners.helpers import _with_js, consumer_info, publish, run_manage, summary, ticket
from ticketing.replica.models import TicketReplica

pytestmark = pytest.mark.usefixtures("isolated_streams")

BOTH = ("ticket:created", "ticket:updated")
RUN = '"python manage.py outbox_streams" on the producing service'


def stream_configs() -> dict[str, dict]:
    """Every stream of the producer's registry, as the server holds it."""
    names = [stream_name(stream) for stream in registry.streams()]

    async def work(js):
        return {name: (await js.stream_info(name)).config.as_dict() for name in names}

    return asyncio.run(_with_js(work))


def stream_exists(name: str) -> bool:
    async def work(js):
        try:
            await js.stream_info(name)
        except NotFoundError:
            return False
        return True

    return asyncio.run(_with_js(work))


@pytest.mark.django_db(transaction=True)
def test_a_listener_that_registers_part_of_the_contracts_leaves_the_producers_streams_as_they_were(monkeypatch):
    publish([ticket("t1", 0), ticket("t1", 1)])  # the producer's streams, from every contract
    before = stream_configs()
    assert nats_subject("ticket:updated") in before[stream_name("TICKETS")]["subjects"]

    # This process knows one contract only, as a consumer-only service would.
    monkeypatch.setattr(registry, "_by_name", {"ticket:created": registry.get("ticket:created")})
    out = io.StringIO()
    call_command("listen", "ticket:created", "--max-messages", "1", "--idle-exit", "30", stdout=out)
    monkeypatch.undo()

    assert stream_configs() == before
    assert summary(out.getvalue()) == (1, {"applied": 1})
    assert TicketReplica.objects.get(pk="t1").version == 0
    # Its durable takes its own subject only: the update is not its to read (nor to dead-letter).
    assert consumer_info("replica-ticket-created").config.filter_subject == nats_subject("ticket:created")
    assert not DeadLetter.objects.exists()


def test_a_listener_whose_stream_is_missing_exits_1_with_one_line_naming_the_stream_and_the_command():
    tickets = stream_name("TICKETS")

    result = run_manage("listen", *BOTH)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"CommandError: stream {tickets} does not exist: run {RUN}"]
    assert not stream_exists(tickets)


def test_on_a_cluster_no_such_stream_is_asked_again_before_it_is_believed():
    """A node that lost its peers may answer "no such stream" from its own view until it notices it
    has no quorum: given ``settle``, the check asks again, and a stream that is there by then is found;
    one that never comes is still refused, with the same one line."""
    from outbox.streams import ensure_streams

    name = stream_name("TICKETS")
    wanted = {name: [nats_subject("ticket:created")]}

    async def work(js):
        async def appear_later():
            await asyncio.sleep(1.5)
            await ensure_streams(js)

        creating = asyncio.ensure_future(appear_later())
        taken = await streams_check(js, wanted, settle=10)
        await creating
        await js.delete_stream(name)
        with pytest.raises(StreamNotReady, match="does not exist"):
            await streams_check(js, wanted, settle=1.5)
        return taken

    assert not stream_exists(name)
    taken = asyncio.run(_with_js(work))
    assert any(subject_matches(p, nats_subject("ticket:created")) for p in taken[name])


def test_a_listener_whose_stream_does_not_take_its_subject_exits_1_with_one_line_and_leaves_the_stream():
    tickets, created, updated = stream_name("TICKETS"), nats_subject("ticket:created"), nats_subject("ticket:updated")
    # The producer's stream as an older release left it: no ticket:updated yet.
    asyncio.run(_with_js(lambda js: js.add_stream(StreamConfig(name=tickets, subjects=[created]))))

    result = run_manage("listen", *BOTH)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"CommandError: stream {tickets} does not take {updated} (it takes {created}): run {RUN}"
    ]
    assert asyncio.run(_with_js(lambda js: js.stream_info(tickets))).config.subjects == [created]


@pytest.mark.parametrize(
    ("pattern", "subject", "takes"),
    [
        ("t.ticket:created", "t.ticket:created", True),
        ("t.ticket:created", "t.ticket:updated", False),
        ("t.*", "t.ticket:updated", True),
        ("t.*", "t.a.b", False),
        ("t.>", "t.a.b", True),
        ("t.>", "t", False),
        ("*.ticket:created", "t.ticket:created", True),
        ("t.a", "t.a.b", False),
    ],
)
def test_stream_subject_wildcards_are_matched_as_nats_does(pattern, subject, takes):
    assert subject_matches(pattern, subject) is takes
