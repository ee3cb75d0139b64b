"""``python -m tests.crash_after_commit N SUBJECT ... [listen options]``: ``manage.py listen`` that kills itself.

The process SIGKILLs itself right after its N-th batch committed and before any of it
is acked — the crash window of "applied but not acked" that the fault tests attack.
It installs a :data:`listeners.hooks.AFTER_COMMIT` hook, then runs the ordinary
``listen`` command; production code carries no switch for it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def main(argv: list[str]) -> None:
    crash_after = int(argv[0])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ticketing.settings")
    import django

    django.setup()
    from django.core.management import execute_from_command_line

    from listeners.hooks import AFTER_COMMIT, add_hook

    def crash(*, batches: int, **_: object) -> None:
        if batches >= crash_after:
            logging.getLogger("listeners.runner").critical("listener.fault_injection: SIGKILL after commit, before ack")
            os.kill(os.getpid(), signal.SIGKILL)

    add_hook(AFTER_COMMIT, crash)
    execute_from_command_line(["manage.py", "listen", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
