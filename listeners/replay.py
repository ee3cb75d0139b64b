"""Replaying a dead letter through its listener, at most once: the admin action's and ``listeners_replay``'s service."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from listeners.apply import apply_message
from listeners.delivery import ACK, Decision, Delivery, event_id_of, storable_text
from listeners.models import DeadLetter, DeadLetterStatus
from listeners.registry import all_listeners


class _ReplayFailed(Exception):
    """Rolls back a replay that did not apply; carries its decision out of the savepoint."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision


def dead_letter_replay(*, dead_letter_id: int) -> Decision:
    """Apply a dead letter's (possibly corrected) payload through its listener, once.

    The payload as it was received (``raw``) is replayed unless an operator edited the
    text; the inbox row is written for the letter's consumer, so a later redelivery of
    the same event is absorbed. A replay that fails leaves the letter as it was and
    writes no second dead letter.
    """
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().get(pk=dead_letter_id)
        if letter.status != DeadLetterStatus.DEAD:
            return Decision(ACK, "already-replayed")
        candidates = [cls for cls in all_listeners() if letter.subject in cls.subjects]
        chosen = next(
            (c for c in candidates if letter.consumer == c.group or letter.consumer.startswith(f"{c.group}-")),
            None,
        ) or (candidates[0] if candidates else None)
        raw = bytes(letter.raw or b"")
        unedited = raw and letter.payload == storable_text(raw.decode("utf-8", errors="replace"))
        delivery = Delivery(
            event_name=letter.subject,
            data=raw if unedited else letter.payload.encode(),
            headers=dict(letter.headers or {}),
            stream=letter.stream,
            stream_sequence=letter.stream_sequence,
            deliveries=1,
            consumer=letter.consumer,
            listener=chosen,
        )
        delivery.headers["Nats-Msg-Id"] = letter.event_id or event_id_of(delivery)
        try:
            with transaction.atomic():
                decision = apply_message(delivery)
                if decision.action != ACK:
                    raise _ReplayFailed(decision)
        except _ReplayFailed as failed:
            return failed.decision
        letter.status = DeadLetterStatus.REPLAYED
        letter.replayed_at = timezone.now()
        letter.save(update_fields=["status", "replayed_at"])
        return decision
