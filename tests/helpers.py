"""Shared helpers of the test suite: waiting on conditions, processes, streams."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from django.db import connection

from tests.processes import free_port, kill, stop, wait_for  # noqa: F401 - the tests' names for them

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def test_database_url() -> str:
    settings = connection.settings_dict
    return f"postgres://{settings['USER']}@{settings['HOST']}:{settings['PORT']}/{settings['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process that must see this test's database."""
    env = dict(os.environ)
    env["DATABASE_URL"] = test_database_url()
    env.pop("TEST_DATABASE_NAME", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def manage(*args: str, env: dict[str, str] | None = None, log: Path | None = None, **kwargs: Any) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [PYTHON, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env or subprocess_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kwargs,
    )


def listen_crashing_after_commit(
    *args: str, batches: int = 1, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen:
    """``manage.py listen ARGS`` that SIGKILLs itself after its ``batches``-th commit, before acking it."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [PYTHON, "-m", "tests.crash_after_commit", str(batches), *args],
        cwd=ROOT,
        env=env or subprocess_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def celery_worker(
    *, env: dict[str, str] | None = None, log: Path | None = None, beat: bool = False
) -> subprocess.Popen:
    env = env or subprocess_env()
    args = [
        PYTHON,
        "-m",
        "celery",
        "-A",
        "ticketing",
        "worker",
        "--pool=solo",
        "-Q",
        env["OUTBOX_CELERY_QUEUE"],
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"relay-{time.monotonic_ns()}@%h",
    ]
    if beat:
        args += ["--beat", "--schedule", str(Path(tempfile.mkdtemp()) / "beat-schedule")]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_async(coro):
    return asyncio.run(coro)


async def stream_messages(stream: str, *, url: str | None = None) -> list[dict[str, Any]]:
    """Every message of a stream, in stream order: subject, seq, headers, data."""
    nc = await nats.connect(url or os.environ["NATS_URL"], connect_timeout=2)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        result = []
        seq = info.state.first_seq
        while seq and seq <= info.state.last_seq:
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                seq += 1
                continue
            result.append(
                {
                    "subject": msg.subject,
                    "seq": msg.seq,
                    "headers": dict(msg.headers or {}),
                    "data": json.loads(msg.data),
                }
            )
            seq += 1
        return result
    finally:
        await nc.close()


def read_stream(stream: str, *, url: str | None = None) -> list[dict[str, Any]]:
    return asyncio.run(stream_messages(stream, url=url))


async def _delete_streams(prefix: str, url: str) -> None:
    nc = await nats.connect(url, connect_timeout=2)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def delete_streams(prefix: str, url: str | None = None) -> None:
    asyncio.run(_delete_streams(prefix, url or os.environ["NATS_URL"]))


class PrivateNats:
    """A nats-server of our own on a free loopback port, with a file store, to kill and restart."""

    def __init__(self, *, binary: str | None = None, store: Path | None = None, extra: list[str] | None = None) -> None:
        self.binary = binary or str(Path(PYTHON).parent / "nats-server")
        if not Path(self.binary).exists():
            self.binary = "/usr/sbin/nats-server"
        self.port = free_port()
        self.store = store or Path(tempfile.mkdtemp(prefix="nats-store-"))
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.url = f"nats://127.0.0.1:{self.port}"

    def start(self) -> PrivateNats:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=30, what=f"nats-server on {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


async def _fetch_all(stream: str, url: str) -> list[dict[str, Any]]:
    """Every message of a stream through a temporary pull consumer (fast for large streams)."""
    import uuid as _uuid

    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(url, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(stream)
        total = info.state.messages
        name = f"verify-{_uuid.uuid4().hex[:10]}"
        await js.add_consumer(
            stream,
            ConsumerConfig(durable_name=name, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        try:
            psub = await js.pull_subscribe_bind(durable=name, stream=stream)
            result: list[dict[str, Any]] = []
            while len(result) < total:
                try:
                    msgs = await psub.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    break
                for msg in msgs:
                    result.append(
                        {
                            "subject": msg.subject,
                            "seq": msg.metadata.sequence.stream,
                            "headers": dict(msg.headers or {}),
                            "data": json.loads(msg.data),
                        }
                    )
            return result
        finally:
            await js.delete_consumer(stream, name)
    finally:
        await nc.close()


def read_stream_fast(stream: str, *, url: str | None = None) -> list[dict[str, Any]]:
    return asyncio.run(_fetch_all(stream, url or os.environ["NATS_URL"]))


def insert_ticket_events(*, aggregates: int, per_aggregate: int, interleave: bool = True) -> int:
    """Bulk-insert valid pending ticket:updated outbox rows (version 0..per_aggregate-1 per ticket).

    Rows of one aggregate get increasing ``seq`` in version order, as the write path guarantees;
    aggregates interleave so that a batch mixes them.
    """
    import random
    import uuid as _uuid

    from outbox.models import OutboxEvent

    ids = [str(_uuid.uuid4()) for _ in range(aggregates)]
    order = [(a, v) for v in range(per_aggregate) for a in range(aggregates)]
    if interleave:
        # Shuffle within each version "layer" so neighbouring rows belong to different aggregates.
        rng = random.Random(42)
        layers = [order[i : i + aggregates] for i in range(0, len(order), aggregates)]
        for layer in layers:
            rng.shuffle(layer)
        order = [x for layer in layers for x in layer]
    rows = []
    for a, v in order:
        payload = {"id": ids[a], "version": v, "title": f"T{a}-{v}", "price": 10.0, "userId": "u", "orderId": None}
        rows.append(
            OutboxEvent(
                subject="ticket:updated",
                payload=payload,
                headers={"correlation-id": "bulk"},
                aggregate_type="ticket",
                aggregate_id=ids[a],
                aggregate_version=v,
            )
        )
    OutboxEvent.objects.bulk_create(rows, batch_size=2000)
    return len(rows)


class PrivateRedis:
    """A redis-server of our own on a free loopback port, to stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=30, what=f"redis-server on {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(7).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def update_tickets_concurrently(ticket_ids: list[Any], *, updates: int) -> None:
    """One thread per ticket, each updating its ticket ``updates`` times (price 2, 3, ...) through
    ``ticket_update``, the tickets at version 0; returns when all are done, raising the first error."""
    import threading

    from ticketing.services import ticket_update

    errors: list[BaseException] = []

    def write(ticket_id: Any) -> None:
        try:
            for version in range(updates):
                ticket_update(ticket_id=ticket_id, expected_version=version, price=str(version + 2))
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread below
            errors.append(exc)
        finally:
            connection.close()

    writers = [threading.Thread(target=write, args=(t,), name=f"writer-{n}") for n, t in enumerate(ticket_ids)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    if errors:
        raise errors[0]
