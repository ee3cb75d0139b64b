"""The apply algorithm: a batch of deliveries applied in one transaction, a :class:`Decision` per message.

The run loop acks only after :func:`apply_batch` returned, i.e. after the commit. One
commit per batch instead of per event is what lets a listener keep up with the relay.

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
then the run loop retries the whole batch without spending a delivery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from django.db import DataError, IntegrityError, transaction

from listeners import tracing
from listeners.base import Context, Listener
from listeners.db_health import ensure_committable, ensure_connected
from listeners.delivery import ACK, NAK, TERM, Decision, Delivery, event_id_of
from listeners.errors import NotYet, PermanentFailure
from listeners.inbox import Applied, inbox_has, inbox_read_batch, inbox_record, inbox_record_set
from listeners.services import dead_letter_create
from outbox import event_context
from outbox.contracts import registry

logger = logging.getLogger("listeners.events")


@dataclass(slots=True)
class _Pending:
    """A delivery on its way through :func:`apply_batch`: decoded, or already decided."""

    delivery: Delivery
    event_id: str
    version: Any
    started: float
    event: Any = None
    ctx: Context | None = None
    decision: Decision | None = None
    #: ``trace_id``/``span_id`` of the message's span (tracing on), for its log line.
    trace: dict[str, str] | None = None


class _ReadInboxFirst(Exception):
    """An attempt without the inbox read met what only that read can decide: run the batch again with it."""


class _SetPathFailed(Exception):
    """A batch group's set path raised: the batch transaction is rolled back and run again without it."""

    def __init__(self, group: Any, listener_cls: type[Listener], messages: int) -> None:
        super().__init__(group)
        self.group, self.listener_cls, self.messages = group, listener_cls, messages


# --- the batch ------------------------------------------------------------------------


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

    On ``outbox.backends.postgresql`` the inbox INSERT of a batch whose last step is a set
    travels with the COMMIT; a row recorded before (or concurrently, by a process sharing
    the durable) then fails the commit, and the batch is run again reading the inbox first.
    """
    read = not _may_skip_inbox_read(deliveries)
    per_message: set[Any] = set()
    commit_refused = False
    while True:
        try:
            items = _attempt_batch(deliveries, per_message, read=read)
        except _ReadInboxFirst:
            read = True
            continue
        except IntegrityError:
            # Only the rows sent with the commit can fail there (an earlier statement's failure is
            # decided inside the attempt): the inbox's, refused. Read it and try once more.
            if read and commit_refused:
                raise
            read = commit_refused = True
            continue
        except _SetPathFailed as failed:
            # Nothing of this attempt was kept. (A lost connection is not a set failure: it
            # raises TransactionBroken, and the run loop retries the batch as a whole.)
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
            _log_decision(item)
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


def _attempt_batch(deliveries: list[Delivery], per_message: set[Any], *, read: bool) -> list[_Pending]:
    """One attempt at the batch transaction; the groups in ``per_message`` skip their set path."""
    with transaction.atomic():
        applied = inbox_read_batch(deliveries) if read else set()
        postgres = transaction.get_connection().vendor == "postgresql"
        items = [_decode_or_decide(d, applied, read=read) for d in deliveries]
        groups: dict[Any, list[_Pending]] = {}
        single: list[_Pending] = []
        later: list[_Pending] = []  # a second copy of an event of this batch: decided after the first
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
        ordered = sorted(groups, key=repr)
        for group in ordered:
            if group in per_message:
                for item in sorted(groups[group], key=_aggregate_order):
                    _apply_per_message(item, applied)
            else:
                last = group is ordered[-1] and not single and not later
                _apply_group_as_set(group, groups[group], applied, read=read, last=last)
        for item in sorted(single, key=_aggregate_order):
            _apply_per_message(item, applied)
        for item in later:
            if inbox_has(item.delivery.consumer, item.event_id, applied):
                item.decision = Decision(ACK, "duplicate", ms=(time.perf_counter() - item.started) * 1000)
            else:
                _apply_per_message(item, applied)
        ensure_committable()
    return items


def _aggregate_order(item: _Pending) -> tuple[str, str]:
    """Per-message order: grouped by aggregate (relay headers), stable within one aggregate.

    Two processes sharing a durable lock the rows of the aggregates in their batches;
    taking them in one global order keeps them from deadlocking each other. Events of
    one aggregate keep their stream order, so version order is unchanged.
    """
    headers = item.delivery.headers
    return headers.get("aggregate-type", ""), headers.get("aggregate-id", "")


# --- the set path ---------------------------------------------------------------------


def _apply_group_as_set(
    group: Any, items: list[_Pending], applied: Applied, *, read: bool = True, last: bool = False
) -> None:
    """The set-based path: one ``handle_batch`` call and one inbox INSERT, with no savepoint of their own.

    A savepoint around them would cost two round trips (SAVEPOINT, RELEASE) in every
    batch to save work only in the rare batch where the set path fails. Instead, if
    anything in it raises, the whole batch transaction is rolled back and
    :func:`apply_batch` runs it again with this group on the per-message path, which
    gives each event its own outcome (dead letter, retry, duplicate).

    ``read=False`` (the inbox was not read): anything but a clean success — an event
    the listener did not apply, or the inbox INSERT meeting an event applied before —
    raises :class:`_ReadInboxFirst` instead, to decide it with the inbox read.

    ``last``: nothing of the batch follows; the inbox rows may go with the COMMIT.
    """
    listener_cls = items[0].delivery.listener
    assert listener_cls is not None
    started, started_ns = time.perf_counter(), time.time_ns()
    try:
        outcomes = listener_cls().handle_batch([i.event for i in items], [i.ctx for i in items])  # type: ignore[misc]
        if len(outcomes) != len(items):
            raise RuntimeError(f"handle_batch returned {len(outcomes)} outcomes for {len(items)} events")
        if not read and any(_is_exception_outcome(outcome) for outcome in outcomes):
            raise _ReadInboxFirst
        inbox_record_set([(item.delivery, item.event_id, cast(str, outcome) or "applied")
                          for item, outcome in zip(items, outcomes, strict=True)
                          if not _is_exception_outcome(outcome)], with_commit=last)  # fmt: skip
    except _ReadInboxFirst:
        raise
    except Exception as exc:  # the per-message path sorts out which event it was
        ensure_connected(exc)
        if not read:
            raise _ReadInboxFirst from exc
        raise _SetPathFailed(group, listener_cls, len(items)) from exc
    share = (time.perf_counter() - started) * 1000 / len(items)
    for item, outcome in zip(items, outcomes, strict=True):
        if _is_exception_outcome(outcome):
            item.decision = _decide_handler_error(listener_cls, item.ctx, item.delivery, applied, outcome)  # type: ignore[arg-type]
        else:
            applied.add((item.delivery.consumer, item.event_id))
            item.decision = Decision(ACK, cast(str, outcome) or "applied")
        item.decision.ms = (started - item.started) * 1000 + share
    if tracing.enabled():
        ended_ns = time.time_ns()
        for item in items:
            item.trace = tracing.record_after(
                item.delivery,
                item.event_id,
                item.version,
                item.decision,  # type: ignore[arg-type]
                started_ns,
                ended_ns,
            )


def _is_exception_outcome(outcome: Any) -> bool:
    """A :data:`BatchOutcome` that is the exception ``handle`` would have raised, not an outcome word."""
    return isinstance(outcome, BaseException)


# --- the per-message path -------------------------------------------------------------


def apply_message(delivery: Delivery, *, applied: Applied | None = None) -> Decision:
    """Validate and apply one message through the per-message path; must run inside a transaction.

    ``applied`` is the set of (consumer, event id) already in the inbox, read once
    for the batch and kept up to date here; without it the inbox is asked for this
    message alone.
    """
    item = _decode_or_decide(delivery, applied)
    if item.decision is None:
        _apply_per_message(item, applied)
    else:
        item.decision.ms = (time.perf_counter() - item.started) * 1000
    _log_decision(item)
    return item.decision  # type: ignore[return-value]


def _decode_or_decide(delivery: Delivery, applied: Applied | None, *, read: bool = True) -> _Pending:
    """Identity and validity: decide duplicates and invalid messages, decode the rest.

    ``read=False``: ``applied`` was not read from the inbox, so an invalid message may be
    the broken copy of an event applied since (dead letter fixed and replayed): raise
    :class:`_ReadInboxFirst` instead of dead-lettering it.
    """
    item = _Pending(delivery, event_id_of(delivery), delivery.headers.get("aggregate-version"), time.perf_counter())
    # Identity first: an event this consumer already applied is acked whatever the copy holds
    # (e.g. the original, broken bytes of a dead letter that was fixed and replayed).
    if inbox_has(delivery.consumer, item.event_id, applied):
        item.decision = Decision(ACK, "duplicate")
        return item
    try:
        if delivery.listener is None:
            raise PermanentFailure(f"no listener handles {delivery.event_name!r} in this consumer")
        contract = registry.get(delivery.event_name)
        item.event = contract.decode(delivery.data)
        item.version = getattr(item.event, contract.version_field, None) if contract.version_field else None
    except Exception as exc:  # whatever the bytes do to the decoder, the message is invalid
        if not read:
            raise _ReadInboxFirst from exc
        # A message that can never be valid is dead-lettered and terminated at once.
        error = _describe_invalid(exc)
        dead_letter_create(delivery=delivery, event_id=item.event_id, error=f"invalid message: {error}")
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


def _describe_invalid(exc: BaseException) -> str:
    text = str(exc)
    return text if text and not isinstance(exc, UnicodeError) else f"{type(exc).__name__}: {exc}"


def _apply_per_message(item: _Pending, applied: Applied | None) -> None:
    """The handler and the inbox row in a savepoint of their own; a failure rolls back only this message."""
    listener_cls, ctx = item.delivery.listener, item.ctx
    assert listener_cls is not None and ctx is not None
    correlation = ctx.headers.get("correlation-id") or ctx.event_id
    # The message's span is current while the handler runs: what it emits continues the trace.
    with tracing.processing(item.delivery, item.event_id, item.version) as span:
        try:
            with transaction.atomic():
                with event_context(correlation_id=correlation, causation_id=ctx.event_id):
                    outcome = listener_cls().handle(item.event, ctx) or "applied"
                # The inbox row commits with the handler's writes or not at all. Its unique
                # constraint is the last line against a concurrent copy of the same event
                # (another process sharing the durable): the loser's savepoint rolls back.
                inbox_record(
                    consumer=ctx.consumer,
                    event_id=ctx.event_id,
                    subject=ctx.subject,
                    stream_sequence=ctx.stream_sequence,
                    outcome=outcome,
                )
            if applied is not None:
                applied.add((ctx.consumer, ctx.event_id))
            item.decision = Decision(ACK, outcome)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the listener
            ensure_committable(exc)
            item.decision = _decide_handler_error(listener_cls, ctx, item.delivery, applied, exc)
        item.decision.ms = (time.perf_counter() - item.started) * 1000
        tracing.record(span, item.decision)
        item.trace = tracing.ids(span)


# --- what a handler's exception costs -------------------------------------------------


def _decide_handler_error(
    listener_cls: type[Listener], ctx: Context, delivery: Delivery, applied: Applied | None, exc: Exception
) -> Decision:
    """The message's fate after its handler raised ``exc``: duplicate, wait for a gap, retry, or dead letter."""
    if isinstance(exc, IntegrityError):
        if inbox_has(ctx.consumer, ctx.event_id):
            if applied is not None:
                applied.add((ctx.consumer, ctx.event_id))
            return Decision(ACK, "duplicate")
        return _retry_or_dead_letter(listener_cls, ctx, delivery, exc)
    if isinstance(exc, NotYet):
        if ctx.deliveries >= listener_cls.max_gap_deliveries:
            error = f"gave up waiting after {ctx.deliveries} deliveries: {exc}"
            dead_letter_create(delivery=delivery, event_id=ctx.event_id, error=error)
            return Decision(TERM, "dead:gap", error=str(exc))
        return Decision(NAK, "waiting", delay=listener_cls.gap_retry_delay(ctx.deliveries), error=str(exc))
    if isinstance(exc, PermanentFailure):
        dead_letter_create(delivery=delivery, event_id=ctx.event_id, error=f"permanent failure: {exc}")
        return Decision(TERM, "dead:permanent", error=str(exc))
    if isinstance(exc, DataError):
        # The database refuses a value of this event (out of range, NUL in text...): no retry will change that.
        error = f"DataError: {exc}".strip()
        dead_letter_create(delivery=delivery, event_id=ctx.event_id, error=f"the database refused the event: {error}")
        return Decision(TERM, "dead:data", error=error)
    return _retry_or_dead_letter(listener_cls, ctx, delivery, exc)


def _retry_or_dead_letter(listener_cls: type[Listener], ctx: Context, delivery: Delivery, exc: Exception) -> Decision:
    """A handler error: redelivered with backoff, dead-lettered once the listener's ``max_deliver`` is spent."""
    error = f"{type(exc).__name__}: {exc}"
    if ctx.deliveries >= listener_cls.max_deliver:
        dead_letter_create(
            delivery=delivery, event_id=ctx.event_id, error=f"handler failed {ctx.deliveries} times: {error}"
        )
        return Decision(TERM, "dead:failed", error=error)
    return Decision(NAK, "retry", delay=listener_cls.retry_delay(ctx.deliveries), error=error)


def _log_decision(item: _Pending) -> None:
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
        extra=item.trace,
    )
