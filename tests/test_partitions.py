"""Non-overlapping key partitions (DESIGN.md P8): claims, the scheduler, resumable runs."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pympx_queues.pipeline import Retry
from pympx_queues.pipeline.claims import Grid, dict_ids, hash_id, mix64, tuple_ids
from pympx_queues.pipeline.partitions import (ClaimScheduler, PartitionError,
                                              run_partitioned)

from conftest import wait_for


class LockTable:
    """An in-process lock table that fails any overlap: every running batch locks the
    node ids of its rows; a second lock of a held node is a deadlock-in-waiting."""

    def __init__(self, monopartite=False):
        self.lock = threading.Lock()
        self.held = set()
        self.violations = []
        self.seen = collections.Counter()
        self.max_running = 0
        self.running = 0
        self.max_batch = 0
        self.cells = []
        self.monopartite = monopartite

    def resources(self, rows):
        out = set()
        for a, b in rows:
            if self.monopartite:
                out.update((("n", a), ("n", b)))
            else:
                out.update((("s", a), ("e", b)))
        return out

    def handler(self, delay=0.0):
        def run(rows):
            res = self.resources(rows)
            with self.lock:
                clash = res & self.held
                if clash:
                    self.violations.append(sorted(clash)[:3])
                self.held |= res
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                self.max_batch = max(self.max_batch, len(rows))
            if delay:
                time.sleep(delay)
            with self.lock:
                self.held -= res
                self.running -= 1
                for r in rows:
                    self.seen[tuple(r)] += 1
            return {"rows": len(rows)}
        return run


def test_mix_spreads_sequential_strided_and_string_ids_evenly():
    n = 10
    for ids in (range(10_000), range(0, 100_000, 10), [f"node-{i}" for i in range(10_000)]):
        counts = collections.Counter(hash_id(i) % n for i in ids)
        assert len(counts) == n
        assert max(counts.values()) < 1.2 * (len(ids) / n)
    assert mix64(0) != mix64(1)


def test_bad_ids_raise_clear_errors():
    grid = Grid(4, tuple_ids())
    with pytest.raises(TypeError, match="float"):
        grid.cell((1.5, 2))
    with pytest.raises(TypeError, match="bool"):
        grid.cell((True, 2))
    with pytest.raises(ValueError, match="no start/end ids"):
        grid.cell((1,))
    with pytest.raises(ValueError, match="lacks the keys"):
        Grid(4, dict_ids()).cell({"start": 1})
    with pytest.raises(ValueError, match="outside"):
        Grid(4, cell_of=lambda row: (4, 0)).cell("x")
    with pytest.raises(ValueError, match="table_size"):
        Grid(0)


def test_monopartite_pairs_share_a_cell_and_claims():
    grid = Grid(8, monopartite=True)
    assert grid.cell((3, 99)) == grid.cell((99, 3))
    r, c = grid.cell((3, 99))
    assert r <= c
    assert set(grid.claims((1, 2))) == {("node", 1), ("node", 2)}


def test_bad_row_stops_the_run_before_it_is_accepted():
    rows = [(1, 2), (3, "x"), (5, 1.0)]
    with pytest.raises(TypeError, match="row 2"):
        run_partitioned(rows, lambda b: None, table_size=4, batch_size=2)


@pytest.mark.parametrize("ids", ["uniform", "strided", "skewed"])
def test_no_two_running_batches_share_a_node(ids):
    import random
    rnd = random.Random(7)
    if ids == "uniform":
        rows = [(rnd.randrange(500), rnd.randrange(500)) for _ in range(3000)]
    elif ids == "strided":
        rows = [(10 * rnd.randrange(300), 10 * rnd.randrange(300)) for _ in range(3000)]
    else:
        rows = [(int(rnd.paretovariate(1.2)), rnd.randrange(500)) for _ in range(3000)]
    rows = list(dict.fromkeys(rows))
    table = LockTable()
    report = run_partitioned(rows, table.handler(0.0005), table_size=6, batch_size=50,
                             workers=4)
    assert table.violations == []
    assert sorted(table.seen) == sorted(rows) and set(table.seen.values()) == {1}
    assert table.max_batch <= 50
    assert report.rows_done == len(rows)
    assert report.statistics["rows"] == len(rows)
    assert sum(b.rows for b in report.batches_committed) == len(rows)
    if ids != "skewed":
        assert table.max_running > 1


def test_straggler_delays_only_conflicting_cells():
    """No wave barrier: while one slow batch runs, batches of other rows/columns finish."""
    grid = Grid(4, cell_of=lambda row: row[0])
    done_while_slow = []
    slow_started = threading.Event()
    slow_done = threading.Event()

    def handler(rows):
        if rows[0][1] == "slow":
            slow_started.set()
            wait_for(lambda: len(done_while_slow) >= 6, timeout=20,
                     message="other batches to finish beside the straggler")
            slow_done.set()
        else:
            if slow_started.is_set() and not slow_done.is_set():
                done_while_slow.append(rows[0][0])
        return None

    rows = [((0, 0), "slow")] + [((r, c), i) for i in range(3) for r in (1, 2, 3)
                                 for c in (1, 2, 3)]
    run_partitioned(rows, handler, grid=grid, batch_size=1, workers=3)
    assert len(done_while_slow) >= 6
    assert all(cell[0] != 0 and cell[1] != 0 for cell in done_while_slow)


def test_early_flush_triggers_when_the_buffer_is_full():
    rows = [(i, i + 1) for i in range(400)]
    report = run_partitioned(rows, lambda b: None, table_size=10, batch_size=100,
                             max_buffered=50, workers=2)
    assert report.early_flushes > 0
    assert report.peak_buffered <= 50 + 1
    assert report.rows_done == 400


def test_upstream_statistics_kept_when_no_row_arrives():
    report = run_partitioned([], lambda b: {"x": 1}, upstream_statistics={"read": 7})
    assert report.statistics == {"read": 7}


def test_skewed_histogram_warns(caplog):
    rows = [(0, i) for i in range(300)]
    with caplog.at_level("WARNING", logger="pympx_queues.pipeline.partitions"):
        report = run_partitioned(rows, lambda b: None, table_size=4, batch_size=10,
                                 grid=Grid(4, cell_of=lambda r: (0, 0)))
    assert report.skewed
    assert "skewed" in caplog.text


def test_fail_fast_knows_which_batches_committed():
    rows = [(i, 1000 + i) for i in range(200)]

    def handler(batch):
        if any(a == 77 for a, _ in batch):
            raise RuntimeError("bad row 77")
        return {"ok": len(batch)}

    with pytest.raises(PartitionError) as info:
        run_partitioned(rows, handler, table_size=4, batch_size=10, workers=2)
    rep = info.value.report
    assert len(rep.batches_failed) == 1
    assert "bad row 77" in rep.batches_failed[0].error
    assert rep.statistics.get("ok", 0) == sum(b.rows for b in rep.batches_committed)
    assert rep.rows_done == sum(b.rows for b in rep.batches_committed)


def test_continue_mode_runs_every_other_batch():
    rows = [(i, 1000 + i) for i in range(100)]

    def handler(batch):
        if any(a == 5 for a, _ in batch):
            raise RuntimeError("bad")
        return {"ok": len(batch)}

    rep = run_partitioned(rows, handler, table_size=4, batch_size=10, workers=2,
                          fail_fast=False)
    assert rep.rows_failed >= 1
    assert rep.rows_done + rep.rows_failed == 100
    assert rep.statistics["ok"] == rep.rows_done


def test_failed_rows_are_retried_in_new_batches():
    calls = collections.Counter()

    def handler(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient")
        return None

    rep = run_partitioned([(i, i) for i in range(20)], handler, table_size=2, batch_size=5,
                          workers=1, retry=Retry(max_attempts=3, backoff=0.001))
    assert rep.rows_done == 20 and rep.rows_failed == 0


class _Item:
    def __init__(self, key, data):
        self.key, self.data, self.metadata = key, data, {}


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=120),
       batch_size=st.integers(1, 8), workers=st.integers(1, 5),
       table=st.integers(1, 5), mono=st.booleans(),
       finish_order=st.lists(st.integers(0, 1000), max_size=400))
def test_scheduler_properties(rows, batch_size, workers, table, mono, finish_order):
    """Every row once; no two running groups share a claim; groups within batch_size;
    every group from one cell -- whatever order running groups end in."""
    grid = Grid(table, monopartite=mono)
    sched = ClaimScheduler(grid, batch_size, max_buffered=max(1, len(rows) // 2 or 1))
    pending = [_Item(str(i), r) for i, r in enumerate(rows)]
    running = []
    out = []
    picks = iter(finish_order)
    flushed = False
    while pending or sched.buffered() or running:
        while pending and sched.buffered() < sched.max_buffered:
            sched.offer(pending.pop(0))
        if not pending and not flushed:
            sched.flush()
            flushed = True
        free = workers - len(running)
        for g in sched.take(free):
            assert 0 < len(g) <= batch_size
            cells = {grid.cell(i.data) for i in g}
            assert len(cells) == 1
            claims = set(grid.claims(cells.pop()))
            for other in running:
                assert not claims & other[1]
            running.append((g, claims))
        assert len(running) <= workers
        if running:
            k = next(picks, 0) % len(running)
            g, _ = running.pop(k)
            sched.finished(g)
            out.extend(i.key for i in g)
        elif not pending and sched.buffered():
            raise AssertionError("scheduler holds rows but starts nothing")
    assert sorted(out, key=int) == [str(i) for i in range(len(rows))]


CHILD = textwrap.dedent("""
    import os, sys, time
    from pympx_queues.pipeline.partitions import run_partitioned
    log = sys.argv[2]
    def handler(batch):
        time.sleep(0.002)
        with open(log, "a") as f:
            f.write("".join(f"{a}-{b}\\n" for a, b in batch))
            f.flush()
            os.fsync(f.fileno())
        return {"rows": len(batch)}
    rows = [(i, (i * 7) % 997) for i in range(3000)]
    rep = run_partitioned(rows, handler, table_size=6, batch_size=25, workers=3,
                          journal_dir=sys.argv[1])
    print("DONE", rep.rows_done, rep.rows_from_journal, rep.statistics.get("rows"))
""")


def test_kill_9_then_rerun_reruns_only_unacknowledged_batches(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    journal, log = tmp_path / "j", tmp_path / "log"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), str(journal), str(log)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: log.exists() and log.read_text().count("\n") > 600, timeout=60,
                 message="the first run to be part way")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = collections.Counter(log.read_text().split())
    out = subprocess.run([sys.executable, str(script), str(journal), str(log)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0] == "DONE"
    seen = collections.Counter(log.read_text().split())
    rows = {f"{i}-{(i * 7) % 997}" for i in range(3000)}
    assert set(seen) == rows  # nothing lost
    twice = [r for r, n in seen.items() if n > 1]
    # only rows of batches in flight at the kill ran twice: at most workers x batch_size
    assert len(twice) <= 3 * 25
    assert int(words[1]) + int(words[2]) == 3000
    assert int(words[3]) == 3000  # statistics of earlier-run batches come from the journal
    assert sum(first.values()) > 0
