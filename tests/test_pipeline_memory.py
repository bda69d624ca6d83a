"""P4 with keys, measured: peak RSS of a keyed run and of a durable rerun that skips
every key as done does not grow with the number of keys (scripts/pipeline_memory.py run
small, with a small key budget so that the key sets spill; memory only, no timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 256 * 1024
#: Noise of a process's peak RSS between two runs of the same script, with room to spare;
#: the key sets without a budget grew by 4.6 MB (keyed) and 5.8 MB (rerun) from the
#: small to the large size; with it, by 0.5 to 1.5 MB.
MARGIN_KB = 3 * 1024


def measure(tmp_path, size, *extra):
    args = [sys.executable, os.path.join(ROOT, "scripts", "pipeline_memory.py"),
            "--size", str(size), "--budget", str(BUDGET)] + list(extra)
    if "--rerun" in extra:
        args += ["--journal", str(tmp_path / f"j{size}")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", [("--key",), ("--rerun",)], ids=["keyed", "durable-rerun"])
def test_peak_rss_does_not_grow_with_the_number_of_keys(tmp_path, mode):
    small = measure(tmp_path, 15_000, *mode)
    large = measure(tmp_path, 120_000, *mode)
    print(small, large)
    for res in (small, large):
        assert res["max_items_held"] <= res["bound"]
    if "--rerun" in mode:
        assert large["skipped_done"] == 120_000 and large["done"] == 0
    else:
        assert large["done"] == 120_000 and large["duplicate_keys"] == 0
    assert large["end_peak_kb"] - small["end_peak_kb"] < MARGIN_KB
