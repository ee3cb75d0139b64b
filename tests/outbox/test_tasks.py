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
    # The example project uses it with its own OUTBOX dict (beside the listeners' entries).
    ours = {name: entry for name, entry in settings.CELERY_BEAT_SCHEDULE.items() if name.startswith("outbox-")}
    assert beat_schedule(settings.OUTBOX) == ours
