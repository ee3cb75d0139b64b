"""Domain errors of the ticketing app."""


class TicketError(Exception):
    """Base class of ticket domain errors."""


class TicketNotFound(TicketError):
    pass


class TicketConflict(TicketError):
    """The ticket changed since the caller read it (stale expected version)."""

    def __init__(self, ticket_id, expected: int, actual: int) -> None:
        self.ticket_id, self.expected, self.actual = ticket_id, expected, actual
        super().__init__(
            f"ticket {ticket_id} was changed by someone else: you edited version {expected}, it is now at "
            f"version {actual}. Nothing was saved; reload and apply your change again."
        )


class TicketReserved(TicketError):
    """A reserved ticket (order_id set) cannot be edited."""

    def __init__(self, ticket_id, order_id: str) -> None:
        self.ticket_id, self.order_id = ticket_id, order_id
        super().__init__(f"ticket {ticket_id} is reserved by order {order_id} and cannot be edited")


class TicketInvalid(TicketError):
    def __init__(self, errors: dict[str, list[str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items()))
