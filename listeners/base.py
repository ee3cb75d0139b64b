"""The Listener base class, its batch extension point and the version-order rule."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from django.db import models

from listeners.errors import NotYet
from listeners.sets import insert_new, lock_versions, update_locked
from outbox.contracts import Event


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler knows about the message besides the event itself."""

    subject: str
    event_id: str
    consumer: str
    stream_sequence: int | None
    deliveries: int
    headers: dict[str, str] = field(default_factory=dict)


#: What :meth:`Listener.handle_batch` returns for one event: an outcome word (the event is
#: done: an inbox row is written for it) or the exception :meth:`Listener.handle` would
#: have raised (``NotYet``, ``PermanentFailure`` ...: nothing may have been written for it).
BatchOutcome = str | Exception


class Listener:
    """Declare the subjects, the group and the delivery policy; implement :meth:`handle`.

    ``handle`` runs inside one database transaction together with the inbox row, and
    returns an outcome word for the log (``applied``, ``stale``, ``ignored`` ...).
    Raise :class:`listeners.errors.NotYet` to have the event redelivered later (a
    version gap) and :class:`listeners.errors.PermanentFailure` for an event that
    can never apply. A ``django.db.DataError`` (the database refuses a value the
    event carries) is dead-lettered at once too. Any other exception is retried with
    backoff and, after ``max_deliver`` deliveries, dead-lettered. A lost database
    connection is not the event's fault: the runner retries the whole batch in
    place, without spending deliveries.

    **The batch fast path (optional).** A listener that can apply many events with a
    few set-based statements implements :meth:`handle_batch` as well; the framework
    then hands it every event of a fetched batch that belongs to its
    :meth:`batch_group`, in stream order, and writes their inbox rows with one INSERT,
    all in the batch's one transaction (no savepoint of their own). When
    ``handle_batch`` raises, that whole transaction is rolled back and the batch is
    applied again with these events going through :meth:`handle` one by one, each in
    its own savepoint, exactly as without the fast path: so a poison event in a batch
    costs the batch its speed, never its correctness. :class:`VersionedReplicaListener`
    implements both for the common case of a local copy kept by version.
    """

    #: Event names this listener handles.
    subjects: ClassVar[tuple[str, ...]] = ()
    #: The queue group: processes of the same group share one durable consumer.
    group: ClassVar[str] = ""
    #: Seconds JetStream waits for an ack before redelivering. It is also how long a message
    #: held by a process that died (SIGKILL, OOM, lost node) stays out of reach, and so how long
    #: the events behind it in version order wait (issue 17): short. A batch that takes longer
    #: is kept "in progress" every ``ack_wait / 2`` by the runner, so a slow batch is not redelivered.
    ack_wait: ClassVar[float] = 5.0
    #: Deliveries before a failing event is dead-lettered (counted by the listener, not the server).
    max_deliver: ClassVar[int] = 20
    #: Deliveries an event may wait for a missing earlier version (about 20 minutes at gap_delay_max)
    #: before it is dead-lettered: crashes and slow producers must not turn a gap into a dead letter.
    max_gap_deliveries: ClassVar[int] = 1200
    #: Redelivery delays (seconds) after a handler error, by delivery count; the last one repeats.
    backoff: ClassVar[tuple[float, ...]] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    #: Redelivery delay while waiting for a missing earlier version; doubles, capped at gap_delay_max.
    #: The cap is low on purpose: every event queued behind a gap waits on its own timer, so once
    #: the missing version is applied the queue drains at about one timer per link (issue 17).
    gap_delay: ClassVar[float] = 0.1
    gap_delay_max: ClassVar[float] = 1.0
    #: May :meth:`handle_batch` see an event this consumer applied before, in an attempt that is
    #: then rolled back whole? True lets a batch of first deliveries skip the inbox read (one
    #: round trip): for listeners whose ``handle_batch`` only writes to this database.
    batch_sees_duplicates: ClassVar[bool] = False

    def handle(self, event: Event, ctx: Context) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def handle_batch(self, events: Sequence[Event], ctxs: Sequence[Context]) -> list[BatchOutcome]:
        """Apply several events at once (optional); return one :data:`BatchOutcome` per event, in order.

        Contract, checked by nothing but the tests of the listener that implements it:

        * the result must be what calling :meth:`handle` on each event in the given
          order would have produced (same writes, same outcome words, same exceptions);
        * for an event whose outcome is an exception nothing may have been written;
        * raise (anything) to give up: the framework rolls back whatever this call
          wrote and applies the events one by one through :meth:`handle` instead;
        * the inbox rows are the framework's: do not write them; a duplicate event
          (already in the inbox, or a second copy within the batch) never reaches here —
          unless the listener sets :attr:`batch_sees_duplicates`: then an event applied
          before may reach here in a first delivery, in an attempt whose writes are all
          rolled back when the inbox refuses its row.

        It runs in the batch transaction but not inside :func:`outbox.event_context`
        (there is no single causing event): listeners that emit events stay per-message.
        """
        raise NotImplementedError

    @classmethod
    def batch_group(cls) -> Hashable | None:
        """Events of listeners with equal groups go to one :meth:`handle_batch` call; None: no fast path.

        By default a listener that overrides :meth:`handle_batch` is a group of its own.
        The instance whose ``handle_batch`` is called is of the group's first class met in
        the batch, so listeners sharing a group must accept each other's events there.
        """
        group = cast(Hashable, cls) if cls.handle_batch is not Listener.handle_batch else None
        return group

    def reset(self) -> int:
        """Forget the local state this listener built (``listen --from-start --reset``)."""
        return 0

    # -- helpers ---------------------------------------------------------------------

    @classmethod
    def retry_delay(cls, deliveries: int) -> float:
        index = min(max(deliveries - 1, 0), len(cls.backoff) - 1)
        return cls.backoff[index]

    @classmethod
    def gap_retry_delay(cls, deliveries: int) -> float:
        return min(cls.gap_delay * (2 ** max(deliveries - 1, 0)), cls.gap_delay_max)


def version_decision(*, held: int | None, incoming: int, creation: bool) -> str:
    """The course's rule, fixed: ``apply`` | ``stale`` | ``gap``.

    Apply version N when the replica holds N-1 (or nothing, for a creation); when
    it already holds N or more the event is stale (acked without effect); when it
    holds less than N-1 — or nothing, for an update — an earlier event is missing.
    """
    if held is None:
        return "apply" if creation else "gap"
    if incoming <= held:
        return "stale"
    if incoming == held + 1:
        return "apply"
    return "gap"


class ReplicaConflict(Exception):
    """A row this batch meant to create appeared meanwhile (another process): apply one by one instead."""


class VersionedReplicaListener(Listener):
    """A local copy of an aggregate, one row per aggregate id, kept from its versioned events.

    Declare the model, which subjects create the row and how an event maps to the
    row's fields; get :meth:`handle` *and* the batch fast path without writing SQL::

        class ProductCopy(VersionedReplicaListener):
            subjects = ("product:created", "product:updated")
            group = "catalog"
            model = ProductReplica                   # primary key = the aggregate id
            creation_subjects = ("product:created",)

            def replica_fields(self, event):
                return {"name": event.name, "price": event.price}

    The version rule is :func:`version_decision`: version N applies on N-1 (on nothing
    for a creation), a held version >= N makes the event ``stale``, anything else is a
    gap (``NotYet``: redelivered later). A batch costs one ``SELECT ... FOR UPDATE`` of
    the rows it touches (in primary-key order, so processes sharing a durable take
    their locks in one order and cannot deadlock), the decisions in Python in stream
    order, then at most one INSERT of new rows and one UPDATE of changed rows, each
    row written once with its last state. A row that another process created between
    the lock and the INSERT makes the batch fall back to the per-event path, which
    turns it into an ordinary retry. A batch of a single event (the steady flow at low rates) first
    tries the one statement that applies it: the INSERT of a creation where no row is, the UPDATE of
    the row that holds the version before; only when that writes nothing does the locked read decide.

    Listeners sharing a model share a batch group, so a creation and its updates in
    one batch are decided together; their ``model``, ``creation_subjects``,
    ``replica_key``, ``replica_version`` and ``replica_fields`` must agree (declare them
    on a common base class).
    """

    #: The replica model; its primary key is the aggregate id.
    model: ClassVar[type[models.Model]]
    #: Subjects whose event may create the row (version applies on nothing).
    creation_subjects: ClassVar[tuple[str, ...]] = ()
    #: The model field that holds the applied version.
    version_field: ClassVar[str] = "version"
    #: Its handle_batch only locks and writes replica rows: a duplicate in an attempt that is
    #: rolled back costs nothing (and is "stale" by version anyway).
    batch_sees_duplicates: ClassVar[bool] = True

    # -- the mapping, per event ------------------------------------------------------

    def replica_fields(self, event: Event) -> dict[str, Any]:  # pragma: no cover - abstract
        """The row's field values for ``event``, without the primary key and the version."""
        raise NotImplementedError

    def replica_key(self, event: Event) -> Any:
        return getattr(event, event.__contract__.id_field)

    def replica_version(self, event: Event) -> int:
        return getattr(event, event.__contract__.version_field or "version")

    def is_creation(self, event: Event, ctx: Context) -> bool:
        return ctx.subject in self.creation_subjects

    @classmethod
    def batch_group(cls) -> Hashable | None:
        return ("versioned-replica", cls.model._meta.label)

    # -- the framework's side ----------------------------------------------------------

    def handle(self, event: Event, ctx: Context) -> str:
        [outcome] = self.handle_batch([event], [ctx])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def handle_batch(self, events: Sequence[Event], ctxs: Sequence[Context]) -> list[BatchOutcome]:
        normalize = self.model._meta.pk.to_python
        keys = [normalize(self.replica_key(event)) for event in events]
        if len(events) == 1 and self._apply_alone(events[0], ctxs[0], keys[0]):
            return ["applied"]
        held = lock_versions(self.model, self.version_field, set(keys))
        existing = set(held)
        last: dict[Any, Event] = {}  # the last event applied per row: what the row must hold
        outcomes: list[BatchOutcome] = []
        for event, ctx, key in zip(events, ctxs, keys, strict=True):
            version = self.replica_version(event)
            current = held.get(key)
            decision = version_decision(held=current, incoming=version, creation=self.is_creation(event, ctx))
            if decision == "apply":
                held[key] = version
                last[key] = event
                outcomes.append("applied")
            elif decision == "stale":
                outcomes.append("stale")
            else:
                what = "nothing" if current is None else current
                aggregate = event.__contract__.aggregate
                outcomes.append(NotYet(f"{aggregate} {key}: holds {what}, got version {version}"))
        if last:
            self._write(
                [(key, event) for key, event in last.items() if key not in existing],
                [(key, event) for key, event in last.items() if key in existing],
            )
        return outcomes

    def _apply_alone(self, event: Event, ctx: Context, key: Any) -> bool:
        """A batch of one event (the steady flow at low rates) in one statement, when the rule says "apply".

        A creation is an INSERT ... ON CONFLICT DO NOTHING (it applies where there is no row), an
        update an UPDATE of the row that holds the version just before the event's. Either writes
        nothing otherwise, and the locked read of :meth:`handle_batch` decides (stale, gap). One row:
        no lock order to keep.
        """
        row = self._row(key, event)
        if self.is_creation(event, ctx):
            return insert_new(self.model, self._insert_fields(), [row]) == 1
        version = cast(models.Field, self.model._meta.get_field(self.version_field))
        return update_locked(self.model, self._update_fields(event), [row], only_after=version) == 1

    def _row(self, key: Any, event: Event) -> models.Model:
        version = cast(models.Field, self.model._meta.get_field(self.version_field))
        return self.model(pk=key, **{version.attname: self.replica_version(event)}, **self.replica_fields(event))

    def _insert_fields(self) -> list[models.Field]:
        meta = self.model._meta
        return [f for f in meta.concrete_fields if not (f.primary_key and isinstance(f, models.AutoField))]

    def _update_fields(self, event: Event) -> list[models.Field]:
        """The key first, then the columns an event sets (and ``auto_now`` ones)."""
        meta = self.model._meta
        names = set(self.replica_fields(event)) | {self.version_field}
        return [meta.pk] + [
            f
            for f in meta.concrete_fields
            if not f.primary_key and (f.name in names or f.attname in names or getattr(f, "auto_now", False))
        ]

    def _write(self, created: list[tuple[Any, Event]], changed: list[tuple[Any, Event]]) -> None:
        """One INSERT for the new rows, one UPDATE for the locked ones; rows in key order."""
        label = self.model._meta.label
        if created:
            objs = [self._row(key, e) for key, e in sorted(created, key=_first)]
            inserted = insert_new(self.model, self._insert_fields(), objs)
            if inserted != len(objs):
                raise ReplicaConflict(f"{len(objs) - inserted} {label} row(s) created concurrently")
        if changed:
            objs = [self._row(key, e) for key, e in sorted(changed, key=_first)]
            updated = update_locked(self.model, self._update_fields(changed[0][1]), objs)
            if updated != len(objs):
                raise ReplicaConflict(f"{len(objs) - updated} locked {label} row(s) vanished")


def _first(pair: tuple[Any, Any]) -> Any:
    return pair[0]
