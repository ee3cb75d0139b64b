"""End-to-end latency: a steady rate of ticket updates, from the writer's commit to the listener's commit.

Commands (full, then the smoke run of ``run_all.py --quick``)::

    .venv/bin/python benchmarks/latency.py --rates 20,200,1000 --seconds 30
    .venv/bin/python benchmarks/latency.py --quick          # 200/s for 3 s

In one isolated run (own database, stream prefix, Celery queue; see benchmarks/common.py):

- **system**: a Celery relay worker (``celery -A ticketing worker --pool=solo -Q <queue>``, Redis
  broker; its relay loop woken by the outbox table's NOTIFY, as in production on PostgreSQL, or kicked
  on commit with ``OUTBOX_WAKE=kick`` in the environment) and a listener (``manage.py listen ticket:created
  ticket:updated``) run as subprocesses. Writer threads in this process call
  ``ticketing.services.ticket_update`` at a steady rate R for D seconds (open loop: each update has
  its scheduled time; a writer that falls behind fires at once). The commit time of each update is
  ``time.time()`` taken by a ``transaction.on_commit`` callback registered (through ``post_save``)
  before the relay kick, i.e. right after COMMIT returned, keyed by ticket id and version. The
  listener's commit time is ``InboxEntry.processed_at`` of the event — set when the inbox row is
  written, *before* the batch commits, so the figure slightly underestimates (by the rest of the
  batch and the commit). With ``--cross-check``, also from the other side: a trigger on the inbox
  table of this run's database sends ``pg_notify`` per row, which PostgreSQL delivers only after
  the commit; this script receives it and stamps it (a slight overestimate: delivery, and this busy
  process). Off by default: it makes every listener commit take the notify lock that the writers'
  commits hold through their WAL flush, a cost no production listener pays.
  The stages are split where JetStream stored the message (its timestamp, read back afterwards).
- **bare floor** (same run, same rate, up to 10 s): a plain INSERT committed in PostgreSQL with a
  ``pg_notify`` in the same statement -> an asyncio task LISTENing publishes it to JetStream
  (``publish_async``, pipelined) -> a push consumer receives (and acks) it; commit -> receipt.
  All of it runs in this one process, next to its writer threads.

Per rate: achieved rate, p50/p99/max, the relay and listener stages (published_at), the part after
the inbox row (inbox row -> NOTIFY: the rest of the batch, its COMMIT, the delivery here), and
whether it saturated (writers could not keep the rate, or latency kept growing). Targets: p50 <= 5 ms,
p99 <= 15 ms at every rate, and at 200/s also p50 <= 5x and p99 <= 10x the bare floor of the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from benchmarks.common import Bench, int_list, log, percentile, quick_parser, run, summary_row

P50_TARGET_MS = 5.0
P99_TARGET_MS = 15.0
#: At TARGET_RATE the latencies must also stay within these multiples of the bare floor of the run.
TARGET_RATE = 200
P50_TARGET_RATIO = 5.0
P99_TARGET_RATIO = 10.0
TICKETS = 200

NOTIFY_TRIGGER_SQL = """
CREATE FUNCTION bench_inbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_applied', NEW.event_id);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_inbox_notify AFTER INSERT ON listeners_inboxentry
    FOR EACH ROW EXECUTE FUNCTION bench_inbox_notify();
"""


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    if not ms:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms),
    }


def writer_threads(rate: int) -> int:
    """One thread per 100 updates/s (a ticket_update takes several ms on a busy 2-core machine)."""
    return min(20, max(2, math.ceil(rate / 100)))


def paced(rate: int, seconds: float, threads: int, action) -> tuple[int, float]:
    """Call ``action(thread, i)`` on an open-loop schedule of ``rate``/s for ``seconds`` over ``threads``.

    Returns (calls made, seconds from the first scheduled call to the last one returning).
    """
    start = time.time() + 0.05
    end = start + seconds
    counts = [0] * threads
    errors: list[BaseException] = []

    def work(k: int) -> None:
        from django.db import connection

        interval = threads / rate
        due = start + k / rate
        i = 0
        try:
            while due < end and time.time() < end:
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                action(k, i)
                i += 1
                due += interval
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            counts[k] = i
            connection.close()

    workers = [threading.Thread(target=work, args=(k,), name=f"writer-{k}") for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sum(counts), time.time() - start


class NotifyStamps:
    """Receives the inbox trigger's notifications (sent by PostgreSQL after each listener commit)."""

    def __init__(self, bench: Bench) -> None:
        self.stamps: dict[str, float] = {}
        self.conn = bench.connect()
        self.conn.execute("LISTEN bench_applied")
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="notify-stamps", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            for note in self.conn.notifies(timeout=0.2):
                self.stamps[note.payload] = time.time()

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.conn.close()


def stored_times(bench: Bench, since_seq: int) -> tuple[dict[str, float], int]:
    """When JetStream stored each message of the TICKETS stream after ``since_seq``, by event id (its
    ``Nats-Msg-Id``), read back with an ephemeral pull consumer; and the stream's last sequence."""

    async def go() -> tuple[dict[str, float], int]:
        nc = await bench.nats_connect()
        try:
            js = nc.jetstream(timeout=30)
            stream = bench.stream_name()
            last = (await js.stream_info(stream)).state.last_seq
            stored: dict[str, float] = {}
            if last <= since_seq:
                return stored, last
            psub = await js.pull_subscribe(
                f"{bench.subject_prefix}>",
                stream=stream,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=since_seq + 1,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=30.0,
                ),
            )
            try:
                while True:
                    try:
                        msgs = await psub.fetch(500, timeout=2)
                    except (TimeoutError, NatsTimeoutError):
                        break
                    for msg in msgs:
                        stored[msg.headers["Nats-Msg-Id"]] = msg.metadata.timestamp.timestamp()
                    if msgs[-1].metadata.sequence.stream >= last:
                        break
            finally:
                await psub.unsubscribe()
            return stored, last
        finally:
            await nc.close()

    return asyncio.run(go())


def run_system(
    bench: Bench,
    *,
    rate: int,
    seconds: float,
    tickets: list[str],
    commits: dict,
    notes: NotifyStamps | None,
    since_seq: int,
):
    from ticketing.services import ticket_update

    threads = writer_threads(rate)
    per_thread = [tickets[k::threads] for k in range(threads)]

    def action(k: int, i: int) -> None:
        mine = per_thread[k]
        ticket_update(ticket_id=mine[i % len(mine)], title=f"rate {rate} writer {k} update {i}")

    window_start = time.time()
    sent, elapsed = paced(rate, seconds, threads, action)
    achieved = sent / elapsed
    log(f"system {rate}/s: {sent} updates in {elapsed:.1f}s = {achieved:,.0f}/s with {threads} writer thread(s)")

    written_after = time.time()
    deadline = written_after + 60 + sent / 200
    while True:
        applied = bench.scalar(
            "SELECT count(*) FROM listeners_inboxentry WHERE processed_at >= to_timestamp(%s)", [window_start]
        )
        if applied >= sent or time.time() > deadline:
            break
        time.sleep(0.1)
    drain_seconds = time.time() - written_after
    rows = bench.sql(
        "SELECT o.id::text, o.aggregate_id, o.aggregate_version, extract(epoch FROM o.published_at), "
        "extract(epoch FROM i.processed_at) FROM outbox_outboxevent o "
        "LEFT JOIN listeners_inboxentry i ON i.event_id = o.id::text "
        "WHERE o.subject = 'ticket:updated' AND o.created_at >= to_timestamp(%s)",
        [window_start],
    )
    time.sleep(0.3)  # the last notifications
    stored, last_seq = stored_times(bench, since_seq)
    lat, relay_stage, listener_stage, notified, by_commit, row_to_notified = [], [], [], [], [], []
    to_stream, from_stream, mark_lag = [], [], []
    missing = 0
    for event_id, ticket_id, version, published, processed in rows:
        committed = commits.get((ticket_id, version))
        if committed is None or processed is None:
            missing += 1
            continue
        lat.append(float(processed) - committed)
        by_commit.append((committed, float(processed) - committed))
        if published is not None:
            relay_stage.append(float(published) - committed)
            listener_stage.append(float(processed) - float(published))
        if event_id in stored:
            to_stream.append(stored[event_id] - committed)
            from_stream.append(float(processed) - stored[event_id])
            if published is not None:
                mark_lag.append(float(published) - stored[event_id])
        if notes is not None and event_id in notes.stamps:
            notified.append(notes.stamps[event_id] - committed)
            # The rest of the listener's batch after its inbox row, its COMMIT, and the NOTIFY's way here.
            row_to_notified.append(notes.stamps[event_id] - float(processed))
    by_commit.sort()
    quarter = max(1, len(by_commit) // 4)
    first_q = percentile([x[1] for x in by_commit[:quarter]], 50) * 1000
    last_q = percentile([x[1] for x in by_commit[-quarter:]], 50) * 1000
    writer_bound = achieved < 0.95 * rate
    growing = last_q > 2 * first_q + 20
    result = {
        "rate": rate,
        "writer_threads": threads,
        "updates": sent,
        "achieved_per_s": achieved,
        "applied": len(lat),
        "missing": missing,
        "drain_after_writes_s": drain_seconds,
        "latency_ms": stats_ms(lat),
        "latency_commit_notified_ms": stats_ms(notified),
        "relay_stage_ms": stats_ms(relay_stage),
        "listener_stage_ms": stats_ms(listener_stage),
        "inbox_row_to_notified_ms": stats_ms(row_to_notified),
        "commit_to_stream_ms": stats_ms(to_stream),
        "stream_to_inbox_row_ms": stats_ms(from_stream),
        "stream_to_published_at_ms": stats_ms(mark_lag),
        "last_seq": last_seq,
        "p50_first_quarter_ms": first_q,
        "p50_last_quarter_ms": last_q,
        "saturated": writer_bound or growing or missing > 0,
        "saturation": ", ".join(
            reason
            for reason, on in (
                ("writers could not keep the rate", writer_bound),
                ("latency grew during the run", growing),
                (f"{missing} events not applied in time", missing > 0),
            )
            if on
        ),
    }
    s = result["latency_ms"]
    log(f"system {rate}/s: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms; {result['saturation']}")
    a, b = result["commit_to_stream_ms"], result["stream_to_inbox_row_ms"]
    log(
        f"  commit -> stored in JetStream p50 {a['p50']:.1f} / p99 {a['p99']:.1f} ms; "
        f"stored -> inbox row p50 {b['p50']:.1f} / p99 {b['p99']:.1f} ms"
    )
    return result


# -- the bare floor --------------------------------------------------------------------------


def run_floor(bench: Bench, *, rate: int, seconds: float) -> dict:
    """commit (INSERT + pg_notify) -> LISTEN -> js.publish -> push consumer, ack; latencies commit -> receipt."""
    commits: dict[str, float] = {}
    received: dict[str, float] = {}
    stream = f"{bench.stream_prefix}FLOOR{rate}"
    subject = f"{bench.subject_prefix}floor{rate}"
    body = json.dumps(
        {"id": "5d1f6a3e-0000-4000-8000-000000000000", "version": 1, "title": "Concert", "price": 10.5, "userId": "u"}
    )
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="floor-loop", daemon=True)
    loop_thread.start()
    state: dict = {}

    async def setup() -> None:
        nc = await bench.nats_connect()
        js = nc.jetstream(timeout=5, publish_async_max_pending=1000)
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[subject],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=120.0,
            )
        )

        async def receive(msg) -> None:
            received[msg.headers["Nats-Msg-Id"]] = time.time()
            await msg.ack()

        # A push consumer: each message comes the moment it is stored, with no pull request to wait
        # for (a pull of one message at a time could not keep up with 1,000/s).
        sub = await js.subscribe(subject, stream=stream, cb=receive, manual_ack=True)
        aconn = await psycopg.AsyncConnection.connect(bench.database_url, autocommit=True)
        await aconn.execute("LISTEN bench_floor")
        state.update(nc=nc, js=js, sub=sub, aconn=aconn)

        async def relay() -> None:
            async for note in aconn.notifies():
                event_id, _, payload = note.payload.partition(" ")
                # Pipelined: the PubAck is not awaited before the next notification is handled.
                await js.publish_async(subject, payload.encode(), headers={"Nats-Msg-Id": event_id})

        state["tasks"] = [loop.create_task(relay())]

    async def teardown() -> None:
        for task in state.get("tasks", []):
            task.cancel()
        await asyncio.gather(*state.get("tasks", []), return_exceptions=True)
        if "sub" in state:
            await state["sub"].unsubscribe()
        if "aconn" in state:
            await state["aconn"].close()
        if "js" in state:
            await state["js"].delete_stream(stream)
        if "nc" in state:
            await state["nc"].close()

    asyncio.run_coroutine_threadsafe(setup(), loop).result(30)
    threads = max(1, math.ceil(rate / 400))  # a plain INSERT + COMMIT is far cheaper than ticket_update
    conns = [bench.connect(autocommit=False) for _ in range(threads)]
    try:

        def action(k: int, i: int) -> None:
            conn = conns[k]
            row = conn.execute(
                "WITH r AS (INSERT INTO bench_floor (payload) VALUES (%s) RETURNING id) "
                "SELECT id, pg_notify('bench_floor', id::text || ' ' || %s) FROM r",
                [body, body],
            ).fetchone()
            conn.commit()
            commits[str(row[0])] = time.time()

        sent, elapsed = paced(rate, seconds, threads, action)
        deadline = time.time() + 30
        while len(received) < sent and time.time() < deadline:
            time.sleep(0.05)
    finally:
        for conn in conns:
            conn.close()
        asyncio.run_coroutine_threadsafe(teardown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
    lat = [received[k] - v for k, v in commits.items() if k in received]
    result = {
        "rate": rate,
        "sent": sent,
        "achieved_per_s": sent / elapsed,
        "received": len(lat),
        "latency_ms": stats_ms(lat),
    }
    s = result["latency_ms"]
    log(f"floor {rate}/s: {sent / elapsed:,.0f}/s achieved, p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms")
    return result


# -- the run ---------------------------------------------------------------------------------


def body(bench: Bench, args) -> dict:
    rates = int_list(args.rates) if args.rates else [200]
    seconds = args.seconds or (3.0 if args.quick else 30.0)
    floor_seconds = min(seconds, 10.0)
    bench.setup_django()
    bench.ensure_streams()
    if args.cross_check:
        bench.sql(NOTIFY_TRIGGER_SQL)
    bench.sql("CREATE TABLE bench_floor (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")

    from django.db import transaction
    from django.db.models.signals import post_save

    from ticketing.models import Ticket
    from ticketing.services import ticket_create

    commits: dict[tuple[str, int], float] = {}

    def stamp_commit(sender, instance, **_kwargs) -> None:
        key = (str(instance.id), instance.version)
        # Registered before emit() registers a relay kick (WAKE=kick), so it runs first after COMMIT.
        transaction.on_commit(lambda: commits.__setitem__(key, time.time()))

    post_save.connect(stamp_commit, sender=Ticket, weak=False, dispatch_uid="bench-latency")
    notes = NotifyStamps(bench) if args.cross_check else None
    try:
        bench.celery_worker(name="celery")
        listener = bench.manage(
            "listen", "ticket:created", "ticket:updated", "--batch", str(args.listener_batch), name="listener"
        )
        tickets = [
            str(ticket_create(title=f"Latency ticket {i}", price="25.00", user_id=f"user-{i}").id)
            for i in range(TICKETS)
        ]
        deadline = time.time() + 120
        while bench.scalar("SELECT count(*) FROM replica_ticketreplica") < TICKETS:
            if listener.poll() is not None:
                raise RuntimeError(f"the listener exited:\n{bench.tail('listener')}")
            if time.time() > deadline:
                raise RuntimeError(
                    f"the pipeline did not deliver the {TICKETS} ticket:created events in time:\n"
                    f"{bench.tail('celery')}\n{bench.tail('listener')}"
                )
            time.sleep(0.1)
        log(f"pipeline up: {TICKETS} tickets replicated")
        systems, floors = [], []
        since_seq = 0
        for rate in rates:
            sysrun = run_system(
                bench, rate=rate, seconds=seconds, tickets=tickets, commits=commits, notes=notes, since_seq=since_seq
            )
            since_seq = sysrun["last_seq"]
            systems.append(sysrun)
            floors.append(run_floor(bench, rate=rate, seconds=floor_seconds))
    finally:
        if notes is not None:
            notes.close()
        post_save.disconnect(sender=Ticket, dispatch_uid="bench-latency")

    rates_run = [sysrun["rate"] for sysrun in systems]
    at = rates_run.index(TARGET_RATE) if TARGET_RATE in rates_run else 0
    main, main_floor = systems[at], floors[at]
    figures: dict = {}
    for sysrun, floorrun in zip(systems, floors, strict=True):
        r = sysrun["rate"]
        figures[f"r{r}_achieved_per_s"] = sysrun["achieved_per_s"]
        figures[f"r{r}_p50_ms"] = sysrun["latency_ms"]["p50"]
        figures[f"r{r}_p99_ms"] = sysrun["latency_ms"]["p99"]
        figures[f"r{r}_max_ms"] = sysrun["latency_ms"]["max"]
        figures[f"r{r}_notified_p50_ms"] = sysrun["latency_commit_notified_ms"]["p50"]
        figures[f"r{r}_notified_p99_ms"] = sysrun["latency_commit_notified_ms"]["p99"]
        figures[f"r{r}_relay_stage_p50_ms"] = sysrun["relay_stage_ms"]["p50"]
        figures[f"r{r}_listener_stage_p50_ms"] = sysrun["listener_stage_ms"]["p50"]
        figures[f"r{r}_relay_stage_p99_ms"] = sysrun["relay_stage_ms"]["p99"]
        figures[f"r{r}_listener_stage_p99_ms"] = sysrun["listener_stage_ms"]["p99"]
        figures[f"r{r}_inbox_row_to_notified_p50_ms"] = sysrun["inbox_row_to_notified_ms"]["p50"]
        for stage in ("commit_to_stream", "stream_to_inbox_row"):
            figures[f"r{r}_{stage}_p50_ms"] = sysrun[f"{stage}_ms"]["p50"]
            figures[f"r{r}_{stage}_p99_ms"] = sysrun[f"{stage}_ms"]["p99"]
        figures[f"r{r}_floor_p50_ms"] = floorrun["latency_ms"]["p50"]
        figures[f"r{r}_floor_p99_ms"] = floorrun["latency_ms"]["p99"]
        figures[f"r{r}_floor_achieved_per_s"] = floorrun["achieved_per_s"]
    saturated = [s["rate"] for s in systems if s["saturated"]]
    figures["saturates_at_per_s"] = saturated[0] if saturated else None
    figures["highest_unsaturated_per_s"] = max((s["rate"] for s in systems if not s["saturated"]), default=None)

    summary = []
    for sysrun, floorrun in zip(systems, floors, strict=True):
        r = sysrun["rate"]
        for q, target, ratio_target in (
            ("p50", P50_TARGET_MS, P50_TARGET_RATIO),
            ("p99", P99_TARGET_MS, P99_TARGET_RATIO),
        ):
            value = sysrun["latency_ms"][q]
            ceiling = floorrun["latency_ms"][q]
            figure = f"commit -> listener commit {q} at {r}/s" + (
                f" (achieved {sysrun['achieved_per_s']:,.0f}/s)" if sysrun["saturated"] else ""
            )
            row = {
                "value": value,
                "unit": "ms",
                "ceiling": ceiling,
                "ceiling_what": "bare commit -> NOTIFY -> publish -> push consume, same rate",
                "ratio": value / ceiling if ceiling else None,
                "op": "<=",
            }
            summary.append(summary_row(figure, **row, target=target, target_of="value"))
            if r == TARGET_RATE:  # the rate: also within a multiple of the bare floor
                summary.append(summary_row(f"{figure}, vs the bare floor", **row, target=ratio_target))
    return bench.result(
        params={
            "rates": rates,
            "seconds": seconds,
            "floor_seconds": floor_seconds,
            "tickets": TICKETS,
            "writer_threads": {str(r): writer_threads(r) for r in rates},
            "listener_batch": args.listener_batch,
            "relay": "celery worker --pool=solo, woken by OUTBOX['WAKE'] = " + os.environ.get("OUTBOX_WAKE", "notify"),
        },
        figures=figures,
        summary=summary,
        bound=(
            f"stages at {main['rate']}/s, p50 / p99: commit -> stored in JetStream "
            f"{main['commit_to_stream_ms']['p50']:.1f} / {main['commit_to_stream_ms']['p99']:.1f} ms (the NOTIFY's "
            "delivery to the worker's relay loop, its claim, the publish; with WAKE=kick the on_commit kick, Redis "
            f"and Celery instead of the NOTIFY), stored -> inbox row {main['stream_to_inbox_row_ms']['p50']:.1f} / "
            f"{main['stream_to_inbox_row_ms']['p99']:.1f} ms (delivery to the listener's open pull request, the "
            "batch before it, the batch's statements up to its inbox INSERT), then "
            f"{main['inbox_row_to_notified_ms']['p50']:.1f} ms from the inbox row to the commit's NOTIFY here (the "
            "batch's last statements, COMMIT, delivery to this busy process); the mark (published_at) is off this "
            f"path; bare floor p50 {main_floor['latency_ms']['p50']:.2f} ms"
        ),
        notes=[
            "latency = InboxEntry.processed_at - writer commit; processed_at is set before the listener's batch "
            "commits, so it slightly underestimates; latency_commit_notified_* is the cross-check taken after that "
            "commit (pg_notify from a trigger on the inbox table of this run's database), a slight overestimate",
            "targets p50 <= 5 ms and p99 <= 15 ms; every rate is reported against them",
            "runs: " + json.dumps(systems, default=str),
            "floor runs: " + json.dumps(floors, default=str),
        ],
    )


def main() -> int:
    parser = quick_parser(__doc__)
    parser.add_argument("--rates", help="updates per second, comma separated (default 200)")
    parser.add_argument("--seconds", type=float, help="seconds per rate (default 30; --quick 3)")
    parser.add_argument("--listener-batch", type=int, default=100, help="listen --batch (default 100, its default)")
    parser.add_argument(
        "--cross-check",
        action="store_true",
        help="also stamp each listener commit by a NOTIFY from a trigger on the inbox (it makes every listener "
        "commit take PostgreSQL's notify lock, which writers' commits hold through their WAL flush: off by default)",
    )
    return run("latency", parser, body)


if __name__ == "__main__":
    sys.exit(main())
