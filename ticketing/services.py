"""Ticket write services. Each commits the ticket change and its event together."""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID

from django.db import transaction

from outbox import emit
from ticketing.errors import TicketConflict, TicketInvalid, TicketNotFound, TicketReserved
from ticketing.events import TicketCreated, TicketUpdated
from ticketing.models import Ticket

logger = logging.getLogger("ticketing.services")

EDITABLE_FIELDS = ("title", "price", "user_id")
TITLE_MAX = 200
PRICE_MAX = Decimal("9999999999.99")


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, Any] = {}
    if "title" in fields:
        title = fields["title"]
        title = title.strip() if isinstance(title, str) else ""
        if not title:
            errors["title"] = ["A title is required."]
        elif len(title) > TITLE_MAX:
            errors["title"] = [f"At most {TITLE_MAX} characters (got {len(title)})."]
        cleaned["title"] = title
    if "price" in fields:
        raw = fields["price"]
        try:
            if isinstance(raw, float):
                raw = repr(raw)
            price = Decimal(str(raw).strip()) if not isinstance(raw, Decimal) else raw
            if not price.is_finite():
                raise InvalidOperation
        except (InvalidOperation, ValueError, TypeError):
            errors["price"] = [f"{raw!r} is not a number."]
        else:
            if price < 0:
                errors["price"] = ["The price cannot be negative."]
            elif price > PRICE_MAX:
                errors["price"] = [f"The price cannot exceed {PRICE_MAX}."]
            elif price != price.quantize(Decimal("0.01")):
                errors["price"] = ["At most 2 decimal places."]
            cleaned["price"] = price.quantize(Decimal("0.01")) if "price" not in errors else None
    if "user_id" in fields:
        user_id = str(fields["user_id"] or "").strip()
        if not user_id or len(user_id) > 200:
            errors["user_id"] = ["A user id of 1 to 200 characters is required."]
        cleaned["user_id"] = user_id
    if errors:
        raise TicketInvalid(errors)
    return cleaned


def _updated_event(ticket: Ticket) -> TicketUpdated:
    return TicketUpdated(
        id=str(ticket.id),
        version=ticket.version,
        title=ticket.title,
        price=ticket.price,
        user_id=ticket.user_id,
        order_id=ticket.order_id,
    )


def ticket_create(*, title: str, price: Decimal | str | int, user_id: str) -> Ticket:
    """Create a ticket at version 0 and emit ``ticket:created`` in the same transaction."""
    data = _clean({"title": title, "price": price, "user_id": user_id})
    with transaction.atomic():
        ticket = Ticket.objects.create(**data)
        emit(
            TicketCreated(
                id=str(ticket.id),
                version=ticket.version,
                title=ticket.title,
                price=ticket.price,
                user_id=ticket.user_id,
            )
        )
    logger.info("ticket.created id=%s version=%d", ticket.id, ticket.version)
    return ticket


def ticket_update(*, ticket_id: UUID | str, expected_version: int | None = None, **changes: Any) -> Ticket:
    """Change title/price/user_id; bump the version and emit ``ticket:updated``.

    ``expected_version`` is the version the caller read: when the ticket has moved
    on, TicketConflict is raised and nothing is written. A reserved ticket raises
    TicketReserved. A call that changes nothing writes nothing and emits nothing.
    """
    unknown = set(changes) - set(EDITABLE_FIELDS)
    if unknown:
        raise TicketInvalid({name: ["This field cannot be changed."] for name in sorted(unknown)})
    data = _clean(changes)
    with transaction.atomic():
        try:
            ticket = Ticket.objects.select_for_update().get(pk=ticket_id)
        except (Ticket.DoesNotExist, ValueError) as exc:
            raise TicketNotFound(f"no ticket with id {ticket_id}") from exc
        if expected_version is not None and ticket.version != expected_version:
            raise TicketConflict(ticket.id, expected_version, ticket.version)
        if ticket.order_id:
            raise TicketReserved(ticket.id, ticket.order_id)
        changed = [name for name, value in data.items() if getattr(ticket, name) != value]
        if not changed:
            return ticket
        for name in changed:
            setattr(ticket, name, data[name])
        ticket.version += 1
        ticket.save(update_fields=[*changed, "version", "updated_at"])
        emit(_updated_event(ticket))
    logger.info("ticket.updated id=%s version=%d fields=%s", ticket.id, ticket.version, ",".join(changed))
    return ticket


def _locked_ticket(ticket_id: UUID | str) -> Ticket | None:
    try:
        pk = ticket_id if isinstance(ticket_id, UUID) else UUID(str(ticket_id))
    except ValueError:
        return None
    return Ticket.objects.select_for_update().filter(pk=pk).first()


def ticket_reserve(*, ticket_id: UUID | str, order_id: str) -> Ticket | None:
    """Set the ticket's order; returns None (no change) when it is already held or missing.

    Must run inside the caller's transaction (the listener's, with its inbox row).
    """
    ticket = _locked_ticket(ticket_id)
    if ticket is None:
        logger.warning("ticket.reserve_missing id=%s order=%s", ticket_id, order_id)
        return None
    if ticket.order_id:
        if ticket.order_id != order_id:
            logger.warning("ticket.reserve_refused id=%s held_by=%s order=%s", ticket.id, ticket.order_id, order_id)
        return None
    ticket.order_id = order_id
    ticket.version += 1
    ticket.save(update_fields=["order_id", "version", "updated_at"])
    emit(_updated_event(ticket))
    logger.info("ticket.reserved id=%s version=%d order=%s", ticket.id, ticket.version, order_id)
    return ticket


def ticket_release(*, ticket_id: UUID | str, order_id: str) -> Ticket | None:
    """Clear the ticket's order if this order holds it; otherwise no change."""
    ticket = _locked_ticket(ticket_id)
    if ticket is None or ticket.order_id != order_id:
        logger.warning(
            "ticket.release_ignored id=%s held_by=%s order=%s",
            ticket_id,
            ticket.order_id if ticket else None,
            order_id,
        )
        return None
    ticket.order_id = None
    ticket.version += 1
    ticket.save(update_fields=["order_id", "version", "updated_at"])
    emit(_updated_event(ticket))
    logger.info("ticket.released id=%s version=%d order=%s", ticket.id, ticket.version, order_id)
    return ticket
