"""Relay drain with a large published history in the table vs an empty table.

Commands (full, then the smoke run of ``run_all.py --quick``)::

    .venv/bin/python benchmarks/relay_history.py --events 100000 --history 1000000
    .venv/bin/python benchmarks/relay_history.py --quick

The outbox keeps published rows for ``RETENTION`` (7 days by default), so a busy table holds far
more published than pending rows. The relay must not slow down because of them: its claim reads
partial indexes of unfinished rows only.

Runs, in one isolated run (own database, stream prefix, queue; see benchmarks/common.py), each
drained by ONE ``manage.py outbox_relay --drain --quiet`` process behind a start barrier (the
same procedure as relay_throughput.py):

1. empty:   N pending rows, nothing else;
2. history: H ``published`` rows (``generate_series`` SQL, over H/10 tickets, published_at spread
   over the last day) and then the same N pending rows, whose tickets continue some of those
   histories;
3. history again: N more pending rows on top of the H + N published ones;
4. empty again.

Empty, history, history, empty: drift of the shared machine falls on both sides alike (one run of
each gave ratios from 0.88 to 0.95 for the same code). Before each drain the table is
``VACUUM ANALYZE``d, as autovacuum would have done for a table that grew this big, and a
``CHECKPOINT`` writes out what the preparation logged: loading a million rows writes about 1 GB of
WAL, which otherwise forced checkpoints (``max_wal_size``) in the middle of the history drains and
not of the empty ones. Each drain starts right after a checkpoint, so each pays the full-page
writes of the pages it touches first — more pages with history, which is the history's real cost.
The checkpoints PostgreSQL started during each drain are reported (``checkpoints_during_*``).
Result: mean events/s with history / mean events/s without; target >= 0.9.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Bench, insert_outbox_rows, log, quick_parser, run, summary_row, vacuum_outbox
from benchmarks.relay_throughput import drain

TARGET = 0.9


def prepare(bench: Bench, *, events: int, history: int) -> int:
    """Fresh table and stream: ``history`` published rows, then ``events`` pending ones; returns its bytes."""
    bench.delete_streams(only=lambda name: name == bench.stream_name())
    bench.sql("TRUNCATE outbox_outboxevent")
    offset = 0
    if history:
        seconds = insert_outbox_rows(bench, count=history, aggregates=max(1, history // 10), status="published")
        log(f"{history:,} published rows inserted in {seconds:.1f}s")
        offset = 10
    insert_outbox_rows(bench, count=events, aggregates=max(1, events // 10), version_offset=offset)
    settle(bench)
    bench.ensure_streams()
    return int(bench.scalar("SELECT pg_total_relation_size('outbox_outboxevent')"))


def settle(bench: Bench) -> None:
    """The state of a table that grew over time: vacuumed, analyzed, its load's WAL checkpointed."""
    vacuum_outbox(bench)
    bench.sql("CHECKPOINT")


def checkpoints(bench: Bench) -> int:
    """Checkpoints the server has started (timed and requested) since its statistics were reset."""
    return int(bench.scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"))


def more_pending(bench: Bench, *, events: int, offset: int) -> int:
    """``events`` more pending rows on top of what the table holds (a new stream); returns its bytes."""
    bench.delete_streams(only=lambda name: name == bench.stream_name())
    insert_outbox_rows(bench, count=events, aggregates=max(1, events // 10), version_offset=offset)
    settle(bench)
    bench.ensure_streams()
    return int(bench.scalar("SELECT pg_total_relation_size('outbox_outboxevent')"))


def body(bench: Bench, args) -> dict:
    events = args.events or (5_000 if args.quick else 100_000)
    history = args.history if args.history is not None else (20_000 if args.quick else 1_000_000)
    bench.setup_django()
    rates = {}
    sizes = {}
    during = {}
    for label in ("empty", "history", "history_again", "empty_again"):
        if label == "history_again":
            sizes[label] = more_pending(bench, events=events, offset=10 + events)
        else:
            sizes[label] = prepare(bench, events=events, history=history if label == "history" else 0)
        before = checkpoints(bench)
        rates[label] = drain(bench, procs=1, events=events)["rate"]
        during[label] = checkpoints(bench) - before
        log(f"{label}: {rates[label]:,.0f} events/s ({during[label]} checkpoint(s) started during the drain)")
    empty = (rates["empty"] + rates["empty_again"]) / 2
    with_history = (rates["history"] + rates["history_again"]) / 2
    ratio = with_history / empty
    return bench.result(
        params={
            "events": events,
            "history_rows": history,
            "relay_processes": 1,
            "order": "empty, history, history, empty",
            "before_each_drain": "VACUUM ANALYZE, CHECKPOINT",
        },
        figures={
            "empty_events_per_s": rates["empty"],
            "empty_again_events_per_s": rates["empty_again"],
            "history_events_per_s": with_history,
            "history_first_events_per_s": rates["history"],
            "history_again_events_per_s": rates["history_again"],
            "ratio": ratio,
            "table_mb_empty": sizes["empty"] / 2**20,
            "table_mb_history": sizes["history"] / 2**20,
            **{f"checkpoints_during_{label}": count for label, count in during.items()},
        },
        summary=[
            summary_row(
                f"relay drain with {history:,} published rows in the table",
                value=with_history,
                unit="events/s",
                ceiling=empty,
                ceiling_what="same drain, empty table (mean of the first and the last drain)",
                ratio=ratio,
                op=">=",
                target=TARGET,
            )
        ],
        bound=(
            "the claim reads the partial indexes of unfinished rows (outbox_pending_seq, outbox_unfinished_agg); "
            "published rows only add to the non-partial indexes the updates must maintain "
            "(pkey, seq, outbox_aggregate, outbox_status_subject)"
        ),
        notes=[
            "table sizes (heap + indexes, before the drain) are in the figures",
            f"ratio {'meets' if ratio >= TARGET else 'misses'} the target",
        ],
    )


def main() -> int:
    parser = quick_parser(__doc__)
    parser.add_argument("--events", type=int, help="pending rows to drain (default 100000; --quick 5000)")
    parser.add_argument(
        "--history", type=int, help="published rows already in the table (default 1000000; --quick 20000)"
    )
    return run("relay_history", parser, body)


if __name__ == "__main__":
    sys.exit(main())
