"""Scale out on real engines: a three-node NATS JetStream cluster, streams with three replicas,
several relays and listeners, and cluster nodes SIGKILLed under load.

Every process gets ``OUTBOX_STREAM_REPLICAS=3`` and a ``NATS_URL`` naming cluster nodes; the
test process checks the invariants with the same settings (``ClusterStack.wait_quiet_and_verify``).
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass

import pytest
from django.conf import settings
from django.test import override_settings

from outbox.models import OutboxEvent
from outbox.streams import stream_name
from tests.cluster import NatsCluster
from tests.faults.harness import Stack, after_progress, applied, fault_env, published
from tests.helpers import PYTHON, ROOT, PrivateRedis, free_port, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

REPLICAS = "3"


@dataclass
class ClusterStack(Stack):
    """The fault suite's stack (relays, listeners, load, private Redis) on a NATS cluster."""

    cluster: NatsCluster | None = None
    nats_url: str = ""

    def __post_init__(self) -> None:
        assert self.cluster is not None
        self.nats = None
        self.redis = PrivateRedis().start()
        self.env = cluster_env(self.nats_url or self.cluster.url, CELERY_BROKER_URL=self.redis.url, **self.env_extra)

    def close(self) -> None:
        super().close()  # stops the relays, the listeners and Redis; the cluster belongs to its fixture

    def log_text(self, name: str) -> str:
        return "".join(path.read_text() for path in sorted(self.tmp.glob(f"*-{name}.log")))

    def wait_quiet_and_verify(self, *, timeout: float = 180.0, allow_stream_duplicates: bool = False):
        """Poll the invariant checker, connected to the cluster with three replicas, until it passes."""
        from outbox.broker import reset_broker
        from ticketing.verify import verify

        reset_broker()
        last = {}
        with cluster_settings(self.cluster):

            def check():
                try:
                    report = verify(allow_stream_duplicates=allow_stream_duplicates)
                except Exception as exc:  # noqa: BLE001 - stream not created yet, an election under way
                    last["error"] = exc
                    return False
                last["report"] = report
                return report.ok

            try:
                wait_for(check, timeout=timeout, interval=0.5, what="the invariants to hold")
            except AssertionError:
                if "report" in last:
                    print(last["report"].render(limit=20))
                print(f"last error of the checker: {last.get('error')!r}")
                for path in sorted(self.tmp.glob("*.log"))[-6:]:
                    print(f"--- {path.name}\n{path.read_text()[-3000:]}")
                raise
        report = last["report"]
        print(report.render())
        return report


def cluster_env(nats_url: str, **extra: str) -> dict[str, str]:
    """The fault suite's tuning for child processes, pointed at a cluster, streams with three replicas."""
    # A leader election answers "no responders" at once, so attempts go fast; with the fault
    # suite's 2 s backoff cap, 12 attempts would last ~17 s, which a slow election may exceed.
    return fault_env(nats_url, **{"OUTBOX_STREAM_REPLICAS": REPLICAS, "OUTBOX_MAX_ATTEMPTS": "40", **extra})


def cluster_settings(cluster: NatsCluster):
    """This process's settings for talking to the cluster (the checker, the relay in-process)."""
    return override_settings(
        NATS=dict(settings.NATS, SERVERS=cluster.urls),
        OUTBOX=dict(settings.OUTBOX, STREAM_REPLICAS=int(REPLICAS)),
    )


def run_manage(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dead_url() -> str:
    """A loopback URL where nothing listens."""
    return f"nats://127.0.0.1:{free_port()}"


TICKETS = stream_name("TICKETS")


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path / "nats").start()
    yield c
    c.close()


@pytest.fixture
def stack(tmp_path, cluster):
    created: list[ClusterStack] = []

    def make(nats_url: str = "", **env: str) -> ClusterStack:
        s = ClusterStack(tmp_path, env_extra=env, cluster=cluster, nats_url=nats_url)
        created.append(s)
        return s

    yield make
    for s in created:
        s.close()


def finish(s: ClusterStack, load) -> None:
    assert load.wait(600) == 0, "the load generator failed"
    report = s.wait_quiet_and_verify()
    assert report.ok
    assert report.counts["published"] == report.counts["outbox_events"]
    assert report.counts["dead"] == 0


def test_outbox_streams_reports_replica_drift_and_updates_the_stream_to_three_replicas(cluster):
    one = run_manage("outbox_streams", env=cluster_env(cluster.url, OUTBOX_STREAM_REPLICAS="1"))
    assert one.returncode == 0, one.stderr
    assert f"{TICKETS}: created" in one.stdout
    assert cluster.stream_info(TICKETS).config.num_replicas == 1

    check = run_manage("outbox_streams", "--check", env=cluster_env(cluster.url))
    assert check.returncode == 1
    assert f"{TICKETS}: drift (num_replicas: 1 -> 3)" in check.stdout
    assert "run outbox_streams without --check" in check.stderr
    assert cluster.stream_info(TICKETS).config.num_replicas == 1, "--check must not change anything"

    fix = run_manage("outbox_streams", env=cluster_env(cluster.url))
    assert fix.returncode == 0, fix.stderr
    assert f"{TICKETS}: updated (num_replicas: 1 -> 3)" in fix.stdout
    info = cluster.stream_info(TICKETS)
    assert info.config.num_replicas == 3
    wait_for(lambda: cluster.stream_current(TICKETS), timeout=60, interval=0.2, what="three current replicas")

    again = run_manage("outbox_streams", "--check", env=cluster_env(cluster.url))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{TICKETS}: unchanged" in again.stdout


@pytest.mark.failover  # not in `make test`: see the marker's description in pyproject.toml
def test_stream_leader_sigkilled_under_load_with_two_relays_and_two_listeners_loses_nothing(stack, cluster):
    s = stack()
    for _ in range(2):
        s.start_relay()
        s.start_listener()
    rng = random.Random(21)
    load = s.load(tickets=20, updates=600, rate=50)
    assert after_progress(published, rng, 60, 120, timeout=120), "nothing was published before the fault"
    assert cluster.stream_info(TICKETS).config.num_replicas == 3
    leader = cluster.stream_leader(TICKETS)
    before = published()
    cluster.kill(leader)
    s.kills += 1
    # Writes go on; the two survivors elect a new leader and the relays publish to it.
    successor = cluster.stream_leader(TICKETS)
    assert successor is not leader
    wait_for(lambda: published() >= before + 30, timeout=120, what="events published after the leader died")
    cluster.start_node(leader)
    finish(s, load)
    wait_for(lambda: cluster.stream_current(TICKETS), timeout=90, interval=0.2, what="the old leader to catch up")
    print(f"TICKETS leader {leader.name} SIGKILLed, {successor.name} took over")


def test_processes_given_one_reachable_url_discover_the_cluster_and_survive_losing_that_node(stack, cluster):
    # Two dead URLs and one live node: the client connects to the live one, learns the other
    # members from its INFO, and fails over to them when the only listed node dies.
    first = cluster.nodes[0]
    s = stack(nats_url=f"{dead_url()},{dead_url()},{first.url}")
    s.start_relay()
    s.start_listener()
    rng = random.Random(22)
    before = s.load(tickets=10, updates=150, rate=40)
    assert after_progress(applied, rng, 30, 60, timeout=120), "nothing was applied through the one live URL"
    cluster.kill(first)
    s.kills += 1
    # Every write from here on reaches the stream and the replica through a node NATS_URL never named.
    after = s.load(tickets=5, updates=100, rate=40, seed=2)
    assert before.wait(600) == 0, "the load generator failed"
    finish(s, after)
    for proc in [*s.relays, *s.listeners]:
        assert proc.poll() is None, "a process died instead of failing over"


def test_processes_started_while_two_of_three_nodes_are_down_catch_up_when_they_return(stack, cluster):
    # No quorum: JetStream cannot answer. Writes still commit; the relay keeps its rows pending with
    # the failure recorded; a listener refuses to start with one line (its supervisor restarts it).
    cluster.kill(1)
    cluster.kill(2)
    s = stack()
    s.start_relay()
    s.start_listener()
    load = s.load(tickets=10, updates=100, rate=50)
    wait_for(
        lambda: OutboxEvent.objects.filter(status="pending", attempts__gt=0).exclude(last_error="").exists(),
        timeout=120,
        what="the relay recording failed attempts while JetStream has no quorum",
    )
    assert not OutboxEvent.objects.filter(status="published").exists()
    listener = s.listeners[0]
    assert listener.wait(120) != 0, "a listener cannot set up its consumer without a JetStream quorum"
    out = [line for line in s.log_text("listener").splitlines() if line.startswith("CommandError")]
    assert len(out) == 1 and "NATS" in out[0], out
    cluster.start_node(1, wait=False)
    cluster.start_node(2, wait=False)
    cluster.wait_ready()
    s.start_listener(0)
    finish(s, load)
    assert s.relays[0].poll() is None, "the relay worker must ride out the outage"
