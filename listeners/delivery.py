"""A message as the listener received it (:class:`Delivery`), what is done with it (:class:`Decision`), its event id.

:class:`RunStats` counts the decisions of one run (the ``listen`` command's summary line).

These are the values that travel between the asyncio side (which owns nats-py) and
the database side (which applies and decides); nothing here talks to either.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from listeners.base import Listener

#: What happens to a message once its batch committed: acked, handed back for a later
#: delivery (with ``Decision.delay``), or terminated (it is never delivered again).
ACK, NAK, TERM = "ack", "nak", "term"
#: InboxEntry.event_id / DeadLetter.event_id length.
EVENT_ID_MAX = 64
_FALLBACK_NS = uuid.UUID("6f1c1d8e-4a4e-4b8f-9d7e-5c2f0a9b1e11")


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
    #: The NATS subject it came on ("" when unknown, e.g. a replayed dead letter).
    subject: str = ""


@dataclass
class Decision:
    action: str  # ack | nak | term
    outcome: str
    delay: float | None = None
    ms: float = 0.0
    error: str = ""


@dataclass
class RunStats:
    handled: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, decision: Decision) -> None:
        self.handled += 1
        self.outcomes[decision.outcome] = self.outcomes.get(decision.outcome, 0) + 1


def event_id_of(delivery: Delivery) -> str:
    """The inbox key: the event id the producer put in ``event-id`` or ``Nats-Msg-Id`` (the relay: the
    outbox row's UUID).

    The relay's ``Nats-Msg-Id`` is the event id, except for an event ``outbox_reconcile`` sent back
    after the stream lost it: that copy's ``Nats-Msg-Id`` is ``<id>:r<n>`` and its ``event-id`` the
    plain id, which therefore comes first. An id that does not fit the
    inbox column (too long, or with characters PostgreSQL refuses) is replaced by a
    UUID derived from it, so two different ids never collide by truncation.
    """
    event_id = delivery.headers.get("event-id") or delivery.headers.get("Nats-Msg-Id")
    if event_id:
        if len(event_id) <= EVENT_ID_MAX and "\x00" not in event_id:
            return event_id
        return str(uuid.uuid5(_FALLBACK_NS, f"id:{event_id}"))
    # A producer that did not set an id: the stream position identifies the message.
    return str(uuid.uuid5(_FALLBACK_NS, f"{delivery.stream}:{delivery.stream_sequence}"))


def storable_text(value: Any) -> str:
    """PostgreSQL text and jsonb cannot hold NUL: replace it, keep everything else."""
    return str(value).replace("\x00", "\ufffd")
