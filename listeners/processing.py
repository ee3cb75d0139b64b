"""Synchronous, database-side processing of delivered messages.

A fetched batch is applied in ONE transaction; the runner acks only after that
transaction has committed. One commit per batch instead of per event is what lets
a listener keep up with the relay.

Two ways through a batch, same guarantees:

* **set-based** (listeners that implement :meth:`Listener.handle_batch`, e.g. every
  :class:`listeners.base.VersionedReplicaListener`): the events of one batch group go
  to one ``handle_batch`` call, and their inbox rows are written with one INSERT — a
  fixed number of statements per batch instead of ~5 per event, and no savepoint:
  when a ``handle_batch`` call raises, the whole batch transaction is rolled back and
  run again with that group on the per-message path;
* **per message** (plain ``handle`` listeners, and that fallback): each message in its
  own savepoint with its inbox row, so a failing message rolls back only itself.

Which events of the batch were already applied is read with ONE query per batch,
not one per message — and not at all for a batch of first deliveries to listeners
that allow it (see :func:`apply_batch`): the inbox's unique constraint stands guard.

Nothing a message carries can make :func:`apply_batch` raise: bytes that are not
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

from django.db import DataError, IntegrityError, InterfaceError, OperationalError, transaction
from django.utils import timezone

from listeners.base import Context, Listener, rows_source, set_cursor
from listeners.errors import NotYet, PermanentFailure, TransactionBroken
from listeners.models import DeadLetter, DeadLetterStatus, InboxEntry
from outbox import event_context
from outbox.contracts import registry

logger = logging.getLogger("listeners.events")

ACK, NAK, TERM = "ack", "nak", "term"
_FALLBACK_NS = uuid.UUID("6f1c1d8e-4a4e-4b8f-9d7e-5c2f0a9b1e11")
#: InboxEntry.event_id / DeadLetter.event_id length.
EVENT_ID_MAX = 64


@dataclass(slots=True)
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


@dataclass(slots=True)
class _Item:
    """A delivery on its way through :func:`apply_batch`: decoded, or already decided."""

    delivery: Delivery
    event_id: str
    version: Any
    started: float
    event: Any = None
    ctx: Context | None = None
    decision: Decision | None = None


class _ReadInboxFirst(Exception):
    """An attempt without the inbox read met what only that read can decide: run the batch again with it."""


def _prepare(delivery: Delivery, applied: set[tuple[str, str]] | None, *, read: bool = True) -> _Item:
    """Identity and validity: decide duplicates and invalid messages, decode the rest.

    ``read=False``: ``applied`` was not read from the inbox, so an invalid message may be
    the broken copy of an event applied since (dead letter fixed and replayed): raise
    :class:`_ReadInboxFirst` instead of dead-lettering it.
    """
    item = _Item(delivery, event_id_of(delivery), delivery.headers.get("aggregate-version"), time.perf_counter())
    # Identity first: an event this consumer already applied is acked whatever the copy holds
    # (e.g. the original, broken bytes of a dead letter that was fixed and replayed).
    if _seen(delivery.consumer, item.event_id, applied):
        item.decision = Decision(ACK, "duplicate")
        return item
    try:
        if delivery.listener is None:
            raise PermanentFailure(f"no listener handles {delivery.event_name!r} in this consumer")
        contract = registry.get(delivery.event_name)
        item.event = contract.decode(delivery.data)
        item.version = getattr(item.event, contract.version_field, None) if contract.version_field else None
    except Exception as exc:  # noqa: BLE001 - whatever the bytes do to the decoder, the message is invalid
        if not read:
            raise _ReadInboxFirst from exc
        # A message that can never be valid is dead-lettered and terminated at once.
        error = _describe(exc)
        _dead_letter(delivery, item.event_id, f"invalid message: {error}")
        item.decision = Decision(TERM, "dead:invalid", error=error)
        return item
    item.ctx = Context(
        subject=delivery.event_name,
        event_id=item.event_id,
        consumer=delivery.consumer,
        stream_sequence=delivery.stream_sequence,
        deliveries=delivery.deliveries,
        headers=delivery.headers,
    )
    return item


def _handle_one(item: _Item, applied: set[tuple[str, str]] | None) -> None:
    """The per-message path: the handler and the inbox row in a savepoint of their own."""
    item.decision = _handle(item.delivery.listener, item.event, item.ctx, item.delivery, applied)  # type: ignore[arg-type]
    item.decision.ms = (time.perf_counter() - item.started) * 1000


def _log(item: _Item) -> None:
    decision = item.decision
    assert decision is not None
    logger.info(
        "listener.event subject=%s event_id=%s version=%s outcome=%s deliveries=%d ms=%.2f%s",
        item.delivery.event_name,
        item.event_id,
        item.version,
        decision.outcome,
        item.delivery.deliveries,
        decision.ms,
        f" error={decision.error!r}" if decision.error else "",
    )


def apply_one(delivery: Delivery, *, applied: set[tuple[str, str]] | None = None) -> Decision:
    """Validate and apply one message through the per-message path; must run inside a transaction.

    ``applied`` is the set of (consumer, event id) already in the inbox, read once
    for the batch and kept up to date here; without it the inbox is asked for this
    message alone.
    """
    item = _prepare(delivery, applied)
    if item.decision is None:
        _handle_one(item, applied)
    else:
        item.decision.ms = (time.perf_counter() - item.started) * 1000
    _log(item)
    return item.decision  # type: ignore[return-value]


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
        if ctx.deliveries >= listener_cls.max_gap_deliveries:
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


def _ensure_connected(cause: BaseException) -> None:
    """Raise TransactionBroken when the connection itself failed (not a statement of the batch).

    Without a savepoint, nothing else tells the two apart in time: Django reconnects
    while it closes the transaction, and the next attempt would run — quietly — on a
    new connection. A lost connection is the runner's to retry, and to report.
    """
    if _connection_lost(cause):
        raise TransactionBroken(f"the batch transaction cannot commit any more: {cause}") from cause


def _connection_lost(exc: BaseException) -> bool:
    raw = transaction.get_connection().connection
    if raw is None or getattr(raw, "broken", False) or getattr(raw, "closed", False):
        return True
    if isinstance(exc, InterfaceError):
        return True
    driver_error = exc.__cause__
    if isinstance(exc, OperationalError) and hasattr(driver_error, "sqlstate"):
        # The server's message can be read before the closed socket is: go by the error too.
        # No SQLSTATE: the client lost the server; 08: connection exception; 57P: the session
        # was terminated (admin or crash shutdown). Deadlocks, timeouts ... have their own.
        sqlstate = driver_error.sqlstate  # type: ignore[union-attr]
        return sqlstate is None or sqlstate.startswith(("08", "57P"))
    return False


def _failure(listener_cls: type[Listener], ctx: Context, delivery: Delivery, exc: Exception) -> Decision:
    error = f"{type(exc).__name__}: {exc}"
    if ctx.deliveries >= listener_cls.max_deliver:
        _dead_letter(delivery, ctx.event_id, f"handler failed {ctx.deliveries} times: {error}")
        return Decision(TERM, "dead:failed", error=error)
    return Decision(NAK, "retry", delay=listener_cls.retry_delay(ctx.deliveries), error=error)


def _already_applied(deliveries: list[Delivery]) -> set[tuple[str, str]]:
    """(consumer, event id) of the batch already in the inbox: one query for the whole batch."""
    consumers = sorted({d.consumer for d in deliveries})
    event_ids = sorted({event_id_of(d) for d in deliveries})
    if transaction.get_connection().vendor != "postgresql":  # SQLite (the demo): the portable query
        return set(
            InboxEntry.objects.filter(consumer__in=consumers, event_id__in=event_ids).values_list(
                "consumer", "event_id"
            )
        )
    with set_cursor() as cursor:
        # Arrays, not IN (...): one parameter per list, whatever the batch size.
        cursor.execute(
            f"SELECT consumer, event_id FROM {InboxEntry._meta.db_table} "  # noqa: S608 - the model's table
            "WHERE consumer = ANY(%s::varchar[]) AND event_id = ANY(%s::varchar[])",
            [consumers, event_ids],
        )
        return set(cursor.fetchall())


def _failed(outcome: Any) -> bool:
    return isinstance(outcome, BaseException)


def _insert_inbox(done: list[tuple[_Item, str]]) -> None:
    """The inbox rows of a set, in one INSERT, in application order (their ids follow it)."""
    if not done:
        return
    now = timezone.now()
    exprs, source, params = rows_source(
        [
            ("event_id", "varchar", [item.event_id for item, _ in done]),
            ("consumer", "varchar", [item.delivery.consumer for item, _ in done]),
            ("subject", "varchar", [item.delivery.event_name for item, _ in done]),
            ("stream_sequence", "bigint", [item.delivery.stream_sequence for item, _ in done]),
            ("outcome", "varchar", [outcome[:32] for _, outcome in done]),
            ("processed_at", "timestamptz", [now] * len(done)),
        ]
    )
    with set_cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {InboxEntry._meta.db_table} "  # noqa: S608 - the model's table
            "(event_id, consumer, subject, stream_sequence, outcome, processed_at) "
            f"SELECT {', '.join(exprs)} FROM {source} ORDER BY v._n",
            params,
        )


def _lock_key(item: _Item) -> tuple[str, str]:
    """Per-message order: grouped by aggregate (relay headers), stable within one aggregate.

    Two processes sharing a durable lock the rows of the aggregates in their batches;
    taking them in one global order keeps them from deadlocking each other. Events of
    one aggregate keep their stream order, so version order is unchanged.
    """
    headers = item.delivery.headers
    return headers.get("aggregate-type", ""), headers.get("aggregate-id", "")


class _SetFailed(Exception):
    """A batch group's set path raised: the batch transaction is rolled back and run again without it."""

    def __init__(self, group: Any, listener_cls: type[Listener], messages: int) -> None:
        super().__init__(group)
        self.group, self.listener_cls, self.messages = group, listener_cls, messages


def _apply_group(group: Any, items: list[_Item], applied: set[tuple[str, str]], *, read: bool = True) -> None:
    """The set-based path: one ``handle_batch`` call and one inbox INSERT, with no savepoint of their own.

    A savepoint around them would cost two round trips (SAVEPOINT, RELEASE) in every
    batch to save work only in the rare batch where the set path fails. Instead, if
    anything in it raises, the whole batch transaction is rolled back and
    :func:`apply_batch` runs it again with this group on the per-message path, which
    gives each event its own outcome (dead letter, retry, duplicate).

    ``read=False`` (the inbox was not read): anything but a clean success — an event
    the listener did not apply, or the inbox INSERT meeting an event applied before —
    raises :class:`_ReadInboxFirst` instead, to decide it with the inbox read.
    """
    listener_cls = items[0].delivery.listener
    assert listener_cls is not None
    started = time.perf_counter()
    try:
        outcomes = listener_cls().handle_batch([i.event for i in items], [i.ctx for i in items])  # type: ignore[misc]
        if len(outcomes) != len(items):
            raise RuntimeError(f"handle_batch returned {len(outcomes)} outcomes for {len(items)} events")
        if not read and any(_failed(outcome) for outcome in outcomes):
            raise _ReadInboxFirst
        _insert_inbox([(item, outcome or "applied") for item, outcome in zip(items, outcomes, strict=True)
                       if not _failed(outcome)])  # fmt: skip
    except _ReadInboxFirst:
        raise
    except Exception as exc:  # noqa: BLE001 - the per-message path sorts out which event it was
        _ensure_connected(exc)
        if not read:
            raise _ReadInboxFirst from exc
        raise _SetFailed(group, listener_cls, len(items)) from exc
    share = (time.perf_counter() - started) * 1000 / len(items)
    for item, outcome in zip(items, outcomes, strict=True):
        if _failed(outcome):
            item.decision = _handler_failed(listener_cls, item.ctx, item.delivery, applied, outcome)  # type: ignore[arg-type]
        else:
            applied.add((item.delivery.consumer, item.event_id))
            item.decision = Decision(ACK, outcome or "applied")
        item.decision.ms = (started - item.started) * 1000 + share


def apply_batch(deliveries: list[Delivery]) -> list[Decision]:
    """Apply a batch in one transaction; the caller acks after this returns.

    Decisions come back in the order of ``deliveries``; the per-event log lines are
    written after the commit, in that order too. When a group's set path fails, the
    transaction is rolled back and the batch applied again with that group's events
    on the per-message path (at most once per group).

    Which events were applied before is read from the inbox first — except in a batch
    of first deliveries for listeners that allow it (:attr:`Listener.batch_sees_duplicates`):
    a first delivery is almost never a duplicate, and if it is, the inbox's unique
    constraint refuses its row and the attempt is rolled back whole and run again with
    the read. One round trip less per batch in the steady flow.
    """
    read = not _may_skip_inbox_read(deliveries)
    per_message: set[Any] = set()
    while True:
        try:
            items = _apply_batch(deliveries, per_message, read=read)
        except _ReadInboxFirst:
            read = True
            continue
        except _SetFailed as failed:
            # Nothing of this attempt was kept. (A lost connection is not a set failure: it
            # raises TransactionBroken, and the runner retries the batch as a whole.)
            cause = failed.__cause__
            logger.info(
                "listener.batch_fallback listener=%s messages=%d error=%s: %s",
                failed.listener_cls.__name__,
                failed.messages,
                type(cause).__name__,
                str(cause).splitlines()[0][:300] if str(cause) else "",
            )
            per_message.add(failed.group)
            continue
        break
    if logger.isEnabledFor(logging.INFO):
        for item in items:
            _log(item)
    return [item.decision for item in items]  # type: ignore[misc]


def _may_skip_inbox_read(deliveries: list[Delivery]) -> bool:
    """First deliveries only, all for set-path listeners that allow it, on PostgreSQL."""
    if transaction.get_connection().vendor != "postgresql":
        return False
    for d in deliveries:
        listener = d.listener
        if d.deliveries != 1 or listener is None or not listener.batch_sees_duplicates:
            return False
        if listener.batch_group() is None:
            return False
    return True


def _apply_batch(deliveries: list[Delivery], per_message: set[Any], *, read: bool) -> list[_Item]:
    """One attempt at the batch transaction; the groups in ``per_message`` skip their set path."""
    with transaction.atomic():
        applied = _already_applied(deliveries) if read else set()
        postgres = transaction.get_connection().vendor == "postgresql"
        items = [_prepare(d, applied, read=read) for d in deliveries]
        groups: dict[Any, list[_Item]] = {}
        single: list[_Item] = []
        later: list[_Item] = []  # a second copy of an event of this batch: decided after the first
        claimed: set[tuple[str, str]] = set()
        for item in items:
            if item.decision is not None:
                item.decision.ms = (time.perf_counter() - item.started) * 1000
                continue
            key = (item.delivery.consumer, item.event_id)
            if key in claimed:
                later.append(item)
                continue
            claimed.add(key)
            # The set path binds arrays on a PostgreSQL cursor; elsewhere (SQLite) every message goes alone.
            group = item.delivery.listener.batch_group() if postgres else None  # type: ignore[union-attr]
            if group is None:
                single.append(item)
            else:
                groups.setdefault(group, []).append(item)
        for group in sorted(groups, key=repr):
            if group in per_message:
                for item in sorted(groups[group], key=_lock_key):
                    _handle_one(item, applied)
            else:
                _apply_group(group, groups[group], applied, read=read)
        for item in sorted(single, key=_lock_key):
            _handle_one(item, applied)
        for item in later:
            if _seen(item.delivery.consumer, item.event_id, applied):
                item.decision = Decision(ACK, "duplicate", ms=(time.perf_counter() - item.started) * 1000)
            else:
                _handle_one(item, applied)
        _ensure_committable()
    return items


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
