"""The Listener base class and the version-order rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from outbox.contracts import Contract, Event, registry


@dataclass(frozen=True)
class Context:
    """What a handler knows about the message besides the event itself."""

    subject: str
    event_id: str
    consumer: str
    stream_sequence: int | None
    deliveries: int
    headers: dict[str, str] = field(default_factory=dict)


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
    """

    #: Event names this listener handles.
    subjects: ClassVar[tuple[str, ...]] = ()
    #: The queue group: processes of the same group share one durable consumer.
    group: ClassVar[str] = ""
    #: Seconds JetStream waits for an ack before redelivering.
    ack_wait: ClassVar[float] = 30.0
    #: Deliveries before a failing event is dead-lettered.
    max_deliver: ClassVar[int] = 20
    #: Redelivery delays (seconds) after a handler error, by delivery count; the last one repeats.
    backoff: ClassVar[tuple[float, ...]] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    #: Redelivery delay while waiting for a missing earlier version; doubles, capped at gap_delay_max.
    gap_delay: ClassVar[float] = 0.1
    gap_delay_max: ClassVar[float] = 5.0

    def handle(self, event: Event, ctx: Context) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> int:
        """Forget the local state this listener built (``listen --from-start --reset``)."""
        return 0

    # -- helpers ---------------------------------------------------------------------

    @classmethod
    def contracts(cls) -> list[Contract]:
        return [registry.get(name) for name in cls.subjects]

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


def describe(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
