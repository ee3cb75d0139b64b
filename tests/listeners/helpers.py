"""Helpers of the listener tests: messages, publishing, consumer state, listener processes, logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js.api import ConsumerInfo, PubAck

from outbox.contracts import registry
from outbox.streams import ensure_streams, nats_subject, stream_name
from tests.helpers import (
    PYTHON,
    ROOT,
    listen_crashing_after_commit,
    manage,
    subprocess_env,
    wait_for,
)

Message = tuple[str, bytes, dict[str, str]]


#: The replica listeners' durable when they consume the whole TICKETS stream.
REPLICA = "replica-TICKETS"


def message(
    event_name: str,
    body: dict[str, Any] | bytes,
    *,
    event_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[str, bytes, dict[str, str]]:
    """(event name, body, headers) with the headers the relay sets."""
    event_id = event_id or str(uuid.uuid4())
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Nats-Msg-Id": event_id, "event-id": event_id, "event-name": event_name}
    if isinstance(body, dict) and "id" in body:
        hdrs.update({"aggregate-type": "ticket", "aggregate-id": str(body["id"])})
        if "version" in body:
            hdrs["aggregate-version"] = str(body["version"])
    hdrs.update(headers or {})
    return event_name, data, hdrs


def ticket(ticket_id: str, version: int, *, eid: str | None = None, **overrides: Any) -> Message:
    """A valid ticket:created (version 0) or ticket:updated event."""
    body = {
        "id": ticket_id,
        "version": version,
        "title": f"{ticket_id} v{version}",
        "price": 10 + version,
        "userId": "user-1",
        **overrides,
    }
    return message("ticket:created" if version == 0 else "ticket:updated", body, event_id=eid)


def tickets(count: int, versions: int, *, seed: int = 7) -> list[tuple[str, bytes, dict[str, str]]]:
    """``count`` tickets with versions 0..versions-1, interleaved at random, each ticket's in version order."""
    import random

    rng = random.Random(seed)
    queues = [[ticket(f"t{n:04d}", v) for v in range(versions)] for n in range(count)]
    out = []
    while queues:
        queue = rng.choice(queues)
        out.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return out


def event_id(msg: tuple[str, bytes, dict[str, str]]) -> str:
    return msg[2]["Nats-Msg-Id"]


# --- NATS -----------------------------------------------------------------------------


def nats_url() -> str:
    return os.environ["NATS_URL"]


async def _with_js(work, *, url: str | None = None):
    nc = await nats.connect(url or nats_url(), connect_timeout=2, max_reconnect_attempts=3)
    try:
        return await work(nc.jetstream(timeout=10))
    finally:
        await nc.close()


def setup_streams() -> None:
    asyncio.run(_with_js(lambda js: ensure_streams(js)))


def publish(messages: list[Message], *, url: str | None = None, setup: bool = True) -> list[PubAck]:
    """Publish to this test's streams (created first unless ``setup`` is false), every PubAck awaited (bounded)."""

    async def work(js):
        if setup:
            await ensure_streams(js)
        acks: list[PubAck] = []
        for start in range(0, len(messages), 500):
            futures = []
            for name, data, headers in messages[start : start + 500]:
                futures.append(
                    await js.publish_async(
                        nats_subject(name), data, headers=headers, stream=stream_name(registry.get(name).stream)
                    )
                )
            acks.extend(await asyncio.wait_for(asyncio.gather(*futures), timeout=30))
        return acks

    return asyncio.run(_with_js(work, url=url))


def publish_again_after_dedup_window(msg: tuple[str, bytes, dict[str, str]], stream: str = "TICKETS") -> PubAck:
    """Store a second copy of ``msg`` (same Nats-Msg-Id) the way a late re-publish does: after the window.

    The stream's duplicate window is shrunk to JetStream's minimum (100 ms), then the
    message is re-published until the server stores it instead of answering "duplicate".
    """

    async def shrink(js):
        info = await js.stream_info(stream_name(stream))
        await js.update_stream(info.config.evolve(duplicate_window=0.1))

    asyncio.run(_with_js(shrink))
    return wait_for(
        lambda: (ack := publish([msg], setup=False)[0]) and not ack.duplicate and ack,
        timeout=30,
        interval=0.05,
        what="the re-published copy to be stored",
    )


def consumer_info(durable: str = REPLICA, stream: str = "TICKETS", *, url: str | None = None) -> ConsumerInfo:
    return asyncio.run(_with_js(lambda js: js.consumer_info(stream_name(stream), durable), url=url))


def settled(durable: str = REPLICA, stream: str = "TICKETS") -> bool:
    """Nothing left to deliver and nothing delivered but unacknowledged."""
    info = consumer_info(durable, stream)
    return info.num_pending == 0 and info.num_ack_pending == 0


# --- processes ------------------------------------------------------------------------


def listener_env(**extra: str) -> dict[str, str]:
    return subprocess_env(LOG_LEVEL="INFO", **extra)


def start_listener(*args: str, log: Path, crash_after_commit: int | None = None, **env: str) -> subprocess.Popen:
    """``manage.py listen ARGS`` as a child process with INFO logs (one line per event) in ``log``.

    ``crash_after_commit=N``: the process SIGKILLs itself right after its N-th batch committed, before any ack.
    """
    if crash_after_commit is not None:
        return listen_crashing_after_commit(*args, batches=crash_after_commit, env=listener_env(**env), log=log)
    return manage("listen", *args, env=listener_env(**env), log=log)


def run_manage(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env or listener_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_lines(log: Path, pattern: str = "") -> list[str]:
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if re.search(pattern, line)] if pattern else lines


def outcomes(log: Path) -> dict[str, int]:
    """Per-event outcomes logged by the listener(s) writing ``log``."""
    counts: dict[str, int] = {}
    for line in log_lines(log, r"listener\.event "):
        outcome = re.search(r" outcome=(\S+)", line).group(1)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def summary(text: str) -> tuple[int, dict[str, int]]:
    """The ``listen`` command's last line: "listener stopped after N message(s): a=1, b=2"."""
    match = re.search(r"listener stopped after (\d+) message\(s\): (.*)", text)
    assert match, f"no summary line in {text[-2000:]!r}"
    parts = {} if match.group(2) == "nothing" else dict(p.split("=") for p in match.group(2).split(", "))
    return int(match.group(1)), {k: int(v) for k, v in parts.items()}
