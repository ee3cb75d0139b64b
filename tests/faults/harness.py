"""Real processes for the fault suite: relays (Celery workers with beat), listeners, a load
generator, a private nats-server and a private Redis, each of which a scenario may kill."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.db import connection

from tests.helpers import (
    PYTHON,
    ROOT,
    PrivateNats,
    PrivateRedis,
    celery_worker,
    listen_crashing_after_commit,
    manage,
    stop,
    subprocess_env,
    wait_for,
)

SOAK = os.environ.get("SOAK") == "1"


def scaled(quick: int, soak: int) -> int:
    return soak if SOAK else quick


def fault_env(nats_url: str, **extra: str) -> dict[str, str]:
    """Child-process environment of the fault scenarios: short leases, timeouts and backoff, so
    recoveries happen in seconds; every process tagged so the suite can terminate its sessions."""
    env = subprocess_env(
        NATS_URL=nats_url,
        OUTBOX_LEASE_SECONDS="2",
        OUTBOX_PUBLISH_TIMEOUT="2",
        OUTBOX_BACKOFF_BASE="0.2",
        OUTBOX_BACKOFF_MAX="2",
        OUTBOX_SWEEP_INTERVAL="1",
        OUTBOX_TASK_TIME_BUDGET="5",
        CONN_MAX_AGE="0",
    )
    env["DATABASE_URL"] += "?application_name=faults-process"
    env.update(extra)
    return env


@dataclass
class Stack:
    tmp: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    nats: PrivateNats | None = None
    redis: PrivateRedis | None = None
    relays: list[subprocess.Popen | None] = field(default_factory=list)
    listeners: list[subprocess.Popen | None] = field(default_factory=list)
    kills: int = 0
    _logs: int = 0
    _streams_ready: bool = False

    def __post_init__(self) -> None:
        self.nats = PrivateNats(store=self.tmp / "nats").start()
        self.redis = PrivateRedis().start()
        self.env = fault_env(self.nats.url, CELERY_BROKER_URL=self.redis.url, **self.env_extra)

    def log(self, name: str) -> Path:
        self._logs += 1
        return self.tmp / f"{self._logs:03d}-{name}.log"

    # --- processes ------------------------------------------------------------------
    def start_relay(self, index: int | None = None) -> None:
        proc = celery_worker(env=self.env, beat=True, log=self.log("relay"))
        if index is None:
            self.relays.append(proc)
        else:
            self.relays[index] = proc

    def ensure_streams(self) -> None:
        """Create the streams the producer's way (``manage.py outbox_streams``) until it succeeds once.

        A listener only checks its streams: started before any relay made them, it would exit.
        When NATS cannot take them yet (no quorum), the listener that follows says so itself.
        """
        if not self._streams_ready:
            done = subprocess.run(
                [PYTHON, str(ROOT / "manage.py"), "outbox_streams"],
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                timeout=120,
            )
            self._streams_ready = done.returncode == 0

    def start_listener(self, index: int | None = None, *, crash_after_commit: int | None = None) -> None:
        """A listener; ``crash_after_commit=N``: it SIGKILLs itself right after its N-th commit, before acking."""
        self.ensure_streams()
        args = (
            "ticket:created",
            "ticket:updated",
            "--batch",
            "50",
            # A short ack wait: messages held by a killed listener come back in seconds.
            "--ack-wait",
            "3",
        )
        if crash_after_commit is None:
            proc = manage("listen", *args, env=self.env, log=self.log("listener"))
        else:
            proc = listen_crashing_after_commit(
                *args, batches=crash_after_commit, env=self.env, log=self.log("listener")
            )
        if index is None:
            self.listeners.append(proc)
        else:
            self.listeners[index] = proc

    def load(
        self, *, tickets: int, updates: int, rate: float, seed: int = 1, writers: int = 1, seconds: float = 0
    ) -> subprocess.Popen:
        out = open(self.log("load"), "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [
                PYTHON,
                "-m",
                "tests.faults.load",
                "--tickets",
                str(tickets),
                "--updates",
                str(updates),
                "--rate",
                str(rate),
                "--seed",
                str(seed),
                "--writers",
                str(writers),
                "--seconds",
                str(seconds),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def sigkill(self, procs: list, index: int) -> None:
        proc = procs[index]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            self.kills += 1

    def terminate_db_connections(self) -> int:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'faults-process'"
            )
            return cur.fetchone()[0]

    def close(self) -> None:
        for proc in [*self.relays, *self.listeners]:
            if proc is not None:
                stop(proc, timeout=20)
        if self.redis:
            self.redis.stop()
        if self.nats:
            self.nats.kill()

    # --- the end of a scenario ------------------------------------------------------
    def wait_quiet_and_verify(
        self, *, timeout: float = 180.0, allow_stream_duplicates: bool = False, since: float | None = None
    ):
        """Poll the invariant checker until it passes (the system caught up) or the bound runs out.

        ``since`` (a ``time.monotonic()``: when the writes and the faults stopped) makes the report
        carry ``recovery_seconds``: how long until the invariants held again."""
        from django.conf import settings
        from django.test import override_settings

        from outbox.broker import reset_broker
        from ticketing.verify import verify

        reset_broker()
        last = {}
        with override_settings(NATS=dict(settings.NATS, SERVERS=[self.nats.url])):

            def check():
                started = time.monotonic()
                report = verify(allow_stream_duplicates=allow_stream_duplicates)
                report.counts["verify_seconds"] = round(time.monotonic() - started, 1)
                last["report"] = report
                return report.ok

            try:
                wait_for(check, timeout=timeout, interval=0.5, what="the invariants to hold")
            except AssertionError:
                print(last["report"].render(limit=20))
                for path in sorted(self.tmp.glob("*.log"))[-6:]:
                    print(f"--- {path.name}\n{path.read_text()[-3000:]}")
                raise
        report = last["report"]
        if since is not None:
            report.counts["recovery_seconds"] = round(time.monotonic() - since, 1)
        print(report.render())
        return report


def published() -> int:
    from outbox.models import OutboxEvent

    return OutboxEvent.objects.filter(status="published").count()


def applied() -> int:
    from listeners.models import InboxEntry

    return InboxEntry.objects.count()


def after_time_and_progress(counter, rng: random.Random, seconds: tuple[float, float], events: int) -> bool:
    """Wait a random time in ``seconds`` and until ``counter()`` advanced by ``events`` at least: a
    schedule of faults that holds whatever rate the machine sustains, never striking a stack that has
    not moved since the last fault. False when the counter stopped advancing (the load is over)."""
    target = counter() + events
    due = time.monotonic() + rng.uniform(*seconds)
    try:
        wait_for(lambda: counter() >= target, timeout=60, interval=0.05, what="progress")
    except AssertionError:
        return False
    time.sleep(max(0.0, due - time.monotonic()))  # the schedule itself, not a wait for a condition
    return True


def after_progress(counter, rng: random.Random, low: int, high: int, *, timeout: float = 20.0) -> bool:
    """Wait until ``counter()`` advanced by a random step: faults land at random points of a batch.

    Returns False when the counter stopped advancing (the load is over and everything caught up).
    """
    target = counter() + rng.randint(low, high)
    try:
        wait_for(lambda: counter() >= target, timeout=timeout, interval=0.02, what="progress")
        return True
    except AssertionError:
        return False
