"""`pympx-queues status DIR` and `retry DIR` on a pipeline's journal directory."""

from __future__ import annotations

import json
import threading

from click.testing import CliRunner

from conftest import wait_for
from pympx_queues.cli import main
from pympx_queues.pipeline import Pipeline, Stage

FIXED = set()


def picky(x):
    if x in (3, 7) and x not in FIXED:
        raise ValueError(f"bad row {x}")
    return x * 10


def build(d, handler=picky, **kw):
    return Pipeline(range(10), [Stage("load", lambda x: x), Stage("check", handler)],
                    journal_dir=str(d), progress=False, **kw)


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


def test_status_shows_counts_per_stage_dead_letters_and_whether_a_run_is_live(tmp_path):
    build(tmp_path).run_all()
    res = cli("status", tmp_path)
    assert res.exit_code == 0, res.output
    assert "8 done, 0 unfinished, 2 dead" in res.output
    assert "dead '3' at check: ValueError: bad row 3" in res.output
    assert "no run live" in res.output
    data = json.loads(cli("status", tmp_path, "--json").output)
    (p,) = data["pipelines"]
    assert data["kind"] == "pipeline" and p["counts"] == {"done": 8, "unfinished": 0,
                                                          "dead": 2}
    assert p["per_stage"]["check"]["dead"] == 2
    assert {d["key"] for d in p["dead_letters"]} == {"3", "7"}
    assert "Traceback" in p["dead_letters"][0]["traceback"]
    assert cli("status", tmp_path, "--check").exit_code == 1

    gate = threading.Event()

    def hold(x):
        gate.wait(10)
        return x

    live = Pipeline(["a"], [Stage("s", hold)], key=str, journal_dir=str(tmp_path / "live"),
                    progress=False)
    t = threading.Thread(target=live.run_all)
    t.start()
    try:
        wait_for(lambda: live.stats().in_flight, message="a live run")
        data = json.loads(cli("status", tmp_path / "live", "--json").output)
        assert data["pipelines"][0]["live"] is True
        assert data["pipelines"][0]["per_stage"]["s"]["waiting"] == 1
    finally:
        gate.set()
        t.join(30)


def test_retry_re_drives_dead_letters_at_the_next_run_from_the_stage_they_died_in(tmp_path):
    loads = []

    def load(x):
        loads.append(x)
        return x

    def mk():
        return Pipeline(range(10), [Stage("load", load), Stage("check", picky)],
                        journal_dir=str(tmp_path), progress=False, keep_results=True)

    mk().run_all()
    assert len(loads) == 10
    res = cli("retry", tmp_path, "--dry-run", "--json")
    assert sorted(json.loads(res.output)["moved"]) == ["3", "7"]
    res = cli("retry", tmp_path, "--pattern", "3")
    assert res.exit_code == 0 and "3" in res.output
    data = json.loads(cli("status", tmp_path, "--json").output)
    assert data["pipelines"][0]["counts"] == {"done": 8, "unfinished": 1, "dead": 1}
    FIXED.add(3)
    try:
        loads.clear()
        results = {r.key: r for r in mk().run()}
    finally:
        FIXED.discard(3)
    assert loads == []  # "load" had finished for key 3: not re-run
    assert results["3"].ok and results["3"].value == 30 and not results["3"].from_journal
    assert not results["7"].ok and results["7"].from_journal  # still dead, not retried
    data = json.loads(cli("status", tmp_path, "--json").output)
    assert data["pipelines"][0]["counts"] == {"done": 9, "unfinished": 0, "dead": 1}
