"""Event contracts of the ticketing system: the course's subjects and field names.

These classes are the only thing other services (and ``listeners``) know about
tickets and orders. Field names are camelCase on the wire (``userId``), so a
Node service from the course reads the same JSON.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from outbox.contracts import Event, contract

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Version = Annotated[int, msgspec.Meta(ge=0)]
Price = Annotated[Decimal, msgspec.Meta(extra_json_schema={"minimum": 0})]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


def _check_price(price: Decimal | None) -> None:
    if price is not None and (not price.is_finite() or price < 0):
        raise ValueError(f"price must be a number >= 0, got {price}")


OrderStatus = Literal["created", "cancelled", "awaiting:payment", "complete"]


@contract("ticket:created", stream="TICKETS", aggregate="ticket")
class TicketCreated(Event, frozen=True):
    """A ticket was put up for sale."""

    id: Id
    version: Version
    title: Title
    price: Price
    user_id: Id

    def __post_init__(self) -> None:
        _check_price(self.price)


@contract("ticket:updated", stream="TICKETS", aggregate="ticket")
class TicketUpdated(Event, frozen=True):
    """A ticket changed: its title, price, or its reservation (orderId)."""

    id: Id
    version: Version
    title: Title
    price: Price
    user_id: Id
    order_id: Id | None = None

    def __post_init__(self) -> None:
        _check_price(self.price)


class OrderTicket(msgspec.Struct, frozen=True):
    id: Id
    price: Price | None = None

    def __post_init__(self) -> None:
        _check_price(self.price)


@contract("order:created", stream="ORDERS", aggregate="order")
class OrderCreated(Event, frozen=True):
    """An order was placed for a ticket (published by the orders service)."""

    id: Id
    version: Version
    status: OrderStatus
    user_id: Id
    expires_at: str
    ticket: OrderTicket


@contract("order:cancelled", stream="ORDERS", aggregate="order")
class OrderCancelled(Event, frozen=True):
    """An order was cancelled; its ticket is free again."""

    id: Id
    version: Version
    ticket: OrderTicket
