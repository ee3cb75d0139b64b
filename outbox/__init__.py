"""A transactional outbox that publishes domain events to NATS JetStream.

Public interface::

    from outbox import emit

    with transaction.atomic():
        ticket.save()
        emit(TicketUpdated(...))
"""

from typing import Any

__version__ = "0.2.0"

__all__ = ["Event", "contract", "emit", "event_context"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package does not import models before the app registry is ready.
    if name in {"emit", "event_context"}:
        from outbox import api

        return getattr(api, name)
    if name in {"Event", "contract"}:
        from outbox import contracts

        return getattr(contracts, name)
    raise AttributeError(name)
