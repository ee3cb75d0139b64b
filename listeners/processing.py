"""Synchronous, database-side processing of delivered messages.

A fetched batch is applied in ONE transaction, each message inside its own
savepoint with its inbox row; the runner acks only after that transaction has
committed. One commit per batch instead of per event is what lets a listener keep
up with the relay; a failing message rolls back only its own savepoint.

Round trips per message: the savepoint, the listener's own queries and one inbox
INSERT. Which events of the batch were already applied is read with ONE query per
batch, not one per message.

Nothing a message carries can make :func:`apply_one` raise: bytes that are not
JSON, not UTF-8, that break the contract or that the database refuses are
dead-lettered (and terminated); only a broken database connection escapes, and
then the whole batch is retried by the runner without spending a delivery.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.db import DataError, IntegrityError, transaction
from django.utils import timezone

from listeners.base import Context, Listener
from listeners.errors import NotYet, PermanentFailure, TransactionBroken
from listeners.models import DeadLetter, DeadLetterStatus, InboxEntry
from outbox import event_context
from outbox.contracts import registry

logger = logging.getLogger("listeners.events")

ACK, NAK, TERM = "ack", "nak", "term"
_FALLBACK_NS = uuid.UUID("6f1c1d8e-4a4e-4b8f-9d7e-5c2f0a9b1e11")
#: InboxEntry.event_id / DeadLetter.event_id length.
EVENT_ID_MAX = 64


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


def _text(value: Any) -> str:
    """PostgreSQL text and jsonb cannot hold NUL: replace it, keep everything else."""
    return str(value).replace("\x00", "\ufffd")


def event_id_of(delivery: Delivery) -> str:
    """The inbox key: the event id the producer put in ``Nats-Msg-Id`` (the relay: the outbox row's UUID).

    The relay sets ``Nats-Msg-Id`` and ``event-id`` to the same UUID; ``event-id`` is
    the fallback for a producer that sets only that one. An id that does not fit the
    inbox column (too long, or with characters PostgreSQL refuses) is replaced by a
    UUID derived from it, so two different ids never collide by truncation.
    """
    event_id = delivery.headers.get("Nats-Msg-Id") or delivery.headers.get("event-id")
    if event_id:
        if len(event_id) <= EVENT_ID_MAX and "\x00" not in event_id:
            return event_id
        return str(uuid.uuid5(_FALLBACK_NS, f"id:{event_id}"))
    # A producer that did not set an id: the stream position identifies the message.
    return str(uuid.uuid5(_FALLBACK_NS, f"{delivery.stream}:{delivery.stream_sequence}"))


def _dead_letter(delivery: Delivery, event_id: str, error: str) -> None:
    """Record a message the listener gives up on, in its own savepoint (the batch goes on)."""
    fields = {
        "consumer": _text(delivery.consumer)[:200],
        "subject": _text(delivery.event_name)[:200],
        "event_id": event_id,
        "stream": _text(delivery.stream)[:100],
        "stream_sequence": delivery.stream_sequence,
        "raw": bytes(delivery.data),
        "error": _text(error)[:4000],
        "deliveries": delivery.deliveries,
    }
    try:
        with transaction.atomic():
            DeadLetter.objects.create(
                payload=_text(delivery.data.decode("utf-8", errors="replace")),
                headers={_text(k): _text(v) for k, v in delivery.headers.items()},
                **fields,
            )
    except DataError as exc:
        # Keep the exact bytes and the reason even when the text copy cannot be stored.
        fields["error"] = _text(f"{error} (payload text not stored: {exc})")[:4000]
        with transaction.atomic():
            DeadLetter.objects.create(payload="", headers={}, **fields)


def apply_one(delivery: Delivery, *, applied: set[tuple[str, str]] | None = None) -> Decision:
    """Validate and apply one message; must run inside the batch transaction.

    ``applied`` is the set of (consumer, event id) already in the inbox, read once
    for the batch by :func:`apply_batch` and kept up to date here; without it the
    inbox is asked for this message alone.
    """
    started = time.perf_counter()
    event_id = event_id_of(delivery)
    listener_cls = delivery.listener
    version: Any = delivery.headers.get("aggregate-version")  # until the payload itself is read
    decision: Decision
    # Identity first: an event this consumer already applied is acked whatever the copy holds
    # (e.g. the original, broken bytes of a dead letter that was fixed and replayed).
    if _seen(delivery.consumer, event_id, applied):
        decision = Decision(ACK, "duplicate")
    else:
        try:
            if listener_cls is None:
                raise PermanentFailure(f"no listener handles {delivery.event_name!r} in this consumer")
            contract = registry.get(delivery.event_name)
            event = contract.decode(delivery.data)
            version = getattr(event, contract.version_field, None) if contract.version_field else None
        except Exception as exc:  # noqa: BLE001 - whatever the bytes do to the decoder, the message is invalid
            # A message that can never be valid is dead-lettered and terminated at once.
            error = _describe(exc)
            _dead_letter(delivery, event_id, f"invalid message: {error}")
            decision = Decision(TERM, "dead:invalid", error=error)
        else:
            ctx = Context(
                subject=delivery.event_name,
                event_id=event_id,
                consumer=delivery.consumer,
                stream_sequence=delivery.stream_sequence,
                deliveries=delivery.deliveries,
                headers=delivery.headers,
            )
            decision = _handle(listener_cls, event, ctx, delivery, applied)
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


def _seen(consumer: str, event_id: str, applied: set[tuple[str, str]] | None) -> bool:
    if applied is not None:
        return (consumer, event_id) in applied
    return InboxEntry.objects.filter(consumer=consumer, event_id=event_id).exists()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text and not isinstance(exc, UnicodeError) else f"{type(exc).__name__}: {exc}"


def _handle(
    listener_cls: type[Listener],
    event: Any,
    ctx: Context,
    delivery: Delivery,
    applied: set[tuple[str, str]] | None,
) -> Decision:
    key = (ctx.consumer, ctx.event_id)
    correlation = ctx.headers.get("correlation-id") or ctx.event_id
    try:
        with transaction.atomic():
            with event_context(correlation_id=correlation, causation_id=ctx.event_id):
                outcome = listener_cls().handle(event, ctx) or "applied"
            # The inbox row commits with the handler's writes or not at all. Its unique
            # constraint is the last line against a concurrent copy of the same event
            # (another process sharing the durable): the loser's savepoint rolls back.
            InboxEntry.objects.create(
                consumer=ctx.consumer,
                event_id=ctx.event_id,
                subject=ctx.subject,
                stream_sequence=ctx.stream_sequence,
                outcome=outcome[:32],
            )
        if applied is not None:
            applied.add(key)
        return Decision(ACK, outcome)
    except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the listener
        _ensure_committable(exc)
        return _handler_failed(listener_cls, ctx, delivery, applied, exc)


def _handler_failed(
    listener_cls: type[Listener],
    ctx: Context,
    delivery: Delivery,
    applied: set[tuple[str, str]] | None,
    exc: Exception,
) -> Decision:
    if isinstance(exc, IntegrityError):
        if InboxEntry.objects.filter(consumer=ctx.consumer, event_id=ctx.event_id).exists():
            if applied is not None:
                applied.add((ctx.consumer, ctx.event_id))
            return Decision(ACK, "duplicate")
        return _failure(listener_cls, ctx, delivery, exc)
    if isinstance(exc, NotYet):
        if ctx.deliveries >= listener_cls.max_deliver:
            _dead_letter(delivery, ctx.event_id, f"gave up waiting after {ctx.deliveries} deliveries: {exc}")
            return Decision(TERM, "dead:gap", error=str(exc))
        return Decision(NAK, "waiting", delay=listener_cls.gap_retry_delay(ctx.deliveries), error=str(exc))
    if isinstance(exc, PermanentFailure):
        _dead_letter(delivery, ctx.event_id, f"permanent failure: {exc}")
        return Decision(TERM, "dead:permanent", error=str(exc))
    if isinstance(exc, DataError):
        # The database refuses a value of this event (out of range, NUL in text...): no retry will change that.
        error = f"DataError: {exc}".strip()
        _dead_letter(delivery, ctx.event_id, f"the database refused the event: {error}")
        return Decision(TERM, "dead:data", error=error)
    return _failure(listener_cls, ctx, delivery, exc)


def _ensure_committable(cause: BaseException | None = None) -> None:
    """Raise TransactionBroken when the batch transaction can no longer commit.

    A message's failure is contained by its savepoint. When the connection itself is
    gone, rolling back to the savepoint fails and Django only marks the transaction
    for rollback, which ``atomic`` then performs *silently* at exit: the decisions of
    the messages before would say "applied" for work that was never committed.
    """
    conn = transaction.get_connection()
    if conn.needs_rollback or conn.closed_in_transaction:
        reason = cause or "marked for rollback"
        raise TransactionBroken(f"the batch transaction cannot commit any more: {reason}") from cause


def _failure(listener_cls: type[Listener], ctx: Context, delivery: Delivery, exc: Exception) -> Decision:
    error = f"{type(exc).__name__}: {exc}"
    if ctx.deliveries >= listener_cls.max_deliver:
        _dead_letter(delivery, ctx.event_id, f"handler failed {ctx.deliveries} times: {error}")
        return Decision(TERM, "dead:failed", error=error)
    return Decision(NAK, "retry", delay=listener_cls.retry_delay(ctx.deliveries), error=error)


def _already_applied(deliveries: list[Delivery]) -> set[tuple[str, str]]:
    """(consumer, event id) of the batch already in the inbox: one query for the whole batch."""
    consumers = {d.consumer for d in deliveries}
    event_ids = {event_id_of(d) for d in deliveries}
    rows = InboxEntry.objects.filter(consumer__in=consumers, event_id__in=event_ids).values_list("consumer", "event_id")
    return set(rows)


def _lock_order(deliveries: list[Delivery]) -> list[int]:
    """Indexes of the batch grouped by aggregate (relay headers), stable within one aggregate.

    Two processes sharing a durable lock the rows of the aggregates in their batches;
    taking them in one global order keeps them from deadlocking each other. Events of
    one aggregate keep their stream order, so version order is unchanged.
    """

    def key(i: int) -> tuple[str, str]:
        headers = deliveries[i].headers
        return headers.get("aggregate-type", ""), headers.get("aggregate-id", "")

    return sorted(range(len(deliveries)), key=key)


def apply_batch(deliveries: list[Delivery]) -> list[Decision]:
    """Apply a batch in one transaction; the caller acks after this returns.

    Decisions come back in the order of ``deliveries``.
    """
    decisions: list[Decision | None] = [None] * len(deliveries)
    with transaction.atomic():
        applied = _already_applied(deliveries)
        for i in _lock_order(deliveries):
            decisions[i] = apply_one(deliveries[i], applied=applied)
        _ensure_committable()
    return decisions  # type: ignore[return-value]


def dead_letter_replay(*, dead_letter_id: int) -> Decision:
    """Apply a dead letter's (possibly corrected) payload through its listener, once.

    The payload as it was received (``raw``) is replayed unless an operator edited the
    text; the inbox row is written for the letter's consumer, so a later redelivery of
    the same event is absorbed. A replay that fails leaves the letter as it was and
    writes no second dead letter.
    """
    from listeners.registry import all_listeners

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
        unedited = raw and letter.payload == _text(raw.decode("utf-8", errors="replace"))
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
