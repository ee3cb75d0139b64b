"""The Celery broker (a private Redis) killed and restarted while the relay worker consumes and acks
its kicks: the worker process survives every drop (no "Unrecoverable error", no restart by anyone),
consumes again once Redis is back, and nothing is lost.

This is the scenario behind the celery/kombu pin in pyproject.toml: it runs under the pinned
versions, and under any others installed in the venv that runs the suite.
"""

from __future__ import annotations

import random

import pytest

from tests.faults.harness import SOAK, Stack, after_progress, published, scaled
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(900 if SOAK else 400)]


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def test_redis_killed_repeatedly_while_the_relay_acks_its_kicks_the_worker_survives_and_nothing_is_lost(stack):
    s = stack
    s.start_relay()
    s.start_listener()
    relay = s.relays[0]
    # A commit every few milliseconds: each one kicks the relay through Redis, so the worker is
    # receiving and acking a task at almost any moment Redis goes away.
    load = s.load(tickets=20, updates=scaled(400, 4000), rate=scaled(120, 200))
    rng = random.Random(21)
    drops = 0
    for _ in range(scaled(3, 12)):
        if not after_progress(published, rng, 20, 60):
            break
        s.redis.stop()  # SIGKILL: every connection to it resets, mid-ack or not
        drops += 1
        s.redis.start()  # the same port, empty: queued kicks are gone, the beat sweep is the backstop
    assert drops >= 1, "the load finished before Redis could be dropped"

    # Back on Redis: events still get published by the same worker process.
    before = published()
    wait_for(lambda: published() > before or load.poll() is not None, timeout=120, what="publishing after the drops")

    assert load.wait(600) == 0, "the load generator failed"
    report = s.wait_quiet_and_verify()
    assert report.ok
    assert report.counts["published"] == report.counts["outbox_events"]
    assert relay.poll() is None, "the relay worker exited after Redis dropped"
    assert s.relays[0] is relay
    logs = "".join(p.read_text(errors="replace") for p in sorted(s.tmp.glob("*-relay.log")))
    assert "Unrecoverable error" not in logs, logs[-4000:]
