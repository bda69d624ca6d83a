"""The batch_map benchmark runs (tiny) and reports every figure (issue 12)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_batch_map.py")


def test_bench_batch_map_runs_small_and_reports_ratios_and_trip_latency():
    out = subprocess.run([sys.executable, SCRIPT, "--size", "100", "--json",
                          "--soon-call", "0.01"], capture_output=True, text=True,
                         timeout=110, check=True)
    res = json.loads(out.stdout)
    for k in ("ratio_thread", "ratio_durable", "ratio_durable_switch", "ratio_process",
              "trip_to_raise_now_ms", "trip_to_raise_soon_ms"):
        assert res[k] > 0
