"""Issue 19: a ``listen`` process serves Prometheus metrics of what it applied, skipped, dead-lettered, and its lag."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, stop, wait_for
from tests.listeners.helpers import REPLICA, message, publish, run_manage, setup_streams, start_listener, ticket
from ticketing.replica.models import TicketReplica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("isolated_streams")]

BOTH = ("ticket:created", "ticket:updated")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value; {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_running_listener_serves_its_counters_and_the_lag_of_its_durable(tmp_path: Path):
    port = free_port()
    setup_streams()
    proc = start_listener(*BOTH, "--metrics-port", str(port), log=tmp_path / "listener.log")
    try:
        wait_for(lambda: scrape(port), timeout=60, what="the metrics endpoint")
        publish(
            [
                ticket("t1", 0),
                ticket("t1", 1),
                ticket("t2", 0),
                ticket("t2", 0),  # another event with a version the replica holds: stale
                message("ticket:created", b"{not json"),  # dead letter: invalid
                ticket("t3", 0),
                ticket("t3", 2),  # version 1 never comes: it waits (nak'ed), acked by no one
            ],
            setup=False,
        )
        wait_for(lambda: TicketReplica.objects.count() == 3, timeout=60, what="three tickets applied")
        consumer = {"consumer": REPLICA}

        def settled_samples():
            samples = scrape(port)
            done = (
                value(samples, "listeners_applied_total", subject="ticket:created", **consumer) == 3
                and value(samples, "listeners_consumer_ack_pending", **consumer) == 1
            )
            return done and samples

        samples = wait_for(settled_samples, timeout=60, interval=0.5, what="the counters and a lag sample")
    finally:
        assert stop(proc) == 0

    assert value(samples, "listeners_applied_total", subject="ticket:updated", **consumer) == 1
    assert value(samples, "listeners_skipped_total", subject="ticket:created", reason="stale", **consumer) == 1
    assert value(samples, "listeners_dead_total", subject="ticket:created", reason="invalid", **consumer) == 1
    waiting = value(
        samples, "listeners_redeliveries_requested_total", subject="ticket:updated", reason="waiting", **consumer
    )
    assert waiting and waiting >= 1
    # The lag: nothing left undelivered; the waiting version 2 is delivered and not acked.
    assert value(samples, "listeners_consumer_pending", **consumer) == 0
    assert value(samples, "listeners_consumer_ack_pending", **consumer) == 1
    applied_timings = sum(
        value(samples, "listeners_publish_to_apply_seconds_count", subject=s, **consumer) or 0
        for s in ("ticket:created", "ticket:updated")
    )
    assert applied_timings == 4
    assert value(samples, "listeners_batch_seconds_count", **consumer) >= 1


def test_a_taken_metrics_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_manage("listen", *BOTH, "--metrics-port", str(port), timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"CommandError: cannot serve metrics on 127.0.0.1:{port}: "), lines
