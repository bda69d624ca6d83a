"""P4 with keys: the keys a run saw and the keys earlier runs finished stay in bounded
memory (spilled to scratch files past a budget), exactly: duplicates skipped, done keys
skipped, nothing lost or done twice across a kill -9 in the middle of a spill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import wait_for
from pympx_queues import _fs
from pympx_queues.pipeline import Pipeline, Stage
from pympx_queues.pipeline import _keys
from pympx_queues.pipeline.journal import fold, scan_pipeline
from pympx_queues.pipeline._keys import KeySet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = _keys.MIN_BUDGET  # spills every few hundred keys


def scratch_dirs(directory):
    return [n for n in os.listdir(directory) if n.startswith(_keys.DIR_PREFIX)]


@pytest.fixture
def tiny_budget(monkeypatch, tmp_path):
    monkeypatch.setenv(_keys.BUDGET_ENV, str(TINY))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return str(tmp)


def test_a_key_set_past_its_budget_spills_and_stays_exact(tiny_budget):
    s = KeySet()
    keys = [f"item-{i}" for i in range(20_000)]
    assert all(s.add(k) for k in keys)
    assert s.runs >= 1 and s.runs <= _keys.MAX_RUNS  # spilled, runs merged
    assert len(s) == 20_000
    assert not any(s.add(k) for k in keys[::7])  # in the runs and in the table
    assert all(k in s for k in keys)
    assert not any(f"other-{i}" in s for i in range(20_000))
    assert s["item-3"] is None and s.get("other", 5) == 5
    assert s.nbytes <= TINY
    directory = s.directory
    assert os.listdir(directory)
    s.close()
    assert not os.path.exists(directory)
    with pytest.raises(ValueError, match="closed"):
        s.add("item-1")


def test_a_frozen_bulk_load_is_one_run_and_finds_every_key(tiny_budget):
    s = KeySet()
    s.load()
    for i in range(10_000):
        s.add(f"k{i}")
    s.freeze()
    assert s.runs == 1
    assert all(f"k{i}" in s for i in range(10_000))
    assert not any(f"x{i}" in s for i in range(2_000))
    assert not s.add("k5") and s.add("new")
    s.close()


def test_a_small_frozen_run_is_held_in_memory_and_still_exact(tiny_budget):
    s = KeySet()
    s.load()
    for i in range(250):
        s.add(f"k{i}")
    s.freeze()
    assert s.runs == 1 and s._runs[0].data is not None  # no read per lookup
    assert all(f"k{i}" in s for i in range(250))
    assert not any(f"x{i}" in s for i in range(2_000))
    s.close()


def test_a_budget_below_the_minimum_is_refused_naming_the_variable(monkeypatch):
    with pytest.raises(ValueError, match="at least"):
        KeySet(budget=100)
    monkeypatch.setenv(_keys.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=_keys.BUDGET_ENV):
        KeySet()


def test_scratch_dirs_of_dead_owners_are_removed_and_live_ones_kept(tmp_path):
    prefix = _keys.dir_prefix("p")
    live = _fs.make_owned_dir(str(tmp_path), prefix)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f"{prefix}.{_fs.hostname()}.{child.pid}.1.abcdef"
    dead.mkdir()
    (dead / "run-1").write_bytes(b"\0" * 24)
    other_host = tmp_path / f"{prefix}.elsewhere.{child.pid}.1.abcdef"
    other_host.mkdir()
    assert _keys.remove_dead(str(tmp_path), "p") == 1
    assert os.path.isdir(live) and not dead.exists() and other_host.exists()


def test_duplicate_keys_across_a_spill_boundary_are_counted_and_skipped(tiny_budget, caplog):
    rows = list(range(3000)) + [5, 1500, 2999] + list(range(3000, 3200)) + [0]
    seen = []
    p = Pipeline(rows, [Stage("s", lambda x: x)], key=lambda x: f"row-{x}",
                 on_complete=lambda r: seen.append(r.key), progress=False)
    rep = p.run_all()
    assert rep.duplicate_keys == 4 and rep.done == 3200
    assert sorted(seen) == sorted(f"row-{x}" for x in range(3200))
    assert "duplicate key 'row-1500'" in caplog.text
    assert scratch_dirs(tiny_budget) == []  # the run's scratch files are gone


def test_done_keys_are_skipped_after_a_spill_on_a_rerun(tiny_budget, tmp_path):
    jdir = str(tmp_path / "j")
    first = Pipeline(range(4000), [Stage("s", lambda x: x)], key=lambda x: f"r{x}",
                     journal_dir=jdir, progress=False).run_all()
    assert first.done == 4000
    ran = []
    rows = list(range(4500)) + [4100, 17]  # 500 new keys, one duplicate of each kind
    p = Pipeline(rows, [Stage("s", lambda x: ran.append(x) or x)], key=lambda x: f"r{x}",
                 journal_dir=jdir, progress=False)
    rep = p.run_all()
    assert rep.skipped_done == 4000 and rep.done == 500 and rep.duplicate_keys == 2
    assert sorted(ran) == list(range(4000, 4500))  # P3: no done key ran again
    assert scratch_dirs(jdir) == []
    again = Pipeline(range(4500), [Stage("s", lambda x: x)], key=lambda x: f"r{x}",
                     journal_dir=jdir, progress=False).run_all()
    assert again.skipped_done == 4500 and again.done == 0


KILLED_IN_A_SPILL = textwrap.dedent("""
    import os, sys, time, traceback
    from pympx_queues import _fs
    from pympx_queues.pipeline import Pipeline, Stage

    marker, jdir, n, skip = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    real_write_all = _fs.write_all
    calls = [0]

    def write_all(fd, data):  # the second write of a run file: inside a spill or merge
        calls[0] += 1
        real_write_all(fd, data[: len(data) // 2])
        if calls[0] > skip:
            with open(marker + ".tmp", "w") as f:
                f.write("".join(traceback.format_stack()))
            os.rename(marker + ".tmp", marker)
            time.sleep(120)
        real_write_all(fd, data[len(data) // 2:])

    _fs.write_all = write_all
    Pipeline(range(n), [Stage("s", lambda x: x)], key=lambda x: f"r{x}",
             journal_dir=jdir, progress=False).run_all()
""")


def test_a_kill_9_during_a_spill_then_a_resume_loses_nothing_and_does_nothing_twice(
        tiny_budget, tmp_path):
    jdir = str(tmp_path / "j")
    n = 3000
    env = dict(os.environ, PYTHONPATH=ROOT)
    # First run: killed in the middle of a spill of the keys it saw.
    marker = str(tmp_path / "in-spill")
    child = subprocess.Popen([sys.executable, "-c", KILLED_IN_A_SPILL, marker, jdir, str(n),
                              "40"], env=env)
    try:
        wait_for(lambda: os.path.exists(marker) or child.poll() is not None, timeout=60,
                 message="the child inside a spill")
        assert child.poll() is None, "the child ended before its spill"
        with open(marker) as f:
            assert "_offer_source" in f.read()  # inside a spill of the keys it saw
        assert scratch_dirs(jdir)  # the dead run's half-written run file stays behind
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    # Second run: resumes; loading the done keys spills too, and is killed in the middle
    # of one of those spills.
    os.unlink(marker)
    child = subprocess.Popen([sys.executable, "-c", KILLED_IN_A_SPILL, marker, jdir, str(n),
                              "1"], env=env)
    try:
        wait_for(lambda: os.path.exists(marker) or child.poll() is not None, timeout=60,
                 message="the resumed child inside a spill")
        assert child.poll() is None, "the resumed child ended before its spill"
        with open(marker) as f:
            assert "compact_dead" in f.read()  # inside the load of the done keys
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    # Last run, not killed: the scratch files of the dead runs are removed, never read.
    ran = []
    rep = Pipeline(range(n), [Stage("s", lambda x: ran.append(x) or x)],
                   key=lambda x: f"r{x}", journal_dir=jdir, progress=False).run_all()
    assert scratch_dirs(jdir) == []
    assert rep.state == "finished" and rep.duplicate_keys == 0
    assert rep.skipped_done > 0 and rep.done + rep.skipped_done == n
    scans, _ = scan_pipeline(jdir, "pipeline")
    replay = fold(scans, keep_results=False)
    assert set(replay.done) == {f"r{x}" for x in range(n)}  # nothing lost
    assert replay.done_count == n  # each key done once
    assert not replay.unfinished
    assert len(ran) <= n - rep.skipped_done  # done keys did not run again (P3)
