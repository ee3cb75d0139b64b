"""A relay task that follows new commits (OUTBOX['FOLLOW_SECONDS']): after draining it stays,
and every kick's wake-up on Redis makes it drain again without a new Celery task. The workers
here are woken by kicks (``OUTBOX_WAKE=kick``; on PostgreSQL the default is the NOTIFY loop)."""

from __future__ import annotations

import os
import signal

import pytest
import redis
from django.conf import settings

from outbox.kick import _flag_key
from outbox.models import OutboxEvent
from tests.helpers import celery_worker, stop, subprocess_env, wait_for
from ticketing.services import ticket_create, ticket_update

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _wake_by_kick(settings):
    """The writers (this process) kick too: ``WAKE = "kick"`` (the default on PostgreSQL is "notify")."""
    settings.OUTBOX = {**settings.OUTBOX, "WAKE": "kick"}


def published() -> int:
    return OutboxEvent.objects.filter(status="published").count()


def test_a_following_relay_publishes_new_commits_on_their_wake_up_without_a_new_task(logs):
    worker = celery_worker(
        env=subprocess_env(OUTBOX_WAKE="kick", OUTBOX_FOLLOW_SECONDS="40", OUTBOX_TASK_TIME_BUDGET="60"),
        log=logs / "worker.log",
    )
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        ticket = ticket_create(title="T", price="1", user_id="u")  # kick: a task drains it, then follows
        wait_for(lambda: published() == 1, timeout=60, what="the first event published by a task")
        # From here no kick can enqueue a task: the flag says one is queued (no beat runs either).
        # Only the wake-ups that every kick also publishes can bring the following task to drain.
        client.set(_flag_key(), b"1", px=120_000)
        for version in range(5):
            ticket_update(ticket_id=ticket.id, expected_version=version, price=str(version + 2))
            wait_for(lambda v=version: published() == v + 2, timeout=30, what=f"update {version + 1} published")
        assert client.get(_flag_key()) == b"1", "no relay task started meanwhile (a task clears the flag)"
        assert worker.poll() is None
    finally:
        client.delete(_flag_key())
        stop(worker)


def test_sigterm_ends_a_following_relay_task_at_once_not_after_its_follow_time(logs):
    worker = celery_worker(
        env=subprocess_env(OUTBOX_WAKE="kick", OUTBOX_FOLLOW_SECONDS="100", OUTBOX_TASK_TIME_BUDGET="120"),
        log=logs / "worker.log",
    )
    try:
        ticket_create(title="T", price="1", user_id="u")
        wait_for(lambda: published() == 1, timeout=60, what="the event published (the task now follows)")
        os.killpg(worker.pid, signal.SIGTERM)
        # Warm shutdown waits for the running task: it must notice and leave within a wait slice.
        assert worker.wait(timeout=30) == 0, (logs / "worker.log").read_text()[-2000:]
    finally:
        stop(worker, sig=signal.SIGKILL)
