"""Partitioned stages (P8): claims never overlap, no wave barrier, bounded buffers,
outcomes known batch by batch.  Every run here checks overlap with an in-process lock
table that fails the test on any claim held twice."""

from __future__ import annotations

import collections
import logging
import random
import threading
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pympx_queues.pipeline import Pipeline, Retry
from pympx_queues.pipeline.claims import (ClaimError, Claims, ClaimTypeError, bucket,
                                          dict_claims, hash64, monopartite, tuple_claims)
from pympx_queues.pipeline.partitions import (ClaimScheduler, PartitionError,
                                              partitioned_stage, run_partitioned)


class LockTable:
    """Claims held by running batches; a second holder of a claim is a failure."""

    def __init__(self, extractor):
        self.extractor = extractor
        self.lock = threading.Lock()
        self.held = {}
        self.overlaps = []
        self.running = 0
        self.peak = 0

    def claims_of(self, rows):
        cells = {self.extractor.cell(r) for r in rows}
        assert len(cells) == 1, f"a batch mixes cells {cells}"  # single-cell purity
        return self.extractor.claims(cells.pop())

    def acquire(self, rows):
        claims = self.claims_of(rows)
        with self.lock:
            for c in claims:
                if c in self.held:
                    self.overlaps.append(c)
                self.held[c] = self.held.get(c, 0) + 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        return claims

    def release(self, claims):
        with self.lock:
            self.running -= 1
            for c in claims:
                self.held[c] -= 1
                if not self.held[c]:
                    del self.held[c]


def rows_of(n, ids, seed=1):
    rnd = random.Random(seed)
    return [{"start": rnd.choice(ids), "end": rnd.choice(ids), "i": i} for i in range(n)]


# --------------------------------------------------------------------------- claims
@pytest.mark.parametrize("ids", [
    list(range(10_000)),                                  # sequential
    list(range(0, 100_000, 10)),                          # multiples of 10
    list(range(0, 10**9, 100_000)),                       # coarse stride
    [f"node-{i}" for i in range(10_000)],                 # strings
    [i * 2**40 for i in range(10_000)],                   # high bits only
])
def test_ids_spread_evenly_over_buckets_whatever_their_pattern(ids):
    counts = collections.Counter(bucket(i, 10) for i in ids)
    assert len(counts) == 10
    mean = len(ids) / 10
    assert max(counts.values()) < 1.15 * mean and min(counts.values()) > 0.85 * mean


def test_ids_that_all_end_in_zero_use_every_cell():
    ex = dict_claims(10)
    cells = {ex.cell({"start": 10 * a, "end": 10 * b}) for a in range(50) for b in range(50)}
    assert len(cells) == 100


def test_monopartite_rows_in_either_direction_share_a_cell_and_its_claims():
    ex = monopartite("a", "b", table_size=16)
    for a, b in [(1, 2), (77, 5), ("x", "y"), (3, 3)]:
        assert ex.cell({"a": a, "b": b}) == ex.cell({"a": b, "b": a})
    r, c = ex.cell({"a": 1, "b": 2})
    assert r <= c
    assert set(ex.claims((r, c))) == {r, c}
    assert ex.claims((4, 4)) == (4,)
    assert ex.cells == 16 * 17 // 2


def test_bipartite_cells_claim_a_row_and_a_column():
    ex = tuple_claims(8)
    assert ex.claims((2, 2)) == (("s", 2), ("e", 2))
    assert ex.cells == 64
    assert ex.cell((5, 6)) == (bucket(5, 8), bucket(6, 8))


@pytest.mark.parametrize("row, error, words", [
    ({"start": 1.5, "end": 2}, ClaimTypeError, ["1.5", "float", "start"]),
    ({"start": None, "end": 2}, ClaimTypeError, ["None", "start"]),
    ({"start": True, "end": 2}, ClaimTypeError, ["True"]),
    ({"start": 1}, ClaimError, ["end", "'end'"]),
    ("not-a-mapping", ClaimError, ["str", "start"]),
])
def test_bad_rows_raise_errors_naming_the_row_and_the_field(row, error, words):
    with pytest.raises(error) as info:
        dict_claims(10).cell(row)
    for w in words:
        assert w in str(info.value)


def test_table_size_and_grid_coordinates_are_checked():
    with pytest.raises(ClaimError, match="table_size"):
        dict_claims(0)
    with pytest.raises(ClaimError, match="table_size"):
        ClaimScheduler(lambda r: (0, 0))

    def grid(row):
        return row
    grid.table_size = 4
    sched = ClaimScheduler(grid, 10)
    with pytest.raises(ClaimError, match=r"out of range: \(4, 0\) for table_size=4"):
        sched.extractor.cell((4, 0))
    with pytest.raises(ClaimTypeError, match="pair of ints"):
        sched.extractor.cell("ab")


def test_hash64_is_stable_and_wide_ints_are_mixed():
    assert hash64("node-1") == hash64("node-1") != hash64("node-2")
    assert hash64(2**70) != hash64(2**71)
    assert hash64(-1) != hash64(1)
    assert 0 <= hash64(-(2**100)) < 2**64


def test_custom_claims_use_the_resources_given_or_their_buckets():
    raw = Claims(lambda r: [("user", r["u"]), ("item", r["i"])])
    assert raw.cell({"u": 1, "i": 2}) == raw.claims(raw.cell({"u": 1, "i": 2}))
    assert set(raw.cell({"u": 1, "i": 2})) == {("user", 1), ("item", 2)}
    folded = Claims(lambda r: r["accounts"], table_size=8)
    cell = folded.cell({"accounts": [3, 3, 9]})
    assert all(0 <= b < 8 for b in cell) and len(cell) <= 2
    assert Claims(lambda r: "one").cell({}) == ("one",)


# --------------------------------------------------------------------------- scheduler
def drive(sched, rows, workers, seed, bound=None):
    """Run a scheduler like the engine does: offer rows while the buffer has room, take
    groups for free workers, finish running groups in random order.  Returns the groups
    in start order; fails on overlapping claims or oversized or mixed batches."""
    rnd = random.Random(seed)
    ex = sched.extractor
    items = [SimpleNamespace(key=str(i), data=r, attempt=1) for i, r in enumerate(rows)]
    bound = bound or sched.bound
    running = []
    held = collections.Counter()
    started = []
    pos = 0
    flushed = False
    while True:
        progressed = False
        while pos < len(items) and sched.buffered() < bound and rnd.random() < 0.9:
            sched.offer(items[pos])
            pos += 1
            progressed = True
        if pos == len(items) and not flushed:
            sched.flush()
            flushed = True
        groups = sched.take(workers - len(running))
        if not groups and not running and sched.buffered() >= bound:
            sched.flush()  # what the engine does when a full buffer cannot move
            groups = sched.take(workers - len(running))
        assert len(groups) <= workers - len(running)
        for g in groups:
            assert 1 <= len(g) <= sched.batch_size
            cells = {ex.cell(i.data) for i in g}
            assert len(cells) == 1, "single-cell purity"
            claims = ex.claims(cells.pop())
            for c in claims:
                assert held[c] == 0, f"claim {c!r} held twice"
                held[c] += 1
            running.append((g, claims))
            started.append(g)
            progressed = True
        if running and (rnd.random() < 0.6 or not progressed or pos == len(items)):
            g, claims = running.pop(rnd.randrange(len(running)))
            for c in claims:
                held[c] -= 1
            sched.finished(g)
            sched.ended(g, True, [None] * len(g), None, 0.0)
            progressed = True
        if not progressed and pos == len(items) and not running:
            break
    assert sched.buffered() == 0
    return started


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 400), table=st.integers(1, 6), batch=st.integers(1, 30),
       workers=st.integers(1, 6), mono=st.booleans(), hot=st.floats(0, 1),
       min_fill=st.sampled_from([0.1, 0.5, 1.0]), cap=st.integers(1, 120),
       seed=st.integers(0, 2**16))
def test_every_row_runs_once_in_pure_batches_that_never_share_a_claim(
        n, table, batch, workers, mono, hot, min_fill, cap, seed):
    rnd = random.Random(seed)
    ids = list(range(50))
    rows = [{"start": 7 if rnd.random() < hot else rnd.choice(ids),
             "end": rnd.choice(ids)} for _ in range(n)]
    sched = ClaimScheduler(dict_claims(table, monopartite=mono), batch, min_fill=min_fill,
                           max_buffered=cap)
    groups = drive(sched, rows, workers, seed)
    keys = [i.key for g in groups for i in g]
    assert sorted(keys, key=int) == [str(i) for i in range(n)]
    rep = sched.snapshot()
    assert rep.rows_committed == n and rep.committed == len(groups)
    assert rep.peak_buffered <= cap


def test_early_flush_triggers_when_the_buffer_reaches_its_bound():
    rows = rows_of(3000, list(range(1000)))
    sched = ClaimScheduler(dict_claims(10), 100, max_buffered=500, min_fill=1.0)
    drive(sched, rows, 4, seed=3)
    rep = sched.snapshot()
    assert rep.reasons.get("pressure", 0) > 0
    assert rep.peak_buffered <= 500


def test_a_starved_cell_reserves_its_claims_and_runs():
    # cell (a, b) needs row a and column b; busy neighbours keep taking one or the other
    ex = tuple_claims(2)
    a = next(i for i in range(100) if bucket(i, 2) == 0)
    b = next(i for i in range(100) if bucket(i, 2) == 1)
    sched = ClaimScheduler(ex, 1, min_fill=1.0, starve_after=3)
    mk = iter(range(10**6))

    def item(s, e):
        return SimpleNamespace(key=str(next(mk)), data=(s, e), attempt=1)
    victim = item(a, b)
    sched.offer(victim)
    running = []
    for _ in range(40):  # (a, a) and (b, b) alternate so that row a or column b is held
        for s in (a, b):
            sched.offer(item(s, s))
        for g in sched.take(2 - len(running)):
            running.append(g)
        if any(victim in g for g in running):
            return
        g = running.pop(0)
        sched.finished(g)
    pytest.fail("cell (a, b) never ran")


# --------------------------------------------------------------------------- engine runs
def locked_handler(table, work=None, log=None):
    def handler(batch):
        claims = table.acquire(batch)
        try:
            if work is not None:
                work(batch)
            if log is not None:
                log.extend(r["i"] for r in batch)
        finally:
            table.release(claims)
        return {"rows": len(batch), "batches": 1}
    return handler


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 600), table=st.integers(1, 8), batch=st.integers(1, 50),
       workers=st.integers(1, 5), mono=st.booleans(), seed=st.integers(0, 1000))
def test_pipeline_runs_process_every_row_once_without_overlap(n, table, batch, workers,
                                                              mono, seed):
    ex = dict_claims(table, monopartite=mono)
    locks = LockTable(ex)
    done = []
    rows = rows_of(n, list(range(40)), seed)
    rep = run_partitioned(rows, locked_handler(locks, log=done), ex, batch_size=batch,
                          workers=workers, stop_signals=False)
    assert not locks.overlaps
    assert sorted(done) == list(range(n))
    assert rep.rows_committed == n and rep.failed == 0
    assert rep.statistics == ({"rows": n, "batches": rep.committed} if n else {})
    assert rep.run.state == "finished" and rep.run.done == n


def test_a_straggler_delays_only_the_cells_that_conflict_with_it():
    ex = dict_claims(6)
    locks = LockTable(ex)
    rows = rows_of(3000, list(range(500)))
    straggler_cell = ex.cell(rows[0])
    release = threading.Event()
    others_while_stuck = []
    stuck = threading.Event()
    lock = threading.Lock()

    def work(batch):
        if ex.cell(batch[0]) == straggler_cell and not stuck.is_set():
            stuck.set()
            # hold the straggler until many other batches have finished around it
            assert release.wait(30), "other batches did not progress past the straggler"
        elif stuck.is_set() and not release.is_set():
            with lock:
                others_while_stuck.append(ex.cell(batch[0]))
                if len(others_while_stuck) >= 20:
                    release.set()

    rep = run_partitioned(rows, locked_handler(locks, work), ex, batch_size=20, workers=3,
                          stop_signals=False)
    assert not locks.overlaps
    assert len(others_while_stuck) >= 20
    # none of them touched the straggler's row or column
    assert all(c[0] != straggler_cell[0] and c[1] != straggler_cell[1]
               for c in others_while_stuck)
    assert rep.rows_committed == 3000


def test_statistics_merge_and_upstream_counters_survive_an_empty_source():
    rep = run_partitioned([], lambda rows: {"written": len(rows)}, dict_claims(4),
                          statistics={"read": 5, "invalid": 2}, stop_signals=False)
    assert rep.statistics == {"read": 5, "invalid": 2}
    rows = rows_of(200, list(range(30)))
    rep = run_partitioned(rows, lambda rows: {"written": len(rows), "tx": 1},
                          dict_claims(4), batch_size=16, statistics={"read": 200},
                          stop_signals=False)
    assert rep.statistics == {"read": 200, "written": 200, "tx": rep.committed}


def test_each_batch_is_reported_with_cell_rows_duration_and_buffer():
    seen = []
    ex = dict_claims(4)
    rows = rows_of(300, list(range(30)))
    rep = run_partitioned(rows, lambda rows: None, ex, batch_size=25, on_batch=seen.append,
                          stop_signals=False)
    assert len(seen) == rep.batches == rep.committed
    assert sum(b.rows for b in seen) == 300
    for b in seen:
        assert b.ok and b.rows <= 25 and b.seconds >= 0 and b.buffered >= b.rows
        assert {ex.cell(rows[int(k)]) for k in b.keys} == {b.cell}
        assert b.reason in ("full", "fill", "pressure", "end")
    assert rep.mean_running > 0


def test_skewed_cells_are_warned_about_and_even_ones_are_not(caplog):
    caplog.set_level(logging.WARNING, "pympx_queues.pipeline.partitions")
    run_partitioned(rows_of(4000, list(range(5000))), lambda rows: None, dict_claims(4),
                    batch_size=50, stop_signals=False)
    assert "skewed" not in caplog.text
    hot = [{"start": 1, "end": 1, "i": i} for i in range(3000)] + rows_of(1000, [2, 3, 4])
    rep = run_partitioned(hot, lambda rows: None, dict_claims(4), batch_size=50,
                          stop_signals=False)
    assert "cell histogram is skewed" in caplog.text
    assert rep.skew > 3


def test_fail_fast_stops_new_batches_and_reports_which_committed():
    ex = dict_claims(5)
    locks = LockTable(ex)
    rows = rows_of(2000, list(range(100)))
    bad = rows[700]["i"]
    handled = []
    lock = threading.Lock()

    def handler(batch):
        claims = locks.acquire(batch)
        try:
            if any(r["i"] == bad for r in batch):
                raise RuntimeError("constraint violated")
            with lock:
                handled.extend(r["i"] for r in batch)
        finally:
            locks.release(claims)

    with pytest.raises(PartitionError, match="constraint violated") as info:
        run_partitioned(rows, handler, ex, batch_size=20, workers=3, keep_batches=True,
                        stop_signals=False)
    rep = info.value.report
    assert rep.failed == 1 and rep.failed_batches[0].error.type == "RuntimeError"
    assert str(bad) in rep.failed_batches[0].keys
    committed = sorted(int(k) for b in rep.committed_batches for k in b.keys)
    assert committed == sorted(handled)  # exactly the batches that committed
    assert rep.batches == rep.committed + rep.failed  # every started batch accounted
    assert len(handled) < 2000 and rep.run.state == "halted"
    assert not locks.overlaps


def test_continue_mode_dead_letters_the_failed_batch_and_finishes_the_rest():
    rows = rows_of(500, list(range(50)))
    bad = {rows[100]["i"]}
    results = []

    def handler(batch):
        if any(r["i"] in bad for r in batch):
            raise ValueError("bad batch")
        return {"ok": len(batch)}

    stage = partitioned_stage("load", handler, dict_claims(4), batch_size=10,
                              fail_fast=False, retry=Retry(max_attempts=2, backoff=0.001))
    p = Pipeline(rows, [stage], on_complete=results.append, stop_signals=False)
    run = p.run_all()
    rep = stage.scheduler.snapshot()
    assert run.state == "finished"
    assert rep.failed == 2  # the batch and its retry (the retry may hold other rows)
    dead = [r for r in results if not r.ok]
    assert {rows[int(r.key)]["i"] for r in dead} >= bad
    assert rep.rows_committed + len(dead) == 500
    assert rep.statistics == {"ok": rep.rows_committed}


def test_a_row_without_valid_claims_is_a_dead_letter_naming_the_problem():
    rows = rows_of(100, list(range(20))) + [{"start": 1.5, "end": 3, "i": 100}]
    results = []
    stage = partitioned_stage("load", lambda rows: None, dict_claims(4), batch_size=10,
                              fail_fast=False)
    Pipeline(rows, [stage], on_complete=results.append, stop_signals=False).run_all()
    dead = [r for r in results if not r.ok]
    assert [r.key for r in dead] == ["100"]
    assert dead[0].error.type == "ClaimTypeError" and "1.5" in dead[0].error.message
    assert stage.scheduler.report.rows_committed == 100

    with pytest.raises(PartitionError, match="1.5"):
        run_partitioned(rows, lambda rows: None, dict_claims(4), batch_size=10,
                        stop_signals=False)


def test_a_buffer_bound_below_one_batch_per_cell_still_moves():
    rows = rows_of(1000, list(range(1000)))
    rep = run_partitioned(rows, lambda rows: None, dict_claims(10), batch_size=50,
                          max_buffered=60, stop_signals=False)
    assert rep.rows_committed == 1000 and rep.peak_buffered <= 60
    assert rep.reasons.get("pressure", 0) > 0


def _proc_handler(rows):
    return {"rows": len(rows)}


def test_process_workers_run_bucket_batches():
    rows = [(i % 37, (i * 7) % 41) for i in range(300)]
    rep = run_partitioned(rows, _proc_handler, tuple_claims(4), batch_size=40, workers=2,
                          kind="process", stop_signals=False)
    assert rep.statistics == {"rows": 300}


# --------------------------------------------------------------------------- crashes
CRASH_CHILD = """
import os, sys, time
from pympx_queues.pipeline.claims import tuple_claims
from pympx_queues.pipeline.partitions import run_partitioned

log_path, journal = sys.argv[1], sys.argv[2]
fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def handler(rows):
    time.sleep(0.02)
    os.write(fd, "".join(f"{r[2]}\\n" for r in rows).encode())  # before acknowledging

rows = [((i * 7919) % 500, (i * 104729) % 500, i) for i in range(1500)]
rep = run_partitioned(rows, handler, tuple_claims(6), batch_size=10, workers=3,
                      journal_dir=journal, name="rels", progress=False)
print(rep.run.resumed, rep.run.skipped_done, rep.rows_committed, flush=True)
"""


def _logged(path):
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def test_kill_9_mid_run_then_a_rerun_redoes_only_unacknowledged_batches(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import wait_for

    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD)
    journal = tmp_path / "journal"
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
    proc = subprocess.Popen([sys.executable, str(script), str(log1), str(journal)])
    try:
        wait_for(lambda: len(_logged(log1)) >= 300, timeout=60, message="300 rows written")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    first = _logged(log1)
    assert len(first) < 1500, "the run ended before it was killed"
    out = subprocess.run([sys.executable, str(script), str(log2), str(journal)],
                         capture_output=True, text=True, timeout=120, check=True)
    resumed, skipped_done, committed = map(int, out.stdout.split())
    second = _logged(log2)
    print(f"killed after {len(first)} rows; journal had {skipped_done} done; rerun did "
          f"{committed}; done twice: {len(set(first) & set(second))}")
    assert sorted(set(first) | set(second)) == list(range(1500))  # nothing lost
    assert len(second) == len(set(second)) == committed  # each row once in the rerun
    # the rerun did exactly the rows the journal had not acknowledged as done ...
    assert skipped_done >= 200 and committed == 1500 - skipped_done
    # ... so rows done twice are only those in flight at the kill (3 workers x 10 rows)
    assert len(set(first) & set(second)) <= 3 * 10


def test_a_draining_stop_runs_the_buffered_partial_cells_and_ends():
    rows = rows_of(10000, list(range(2000)))
    done = []
    holder = {}

    def handler(batch):
        done.extend(r["i"] for r in batch)
        if len(done) >= 200 and not holder.get("stopped"):
            holder["stopped"] = True
            holder["p"].stop(drain=True)  # partial cells are buffered at this moment

    stage = partitioned_stage("load", handler, dict_claims(8), batch_size=50, workers=2,
                              max_buffered=1000)
    p = holder["p"] = Pipeline(rows, [stage], stop_signals=False)
    run = p.run_all()
    rep = stage.scheduler.snapshot()
    assert run.state == "stopped"
    assert run.done == run.accepted == rep.rows_committed == len(done) < 10000
    assert rep.reasons.get("end", 0) > 0  # the partial cells went out


def test_without_claims_start_and_end_keys_or_positions_are_the_claims(tmp_path):
    dict_rows = rows_of(300, list(range(50)))
    rep = run_partitioned(dict_rows, lambda rows: {"n": len(rows)}, table_size=6,
                          batch_size=20, journal_dir=str(tmp_path / "j"), stop_signals=False)
    assert rep.statistics == {"n": 300} and all(0 <= r < 6 for r, _c in rep.histogram)
    tuple_rows = [(r["start"], r["end"]) for r in dict_rows]
    assert run_partitioned(tuple_rows, lambda rows: None, stop_signals=False
                           ).rows_committed == 300
    with pytest.raises(PartitionError, match="neither a mapping"):
        run_partitioned([42], lambda rows: None, stop_signals=False)


def test_the_first_partitions_api_still_runs_ids_grid_monopartite_and_upstream_statistics():
    from pympx_queues.pipeline.claims import Grid, dict_ids, tuple_ids

    rows = [{"start": i % 50, "end": (i * 3) % 70} for i in range(600)]
    table = LockTable(Grid(10, dict_ids("start", "end")))
    rep = run_partitioned(rows, locked_handler(table), ids=dict_ids("start", "end"),
                          table_size=10,
                          batch_size=40, workers=3, upstream_statistics={"read": 600},
                          keep_batches=True, stop_signals=False)
    assert rep.rows_done == 600 and rep.statistics["read"] == 600
    assert rep.statistics["rows"] == 600
    assert len(rep.batches_committed) == rep.committed and rep.mean_parallelism > 0
    assert table.overlaps == []
    rep = run_partitioned([(i, i + 1) for i in range(300)], lambda rows: None,
                          grid=Grid(8, tuple_ids(), monopartite=True), batch_size=30,
                          stop_signals=False)
    assert rep.rows_done == 300
    rep = run_partitioned(rows, lambda rows: None, table_size=10, monopartite=True,
                          batch_size=30, stop_signals=False)
    assert rep.rows_done == 600
    with pytest.raises(ClaimError, match="lacks the keys"):
        Grid(10, dict_ids()).cell({"start": 1})


def test_on_a_virtual_clock_skewed_rows_finish_near_their_busiest_claims_chain():
    # Deterministic scheduling quality (no timing): the rows of the busiest claim run one
    # batch at a time, so their chain bounds the run; the scheduler keeps it busy.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_partitions as bp

    args = SimpleNamespace(table=10, batch=100, workers=4, row_cost=50e-6, batch_cost=1e-3)
    rows = bp.make_rows("skewed", 6000, 1500, 7)
    ex = monopartite("start", "end", 10)
    load = collections.Counter(c for r in rows for c in ex.claims(ex.cell(r)))
    hot = max(load.values())
    chain = (hot / args.batch) * args.batch_cost + hot * args.row_cost  # full batches
    spread = (len(rows) / args.batch * args.batch_cost + len(rows) * args.row_cost) / 4
    ours = bp.virtual_claims(rows, args)["seconds"]
    assert ours <= 1.15 * max(chain, spread)
    waves = bp.virtual_waves(bp.compat, bp.compat.canonical_integer_id_extractor(10),
                             rows, args)["seconds"]
    assert ours < waves
