"""Process control shared by the tests and the benchmarks: free ports, waiting on a condition,
stopping a child's whole process group (harder when it does not listen).

It imports nothing from Django, so a benchmark can use it before (or without) setting Django up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after a generous bound."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition} (last value: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal the child's process group (it was started with ``start_new_session=True``), wait for
    it, and SIGKILL the group when it does not end within ``timeout``; returns the exit status."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return proc.wait(timeout)
    return proc.returncode


def kill(proc: subprocess.Popen) -> None:
    stop(proc, sig=signal.SIGKILL)
