"""Write services of the listeners app (the admin calls these)."""

from __future__ import annotations

import logging

from django.db import transaction

from listeners.errors import ListenerError
from listeners.models import DeadLetter, DeadLetterStatus

logger = logging.getLogger("listeners.services")


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
