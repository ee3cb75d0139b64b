"""The relay's Celery tasks find their queue by themselves, and beat gets its entries from one helper."""

from __future__ import annotations

import json

import pytest
import redis
from celery import current_app
from django.conf import settings

from outbox.beat import beat_schedule
from outbox.conf import outbox_settings
from outbox.tasks import purge, relay, sweep


@pytest.fixture
def queues():
    """This run's relay queue and Celery's default queue, as Redis lists; left empty."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    ours = outbox_settings().CELERY_QUEUE
    default = current_app.conf.task_default_queue
    before = client.llen(default)
    client.delete(ours)
    yield client, ours, default, before
    client.delete(ours)


def test_relay_tasks_go_to_the_outbox_queue_without_any_project_route(queues):
    client, ours, default, before = queues
    assert not getattr(settings, "CELERY_TASK_ROUTES", None) and not current_app.conf.task_routes
    for task in (relay, sweep, purge):
        task.apply_async(retry=False)
    names = [json.loads(raw)["headers"]["task"] for raw in client.lrange(ours, 0, -1)]
    assert sorted(names) == ["outbox.purge", "outbox.relay", "outbox.sweep"]
    assert client.llen(default) == before


def test_a_queue_given_at_the_call_still_wins(queues):
    client, ours, _default, _before = queues
    elsewhere = f"{ours}-elsewhere"
    try:
        relay.apply_async(queue=elsewhere, retry=False)
        assert client.llen(elsewhere) == 1 and client.llen(ours) == 0
    finally:
        client.delete(elsewhere)


def test_the_beat_helper_gives_the_sweep_and_the_purge_on_the_outbox_queue():
    assert beat_schedule() == {
        "outbox-sweep": {"task": "outbox.sweep", "schedule": 5.0, "options": {"queue": "outbox"}},
        "outbox-purge": {"task": "outbox.purge", "schedule": 3600.0, "options": {"queue": "outbox"}},
    }
    entries = beat_schedule({"CELERY_QUEUE": "relays", "SWEEP_INTERVAL": 2})
    assert entries["outbox-sweep"]["schedule"] == 2.0
    assert {e["options"]["queue"] for e in entries.values()} == {"relays"}
    assert "outbox-reconcile" not in entries  # off unless asked for
    assert beat_schedule({"RECONCILE_INTERVAL": 600})["outbox-reconcile"] == {
        "task": "outbox.reconcile",
        "schedule": 600.0,
        "options": {"queue": "outbox"},
    }
    # The example project uses it with its own OUTBOX dict (beside the listeners' entries).
    ours = {name: entry for name, entry in settings.CELERY_BEAT_SCHEDULE.items() if name.startswith("outbox-")}
    assert beat_schedule(settings.OUTBOX) == ours


def test_a_worker_of_the_relay_queue_with_a_pool_other_than_solo_refuses_with_one_line():
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    queue = outbox_settings().CELERY_QUEUE
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ticketing", "worker", "--pool=threads", "-Q", queue],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    refusal = [line for line in done.stderr.splitlines() if line.startswith("outbox:")]
    assert refusal == [
        f"outbox: the relay's queue {queue!r} needs --pool=solo (this worker uses 'thread', whose threads or "
        "processes would share one relay's state); run a separate solo worker for it"
    ]


def test_only_workers_of_the_relay_queue_are_held_to_solo():
    from outbox.tasks import unsafe_pool

    assert unsafe_pool("solo", {"outbox"}, "outbox") is None
    assert unsafe_pool("prefork", {"emails"}, "outbox") is None
    assert "needs --pool=solo" in unsafe_pool("prefork", {"outbox", "emails"}, "outbox")
    assert "'gevent'" in unsafe_pool("gevent", {"outbox"}, "outbox")
