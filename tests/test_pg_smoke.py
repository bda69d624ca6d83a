"""The PostgreSQL partition benchmark runs, small: our claims scheduling never deadlocks
against real row locks, and every row is loaded once (the script checks the sums)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")
sys.path.insert(0, SCRIPTS)

import _pg  # noqa: E402


def test_bench_partitions_small_run_has_no_deadlocks_for_claims():
    reason = _pg.why_unavailable()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_partitions.py"),
                          "--size", "1500", "--nodes", "1500", "--batch-size", "50",
                          "--strategies", "waves,claims", "--dists", "uniform,strided"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if " claims " in f" {ln} "]
    assert len(lines) >= 2
    for ln in lines:
        if "claims deadlocks" in ln:
            assert ln.rstrip().endswith("claims deadlocks 0")
        elif ln.split()[1] == "claims":
            assert ln.split()[3] == "0" and ln.rstrip().endswith("yes")
