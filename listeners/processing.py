"""Synchronous, database-side processing of delivered messages.

A fetched batch is applied in ONE transaction, each message inside its own
savepoint with its inbox row; the runner acks only after that transaction has
committed. One commit per batch instead of per event is what lets a listener keep
up with the relay; a failing message rolls back only its own savepoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from listeners.base import Context, Listener
from listeners.errors import NotYet, PermanentFailure
from listeners.models import DeadLetter, DeadLetterStatus, InboxEntry
from outbox import event_context
from outbox.contracts import registry
from outbox.errors import InvalidPayloadError, UnknownSubjectError

logger = logging.getLogger("listeners.events")

ACK, NAK, TERM = "ack", "nak", "term"
_FALLBACK_NS = uuid.UUID("6f1c1d8e-4a4e-4b8f-9d7e-5c2f0a9b1e11")


@dataclass
class Delivery:
    """One message as received, independent of nats-py."""

    event_name: str
    data: bytes
    headers: dict[str, str]
    stream: str
    stream_sequence: int | None
    deliveries: int
    consumer: str
    listener: type[Listener] | None = None


@dataclass
class Decision:
    action: str  # ack | nak | term
    outcome: str
    delay: float | None = None
    ms: float = 0.0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def event_id_of(delivery: Delivery) -> str:
    event_id = delivery.headers.get("Nats-Msg-Id") or delivery.headers.get("event-id")
    if event_id:
        return event_id[:64]
    # A producer that did not set an id: the stream position identifies the message.
    return str(uuid.uuid5(_FALLBACK_NS, f"{delivery.stream}:{delivery.stream_sequence}"))


def _dead_letter(delivery: Delivery, event_id: str, error: str) -> None:
    DeadLetter.objects.create(
        consumer=delivery.consumer,
        subject=delivery.event_name,
        event_id=event_id,
        stream=delivery.stream,
        stream_sequence=delivery.stream_sequence,
        payload=delivery.data.decode("utf-8", errors="replace"),
        raw=delivery.data,
        headers=delivery.headers,
        error=error[:4000],
        deliveries=delivery.deliveries,
    )


def apply_one(delivery: Delivery) -> Decision:
    """Validate and apply one message; must run inside the batch transaction."""
    started = time.perf_counter()
    event_id = event_id_of(delivery)
    listener_cls = delivery.listener
    decision: Decision
    version: Any = None
    try:
        if listener_cls is None:
            raise PermanentFailure(f"no listener handles {delivery.event_name!r} in this consumer")
        contract = registry.get(delivery.event_name)
        event = contract.decode(delivery.data)
        version = getattr(event, contract.version_field, None) if contract.version_field else None
    except (InvalidPayloadError, UnknownSubjectError, PermanentFailure) as exc:
        # A message that can never be valid is dead-lettered and terminated at once.
        _dead_letter(delivery, event_id, f"invalid message: {exc}")
        decision = Decision(TERM, "dead:invalid", error=str(exc))
    else:
        ctx = Context(
            subject=delivery.event_name,
            event_id=event_id,
            consumer=delivery.consumer,
            stream_sequence=delivery.stream_sequence,
            deliveries=delivery.deliveries,
            headers=delivery.headers,
        )
        decision = _handle(listener_cls, event, ctx, delivery)
    decision.ms = (time.perf_counter() - started) * 1000
    logger.info(
        "listener.event subject=%s event_id=%s version=%s outcome=%s deliveries=%d ms=%.2f%s",
        delivery.event_name,
        event_id,
        version,
        decision.outcome,
        delivery.deliveries,
        decision.ms,
        f" error={decision.error!r}" if decision.error else "",
    )
    return decision


def _handle(listener_cls: type[Listener], event: Any, ctx: Context, delivery: Delivery) -> Decision:
    if InboxEntry.objects.filter(consumer=ctx.consumer, event_id=ctx.event_id).exists():
        return Decision(ACK, "duplicate")
    correlation = ctx.headers.get("correlation-id") or ctx.event_id
    try:
        with transaction.atomic():
            InboxEntry.objects.create(
                consumer=ctx.consumer,
                event_id=ctx.event_id,
                subject=ctx.subject,
                stream_sequence=ctx.stream_sequence,
                outcome="applied",
            )
            with event_context(correlation_id=correlation, causation_id=ctx.event_id):
                outcome = listener_cls().handle(event, ctx) or "applied"
            if outcome != "applied":
                InboxEntry.objects.filter(consumer=ctx.consumer, event_id=ctx.event_id).update(outcome=outcome[:32])
        return Decision(ACK, outcome)
    except IntegrityError as exc:
        if InboxEntry.objects.filter(consumer=ctx.consumer, event_id=ctx.event_id).exists():
            return Decision(ACK, "duplicate")
        return _failure(listener_cls, ctx, delivery, exc)
    except NotYet as exc:
        if ctx.deliveries >= listener_cls.max_deliver:
            _dead_letter(delivery, ctx.event_id, f"gave up waiting after {ctx.deliveries} deliveries: {exc}")
            return Decision(TERM, "dead:gap", error=str(exc))
        return Decision(NAK, "waiting", delay=listener_cls.gap_retry_delay(ctx.deliveries), error=str(exc))
    except PermanentFailure as exc:
        _dead_letter(delivery, ctx.event_id, f"permanent failure: {exc}")
        return Decision(TERM, "dead:permanent", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the listener
        return _failure(listener_cls, ctx, delivery, exc)


def _failure(listener_cls: type[Listener], ctx: Context, delivery: Delivery, exc: Exception) -> Decision:
    error = f"{type(exc).__name__}: {exc}"
    if ctx.deliveries >= listener_cls.max_deliver:
        _dead_letter(delivery, ctx.event_id, f"handler failed {ctx.deliveries} times: {error}")
        return Decision(TERM, "dead:failed", error=error)
    return Decision(NAK, "retry", delay=listener_cls.retry_delay(ctx.deliveries), error=error)


def apply_batch(deliveries: list[Delivery]) -> list[Decision]:
    """Apply a batch in one transaction; the caller acks after this returns."""
    with transaction.atomic():
        return [apply_one(d) for d in deliveries]


def dead_letter_replay(*, dead_letter_id: int) -> Decision:
    """Apply a dead letter's (possibly corrected) payload through its listener, once."""
    from listeners.registry import all_listeners

    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().get(pk=dead_letter_id)
        if letter.status != DeadLetterStatus.DEAD:
            return Decision(ACK, "already-replayed")
        candidates = [cls for cls in all_listeners() if letter.subject in cls.subjects]
        chosen = next((c for c in candidates if letter.consumer.startswith(c.group)), None) or (
            candidates[0] if candidates else None
        )
        delivery = Delivery(
            event_name=letter.subject,
            data=letter.payload.encode(),
            headers=dict(letter.headers or {}),
            stream=letter.stream,
            stream_sequence=letter.stream_sequence,
            deliveries=1,
            consumer=letter.consumer,
            listener=chosen,
        )
        event_id = letter.event_id or event_id_of(delivery)
        delivery.headers["Nats-Msg-Id"] = event_id
        try:
            with transaction.atomic():
                decision = apply_one(delivery)
                if decision.action != ACK:
                    raise _Rollback(decision)
        except _Rollback as rb:
            return rb.decision
        letter.status = DeadLetterStatus.REPLAYED
        letter.replayed_at = timezone.now()
        letter.save(update_fields=["status", "replayed_at"])
        return decision


class _Rollback(Exception):
    def __init__(self, decision: Decision) -> None:
        self.decision = decision
