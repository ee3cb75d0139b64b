"""The relay loop as part of the Celery worker: :class:`RelayLoopStep`, a worker bootstep that runs
:class:`~outbox.relay.notify.RelayLoop` for the life of a worker consuming the relay's queue, so
``celery -A proj worker -Q outbox`` stays the one relay process an operator runs.

It runs when ``OUTBOX['WAKE']`` is "notify" and the database is PostgreSQL; otherwise the worker
only runs the relay's tasks, kicked on commit, as before. ``outbox.tasks`` adds the step to the
current Celery app when Django loads the outbox app (before a worker builds its blueprint);
:func:`install` adds it to another app. The worker's warm shutdown (SIGTERM) stops the loop after
its batches in flight; a killed worker leaves its rows pending and its partitions free (they are
held by its database session).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

logger = logging.getLogger("outbox.bootsteps")

#: Seconds a warm shutdown waits for the loop's batches in flight (each publish wait is bounded).
STOP_TIMEOUT = 30.0


def loop_wanted(worker: Any) -> bool:
    """Does this worker run the relay loop: WAKE "notify", PostgreSQL, and it consumes the relay's queue?"""
    from django.db import connection

    from outbox.conf import outbox_settings, wake_mode

    conf = outbox_settings()
    if wake_mode(conf, connection.vendor) != "notify":
        return False
    queues = getattr(getattr(worker.app, "amqp", None), "queues", None)
    selected = getattr(queues, "consume_from", None)
    return selected is None or conf.CELERY_QUEUE in selected


class RelayLoopStep(bootsteps.StartStopStep):
    """Starts the relay loop with the worker and stops it with the worker."""

    label = "outbox relay loop"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        self.loop: Any = None
        super().__init__(parent, **kwargs)

    def start(self, parent: Any) -> None:
        if not loop_wanted(parent):
            return
        from outbox.relay.notify import RelayLoop

        self.loop = RelayLoop()
        self.loop.start()

    def stop(self, parent: Any) -> None:
        loop, self.loop = self.loop, None
        if loop is not None and not loop.stop(STOP_TIMEOUT):
            logger.warning("outbox.relay_loop did not stop within %ss", STOP_TIMEOUT)

    def terminate(self, parent: Any) -> None:
        self.stop(parent)

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


def install(app: Any) -> None:
    """Add the relay loop to the workers of ``app`` (idempotent)."""
    app.steps["worker"].add(RelayLoopStep)
