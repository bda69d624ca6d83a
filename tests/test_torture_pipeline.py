"""scripts/torture.py --mode pipeline run small (the long run quoted in
docs/benchmarks-pipeline.md is the same command with a bigger ``--size``).

The rounds and their checks are the engine's ``pympx_queues.pipeline._torture``; this
test checks the script's face: one summary line in the style of the other modes, every
count that must be zero is zero, exit status 0, nothing left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "torture.py")
ZERO = ("lost", "not_stored", "finished_stage_rerun", "done_rerun",
        "sink_dup_beyond_inflight", "orphan_workers", "errors")


@pytest.mark.timeout(150)
def test_pipeline_mode_kills_the_coordinator_and_finds_nothing_lost_or_redone(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--mode", "pipeline", "--size", "3",
                          "--seed", "7"], capture_output=True, text=True, timeout=140,
                         cwd=str(tmp_path))
    lines = [x for x in res.stdout.splitlines() if x.startswith("mode=pipeline")]
    assert len(lines) == 1, res.stdout + res.stderr
    summary = dict(kv.split("=", 1) for kv in lines[0].split())
    assert res.returncode == 0, res.stdout + res.stderr
    assert summary["queue"] == "pipeline" and summary["durability"] == "flush"
    assert summary["rounds"] == "4" and int(summary["kills"]) >= 1
    for key in ZERO:
        assert summary[key] == "0", summary
    assert os.listdir(str(tmp_path)) == []  # its temp dirs are gone
