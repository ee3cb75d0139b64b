"""Coalesced relay kicks.

Every commit that emitted events calls :func:`kick_relay`. With a Redis broker a
short-lived ``SET NX`` flag lets only the first kick of a burst enqueue a task; the
task clears the flag when it starts, so commits that land while it drains enqueue
at most one follow-up. A kick that cannot reach Redis is dropped with a warning:
the write already committed, and the beat sweep publishes the row later.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings

from outbox.conf import outbox_settings

logger = logging.getLogger("outbox.kick")

_FLAG_TTL_MS = 2000
_local = threading.local()


def _flag_key() -> str:
    conf = outbox_settings()
    return f"outbox:kick:{conf.STREAM_PREFIX}{conf.CELERY_QUEUE}"


def _redis() -> Any | None:
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = getattr(_local, "redis", None)
    if client is None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        _local.redis = client
    return client


def clear_kick_flag() -> None:
    client = _redis()
    if client is None:
        return
    try:
        client.delete(_flag_key())
    except Exception:  # noqa: BLE001 - Redis down only costs a redundant kick
        logger.debug("could not clear the kick flag", exc_info=True)


def kick_relay() -> bool:
    """Enqueue a relay task unless one is already queued. Never raises."""
    if not outbox_settings().KICK_ON_COMMIT:
        return False
    from outbox.tasks import relay

    client = _redis()
    try:
        if client is not None and not _flag_and_wake(client):
            return False
        relay.apply_async(retry=False)
        return True
    except Exception as exc:  # noqa: BLE001 - the write committed; the sweep is the backstop
        logger.warning("relay kick failed (%s); the beat sweep will publish the event", exc)
        if client is not None:
            try:
                client.delete(_flag_key())
            except Exception:  # noqa: BLE001, S110
                pass
        return False


def _flag_and_wake(client: Any) -> bool:
    """One round trip: set the flag unless a task is queued (True: this kick enqueues one), and
    wake a relay that follows new commits (outbox/wake.py), if following is on."""
    if outbox_settings().FOLLOW_SECONDS <= 0:
        return bool(client.set(_flag_key(), b"1", nx=True, px=_FLAG_TTL_MS))
    from outbox.wake import wake_channel

    pipe = client.pipeline(transaction=False)
    pipe.set(_flag_key(), b"1", nx=True, px=_FLAG_TTL_MS)
    pipe.publish(wake_channel(), b"")
    first, _woken = pipe.execute()
    return bool(first)
