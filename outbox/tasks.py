"""Celery tasks of the relay. Each worker process reuses one NATS connection."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from django.db import close_old_connections

from outbox.conf import outbox_settings

logger = logging.getLogger("outbox.tasks")

_relay = None


def _get_relay():
    global _relay
    from outbox.relay import Relay

    if _relay is None or _relay.broker.pid != __import__("os").getpid():
        _relay = Relay()
    return _relay


@shared_task(name="outbox.relay", ignore_result=True)
def relay() -> int:
    """Drain the outbox for up to TASK_TIME_BUDGET seconds; re-kicks itself when work remains."""
    from outbox.kick import clear_kick_flag, kick_relay

    clear_kick_flag()
    close_old_connections()
    try:
        total = _get_relay().drain(time_budget=outbox_settings().TASK_TIME_BUDGET)
    finally:
        close_old_connections()
    if total.claimed and not total.failed:
        # Budget spent with work left, or more may have arrived: hand over to a fresh task.
        kick_relay()
    return total.published


@shared_task(name="outbox.sweep", ignore_result=True)
def sweep() -> int:
    """Beat backstop: publishes rows whose kick was lost (Redis down, worker crash)."""
    from outbox import metrics
    from outbox.selectors import outbox_backlog

    close_old_connections()
    try:
        metrics.sample()
        if outbox_backlog().pending == 0:
            return 0
        return _get_relay().drain(time_budget=outbox_settings().TASK_TIME_BUDGET).published
    finally:
        close_old_connections()


@shared_task(name="outbox.purge", ignore_result=True)
def purge() -> int:
    from outbox.services import outbox_purge_published

    close_old_connections()
    try:
        return outbox_purge_published()
    finally:
        close_old_connections()


@worker_process_init.connect
def _fresh_connection_after_fork(**_: object) -> None:
    from outbox.broker import reset_broker

    global _relay
    _relay = None
    reset_broker()


@worker_ready.connect
def _metrics_server(**_: object) -> None:
    """OUTBOX_METRICS_PORT=9808 serves this worker's relay counters to Prometheus (loopback by default)."""
    import os

    port = os.environ.get("OUTBOX_METRICS_PORT")
    if port:
        from prometheus_client import start_http_server

        start_http_server(int(port), addr=os.environ.get("OUTBOX_METRICS_ADDR", "127.0.0.1"))
        logger.info("outbox.metrics_server port=%s", port)


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
