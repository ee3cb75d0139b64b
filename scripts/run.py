"""`make run`: the Procfile (web, relay worker with beat, both listeners) under honcho, on the
same embedded fallbacks as the demo (scripts/stack.py), with its state in var/run.

Ctrl-C (or SIGTERM) stops honcho's processes first, then the nats-server it may have started.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from stack import PY, ROOT, SERVICES, Stack, StackError, colour


def say(text: str) -> None:
    prefix = "\033[1;35m[run]\033[0m" if colour() else "[run]"
    print(f"{prefix} {text}", flush=True)


def main() -> int:
    stack = Stack("run", say)
    stack.env.setdefault("DEBUG", "1")
    honcho = [str(Path(PY).parent / "honcho"), "start", "-f", str(ROOT / "Procfile"), "-d", str(ROOT)]
    if not colour():
        honcho.append("--no-colour")

    stopping = {"asked": False}

    def on_signal(signum: int, _frame) -> None:
        stopping["asked"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.prepare()
        stack.run(stack.manage("migrate", "--no-input", "-v", "0"))
        stack.run(stack.manage("outbox_streams"), quiet=True)
        port = stack.env.get("WEB_PORT", "8000")
        say(f"admin on http://127.0.0.1:{port}/admin/ (a login: make superuser); Ctrl-C stops everything")
        # honcho stays in our process group: Ctrl-C reaches it at once and it stops the Procfile's
        # processes while we wait; the services (nats-server) go after it, in stack.stop().
        proc = stack.start(honcho, tier=SERVICES + 1, own_group=False)
        return proc.wait()
    except StackError as exc:
        say(str(exc))
        return 1
    except KeyboardInterrupt:
        stopping["asked"] = True
        return 0
    finally:
        if stopping["asked"]:
            say("stopping: web, relay and listeners first, then the services")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the ordered stop short
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
