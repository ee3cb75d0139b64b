"""The relay's periodic tasks, for the project's Celery beat schedule.

One helper, called from the project's settings with the ``OUTBOX`` dict it already has::

    from outbox.beat import beat_schedule

    OUTBOX = {...}
    CELERY_BEAT_SCHEDULE = {**beat_schedule(OUTBOX), **your_own_entries}

It reads only the dict it is given (settings are not loaded yet when it runs), so its
defaults are those of :class:`outbox.conf.OutboxSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from outbox.conf import OutboxSettings

#: Seconds between purges of published rows older than OUTBOX['RETENTION'].
PURGE_INTERVAL = 3600.0


def beat_schedule(outbox: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``outbox-sweep`` (the backstop for lost kicks, every SWEEP_INTERVAL seconds), ``outbox-purge``
    (hourly) and, when RECONCILE_INTERVAL is set, ``outbox-reconcile``; all sent to OUTBOX['CELERY_QUEUE']."""
    outbox = outbox or {}
    defaults = OutboxSettings()
    queue = outbox.get("CELERY_QUEUE", defaults.CELERY_QUEUE)
    sweep = float(outbox.get("SWEEP_INTERVAL", defaults.SWEEP_INTERVAL))
    entries = {
        "outbox-sweep": {"task": "outbox.sweep", "schedule": sweep, "options": {"queue": queue}},
        "outbox-purge": {"task": "outbox.purge", "schedule": PURGE_INTERVAL, "options": {"queue": queue}},
    }
    reconcile = float(outbox.get("RECONCILE_INTERVAL", defaults.RECONCILE_INTERVAL) or 0)
    if reconcile > 0:
        entries["outbox-reconcile"] = {"task": "outbox.reconcile", "schedule": reconcile, "options": {"queue": queue}}
    return entries
