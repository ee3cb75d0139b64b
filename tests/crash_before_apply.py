"""``python -m tests.crash_before_apply N SUBJECT ... [options]``: ``manage.py listen`` that dies holding a batch.

The process SIGKILLs itself when its N-th batch has arrived and before anything of it
is applied: the messages stay delivered to a process that is gone, so JetStream gives
them to another one only after ``ack_wait``. It installs a
:data:`listeners.hooks.BEFORE_APPLY` hook, then runs the ordinary ``listen`` command.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def main(argv: list[str]) -> None:
    crash_at = int(argv[0])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ticketing.settings")
    import django

    django.setup()
    from django.core.management import execute_from_command_line

    from listeners.hooks import BEFORE_APPLY, add_hook

    received = 0

    def crash(**_: object) -> None:
        nonlocal received
        received += 1
        if received >= crash_at:
            logging.getLogger("listeners.runner").critical("listener.fault_injection: SIGKILL holding a batch")
            os.kill(os.getpid(), signal.SIGKILL)

    add_hook(BEFORE_APPLY, crash)
    execute_from_command_line(["manage.py", "listen", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
