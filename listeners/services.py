"""Write services on the dead-letter table: recording a message the listener gives up on, correcting one.

Replaying a dead letter runs the apply algorithm and lives in :mod:`listeners.replay`
(the apply algorithm records dead letters through this module, so one module for
both would import itself in a circle).
"""

from __future__ import annotations

import logging

from django.db import DataError, transaction

from listeners.delivery import Delivery, storable_text
from listeners.errors import ListenerError
from listeners.models import DeadLetter, DeadLetterStatus

logger = logging.getLogger("listeners.services")


def dead_letter_create(*, delivery: Delivery, event_id: str, error: str) -> DeadLetter:
    """Record a message the listener gives up on, in its own savepoint (the batch goes on).

    The exact bytes are always kept (``raw``); the text copy and the headers are kept
    when the database takes them.
    """
    fields = {
        "consumer": storable_text(delivery.consumer)[:200],
        "subject": storable_text(delivery.event_name)[:200],
        "event_id": event_id,
        "stream": storable_text(delivery.stream)[:100],
        "stream_sequence": delivery.stream_sequence,
        "raw": bytes(delivery.data),
        "error": storable_text(error)[:4000],
        "deliveries": delivery.deliveries,
    }
    try:
        with transaction.atomic():
            return DeadLetter.objects.create(
                payload=storable_text(delivery.data.decode("utf-8", errors="replace")),
                headers={storable_text(k): storable_text(v) for k, v in delivery.headers.items()},
                **fields,
            )
    except DataError as exc:
        # Keep the exact bytes and the reason even when the text copy cannot be stored.
        fields["error"] = storable_text(f"{error} (payload text not stored: {exc})")[:4000]
        with transaction.atomic():
            return DeadLetter.objects.create(payload="", headers={}, **fields)


def dead_letter_edit_payload(*, dead_letter_id: int, payload: str) -> DeadLetter:
    """Correct a dead letter's payload before a replay; only letters that are still dead can change."""
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().get(pk=dead_letter_id)
        if letter.status != DeadLetterStatus.DEAD:
            raise ListenerError(f"dead letter {dead_letter_id} was already replayed; its payload is kept as applied")
        if letter.payload != payload:
            letter.payload = payload
            letter.save(update_fields=["payload"])
            logger.info("listener.dead_letter_edited id=%s subject=%s", letter.pk, letter.subject)
    return letter
