"""``manage.py`` for crash tests: the relay SIGKILLs its own process at a named step.

``python -m tests.crashing_relay POINT COMMAND [ARGS...]`` runs ``manage.py COMMAND ARGS`` with a
relay hook (outbox/relay/hooks.py) that kills the process at POINT:

* ``after-claim`` -- right after a batch was claimed, before any of it is sent;
* ``after-publish`` -- after a batch's PubAcks arrived (something was published), before it is marked.

The tests start this instead of ``manage.py``: production code has no switch that kills a relay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

POINTS = ("after-claim", "after-publish")


def _die(**_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_if_published(*, result: Any) -> None:
    if result.published:
        _die()


def main() -> None:
    point, *args = sys.argv[1:]
    if point not in POINTS:
        raise SystemExit(f"crash point {point!r}: use one of {', '.join(POINTS)}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ticketing.settings")
    import django

    django.setup()
    from django.core.management import execute_from_command_line

    from outbox.relay import hooks

    if point == "after-claim":
        hooks.register(hooks.AFTER_CLAIM, _die)
    else:
        hooks.register(hooks.BEFORE_MARK, _die_if_published)
    execute_from_command_line(["manage.py", *args])


def start(point: str, *args: str, env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """Start ``manage.py *args`` whose relay kills itself at ``point`` (like tests.helpers.manage)."""
    root = Path(__file__).resolve().parent.parent
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crashing_relay", point, *args],
        cwd=root,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


if __name__ == "__main__":
    main()
