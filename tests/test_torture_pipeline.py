"""scripts/torture.py --mode pipeline run small, and its checker's teeth.

The long run quoted in docs/benchmarks-pipeline.md is the same script with a bigger
``--size``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "torture.py")
ZERO = ("lost", "finished_stage_rerun", "done_rerun", "sink_dup_beyond_inflight",
        "orphan_workers", "errors")


def _load_torture():
    spec = importlib.util.spec_from_file_location("torture", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torture", mod)
    spec.loader.exec_module(mod)
    return mod


torture = _load_torture()


@pytest.mark.timeout(150)
def test_pipeline_mode_kills_the_coordinator_and_finds_nothing_lost_or_redone(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--mode", "pipeline", "--size", "3",
                          "--seed", "7"], capture_output=True, text=True, timeout=140,
                         cwd=str(tmp_path))
    lines = [x for x in res.stdout.splitlines() if x.startswith("mode=pipeline")]
    assert len(lines) == 1, res.stdout + res.stderr
    summary = dict(kv.split("=", 1) for kv in lines[0].split())
    assert res.returncode == 0, res.stdout + res.stderr
    assert int(summary["kills"]) == 3 and int(summary["items"]) > 0
    for key in ZERO:
        assert summary[key] == "0", summary
    assert os.listdir(str(tmp_path)) == []  # its temp dirs are gone


def _clean_events(items=3):
    ev = []
    for i in range(items):
        k = f"k{i}"
        for stage in torture.PL_STAGES:
            ev += [("start", stage, k, 10, 1), ("end", stage, k, 10, 1)]
        ev.append(("done", "-", k, 9, 1))
    return ev


def test_pipeline_checker_counts_each_kind_of_violation():
    check = torture.check_pipeline_events
    ok = {"skipped_done": 3, "dead": 0}
    assert not any(check(_clean_events(), 3, ok, 9).values())

    # a key never done: lost
    assert check(_clean_events(), 4, {"skipped_done": 3}, 9)["lost"] == 1
    # extract ran again in round 2 although transform had started in round 1
    ev = _clean_events() + [("start", "extract", "k0", 11, 2)]
    got = check(ev, 3, ok, 9)
    assert got["finished_stage_rerun"] == 1 and got["done_rerun"] == 1
    # three loads of already-loaded keys after one kill, two sink workers: one too many
    ev = _clean_events() + [("end", "load", k, 11, 2) for k in ("k0", "k1", "k2")]
    got = check(ev, 3, ok, 9, sink_workers=2)
    assert got["sink_dup"] == 3 and got["sink_dup_beyond_inflight"] == 1
    # the verification run ran something, or an item died
    assert check(_clean_events() + [("start", "load", "k0", 12, 9)], 3, ok, 9)["errors"] == 1
    assert check(_clean_events(), 3, {"skipped_done": 3, "dead": 1}, 9)["errors"] == 1
