"""Plumbing shared by the benchmark scripts: isolation, cleanup, processes, bulk rows, JSON.

Every script runs its body inside :class:`Bench`, which

- creates its own PostgreSQL database ``bench_<pid>_<hex>`` on the server of ``DATABASE_URL``
  (default ``postgres://postgres@127.0.0.1:5432/postgres``) and migrates it with
  ``manage.py migrate`` in a subprocess whose ``DATABASE_URL`` points at it;
- picks a unique ``OUTBOX_STREAM_PREFIX`` / ``OUTBOX_SUBJECT_PREFIX`` / ``OUTBOX_CELERY_QUEUE``, so
  its streams, subjects and Celery queue are its own;
- on the way out (normal end, exception, Ctrl-C, SIGTERM) stops the processes it started, drops
  the database, deletes its streams and its Redis keys.

Only the JSON result goes to stdout: while a script runs, ``sys.stdout`` is redirected to
stderr, so a stray print or a log line cannot corrupt the output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import nats
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.processes import stop as stop_group  # noqa: E402 - the tests' process control, shared

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

_real_stdout = sys.stdout


def log(message: str) -> None:
    """Progress for a human, on stderr (stdout carries only the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def database_url(name: str) -> str:
    """The URL of database ``name`` on the server of DATABASE_URL (a PostgreSQL one)."""
    base = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    parsed = urlparse(base)
    if parsed.scheme not in {"postgres", "postgresql", "pgsql"}:
        parsed = urlparse(DEFAULT_DATABASE_URL)
    return urlunparse(parsed._replace(path=f"/{name}"))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; values need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_row(
    figure: str,
    *,
    value: float,
    unit: str,
    ceiling: float | None,
    ceiling_what: str,
    ratio: float | None,
    op: str,
    target: float,
    target_of: str = "ratio",
) -> dict[str, Any]:
    """One line of the results table. ``target_of`` says whether the target applies to the ratio or the value."""
    subject = ratio if target_of == "ratio" else value
    met = subject is not None and (subject >= target if op == ">=" else subject <= target)
    return {
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
        "ceiling": None if ceiling is None else round(ceiling, 3),
        "ceiling_what": ceiling_what,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": f"{target_of} {op} {target:g}" + (f" {unit}" if target_of == "value" else ""),
        "target_op": op,
        "target_value": target,
        "target_of": target_of,
        "met": bool(met),
    }


def quick_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    return parser


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


class Bench:
    """An isolated run: own database, stream/subject prefixes, Celery queue; cleaned up on exit."""

    def __init__(self, name: str, *, quick: bool = False) -> None:
        self.name = name
        self.quick = quick
        self.run_id = f"{os.getpid()}_{secrets.token_hex(2)}"
        self.db_name = f"bench_{self.run_id}"
        self.database_url = database_url(self.db_name)
        self.admin_url = database_url("postgres")
        self.stream_prefix = f"BENCH{self.run_id}_"
        self.subject_prefix = f"bench{self.run_id}."
        self.queue = f"bench-{self.run_id}"
        self.nats_url = (os.environ.get("NATS_URL") or DEFAULT_NATS_URL).split(",")[0].strip()
        self.broker_url = os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.procs: list[subprocess.Popen] = []
        self.django_ready = False
        self.started = time.time()
        self.load_start = os.getloadavg()
        self._old_handlers: dict[int, Any] = {}
        self._created_db = False
        self.keep_logs = bool(os.environ.get("BENCH_KEEP_LOGS"))

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Bench:
        sys.stdout = sys.stderr  # the JSON is written to the real stdout by emit()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            self.create_database()
            self.migrate()
        except BaseException:
            self.cleanup(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.cleanup(failed=exc_type is not None)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    def cleanup(self, *, failed: bool = False) -> None:
        log(f"cleaning up {self.db_name}, streams {self.stream_prefix}*, queue {self.queue}")
        for proc in self.procs:
            self.stop(proc, timeout=10)
        if self.django_ready:
            try:
                from django.db import connections

                connections.close_all()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                log(f"closing Django connections failed: {exc}")
        if self._created_db:
            try:
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001
                log(f"could not drop database {self.db_name}: {exc}")
        try:
            asyncio.run(self._delete_streams())
        except Exception as exc:  # noqa: BLE001
            log(f"could not delete streams {self.stream_prefix}*: {exc}")
        try:
            import redis

            client = redis.Redis.from_url(self.broker_url, socket_timeout=2)
            for key in list(client.scan_iter(f"*{self.queue}*")) + list(client.scan_iter(f"*{self.stream_prefix}*")):
                client.delete(key)
        except Exception as exc:  # noqa: BLE001
            log(f"could not clean Redis keys of {self.queue}: {exc}")
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        if failed or self.keep_logs:
            log(f"logs of this run kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        sys.stdout = _real_stdout

    # -- database --------------------------------------------------------------------

    def create_database(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self._created_db = True

    def migrate(self) -> None:
        started = time.perf_counter()
        done = subprocess.run(
            [PYTHON, str(ROOT / "manage.py"), "migrate", "--no-input", "-v", "0"],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode:
            raise RuntimeError(f"manage.py migrate failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        log(f"database {self.db_name} migrated in {time.perf_counter() - started:.1f}s")

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=autocommit)

    def sql(self, query: str, params: Iterable[Any] | None = None) -> list[tuple]:
        """Run one statement on the benchmark database (autocommit); returns its rows, if any."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: Iterable[Any] | None = None) -> Any:
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    # -- settings and processes ------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child process (and of Django in this process): this run's isolation."""
        env = dict(os.environ)
        env.pop("TEST_DATABASE_NAME", None)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "ticketing.settings",
                "DJANGO_DEV": "1",
                "DATABASE_URL": self.database_url,
                "NATS_URL": self.nats_url,
                "CELERY_BROKER_URL": self.broker_url,
                "OUTBOX_SUBJECT_PREFIX": self.subject_prefix,
                "OUTBOX_STREAM_PREFIX": self.stream_prefix,
                "OUTBOX_CELERY_QUEUE": self.queue,
                "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(extra)
        return env

    def setup_django(self) -> None:
        """Configure Django in this process against this run's database and prefixes."""
        if self.django_ready:
            return
        os.environ.update(self.env())
        import django

        django.setup()
        self.django_ready = True

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def spawn(
        self, args: list[str], *, name: str, env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen:
        """Start a child in its own session (so stop() reaches its children), output to a log file."""
        out = open(self.log_path(name), "ab")  # noqa: SIM115 - closed when the process is reaped
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env or self.env(),
            stdout=kwargs.pop("stdout", out),
            stderr=subprocess.STDOUT if kwargs.get("stderr") is None else kwargs.pop("stderr"),
            start_new_session=True,
            **kwargs,
        )
        proc._bench_log = out  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def manage(self, *args: str, name: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
        return self.spawn([PYTHON, str(ROOT / "manage.py"), *args], name=name, env=env, **kwargs)

    def celery_worker(self, *, name: str = "celery") -> subprocess.Popen:
        return self.spawn(
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "ticketing",
                "worker",
                "--pool=solo",
                "-Q",
                self.queue,
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{self.queue}-{secrets.token_hex(2)}@%h",
            ],
            name=name,
        )

    def stop(self, proc: subprocess.Popen, *, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop a child started by this run (its whole process group), harder if it does not listen."""
        stop_group(proc, sig=sig, timeout=timeout)
        out = getattr(proc, "_bench_log", None)
        if out is not None and not out.closed:
            out.close()
        return proc.returncode

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_exit(self, proc: subprocess.Popen, *, name: str, timeout: float) -> None:
        """Wait for a child that should end by itself; fail with its log when it does not or fails."""
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f}s:\n{self.tail(name)}") from None
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}:\n{self.tail(name)}")

    # -- NATS ------------------------------------------------------------------------

    async def nats_connect(self, **kwargs: Any) -> Any:
        return await nats.connect(self.nats_url, connect_timeout=5, name=f"bench-{self.name}", **kwargs)

    async def _delete_streams(self, *, only: Callable[[str], bool] | None = None) -> list[str]:
        nc = await self.nats_connect()
        deleted = []
        try:
            js = nc.jetstream(timeout=30)
            for info in await js.streams_info():
                name = info.config.name
                if name.startswith(self.stream_prefix) and (only is None or only(name)):
                    await js.delete_stream(name)
                    deleted.append(name)
        finally:
            await nc.close()
        return deleted

    def delete_streams(self, only: Callable[[str], bool] | None = None) -> list[str]:
        return asyncio.run(self._delete_streams(only=only))

    def ensure_streams(self) -> None:
        """Create the outbox's streams (from the contract registry) as the relay would."""
        self.setup_django()
        from outbox.streams import ensure_streams

        async def go() -> None:
            nc = await self.nats_connect()
            try:
                await ensure_streams(nc.jetstream(timeout=30))
            finally:
                await nc.close()

        asyncio.run(go())

    def stream_name(self, stream: str = "TICKETS") -> str:
        return f"{self.stream_prefix}{stream}"

    def stream_messages(self, stream: str) -> int:
        async def go() -> int:
            nc = await self.nats_connect()
            try:
                info = await nc.jetstream(timeout=30).stream_info(stream)
                return info.state.messages
            finally:
                await nc.close()

        return asyncio.run(go())

    # -- output ----------------------------------------------------------------------

    def environment(self) -> dict[str, Any]:
        return {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "postgres": self.scalar("SHOW server_version") if self._created_db else None,
            "nats_url": self.nats_url,
            "run_id": self.run_id,
        }

    def result(self, *, params: dict, figures: dict, summary: list[dict], bound: str, notes: list[str]) -> dict:
        """The script's JSON. ``figures`` keeps finite numbers only; the names of the others are listed."""
        clean: dict[str, float | int] = {}
        unavailable = []
        for key, value in figures.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                unavailable.append(key)
            else:
                clean[key] = round(value, 4) if isinstance(value, float) else value
        return {
            "benchmark": self.name,
            "quick": self.quick,
            "params": params,
            "figures": clean,
            "figures_unavailable": unavailable,
            "summary": summary,
            "bound": bound,
            "notes": notes,
            "seconds": round(time.time() - self.started, 1),
            "environment": self.environment(),
        }


def emit(result: dict[str, Any]) -> None:
    """Write the one JSON object of a script to the real stdout."""
    _real_stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    _real_stdout.flush()


def run(name: str, parser: argparse.ArgumentParser, body: Callable[[Bench, argparse.Namespace], dict]) -> int:
    """Parse arguments, run ``body`` inside an isolated Bench, print its JSON after the cleanup."""
    args = parser.parse_args()
    with Bench(name, quick=args.quick) as bench:
        result = body(bench, args)
    emit(result)
    return 0


# -- bulk outbox rows --------------------------------------------------------------------

#: Valid ticket:created / ticket:updated rows, as emit() writes them (payload, headers, aggregate).
#: Parameters: aggregates, version_offset, status, stream, start, count. Row g belongs to ticket
#: g % aggregates at version g / aggregates + version_offset: aggregates interleave, versions ascend.
OUTBOX_ROWS_SQL = """
INSERT INTO outbox_outboxevent (id, subject, payload, headers, aggregate_type, aggregate_id, aggregate_version,
    status, attempts, lease_owner, last_error, published_at, stream, stream_sequence)
SELECT e.id,
       CASE WHEN e.version = 0 THEN 'ticket:created' ELSE 'ticket:updated' END,
       CASE WHEN e.version = 0
            THEN jsonb_build_object('id', e.tid, 'version', e.version, 'title', e.title, 'price', e.price,
                                    'userId', e.uid)
            ELSE jsonb_build_object('id', e.tid, 'version', e.version, 'title', e.title, 'price', e.price,
                                    'userId', e.uid, 'orderId', NULL)
       END,
       jsonb_build_object('correlation-id', e.id::text),
       'ticket', e.tid, e.version,
       %(status)s::text,
       CASE WHEN %(status)s::text = 'published' THEN 1 ELSE 0 END,
       '', '',
       CASE WHEN %(status)s::text = 'published' THEN now() - (e.g %% 86400) * interval '1 second' END,
       CASE WHEN %(status)s::text = 'published' THEN %(stream)s::text ELSE '' END,
       CASE WHEN %(status)s::text = 'published' THEN e.g + 1 END
FROM (
    SELECT g,
           -- A UUIDv7 as emit() makes them: 48 bits of Unix milliseconds (the clock as each row is
           -- made, so later inserts sort after earlier ones), version 7, the rest random.
           (lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0')
            || '7' || substr(r, 16, 3) || substr(r, 20, 4) || substr(r, 25, 12))::uuid AS id,
           md5('bench-ticket-' || (g %% %(aggregates)s))::uuid::text AS tid,
           (g / %(aggregates)s + %(version_offset)s)::int AS version,
           'Concert #' || (g %% %(aggregates)s) || ' - row ' || chr(65 + (g %% 26)) AS title,
           ((g %% %(aggregates)s) %% 900 + 10.5)::numeric AS price,
           'user-' || ((g %% %(aggregates)s) %% 1000) AS uid
    FROM generate_series(%(start)s, %(start)s + %(count)s - 1) AS g,
         LATERAL (SELECT gen_random_uuid()::text || left(g::text, 0) AS r) AS random_part
    ORDER BY g
) AS e
ORDER BY e.g
"""


def insert_outbox_rows(
    bench: Bench,
    *,
    count: int,
    aggregates: int,
    status: str = "pending",
    version_offset: int = 0,
    start: int = 0,
    chunk: int = 200_000,
) -> float:
    """Bulk-insert ``count`` outbox rows; returns the seconds it took."""
    started = time.perf_counter()
    with bench.connect() as conn:
        done = 0
        while done < count:
            n = min(chunk, count - done)
            conn.execute(
                OUTBOX_ROWS_SQL,
                {
                    "status": status,
                    "stream": bench.stream_name(),
                    "aggregates": max(1, aggregates),
                    "version_offset": version_offset,
                    "start": start + done,
                    "count": n,
                },
            )
            done += n
    return time.perf_counter() - started


def read_payloads(bench: Bench, *, status: str = "pending") -> list[tuple[str, str, bytes]]:
    """(event id, event name, body) of the outbox rows, in seq order: the bytes the relay publishes."""
    with bench.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT id::text, subject, payload::text FROM outbox_outboxevent WHERE status = %s ORDER BY seq", [status]
        )
        return [(r[0], r[1], r[2].encode()) for r in cur.fetchall()]


def vacuum_outbox(bench: Bench) -> None:
    bench.sql("VACUUM ANALYZE outbox_outboxevent")


class TableBarrier:
    """Start several processes at the same instant: hold an exclusive lock on a table they all read
    first; once every one of them waits on it, release it and note the time.

    This keeps process start-up (interpreter, Django, connections) out of the measured window.
    """

    def __init__(self, bench: Bench, table: str) -> None:
        self.bench = bench
        self.table = table
        self.conn: psycopg.Connection | None = None
        self.released_at: float | None = None

    def __enter__(self) -> TableBarrier:
        self.conn = self.bench.connect(autocommit=False)
        self.conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")
        return self

    def waiting(self) -> int:
        return int(
            self.bench.scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = %s AND NOT l.granted",
                [self.table],
            )
        )

    def release_when(self, waiting: int, *, procs: list[subprocess.Popen], timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while self.waiting() < waiting:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a process ended before reaching the start barrier")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.waiting()} of {waiting} processes reached the start barrier")
            time.sleep(0.02)
        assert self.conn is not None
        self.released_at = time.time()
        self.conn.commit()
        return self.released_at

    def __exit__(self, *exc: Any) -> None:
        if self.conn is not None:
            if self.released_at is None:
                self.conn.rollback()
            self.conn.close()
