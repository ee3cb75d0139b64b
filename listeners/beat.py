"""The listeners' periodic task, for the project's Celery beat schedule.

One helper, called from the project's settings with the ``LISTENERS`` dict it already has,
beside the relay's::

    from listeners.beat import beat_schedule as listeners_beat
    from outbox.beat import beat_schedule

    CELERY_BEAT_SCHEDULE = {**beat_schedule(OUTBOX), **listeners_beat(LISTENERS)}

It reads only the dict it is given (settings are not loaded yet when it runs), so its
defaults are those of :class:`listeners.conf.ListenersSettings`. The task routes itself to
``OUTBOX['CELERY_QUEUE']`` when beat sends it; pass ``queue`` to name one here instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from listeners.conf import ListenersSettings, retention_of

#: Seconds between purges of inbox rows older than LISTENERS['INBOX_RETENTION'].
PURGE_INTERVAL = 3600.0


def beat_schedule(listeners: Mapping[str, Any] | None = None, *, queue: str | None = None) -> dict[str, dict[str, Any]]:
    """``listeners-purge-inbox`` (hourly); nothing when the inbox is kept forever (``INBOX_RETENTION`` 0/None)."""
    listeners = listeners or {}
    retention = listeners.get("INBOX_RETENTION", ListenersSettings().INBOX_RETENTION)
    try:
        off = retention_of(retention) is None
    except (TypeError, ValueError):
        off = False  # malformed: the system check (listeners.E003) says so; settings must still load
    if off:
        return {}
    entry: dict[str, Any] = {"task": "listeners.purge_inbox", "schedule": PURGE_INTERVAL}
    if queue:
        entry["options"] = {"queue": queue}
    return {"listeners-purge-inbox": entry}
