"""Write overhead of the outbox: ``ticket_update`` with its event vs the same ORM update without one.

Commands (full, then the smoke run of ``run_all.py --quick``)::

    .venv/bin/python benchmarks/write_overhead.py --updates 5000
    .venv/bin/python benchmarks/write_overhead.py --quick          # 300 of each

In one isolated run (own database, stream prefix, queue; see benchmarks/common.py), Django is
configured in this process and a set of tickets is created. Then, in alternating blocks of 10
(with/without, then without/with, ...) so that drift and stalls of the shared machine hit both
sides alike, one thread runs:

- **with event**: ``ticketing.services.ticket_update(ticket_id=..., title=...)`` — validation,
  ``select_for_update``, ``save``, ``outbox.emit`` (INSERT of the outbox row) and, on commit,
  the coalesced relay kick (handed to the kicker thread, which makes a Redis ``SET NX`` and a
  Celery message at most every 2 s);
- **without**: the same ORM path minus the event — the same validation, ``transaction.atomic``,
  ``select_for_update().get``, version bump and ``save(update_fields=...)``.

At the end of each "with" block the script waits for the kicker's last kick and adds the wait to
that block's last update, so no kick work spills into the timing of the other side.
No relay runs, so the rows stay pending (the kicks go to this run's own queue, which nobody
consumes and which is deleted at the end). Result: mean seconds per update with / without; target <= 1.15.
Also reported: the CPU seconds of this process per update (all threads, so the kicker's work is
counted on the "with" side), a figure that scheduling delays on a loaded machine do not inflate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Bench, log, percentile, quick_parser, run, summary_row

TARGET = 1.15
BLOCK = 10


def body(bench: Bench, args) -> dict:
    updates = args.updates or (300 if args.quick else 5_000)
    bench.setup_django()
    from django.db import transaction

    from outbox.kick import flush_kicks
    from ticketing.models import Ticket
    from ticketing.services import _clean, ticket_create, ticket_update

    def update_without_event(*, ticket_id, **changes) -> Ticket:
        data = _clean(changes)
        with transaction.atomic():
            ticket = Ticket.objects.select_for_update().get(pk=ticket_id)
            changed = [name for name, value in data.items() if getattr(ticket, name) != value]
            for name in changed:
                setattr(ticket, name, data[name])
            ticket.version += 1
            ticket.save(update_fields=[*changed, "version", "updated_at"])
        return ticket

    tickets = [ticket_create(title=f"Ticket {i}", price="20.00", user_id=f"user-{i}").id for i in range(100)]
    # Warm both paths (connections, query compilation) outside the measurement.
    for i in range(20):
        ticket_update(ticket_id=tickets[i], title=f"warm {i}")
        update_without_event(ticket_id=tickets[i + 20], title=f"warm {i}")

    times: dict[str, list[float]] = {"with": [], "without": []}
    cpu = {"with": 0.0, "without": 0.0}
    functions = {"with": ticket_update, "without": update_without_event}
    done = 0
    while done < updates:
        n = min(BLOCK, updates - done)
        for label in ("with", "without") if (done // BLOCK) % 2 == 0 else ("without", "with"):
            fn = functions[label]
            samples = times[label]
            cpu_started = time.process_time()
            for i in range(done, done + n):
                ticket_id = tickets[i % len(tickets)]
                started = time.perf_counter()
                fn(ticket_id=ticket_id, title=f"{label} {i}")
                samples.append(time.perf_counter() - started)
            if label == "with":
                # The kicker thread may still be kicking for the block's last commit: wait for it and
                # charge the wait to that update, so no kick runs while the other side is timed.
                started = time.perf_counter()
                flush_kicks()
                samples[-1] += time.perf_counter() - started
            cpu[label] += time.process_time() - cpu_started
        done += n
    events = bench.scalar("SELECT count(*) FROM outbox_outboxevent WHERE subject = 'ticket:updated'")
    if events != updates + 20:
        raise RuntimeError(f"expected {updates + 20} ticket:updated rows, found {events}")

    mean = {k: sum(v) / len(v) for k, v in times.items()}
    ratio = mean["with"] / mean["without"]
    figures = {
        "updates_each": updates,
        "with_event_mean_ms": mean["with"] * 1000,
        "without_event_mean_ms": mean["without"] * 1000,
        "with_event_p50_ms": percentile(times["with"], 50) * 1000,
        "without_event_p50_ms": percentile(times["without"], 50) * 1000,
        "with_event_p99_ms": percentile(times["with"], 99) * 1000,
        "without_event_p99_ms": percentile(times["without"], 99) * 1000,
        "with_event_per_s": 1 / mean["with"],
        "without_event_per_s": 1 / mean["without"],
        "ratio": ratio,
        "ratio_p50": percentile(times["with"], 50) / percentile(times["without"], 50),
        "with_event_cpu_ms": cpu["with"] / updates * 1000,
        "without_event_cpu_ms": cpu["without"] / updates * 1000,
        "cpu_ratio": cpu["with"] / cpu["without"] if cpu["without"] else float("nan"),
    }
    log(
        f"with event {mean['with'] * 1000:.3f} ms, without {mean['without'] * 1000:.3f} ms: ratio {ratio:.2f} "
        f"(p50 {figures['ratio_p50']:.2f}, CPU {figures['cpu_ratio']:.2f})"
    )
    return bench.result(
        params={"updates_each": updates, "tickets": len(tickets), "block": BLOCK, "threads": 1},
        figures=figures,
        summary=[
            summary_row(
                "ticket_update with event vs same ORM update without",
                value=mean["with"] * 1000,
                unit="ms/update",
                ceiling=mean["without"] * 1000,
                ceiling_what="the same ORM update (select_for_update, save, atomic) without emit()",
                ratio=ratio,
                op="<=",
                target=TARGET,
            )
        ],
        bound=(
            "both sides pay BEGIN, the row lock, the UPDATE and one commit (WAL flush): four round trips to "
            "PostgreSQL; the event adds a fifth, the INSERT of the outbox row (two JSON columns, four index "
            "entries), and the CPU of building and validating the event; the relay kick after the commit "
            "(Redis SET NX, a Celery message when the flag was free) runs on the kicker thread: the caller does "
            "not wait for Redis, but the thread's CPU and GIL time are still this process's"
        ),
        notes=[
            "ratio uses mean seconds per update; ratio_p50 uses medians",
            "cpu figures: process CPU seconds (all threads) per update, measured per block",
        ],
    )


def main() -> int:
    parser = quick_parser(__doc__)
    parser.add_argument("--updates", type=int, help="updates of each kind (default 5000; --quick 300)")
    return run("write_overhead", parser, body)


if __name__ == "__main__":
    sys.exit(main())
