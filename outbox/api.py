"""``emit()``: the only way an event enters the outbox."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from outbox.contracts import Event, payload_from_event
from outbox.errors import NotInTransactionError
from outbox.models import OutboxEvent

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("outbox_event_context", default={})  # noqa: B039


@contextmanager
def event_context(*, correlation_id: str | None = None, causation_id: str | None = None) -> Iterator[None]:
    """Events emitted inside this block carry these correlation/causation ids.

    Listeners set it for their handler: causation = the event being handled,
    correlation = that event's correlation id (or its own id when it had none).
    """
    values = dict(_context.get())
    if correlation_id:
        values["correlation-id"] = correlation_id
    if causation_id:
        values["causation-id"] = causation_id
    token = _context.set(values)
    try:
        yield
    finally:
        _context.reset(token)


def emit(
    event: Event,
    *,
    aggregate: tuple[str, str] | None = None,
    aggregate_version: int | None = None,
    headers: dict[str, str] | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> OutboxEvent:
    """Write ``event`` to the outbox inside the caller's transaction.

    The aggregate (type, id, version) comes from the event's contract unless given.
    Raises NotInTransactionError outside ``transaction.atomic``, UnknownSubjectError
    for an unregistered event class, InvalidPayloadError for a payload that breaks
    its contract. Nothing touches Redis or NATS here; the relay is kicked on commit.
    """
    connection = connections[using]
    if not connection.in_atomic_block:
        raise NotInTransactionError(
            "outbox.emit() must run inside transaction.atomic(), in the same transaction as the change it describes"
        )
    item, _body, data = payload_from_event(event)
    agg_type, agg_id, version = item.aggregate_key(event)
    if aggregate is not None:
        agg_type, agg_id = aggregate[0], str(aggregate[1])
    if aggregate_version is not None:
        version = aggregate_version
    event_id = uuid.uuid4()
    meta: dict[str, Any] = dict(_context.get())
    meta.setdefault("correlation-id", str(event_id))
    if headers:
        meta.update({str(k): str(v) for k, v in headers.items()})
    row = OutboxEvent.objects.using(using).create(
        id=event_id,
        subject=item.name,
        payload=data,
        headers=meta,
        aggregate_type=agg_type,
        aggregate_id=agg_id,
        aggregate_version=version,
    )
    _kick_on_commit(using)
    return row


def _kick_on_commit(using: str) -> None:
    from outbox.kick import kick_relay

    connection = connections[using]
    # One kick per transaction, however many events it emits.
    for entry in connection.run_on_commit:
        if entry[1] is kick_relay:
            return
    transaction.on_commit(kick_relay, using=using, robust=True)
