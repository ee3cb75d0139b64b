"""Celery tasks of the listeners: the periodic inbox purge (``listeners.purge_inbox``).

The task sends itself to ``OUTBOX['CELERY_QUEUE']`` like the relay's tasks (it is an
:class:`outbox.tasks.OutboxTask`): the worker that runs the relay runs it too, and a
project needs no route. Its beat entry comes from :func:`listeners.beat.beat_schedule`.
"""

from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from outbox.tasks import OutboxTask


@shared_task(name="listeners.purge_inbox", base=OutboxTask, ignore_result=True)
def purge_inbox() -> int:
    """Delete inbox rows older than ``LISTENERS['INBOX_RETENTION']``; returns how many."""
    from listeners.inbox import inbox_purge

    close_old_connections()
    try:
        return inbox_purge().rows
    finally:
        close_old_connections()
