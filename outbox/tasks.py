"""Celery tasks of the relay, and the relay loop's bootstep installed on the current Celery app
(outbox/bootsteps.py). Each worker process reuses one NATS connection."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, current_app, shared_task
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready
from django.db import close_old_connections

from outbox.bootsteps import install
from outbox.conf import outbox_settings

logger = logging.getLogger("outbox.tasks")

_relay = None

# A worker of the project's app (current when Django loads this module, which happens before the
# worker builds its blueprint) runs the relay loop for as long as it lives.
install(current_app)


class OutboxTask(Task):
    """A relay task goes to ``OUTBOX['CELERY_QUEUE']`` by itself: the project needs no task route.

    A route the project declares for these task names still wins (Celery gives routes precedence
    over a task's own options), and so does a queue passed to ``apply_async``.
    """

    def _get_exec_options(self) -> dict[str, Any]:
        options = super()._get_exec_options()  # type: ignore[misc]  # not in celery-types
        return {**options, "queue": outbox_settings().CELERY_QUEUE}


def _get_relay():
    global _relay
    from outbox.relay import Relay

    if _relay is None or _relay.broker.pid != __import__("os").getpid():
        _relay = Relay()
    return _relay


@shared_task(name="outbox.relay", base=OutboxTask, ignore_result=True)
def relay() -> int:
    """Drain the outbox, then follow new commits for up to FOLLOW_SECONDS of quiet (outbox/wake.py),
    within TASK_TIME_BUDGET seconds in all; re-kicks itself when work may remain."""
    from outbox.kick import clear_kick_flag, kick_relay
    from outbox.wake import Wakeups, follow_enabled

    clear_kick_flag()
    close_old_connections()
    conf = outbox_settings()
    until = time.monotonic() + conf.TASK_TIME_BUDGET
    followed = out_of_time = False
    try:
        relay = _get_relay()
        total = relay.drain(time_budget=conf.TASK_TIME_BUDGET)
        if follow_enabled() and not (total.failed and not total.published) and not _worker_stopping():
            try:
                wakeups = Wakeups()
            except Exception as exc:  # noqa: BLE001 - Redis trouble: the plain kick path still works
                logger.warning("outbox.follow_unavailable error=%s", exc)
            else:
                try:
                    # Subscribed: a drain now catches what committed before, the wake-ups the rest.
                    total.add(relay.drain(time_budget=max(0.0, until - time.monotonic())))
                    report, out_of_time = relay.follow(
                        wakeups, idle=conf.FOLLOW_SECONDS, until=until, stop=_worker_stopping
                    )
                    total.add(report)
                    followed = True
                finally:
                    wakeups.close()
    finally:
        close_old_connections()
    if total.claimed and not total.failed and (out_of_time or not followed):
        # Budget spent with work left, or more may have arrived: hand over to a fresh task.
        kick_relay()
    return total.published


def _worker_stopping() -> bool:
    """The worker was asked to shut down (warm or cold): a following task leaves at once."""
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


@shared_task(name="outbox.sweep", base=OutboxTask, ignore_result=True)
def sweep() -> int:
    """Beat backstop: publishes rows whose kick was lost (Redis down, worker crash)."""
    from outbox.operations import sample_metrics
    from outbox.selectors import outbox_backlog

    close_old_connections()
    try:
        sample_metrics()
        if outbox_backlog().pending == 0:
            return 0
        return _get_relay().drain(time_budget=outbox_settings().TASK_TIME_BUDGET).published
    finally:
        close_old_connections()


@shared_task(name="outbox.reconcile", base=OutboxTask, ignore_result=True)
def reconcile() -> int:
    """Beat (OUTBOX['RECONCILE_INTERVAL']): republish the events the streams lost; returns how many."""
    from django.utils import timezone

    from outbox.reconcile import reconcile as reconcile_streams

    close_old_connections()
    try:
        window = outbox_settings().RECONCILE_WINDOW
        findings = reconcile_streams(since=timezone.now() - window if window else None)
        if findings.missing:
            logger.error(
                "outbox.reconcile missing=%d republished=%d checked=%d",
                findings.missing,
                findings.republished,
                findings.checked,
            )
        return findings.republished
    finally:
        close_old_connections()


@shared_task(name="outbox.purge", base=OutboxTask, ignore_result=True)
def purge() -> int:
    from outbox.services import outbox_purge_published

    close_old_connections()
    try:
        return outbox_purge_published()
    finally:
        close_old_connections()


#: The one pool a relay worker runs in: the relay keeps per-process state (its NATS connection on
#: a private event-loop thread, its partitions, its worker sessions) that threads, greenlets and
#: forked children would share or inherit.
SAFE_POOL = "solo"


def unsafe_pool(pool: object, queues: set[str], queue: str) -> str | None:
    """The sentence refusing this worker, or None when it may run the relay."""
    kind = pool if isinstance(pool, str) else str(getattr(pool, "__module__", pool)).rsplit(".", 1)[-1]
    if queue not in queues or kind == SAFE_POOL:
        return None
    return (
        f"outbox: the relay's queue {queue!r} needs --pool={SAFE_POOL} (this worker uses {kind!r}, whose "
        "threads or processes would share one relay's state); run a separate solo worker for it"
    )


@worker_init.connect
def _refuse_an_unsafe_pool(sender=None, **_: object) -> None:
    """A worker that consumes the relay's queue with a pool other than solo refuses to start."""
    if sender is None:
        return
    queues = set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    problem = unsafe_pool(sender.pool_cls, queues, outbox_settings().CELERY_QUEUE)
    if problem:
        raise SystemExit(problem)


@worker_process_init.connect
def _fresh_connection_after_fork(**_: object) -> None:
    from outbox.broker import reset_broker

    global _relay
    _relay = None
    reset_broker()


@worker_ready.connect
def _metrics_server(**_: object) -> None:
    """OUTBOX['METRICS_PORT'] serves this worker's relay counters to Prometheus (on METRICS_ADDR: loopback)."""
    conf = outbox_settings()
    if conf.METRICS_PORT is not None:
        from prometheus_client import start_http_server

        start_http_server(conf.METRICS_PORT, addr=conf.METRICS_ADDR)
        logger.info("outbox.metrics_server port=%s", conf.METRICS_PORT)


@worker_ready.connect
def _streams_on_start(**_: object) -> None:
    try:
        _get_relay().ensure_streams()
    except Exception as exc:  # noqa: BLE001 - NATS may come later; the relay retries on each batch
        logger.warning("could not create streams at worker start: %s", exc)


@worker_process_shutdown.connect
def _close_connection(**_: object) -> None:
    from outbox.broker import reset_broker

    if _relay is not None:
        _relay.close_sessions()
    reset_broker()
