"""Smoke test of scripts/bench_pipeline.py: one tiny run prints every case and ratio and
writes valid JSON.  No timing assertions (figures live in docs/benchmarks-pipeline.md).

The bergtalzug rows need the private Python 3.14 of
scripts/install_bench_peers_pipeline.sh; here it is pointed at a path that does not exist,
and the run must say so instead of failing or inventing a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench_pipeline.py")
CASES = ("handwired", "memory", "flush", "fsync", "naive-fsync", "pool-map", "process",
         "pool-map-warm", "process-deep",
         "pool-map-work", "process-work")


@pytest.mark.timeout(120)
def test_tiny_run_prints_every_case_and_ratio_and_says_when_bergtalzug_is_missing(tmp_path):
    out_json = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, BENCH, "--size", "200", "--repeat", "1", "--dir", str(tmp_path),
         "--py314", str(tmp_path / "no-python3.14"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=110, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    for case in CASES:
        assert f"  {case} " in res.stdout, res.stdout
    assert "bergtalzug 0.2.0): not measured: no Python 3.14" in res.stdout
    assert "bergtalzug_vs_memory_py314" in res.stdout and "not measured" in res.stdout
    data = json.loads(out_json.read_text())
    assert set(CASES) <= set(data["seconds_per_item"])
    assert data["seconds_per_item"]["memory"] > 0
    assert data["records_per_item"]["flush"] >= 3  # accepted + stages + done, per item
    assert "error" in data["py314"]
    assert sorted(os.listdir(str(tmp_path))) == ["bench.json"]  # journals cleaned up
