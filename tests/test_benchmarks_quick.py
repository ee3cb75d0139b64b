"""The benchmark scripts still run: ``benchmarks/run_all.py --quick`` end to end.

Timing claims live in benchmarks/, never in assertions: this test checks that every script runs
against the real services, cleans up, and reports numeric figures — not what the figures are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_JSON = ROOT / "benchmarks" / "results" / "quick.json"
EXPECTED = {
    "relay_throughput",
    "relay_history",
    "relay_statistics",
    "latency",
    "write_overhead",
    "listener_throughput",
    "memory",
    "durability",
    "tracing",
}


@pytest.mark.timeout(900)
def test_run_all_quick_reports_numeric_figures_for_every_benchmark():
    env = dict(os.environ)
    env.pop("TEST_DATABASE_NAME", None)  # each benchmark creates and drops its own database
    QUICK_JSON.unlink(missing_ok=True)

    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, f"run_all.py --quick failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads(QUICK_JSON.read_text())
    assert results["quick"] is True
    assert set(results["benchmarks"]) == EXPECTED
    for key, result in results["benchmarks"].items():
        assert "error" not in result, f"{key}: {result.get('error')}"
        figures = result["figures"]
        assert figures, f"{key} reported no figures"
        for name, value in figures.items():
            assert isinstance(value, int | float) and not isinstance(value, bool), f"{key}.{name} = {value!r}"
            assert math.isfinite(value), f"{key}.{name} = {value!r}"
        assert result["summary"], f"{key} has no summary rows"
        for row in result["summary"]:
            assert isinstance(row["value"], int | float), f"{key}: {row}"
            assert isinstance(row["met"], bool), f"{key}: {row}"
