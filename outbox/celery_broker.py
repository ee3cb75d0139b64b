"""The Celery app's own broker, as the kick and the wake-ups reach it.

The relay is kicked through the broker of the Celery app that runs it — whatever way the
project configured it (``CELERY_BROKER_URL`` in settings, ``app.conf.broker_url``, or
Celery's own ``CELERY_BROKER_URL`` environment variable) — not through a Django setting
of its own. Only a Redis broker carries the coalescing flag and the wake-ups; with any other
broker a kick is a plain task message.
"""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

#: The Redis URL once read (None inside: not Redis); reading Celery's configuration costs about
#: 20 µs, and every kick asks.
_cached: tuple[str | None] | None = None


def broker_url() -> str:
    """The write broker URL of the current Celery app ("" when none is configured)."""
    from celery import current_app

    conf = current_app.conf
    url = conf.broker_write_url or conf.broker_url or ""
    if isinstance(url, list | tuple):  # failover list: the first one is used first
        url = url[0] if url else ""
    return str(url).split(";", 1)[0].strip()


def redis_broker_url() -> str | None:
    """The broker URL when it is Redis, else None (read once; :func:`forget_broker_url` resets)."""
    global _cached
    cached = _cached
    if cached is None:
        url = broker_url()
        cached = _cached = (url if url.startswith(REDIS_SCHEMES) else None,)
    return cached[0]


def forget_broker_url(**_: Any) -> None:
    """Read the broker URL afresh next time (after the Celery app's configuration changed)."""
    global _cached
    _cached = None


setting_changed.connect(forget_broker_url)
