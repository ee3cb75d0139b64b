"""``emit()``: the only way an event enters the outbox."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

from django.db import DEFAULT_DB_ALIAS, connections, models

from outbox import tracing
from outbox.contracts import Event, payload_from_event, plain_json
from outbox.errors import NotInTransactionError, UnrelayedDatabaseError
from outbox.ids import uuid7
from outbox.kick import kick_relay_after_commit, kicks_on_commit
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
    ``using`` must be the default database: the relay reads that outbox only (UnrelayedDatabaseError).
    Raises NotInTransactionError outside ``transaction.atomic``, UnknownSubjectError
    for an unregistered event class, InvalidPayloadError for a payload that breaks
    its contract. Nothing touches Redis or NATS here. On PostgreSQL (``WAKE = "notify"``) the
    table's trigger sends a NOTIFY that PostgreSQL delivers at commit; otherwise the relay is kicked
    after commit by this process's kicker thread (outbox/kick.py), so the caller does not wait for Redis.
    Returns the row; the columns the database fills (seq, created_at, next_attempt_at, republished) are
    deferred and load on first access.
    """
    if using != DEFAULT_DB_ALIAS:
        raise UnrelayedDatabaseError(
            f"emit(using={using!r}): the relay reads the outbox of the {DEFAULT_DB_ALIAS!r} database only, so a "
            f"row written to {using!r} would never be published. Emit in a transaction on {DEFAULT_DB_ALIAS!r}, "
            "together with the change the event describes."
        )
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
    event_id = uuid7()
    meta: dict[str, Any] = dict(_context.get())
    meta.setdefault("correlation-id", str(event_id))
    if headers:
        meta.update({str(k): str(v) for k, v in headers.items()})
    if tracing.enabled():
        tracing.inject(meta)
    fields = {
        "id": event_id,
        "subject": item.name,
        "payload": data,
        "headers": meta,
        "aggregate_type": agg_type,
        "aggregate_id": agg_id,
        "aggregate_version": version,
    }
    if connection.vendor == "postgresql":
        row = _insert(connection, using, fields)
    else:  # the SQLite demo: the ORM's INSERT, whose cost nobody measures there
        row = OutboxEvent.objects.using(using).create(**fields)
    if kicks_on_commit(connection.vendor):  # on PostgreSQL the outbox table's trigger NOTIFYs instead
        _kick_on_commit(connection)
    return row


#: The columns emit() sets, in the order of _insert()'s first parameters.
_SET = ("id", "subject", "payload", "headers", "aggregate_type", "aggregate_id", "aggregate_version")


class _Plan(NamedTuple):
    sql: str
    #: The fields whose value emit() knows (attnames; all but the database-filled ones, which stay
    #: deferred on the instance) and, in model order, their values with the defaults filled in.
    known: frozenset[str]
    template: tuple[Any, ...]
    #: Positions in ``template`` of the _SET fields and of the fields with a callable default
    #: (sent as parameters after the _SET ones).
    set_at: tuple[int, ...]
    callable_at: tuple[tuple[int, Any], ...]


_plan_cache: _Plan | None = None


def _plan(connection: Any) -> _Plan:
    """The INSERT for PostgreSQL, built once from the model.

    Every other column takes its model default: a ``db_default`` (seq, timestamps) is filled by
    the database; a constant Python-side ``default`` is written as a literal and a callable one
    as a parameter (Django never makes either a database default); a nullable column without one
    is left NULL. So a field added to the model is written as the ORM would write it, or the
    statement fails loudly (NOT NULL) in every test.
    """
    global _plan_cache
    if _plan_cache is None:
        meta = OutboxEvent._meta
        q = connection.ops.quote_name
        # The _SET columns first (their parameters lead), then the defaults, in model order.
        set_fields = [cast(models.Field, meta.get_field(name)) for name in _SET]
        columns = [f.column for f in set_fields]
        values = ["%s::jsonb" if f.get_internal_type() == "JSONField" else "%s" for f in set_fields]
        known: list[Any] = []
        template: list[Any] = []
        callable_at = []
        for field in meta.concrete_fields:
            if field.has_db_default():  # type: ignore[attr-defined]  # Django 5 API not in django-stubs
                continue  # filled by the database; deferred on the instance
            value = None
            if field.name in _SET:
                pass  # a parameter
            elif field.has_default() and callable(field.default):
                callable_at.append((len(template), field))
                columns.append(field.column)
                values.append("%s")
            elif field.has_default():
                value = field.get_default()
                columns.append(field.column)
                literal = connection.ops.compose_sql("%s", [field.get_db_prep_save(value, connection)])
                values.append(literal.replace("%", "%%"))
            elif not field.null:
                raise TypeError(f"emit() does not know what to write to {meta.db_table}.{field.column}")
            known.append(field)  # a nullable column left out is NULL: known too
            template.append(value)
        _plan_cache = _Plan(
            sql=(
                f"INSERT INTO {q(meta.db_table)} ({', '.join(q(c) for c in columns)}) "  # noqa: S608 - model names only
                f"VALUES ({', '.join(values)})"
            ),
            known=frozenset(f.attname for f in known),
            template=tuple(template),
            set_at=tuple(known.index(meta.get_field(name)) for name in _SET),
            callable_at=tuple(callable_at),
        )
    return _plan_cache


def _insert(connection: Any, using: str, fields: dict[str, Any]) -> OutboxEvent:
    """The outbox row in one statement on the caller's connection (PostgreSQL).

    ``Model.objects.create`` spends more CPU compiling and adapting eighteen columns than psycopg
    and the server spend on the statement; this sends a planned statement with the seven values
    that vary, and nothing comes back. The JSON columns hold the same values the ORM stored. The
    returned instance has every column it wrote; the database-filled ones (seq, next_attempt_at, republished,
    created_at) are deferred, loaded on first access as for any deferred field.
    """
    plan = _plan(connection)
    values = list(plan.template)
    for index, name in zip(plan.set_at, _SET, strict=True):
        values[index] = fields[name]
    params = [
        fields["id"],
        fields["subject"],
        plain_json(fields["payload"]),
        plain_json(fields["headers"]),
        fields["aggregate_type"],
        fields["aggregate_id"],
        fields["aggregate_version"],
    ]
    for index, field in plan.callable_at:
        values[index] = field.get_default()
        params.append(field.get_db_prep_save(values[index], connection))
    if getattr(connection, "sends_with_next_statement", False):
        connection.send_with_next(plan.sql, params)  # outbox.backends.postgresql: no round trip of its own
    else:
        with connection.cursor() as cursor:
            cursor.execute(plan.sql, params)
    return OutboxEvent.from_db(using, plan.known, values)


def _kick_on_commit(connection: Any) -> None:
    # One kick per transaction, however many events it emits.
    for entry in connection.run_on_commit:
        if entry[1] is kick_relay_after_commit:
            return
    connection.on_commit(kick_relay_after_commit, robust=True)
