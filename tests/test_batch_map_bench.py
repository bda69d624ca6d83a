"""The batch_map benchmark runs (tiny) and reports every figure (issue 12)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_batch_map.py")


def test_bench_batch_map_runs_small_and_reports_ratios_and_trip_latency():
    out = subprocess.run([sys.executable, SCRIPT, "--size", "100", "--json",
                          "--soon-call", "0.01", "--prefect", "0"], capture_output=True,
                         text=True, timeout=110, check=True)
    res = json.loads(out.stdout)
    for k in ("ratio_thread", "ratio_thread_switch", "ratio_durable", "ratio_durable_switch",
              "ratio_process", "trip_to_raise_now_ms", "trip_to_raise_soon_ms",
              "trip_to_raise_durable_now_ms"):
        assert res[k] > 0


@pytest.mark.skipif(importlib.util.find_spec("prefect") is None,
                    reason="Prefect is not installed (optional extra: pip install -e '.[prefect]')")
def test_bench_batch_map_reports_prefect_rows_and_how_prefecto_fails():  # pragma: no cover
    out = subprocess.run([sys.executable, SCRIPT, "--size", "20", "--json", "--soon-call",
                          "0.01", "--prefect", "3", "--workers", "2"], capture_output=True,
                         text=True, timeout=170, check=True)
    pr = json.loads(out.stdout)["prefect_rows"]
    assert pr["compat_prefect_task"]["ms_per_task"] > 0  # several batches through Prefect
    assert pr["prefect_task_map"]["ms_per_task"] > 0
    if pr["prefecto_version"] is not None:  # a figure, or exactly how it fails
        assert "ms_per_task" in pr["prefecto"] or "get_state" in pr["prefecto"]["fails"]
