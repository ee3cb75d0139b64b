"""Poison messages: whatever bytes arrive, the listener dead-letters them with the reason and goes on.

Also the handler's own failures (retried, then dead-lettered; permanent ones at once)
and the way back: a dead letter fixed by an operator and replayed, exactly once.
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
from django.core.management import CommandError, call_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listeners.apply import apply_batch
from listeners.base import Context, Listener
from listeners.delivery import ACK, NAK, TERM, Delivery
from listeners.errors import PermanentFailure
from listeners.models import DeadLetter, DeadLetterStatus, InboxEntry
from listeners.registry import listener, unregister
from listeners.replay import dead_letter_replay
from outbox.contracts import MAX_PAYLOAD_BYTES, Event, contract, registry
from outbox.streams import stream_name
from tests.listeners.helpers import (
    REPLICA,
    event_id,
    message,
    publish,
    publish_again_after_dedup_window,
    settled,
    summary,
    ticket,
)
from ticketing.replica.handlers import TicketCreatedListener, TicketUpdatedListener
from ticketing.replica.models import TicketReplica

LISTENERS = {"ticket:created": TicketCreatedListener, "ticket:updated": TicketUpdatedListener}


def listen(*args: str) -> tuple[int, dict[str, int]]:
    out = io.StringIO()
    call_command("listen", *args, stdout=out)
    return summary(out.getvalue())


def body(**fields) -> dict:
    return {"id": "t9", "version": 0, "title": "Show", "price": 1, "userId": "u", **fields}


def delivery(data: bytes, *, name: str = "ticket:created", headers: dict | None = None, **kw) -> Delivery:
    return Delivery(
        event_name=name,
        data=data,
        headers={"Nats-Msg-Id": str(uuid.uuid4())} if headers is None else headers,
        stream="T_TICKETS",
        stream_sequence=kw.pop("seq", 1),
        deliveries=kw.pop("deliveries", 1),
        consumer=REPLICA,
        listener=kw.pop("listener", LISTENERS.get(name)),
    )


# --- through NATS ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_streams")
def test_poison_messages_are_dead_lettered_with_the_reason_and_the_next_good_event_applies():
    poison = {
        "not JSON, not UTF-8, with NUL": (b"\x00\x01 not json \xff\xfe", "not valid JSON"),
        "not UTF-8 inside a string": (b'{"id":"t9","version":0,"title":"caf\xe9","price":1,"userId":"u"}', "utf-8"),
        "missing fields": (json.dumps({"id": "t9"}).encode(), "missing required field `version`"),
        "wrong types": (json.dumps(body(version="zero")).encode(), "Expected `int`, got `str` - at `$.version`"),
        # Just under the server's 1 MB max_payload, and far over the contract's 200-character title.
        "1 MB": (json.dumps(body(title="x" * 1_000_000)).encode(), "Expected `str` of length <= 200"),
        "a price the replica cannot hold": (json.dumps(body(price=1e20)).encode(), "numeric field overflow"),
        "NUL inside the title": (json.dumps(body(title="a\u0000b")).encode(), "NUL"),
    }
    bad = {label: message("ticket:created", data) for label, (data, _) in poison.items()}
    good = ticket("t9", 0)
    publish([*bad.values(), good])

    handled, counts = listen("ticket:created", "--max-messages", "8", "--idle-exit", "30")
    assert (handled, counts) == (8, {"dead:invalid": 5, "dead:data": 2, "applied": 1})

    letters = {letter.event_id: letter for letter in DeadLetter.objects.all()}
    assert len(letters) == len(poison)
    for label, (data, reason) in poison.items():
        letter = letters[event_id(bad[label])]
        assert reason in letter.error, (label, letter.error)
        assert bytes(letter.raw) == data, label
        assert (letter.consumer, letter.subject, letter.deliveries) == ("replica-ticket-created", "ticket:created", 1)
        assert letter.stream == stream_name("TICKETS") and letter.stream_sequence
        assert letter.status == DeadLetterStatus.DEAD
    assert "\x00" not in letters[event_id(bad["not JSON, not UTF-8, with NUL"])].payload
    assert TicketReplica.objects.get(pk="t9").version == 0
    assert list(InboxEntry.objects.values_list("event_id", flat=True)) == [event_id(good)]
    assert settled("replica-ticket-created")


@pytest.fixture
def boom():
    """A listener of this test alone, on a contract and stream of its own; both forgotten afterwards."""

    @contract("ltest:boom", stream="LTEST", aggregate="boom", version_field=None)
    class Boom(Event, frozen=True):
        id: str
        mode: str

    class BoomListener(Listener):
        subjects = ("ltest:boom",)
        group = "ltest"
        max_deliver = 3
        backoff = (0.05,)
        broken = True

        def handle(self, event: Boom, ctx: Context) -> str:
            if event.mode == "raise" and self.broken:
                raise RuntimeError(f"boom {event.id}")
            if event.mode == "permanent":
                raise PermanentFailure("this can never apply")
            return "applied"

    listener(BoomListener)
    try:
        yield BoomListener
    finally:
        unregister(BoomListener)
        registry._by_name.pop("ltest:boom", None)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_streams")
def test_handler_errors_are_retried_then_dead_lettered_permanent_failures_at_once(boom):
    failing, permanent, good = (message("ltest:boom", {"id": n, "mode": m}) for n, m in
                                [("a", "raise"), ("b", "permanent"), ("c", "fine")])  # fmt: skip
    publish([failing, permanent, good])

    handled, counts = listen("ltest:boom", "--max-messages", "3", "--idle-exit", "30")
    assert (handled, counts) == (3, {"dead:failed": 1, "dead:permanent": 1, "applied": 1})

    letters = {letter.event_id: letter for letter in DeadLetter.objects.all()}
    assert letters[event_id(failing)].error == "handler failed 3 times: RuntimeError: boom a"
    assert letters[event_id(failing)].deliveries == 3
    assert letters[event_id(permanent)].error == "permanent failure: this can never apply"
    assert letters[event_id(permanent)].deliveries == 1
    assert list(InboxEntry.objects.values_list("event_id", flat=True)) == [event_id(good)]
    assert settled("ltest-LTEST", "LTEST")

    # The bug is fixed: the letter, unedited, is replayed from the bytes received.
    boom.broken = False
    decision = dead_letter_replay(dead_letter_id=letters[event_id(failing)].pk)
    assert (decision.action, decision.outcome) == (ACK, "applied")
    assert InboxEntry.objects.filter(consumer="ltest-LTEST", event_id=event_id(failing)).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_streams")
def test_a_fixed_dead_letter_is_replayed_once_and_the_stream_goes_on_from_it():
    broken = message("ticket:created", body(id="t5", version="zero"))
    publish([broken])
    assert listen("ticket:created", "ticket:updated", "--max-messages", "1", "--idle-exit", "30") == (
        1,
        {"dead:invalid": 1},
    )
    letter = DeadLetter.objects.get()

    letter.payload = json.dumps(body(id="t5", version=0, title="fixed"))  # what the admin's form saves
    letter.save(update_fields=["payload"])
    decision = dead_letter_replay(dead_letter_id=letter.pk)
    assert (decision.action, decision.outcome) == (ACK, "applied")
    letter.refresh_from_db()
    assert letter.status == DeadLetterStatus.REPLAYED and letter.replayed_at is not None
    assert TicketReplica.objects.get(pk="t5").title == "fixed"
    assert dead_letter_replay(dead_letter_id=letter.pk).outcome == "already-replayed"

    # The same event arriving again (a late re-publish) is a duplicate; the next version applies on top.
    publish_again_after_dedup_window(broken)
    publish([ticket("t5", 1)])
    assert listen("ticket:created", "ticket:updated", "--max-messages", "2", "--idle-exit", "30") == (
        2,
        {"duplicate": 1, "applied": 1},
    )
    assert TicketReplica.objects.get(pk="t5").version == 1
    assert InboxEntry.objects.filter(event_id=event_id(broken)).count() == 1
    assert DeadLetter.objects.count() == 1


# --- apply_batch, without NATS --------------------------------------------------------


@pytest.mark.django_db
def test_payload_over_max_payload_bytes_is_dead_lettered_without_decoding():
    data = json.dumps(body(title="x" * MAX_PAYLOAD_BYTES)).encode()
    assert len(data) > MAX_PAYLOAD_BYTES
    [decision] = apply_batch([delivery(data)])
    assert (decision.action, decision.outcome) == (TERM, "dead:invalid")
    assert f"exceeds {MAX_PAYLOAD_BYTES}" in DeadLetter.objects.get().error


@pytest.mark.django_db
def test_a_message_for_a_subject_without_listener_is_dead_lettered():
    [decision] = apply_batch([delivery(json.dumps(body()).encode(), name="order:created", listener=None)])
    assert decision.action == TERM
    assert "no listener handles 'order:created'" in DeadLetter.objects.get().error


@pytest.mark.django_db
def test_event_ids_that_do_not_fit_the_inbox_never_collide_or_break_the_batch():
    long_a, long_b = "x" * 64 + "a", "x" * 64 + "b"
    batch = [
        delivery(json.dumps(body(id="t1")).encode(), headers={"Nats-Msg-Id": long_a}),
        delivery(json.dumps(body(id="t2")).encode(), headers={"Nats-Msg-Id": long_b}),
        delivery(json.dumps(body(id="t3")).encode(), headers={"Nats-Msg-Id": "nul\x00id"}),
        delivery(json.dumps(body(id="t4")).encode(), headers={}, seq=44),
    ]
    assert [d.outcome for d in apply_batch(batch)] == ["applied"] * 4
    assert InboxEntry.objects.values("event_id").distinct().count() == 4
    # The same deliveries again: every one recognised as already applied.
    assert [d.outcome for d in apply_batch(batch)] == ["duplicate"] * 4


# --- property: arbitrary input never escapes apply_batch -------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
plausible = {
    "id": st.sampled_from(["p1", "p2", ""]) | st.text(max_size=8),
    "version": st.integers(min_value=-1, max_value=3) | st.integers(),
    "title": st.text(max_size=12),
    "price": st.integers(min_value=-5, max_value=10**15) | st.floats() | st.text(max_size=5),
    "userId": st.text(max_size=5),
    "orderId": st.none() | st.text(max_size=5),
}
event_like = st.fixed_dictionaries({}, optional={k: v | json_values for k, v in plausible.items()})


def _utf8_broken(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\xc3"


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    event_like.map(lambda v: json.dumps(v).encode()),
    event_like.map(_utf8_broken),
)
names = st.sampled_from(["ticket:created", "ticket:updated", "order:created", "no:such"])
msg_ids = st.none() | st.text(max_size=80)


@pytest.mark.django_db
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, data=bodies, msg_id=msg_ids, deliveries=st.integers(min_value=1, max_value=25))
def test_any_bytes_end_as_an_ack_a_wait_or_a_dead_letter_and_never_block_the_batch(name, data, msg_id, deliveries):
    headers = {} if msg_id is None else {"Nats-Msg-Id": msg_id}
    garbage = delivery(data, name=name, headers=headers, deliveries=deliveries)
    good_id = f"good-{uuid.uuid4().hex[:8]}"
    good = delivery(json.dumps(body(id=good_id)).encode())
    letters_before = DeadLetter.objects.count()

    decision, after = apply_batch([garbage, good])  # never raises

    assert decision.action in (ACK, NAK, TERM)
    new_letters = DeadLetter.objects.count() - letters_before
    if decision.action == TERM:
        assert new_letters == 1 and DeadLetter.objects.order_by("-id").first().error
    else:
        assert new_letters == 0
    if decision.action == NAK:
        assert decision.outcome == "waiting" and decision.delay, decision  # only a version gap waits
    if decision.action == ACK:
        assert decision.outcome in {"applied", "stale", "duplicate"}, decision
    assert (after.action, after.outcome) == (ACK, "applied")
    assert TicketReplica.objects.filter(pk=good_id).exists()


# --- replay from the command line -----------------------------------------------------


def _letter(data: bytes, *, subject: str = "ticket:created") -> DeadLetter:
    eid = str(uuid.uuid4())
    return DeadLetter.objects.create(
        consumer=REPLICA,
        subject=subject,
        event_id=eid,
        stream="T_TICKETS",
        stream_sequence=3,
        payload=data.decode("utf-8", "replace"),
        raw=data,
        headers={"Nats-Msg-Id": eid},
        error="handler failed 20 times: OperationalError",
        deliveries=20,
    )


@pytest.mark.django_db
def test_listeners_replay_command_applies_fixable_letters_and_fails_loudly_on_the_rest():
    good = _letter(json.dumps(body(id="r1")).encode())
    bad = _letter(b"still not json")
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(CommandError, match=r"1 dead letter\(s\) could not be replayed"):
        call_command("listeners_replay", "--all", stdout=out, stderr=err)

    assert f"#{good.pk}: applied" in out.getvalue()
    assert f"#{bad.pk}: still failing (dead:invalid: ticket:created: not valid JSON" in err.getvalue()
    assert "replayed 1, still failing 1, already replayed 0" in out.getvalue()
    good.refresh_from_db()
    bad.refresh_from_db()
    assert (good.status, bad.status) == (DeadLetterStatus.REPLAYED, DeadLetterStatus.DEAD)
    assert DeadLetter.objects.count() == 2
    assert TicketReplica.objects.get(pk="r1").version == 0

    call_command("listeners_replay", str(good.pk), stdout=(out := io.StringIO()))
    assert "already replayed 1" in out.getvalue()
    with pytest.raises(CommandError, match="give dead letter ids, or --all"):
        call_command("listeners_replay")


# --- the cost of a batch --------------------------------------------------------------


@pytest.mark.django_db
def test_a_batch_costs_one_inbox_read_and_a_fixed_number_of_statements_per_message():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    # Redelivered (a batch of first deliveries for a replica listener skips the read altogether).
    batch = [delivery(json.dumps(body(id=f"q{n}")).encode(), deliveries=2) for n in range(50)]
    with CaptureQueriesContext(connection) as queries:
        decisions = apply_batch(batch)
    assert {d.outcome for d in decisions} == {"applied"}
    inbox_reads = [q for q in queries if q["sql"].startswith("SELECT") and "listeners_inboxentry" in q["sql"]]
    assert len(inbox_reads) == 1
    # Per message: SAVEPOINT, SELECT ... FOR UPDATE, INSERT replica, INSERT inbox, RELEASE SAVEPOINT.
    assert len(queries) <= 2 + 1 + 5 * len(batch), len(queries)
