"""The health file of a ``listen`` process, for liveness and readiness probes: writing it, and judging it.

The run loop reports each turn of each consumer's loop (:meth:`HealthFile.turn`) and
whether it is connected; :class:`HealthFile` rewrites a small JSON document atomically
(write, then rename), at most every :data:`WRITE_INTERVAL` seconds unless readiness
changed. ``listeners_health PATH`` reads it back with :func:`health_verdict`:

* **alive**: every consumer's loop turned within ``max_age`` seconds (a loop turns at
  least once per fetch timeout while idle, once per batch under load; a batch stuck for
  longer, or a wedged event loop, stops it);
* **ready**: connected to NATS, every planned consumer bound, and not stopping.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from listeners.errors import ListenerStartupError

logger = logging.getLogger("listeners.runner")

#: Seconds between two writes of an unchanged status (a turn of the loop under load is ~ms).
WRITE_INTERVAL = 0.5
#: The probe's default: a loop that did not turn for this long is taken for stalled.
DEFAULT_MAX_AGE = 30.0


class HealthFile:
    """The status file one ``listen`` process keeps up to date."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.turns: dict[str, float] = {}  # durable -> wall clock of its loop's last turn
        self.consumers: list[str] = []
        self.written_at = 0.0
        self.last: tuple[bool, str] | None = None
        self.failed_at = 0.0

    def start(self) -> None:
        """Write a first status (not ready yet): a path that cannot be written is a one-line startup error."""
        try:
            self.write(ready=False, state="starting", connected=False)
        except OSError as exc:
            raise ListenerStartupError(f"cannot write the health file {self.path}: {exc.strerror or exc}") from exc

    def plan(self, durables: list[str]) -> None:
        """The consumers this process will run: ready once each has turned its loop."""
        self.consumers = list(durables)

    def turn(self, durable: str, *, connected: bool, stopping: bool) -> None:
        """A consumer's loop turned; rewrite the file when it is due or readiness changed."""
        now = time.time()
        self.turns[durable] = now
        ready = connected and not stopping and all(c in self.turns for c in self.consumers)
        state = (ready, "stopping" if stopping else "running")
        if state != self.last or now - self.written_at >= WRITE_INTERVAL:
            self._write_quietly(ready=ready, state=state[1], connected=connected)

    def _write_quietly(self, **status: Any) -> None:
        """A write that fails (disk full ...) must not stop the listener: the probe sees the file age."""
        try:
            self.write(**status)
        except OSError as exc:
            if time.monotonic() - self.failed_at > 60:
                self.failed_at = time.monotonic()
                logger.warning("listener.health_file_failed path=%s error=%s", self.path, exc)

    def write(self, *, ready: bool, state: str, connected: bool) -> None:
        now = time.time()
        doc = {
            "pid": os.getpid(),
            "state": state,  # starting | running | stopping | stopped
            "ready": ready,
            "connected": connected,
            "written_at": now,
            "consumers": {c: self.turns.get(c) for c in self.consumers},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.written_at = now
        self.last = (ready, state)

    def stopped(self) -> None:
        """The process is leaving: not ready, whatever the file said."""
        self._write_quietly(ready=False, state="stopped", connected=False)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    line: str


def health_verdict(path: str | os.PathLike[str], *, max_age: float, live_only: bool = False) -> Verdict:
    """Judge a health file: one line saying why the process is (not) healthy."""
    try:
        doc: dict[str, Any] = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return Verdict(False, f"unhealthy: no health file at {path} (listener not started yet, or not writing one)")
    except (OSError, ValueError) as exc:
        return Verdict(False, f"unhealthy: cannot read {path}: {exc}")
    now = time.time()
    state = doc.get("state")
    if state == "stopped":
        return Verdict(False, f"unhealthy: the listener (pid {doc.get('pid')}) stopped")
    consumers: dict[str, float | None] = doc.get("consumers") or {}
    waiting = sorted(c for c, at in consumers.items() if at is None)
    turned = [at for at in consumers.values() if at is not None]
    oldest = min(turned) if turned and not waiting else doc.get("written_at", 0.0)
    age = now - float(oldest or 0.0)
    if age > max_age:
        return Verdict(False, f"unhealthy: no loop turn for {age:.1f} s (max {max_age:g} s), pid {doc.get('pid')}")
    if not live_only and not doc.get("ready"):
        if state == "stopping":
            why = "stopping"
        elif not doc.get("connected"):
            why = "not connected to NATS"
        else:
            why = f"consumers not bound yet: {', '.join(waiting) or 'none'}"
        return Verdict(False, f"unhealthy: not ready ({why}), pid {doc.get('pid')}")
    names = ", ".join(sorted(consumers)) or "none"
    what = "alive" if live_only else "ready"
    return Verdict(True, f"ok: {what}, last loop turn {age:.1f} s ago, consumers {names}, pid {doc.get('pid')}")
