"""scripts/torture.py --mode map run small: a durable batch_map killed with SIGKILL at
random points, then run to the end (issue 12).  The rounds and their checks are
``pympx_queues.pipeline._torture_map``; a negative control shows the checks see a map
that does not resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pympx_queues.pipeline import _torture_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "torture.py")
ZERO = ("lost", "wrong", "done_rerun", "rerun_beyond_inflight", "errors")


@pytest.mark.timeout(150)
def test_map_mode_kills_the_map_and_finds_nothing_lost_or_redone(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--mode", "map", "--size", "4",
                          "--seed", "3", "--durability", "both"], capture_output=True,
                         text=True, timeout=140, cwd=str(tmp_path))
    lines = [x for x in res.stdout.splitlines() if x.startswith("mode=map")]
    assert len(lines) == 2, res.stdout + res.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    for line in lines:
        summary = dict(kv.split("=", 1) for kv in line.split())
        assert summary["rounds"] == "5" and int(summary["kills"]) >= 1, summary
        assert summary["calls"] == "400"
        for key in ZERO:
            assert summary[key] == "0", summary
    assert {dict(kv.split("=", 1) for kv in x.split())["durability"] for x in lines} == \
        {"flush", "fsync"}
    assert os.listdir(str(tmp_path)) == []  # its temp dirs are gone


@pytest.mark.timeout(150)
def test_the_checks_catch_a_map_that_does_not_resume(tmp_path, monkeypatch):
    monkeypatch.setenv(_torture_map.ENV_FORGET, "1")
    r = _torture_map.kill_rounds(str(tmp_path), size=200, rounds=3, seed=5)
    assert r["killed"] >= 1
    assert not r["ok"] and r["rerun_beyond_inflight"] > 0, r
    assert r["lost"] == 0 and r["wrong"] == 0  # the last round alone computes it all
