"""Smoke tests of scripts/bench_partitions.py: against a throwaway PostgreSQL cluster
(skipped, with the reason, where initdb or psycopg is missing) and its simulated part.
They check correctness (the database holds exactly the rows' effects; claims never
deadlock; no overlapping batches in the simulation), never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _pg  # noqa: E402

PG_MISSING = _pg.unavailable()


def _bench(args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_partitions.py"), *args,
                           "--json", str(out)], capture_output=True, text=True, timeout=240,
                          cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.skipif(PG_MISSING is not None, reason=f"no throwaway PostgreSQL: {PG_MISSING}")
def test_a_throwaway_cluster_starts_answers_and_leaves_nothing_behind():
    import psycopg

    with _pg.Cluster() as pg:
        root = pg.root
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT current_setting('fsync')").fetchone()[0] == "off"
    assert not os.path.exists(root)


@pytest.mark.skipif(PG_MISSING is not None, reason=f"no throwaway PostgreSQL: {PG_MISSING}")
def test_claims_load_relationships_into_postgresql_without_a_deadlock(tmp_path):
    res, text = _bench(["--size", "400", "--nodes", "100", "--batch", "20", "--table", "6",
                        "--no-sim", "--tx-latency-ms", "1", "--deadlock-timeout-ms", "20", "--modes", "naive,waves-mixed,claims"],
                       tmp_path)
    rows = {(r["dist"], r["mode"]): r for r in res["pg"]}
    for dist in ("uniform", "strided", "skewed"):
        # each mode's database state was checked against the rows by the script
        assert rows[(dist, "claims")]["deadlocks"] == 0
        assert rows[(dist, "waves-mixed")]["deadlocks"] == 0
        assert rows[(dist, "naive")]["batches"] >= 20
    assert "claims =" in text


def test_the_simulated_schedules_never_overlap(tmp_path):
    res, text = _bench(["--size", "1500", "--nodes", "300", "--batch", "25", "--no-pg",
                        "--row-cost", "0.00001", "--batch-cost", "0.0002"], tmp_path)
    for r in res["sim"]:
        if r["mode"] != "naive":
            assert r["overlapping_batches"] == 0, r
    assert {r["mode"] for r in res["sim"]} >= {"naive", "claims"}
    virtual = {(r["dist"], r["mode"]): r for r in res["virtual"]}
    for dist in ("uniform", "strided", "skewed"):
        ours = virtual[(dist, "claims")]
        # no schedule beats the work spread evenly over the workers
        assert ours["rows_per_s"] <= virtual[(dist, "naive")]["rows_per_s"] * 1.0001
        assert ours["batches"] >= 1500 // 25


def test_without_initdb_the_postgresql_part_says_why_and_the_rest_runs(monkeypatch, capsys):
    import bench_partitions

    monkeypatch.setattr(_pg, "SERVER_GLOBS", ("/nonexistent/pg/*/bin",))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _pg.unavailable() == "initdb not found (apt-get install postgresql)"
    with pytest.raises(RuntimeError, match="initdb not found"):
        _pg.Cluster()
    res = bench_partitions.main(["--size", "200", "--nodes", "50", "--batch", "20",
                                 "--modes", "claims", "--row-cost", "0.00001",
                                 "--batch-cost", "0.0001"])
    out = capsys.readouterr().out
    assert "PostgreSQL part skipped: initdb not found" in out
    assert res["pg"] == [] and {r["mode"] for r in res["sim"]} == {"claims"}
