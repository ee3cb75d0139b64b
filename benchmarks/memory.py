"""Relay memory: resident set size of ONE relay process after 10,000 vs 1,000,000 published events.

Commands (full, then the smoke run of ``run_all.py --quick``)::

    .venv/bin/python benchmarks/memory.py --small 10000 --large 1000000
    .venv/bin/python benchmarks/memory.py --quick          # 2,000 vs 20,000

A long-lived relay must not grow with the number of events it has published. In one isolated run
(own database, stream prefix, queue; see benchmarks/common.py) ``--large`` pending rows are
bulk-inserted, then a small driver subprocess (this file with ``--driver``; the same
``Relay().run_batch()`` loop as ``manage.py outbox_relay --drain``) drains them. At each
milestone (the first batch, ``--small``, a few points between, ``--large``) it stops and waits
while this process reads ``VmRSS`` / ``VmHWM`` from ``/proc/<pid>/status`` of the driver.

Result: RSS after ``--large`` / RSS after ``--small``; target <= 1.2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    PYTHON,
    Bench,
    insert_outbox_rows,
    int_list,
    log,
    quick_parser,
    run,
    summary_row,
    vacuum_outbox,
)

TARGET = 1.2


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            values[key] = int(rest.split()[0]) / 1024
    return values


def driver(milestones: list[int]) -> int:
    """Child mode: drain, stopping at each milestone until the parent has read our RSS."""
    import django

    django.setup()
    from outbox.relay import Relay

    relay = Relay()
    published = 0
    pending = sorted(milestones)
    first = True
    try:
        while pending:
            report = relay.run_batch()
            if report.claimed == 0:
                break
            published += report.published
            if first:
                print(f"MILESTONE first {published}", flush=True)
                sys.stdin.readline()
                first = False
            while pending and published >= pending[0]:
                print(f"MILESTONE {pending.pop(0)} {published}", flush=True)
                sys.stdin.readline()
    finally:
        relay.broker.close()
    print(f"DONE {published}", flush=True)
    return 0


def body(bench: Bench, args) -> dict:
    small = args.small or (2_000 if args.quick else 10_000)
    large = args.large or (20_000 if args.quick else 1_000_000)
    between = [m for m in (large // 10, large // 2) if small < m < large]
    milestones = [small, *between, large]
    bench.setup_django()
    seconds = insert_outbox_rows(bench, count=large, aggregates=max(1, large // 10))
    vacuum_outbox(bench)
    bench.ensure_streams()
    log(f"{large:,} pending rows inserted in {seconds:.1f}s")

    child = bench.spawn(
        [PYTHON, str(Path(__file__).resolve()), "--driver", "--milestones", ",".join(map(str, milestones))],
        name="driver",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(bench.log_path("driver"), "ab"),  # noqa: SIM115 - closed at exit
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    samples: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    deadline = time.monotonic() + 300 + large / 300
    while True:
        line = child.stdout.readline()
        if not line:
            break
        parts = line.split()
        if parts[0] == "MILESTONE":
            status = proc_status(child.pid)
            samples[parts[1]] = {**status, "published": int(parts[2]), "seconds": time.perf_counter() - started}
            log(f"after {parts[2]} events: VmRSS {status['VmRSS']:.1f} MiB, VmHWM {status['VmHWM']:.1f} MiB")
            child.stdin.write("go\n")
            child.stdin.flush()
        elif parts[0] == "DONE":
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the relay driver did not finish in time")
    bench.wait_exit(child, name="driver", timeout=60)
    missing = [str(m) for m in milestones if str(m) not in samples]
    if missing:
        raise RuntimeError(f"the driver never reached milestone(s) {missing}:\n{bench.tail('driver')}")
    rss_small = samples[str(small)]["VmRSS"]
    rss_large = samples[str(large)]["VmRSS"]
    ratio = rss_large / rss_small
    figures = {
        "rss_first_batch_mib": samples["first"]["VmRSS"],
        "rss_small_mib": rss_small,
        "rss_large_mib": rss_large,
        "hwm_large_mib": samples[str(large)]["VmHWM"],
        "ratio": ratio,
        "drain_events_per_s": large / samples[str(large)]["seconds"],
    }
    for m in between:
        figures[f"rss_{m}_mib"] = samples[str(m)]["VmRSS"]
    return bench.result(
        params={"small": small, "large": large, "milestones": milestones},
        figures=figures,
        summary=[
            summary_row(
                f"relay RSS after {large:,} events vs {small:,}",
                value=rss_large,
                unit="MiB",
                ceiling=rss_small,
                ceiling_what=f"RSS of the same process after {small:,} events",
                ratio=ratio,
                op="<=",
                target=TARGET,
            )
        ],
        bound="per-batch objects (claimed rows, futures, headers) are released after each batch; "
        "the rest is the interpreter, Django, psycopg and nats-py",
        notes=[
            "VmRSS read by the parent from /proc/<pid>/status while the driver waits at the milestone",
            "drain_events_per_s includes the pauses at milestones (milliseconds)",
        ],
    )


def main() -> int:
    parser = quick_parser(__doc__)
    parser.add_argument("--small", type=int, help="first milestone (default 10000; --quick 2000)")
    parser.add_argument("--large", type=int, help="last milestone (default 1000000; --quick 20000)")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--milestones", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.driver:
        return driver(int_list(args.milestones))
    return run("memory", parser, body)


if __name__ == "__main__":
    sys.exit(main())
