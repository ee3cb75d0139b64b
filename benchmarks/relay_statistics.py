"""A backlog drained on a table whose planner statistics are missing, against the same after ANALYZE.

Commands::

    .venv/bin/python benchmarks/relay_statistics.py --events 100000
    .venv/bin/python benchmarks/relay_statistics.py --quick

The case an operator meets after an outage: a backlog that built up while the relay could not
publish, in a table whose statistics do not know it (autovacuum analyzes after 10 % of a table
changed, and a table of millions of published rows does not get there). Here: the outbox table is
truncated, N pending rows of N different tickets (one event each) are bulk-inserted, and one
``outbox_relay --drain`` process drains them with **no ANALYZE**; then the same backlog again,
after ``VACUUM ANALYZE``. The two run in the order stale, analyzed, analyzed, stale (drift of the
shared machine falls on both alike) and each side's figure is the mean of its two drains. The
first stale drain meets a table that was never analyzed (no statistics at all); the last one the
statistics of an earlier backlog (TRUNCATE resets the row count, not the column statistics).

Raw ``publish_async`` of the same bodies is measured after the drains (relay_throughput.py's
ceiling): measured first, its 100,000 messages being written out and deleted slowed the drain
that followed by a third (11,672 vs 17,175 events/s, 2026-12-07).

Output: events/s of both sides; the figure is ``stale / analyzed``, target >= 0.9.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Bench, insert_outbox_rows, log, quick_parser, read_payloads, run, summary_row
from benchmarks.relay_throughput import drain, raw_ceiling

TARGET = 0.9


def backlog(bench: Bench, *, events: int, analyze: bool) -> None:
    """N pending rows of N tickets in a freshly truncated table (statistics reset), analyzed or not."""
    bench.delete_streams(only=lambda name: name == bench.stream_name())
    bench.sql("TRUNCATE outbox_outboxevent")
    seconds = insert_outbox_rows(bench, count=events, aggregates=events)
    if analyze:
        bench.sql("VACUUM ANALYZE outbox_outboxevent")
    reltuples = bench.scalar("SELECT reltuples FROM pg_class WHERE relname = 'outbox_outboxevent'")
    bench.ensure_streams()
    log(
        f"backlog of {events:,} rows in {seconds:.1f}s, "
        f"{'analyzed' if analyze else 'no ANALYZE'} (reltuples {reltuples})"
    )


def body(bench: Bench, args) -> dict:
    events = args.events or (5_000 if args.quick else 100_000)
    bench.setup_django()
    rates: dict[bool, list[float]] = {False: [], True: []}
    for analyze in (False, True, True, False):
        backlog(bench, events=events, analyze=analyze)
        rates[analyze].append(drain(bench, procs=1, events=events)["rate"])
    stale = sum(rates[False]) / len(rates[False])
    analyzed = sum(rates[True]) / len(rates[True])
    ceiling = raw_ceiling(bench, read_payloads(bench, status="published"), "0")
    ratio = stale / analyzed
    log(f"stale statistics: {stale:,.0f} events/s; analyzed: {analyzed:,.0f} events/s; ratio {ratio:.2f}")
    return bench.result(
        params={"events": events, "aggregates": events, "order": "stale, analyzed, analyzed, stale"},
        figures={
            "events": events,
            "stale_events_per_s": stale,
            "analyzed_events_per_s": analyzed,
            "stale_runs_events_per_s": rates[False],
            "analyzed_runs_events_per_s": rates[True],
            "stale_ratio": ratio,
            "raw_ceiling_events_per_s": ceiling,
            "stale_to_ceiling": stale / ceiling,
        },
        summary=[
            summary_row(
                "relay drain of a backlog with no ANALYZE vs after ANALYZE",
                value=stale,
                unit="events/s",
                ceiling=analyzed,
                ceiling_what="the same drain after VACUUM ANALYZE",
                ratio=ratio,
                op=">=",
                target=TARGET,
            )
        ],
        bound="the claim's plan: it must read only the window of oldest pending rows whatever the statistics say",
        notes=[f"raw publish_async of the same bodies: {ceiling:,.0f} events/s"],
    )


def main() -> int:
    parser = quick_parser(__doc__)
    parser.add_argument("--events", type=int, help="backlog size (default 100000; --quick 5000)")
    return run("relay_statistics", parser, body)


if __name__ == "__main__":
    sys.exit(main())
