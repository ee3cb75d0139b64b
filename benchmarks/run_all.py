"""Run every benchmark, collect their JSON, draw the chart, print the table for the README.

Commands::

    .venv/bin/python benchmarks/run_all.py            # full sizes (many minutes): results/latest.{json,png,md}
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run (about a minute): results/quick.{json,png,md}
    .venv/bin/python benchmarks/run_all.py --only relay_throughput,memory

Each benchmark runs as its own subprocess, one after the other (they would disturb each other's
figures), and isolates itself (own database, streams, queue). Their progress goes to stderr; the
markdown table (figure, value, ceiling, ratio, target, met?) goes to stdout and to the ``.md``
file. The chart shows, for every figure, how far it is from its target: 1.0 is the target,
above it is met. A benchmark that fails is recorded with its error and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

#: key -> (script, extra arguments of a full run)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "relay_throughput": ("relay_throughput.py", []),
    "relay_history": ("relay_history.py", []),
    "relay_statistics": ("relay_statistics.py", []),
    "latency": ("latency.py", ["--rates", "20,200,1000"]),
    "write_overhead": ("write_overhead.py", []),
    "listener_throughput": ("listener_throughput.py", []),
    "memory": ("memory.py", []),
    "durability": ("durability.py", []),
    "tracing": ("tracing.py", []),
}


def run_one(key: str, *, quick: bool, timeout: float) -> dict:
    script, full_args = BENCHMARKS[key]
    args = [sys.executable, str(HERE / script), *(["--quick"] if quick else full_args)]
    print(f"[run_all] {key}: {' '.join(args[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"benchmark": key, "error": f"timed out after {timeout:.0f}s"}
    seconds = time.perf_counter() - started
    print(f"[run_all] {key}: exit {done.returncode} after {seconds:.0f}s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        return {"benchmark": key, "error": f"exit status {done.returncode}", "stdout": done.stdout[-2000:]}
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        return {"benchmark": key, "error": f"output is not one JSON object: {exc}", "stdout": done.stdout[-2000:]}


def git_state() -> tuple[str, list[str]]:
    """(commit, tracked files changed outside benchmarks/) of the code being measured.

    A source tree without ``.git`` (e.g. a ``git archive`` export) can name its commit in
    ``BENCH_SOURCE_COMMIT``.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return os.environ.get("BENCH_SOURCE_COMMIT", ""), []
    if head.returncode != 0:
        return os.environ.get("BENCH_SOURCE_COMMIT", ""), []
    dirty = [line[3:] for line in status.stdout.splitlines() if not line[3:].startswith("benchmarks/")]
    return head.stdout.strip(), dirty


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def rows(results: dict) -> list[dict]:
    out = []
    for key, result in results["benchmarks"].items():
        if "error" in result:
            out.append({"benchmark": key, "error": result["error"]})
            continue
        for row in result.get("summary", []):
            out.append({"benchmark": key, **row})
    return out


def markdown(results: dict) -> str:
    kind = "quick (smoke sizes)" if results["quick"] else "full"
    lines = [
        f"Benchmarks, {kind} run of {results['generated_at']} (commit {results['git_commit'] or '?'}"
        + (
            f" with uncommitted changes to {', '.join(results['uncommitted_changes'])}"
            if results["uncommitted_changes"]
            else ""
        )
        + f", {results['machine']['cpus']} CPUs, load average {results['machine']['loadavg_start'][0]} at the start; "
        "every ceiling measured in the same run).",
        "",
        "| benchmark | figure | value | ceiling | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows(results):
        if "error" in row:
            lines.append(f"| {row['benchmark']} | **failed**: {row['error']} | | | | | ✗ |")
            continue
        lines.append(
            f"| {row['benchmark']} | {row['figure']} | {fmt(row['value'], row['unit'])} | "
            f"{fmt(row['ceiling'], row['unit'] if row['target_of'] == 'value' else row['unit'])} | "
            f"{fmt(row['ratio'])} | {row['target']} | {'✓' if row['met'] else '✗'} |"
        )
    lines += ["", "Ceilings:"]
    seen = set()
    for row in rows(results):
        if "error" not in row and row["ceiling_what"] not in seen:
            seen.add(row["ceiling_what"])
            lines.append(f"- {row['benchmark']}: {row['ceiling_what']}")
    lines += ["", "What bounds each:"]
    for key, result in results["benchmarks"].items():
        if "error" not in result:
            lines.append(f"- **{key}**: {result.get('bound', '')}")
    return "\n".join(lines) + "\n"


def attainment(row: dict) -> float | None:
    """1.0 = exactly on target; > 1 met, < 1 missed (both directions of target)."""
    subject = row["ratio"] if row["target_of"] == "ratio" else row["value"]
    target = row["target_value"]
    if subject is None or subject == 0 or (isinstance(subject, float) and math.isnan(subject)):
        return None
    if not target:
        return None  # a figure reported with no target to reach (e.g. durability's cost): not charted
    return subject / target if row["target_op"] == ">=" else target / subject


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows(results) if "error" not in r and attainment(r) is not None]
    if not data:
        return
    labels = []
    for r in data:
        measured = f"ratio {fmt(r['ratio'])}" if r["target_of"] == "ratio" else fmt(r["value"], r["unit"])
        labels.append(f"{r['benchmark']}: {r['figure']}\n{measured} (target {r['target']})")
    scores = [attainment(r) for r in data]
    colors = ["#2e7d32" if r["met"] else "#c62828" for r in data]
    fig, ax = plt.subplots(figsize=(11, 0.62 * len(data) + 1.6))
    y = list(range(len(data)))[::-1]
    ax.barh(y, scores, color=colors, height=0.6)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7.5)
    ax.set_xlabel("measured / target (log scale; 1.0 = target, right of the line = met)")
    kind = "quick run" if results["quick"] else "full run"
    ax.set_title(
        f"Benchmarks vs targets; ceilings measured in the same run ({kind}, {results['generated_at']})",
        fontsize=9,
    )
    for yi, score in zip(y, scores, strict=True):
        ax.text(score, yi, f" {score:.2g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; writes results/quick.*")
    parser.add_argument("--only", help="comma-separated benchmark keys: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    keys = [k.strip() for k in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [k for k in keys if k not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    started = time.time()
    commit, dirty = git_state()
    results = {
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "git_commit": commit,
        "uncommitted_changes": dirty,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "benchmarks": {},
    }
    for key in keys:
        results["benchmarks"][key] = run_one(key, quick=args.quick, timeout=600 if args.quick else 3600)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.time() - started, 1)

    RESULTS.mkdir(exist_ok=True)
    stem = "quick" if args.quick else "latest"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (RESULTS / f"{stem}.md").write_text(table)
    try:
        chart(results, RESULTS / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001 - the JSON and the table are what matter
        print(f"[run_all] chart failed: {exc}", file=sys.stderr)
    print(table)
    failed = [k for k, r in results["benchmarks"].items() if "error" in r]
    print(
        f"[run_all] {len(keys)} benchmark(s) in {results['seconds']:.0f}s; results in {RESULTS / stem}.json",
        file=sys.stderr,
    )
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
