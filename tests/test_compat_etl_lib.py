"""pympx_queues.compat.etl_lib: etl_lib 0.5's processors and extractors, waves from the
claims scheduler; duck-typed against etl_lib's own classes when it is installed."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import pytest

from pympx_queues.compat.etl_lib import (BatchProcessor, BatchResults,
                                         ParallelBatchProcessor, ParallelBatchResult,
                                         SplittingBatchProcessor,
                                         canonical_integer_id_extractor, dict_id_extractor,
                                         tuple_id_extractor)


class Source(BatchProcessor):
    """Rows in batches, with statistics on every batch (like a CSV reader's)."""

    def __init__(self, rows, stats=None, result_type=BatchResults):
        super().__init__(None)
        self.rows = rows
        self.stats = stats if stats is not None else {"read": 1}
        self.result_type = result_type

    def get_batch(self, max_batch_size):
        if not self.rows:
            yield self.result_type(chunk=[], statistics=dict(self.stats), batch_size=0)
        for i in range(0, len(self.rows), max_batch_size):
            chunk = self.rows[i:i + max_batch_size]
            yield self.result_type(chunk=chunk, statistics=dict(self.stats),
                                   batch_size=len(chunk))


class Recorder:
    """Worker factory: each worker records its rows and checks for overlapping claims."""

    def __init__(self, extractor, fail_on=None):
        self.extractor = extractor
        self.lock = threading.Lock()
        self.held = set()
        self.overlaps = []
        self.rows = []
        self.fail_on = fail_on

    def claims(self, rows):
        cells = {self.extractor(r) for r in rows}
        assert len(cells) == 1
        r, c = cells.pop()
        if getattr(self.extractor, "monopartite", False):
            return {("n", r), ("n", c)}
        return {("s", r), ("e", c)}

    def __call__(self):
        rec = self

        class Worker(BatchProcessor):
            def get_batch(self, max_batch_size):
                for batch in self.predecessor.get_batch(max_batch_size):
                    claims = rec.claims(batch.chunk)
                    with rec.lock:
                        if claims & rec.held:
                            rec.overlaps.append(claims & rec.held)
                        rec.held |= claims
                    try:
                        if rec.fail_on is not None and any(
                                r["i"] == rec.fail_on for r in batch.chunk):
                            raise RuntimeError("write failed")
                        with rec.lock:
                            rec.rows.extend(r["i"] for r in batch.chunk)
                    finally:
                        with rec.lock:
                            rec.held -= claims
                    yield BatchResults(chunk=batch.chunk, statistics={"written": len(batch.chunk)},
                                       batch_size=len(batch.chunk))
        return Worker(None)


def rows_of(n, ids, seed=3):
    rnd = random.Random(seed)
    return [{"start": rnd.choice(ids), "end": rnd.choice(ids), "i": i} for i in range(n)]


def chain(rows, extractor, *, batch=50, workers=4, source_stats=None, fail_on=None,
          barrier_free=False, result_type=BatchResults):
    rec = Recorder(extractor, fail_on)
    src = Source(rows, source_stats, result_type)
    split = SplittingBatchProcessor(None, extractor.table_size, extractor, predecessor=src)
    par = ParallelBatchProcessor(None, rec, predecessor=split, max_workers=workers,
                                 barrier_free=barrier_free)
    return rec, split, par


def test_waves_hold_non_overlapping_capped_bucket_batches_and_stats_come_last():
    ex = dict_id_extractor(6)
    rows = rows_of(3000, list(range(0, 5000, 10)))
    split = SplittingBatchProcessor(None, 6, ex, predecessor=Source(rows))
    waves = list(split.get_batch(100))
    seen = []
    for w in waves:
        assert isinstance(w, ParallelBatchResult)
        cells = [{ex(r) for r in b} for b in w.chunk]
        assert all(len(c) == 1 for c in cells)  # one bucket per bucket-batch
        rows_used = [next(iter(c))[0] for c in cells]
        cols_used = [next(iter(c))[1] for c in cells]
        assert len(set(rows_used)) == len(rows_used) and len(set(cols_used)) == len(cols_used)
        assert all(len(b) <= 100 for b in w.chunk)
        assert w.batch_size == sum(len(b) for b in w.chunk)
        seen.extend(r["i"] for b in w.chunk for r in b)
    assert sorted(seen) == list(range(3000))
    assert all(w.statistics == {} for w in waves[:-1])
    assert waves[-1].statistics == {"read": 30}  # one per upstream batch of 100


def test_monopartite_waves_never_use_a_node_bucket_twice():
    ex = canonical_integer_id_extractor(8)
    rows = rows_of(2000, list(range(300)))
    for w in SplittingBatchProcessor(None, 8, ex, predecessor=Source(rows)).get_batch(64):
        nodes = [n for b in w.chunk for n in set(ex(b[0]))]
        assert len(nodes) == len(set(nodes))


def test_the_parallel_chain_processes_every_row_once_and_merges_statistics():
    ex = dict_id_extractor(5)
    rows = rows_of(2000, list(range(400)))
    rec, _split, par = chain(rows, ex, batch=50)
    results = list(par.get_batch(50))
    assert not rec.overlaps
    assert sorted(rec.rows) == list(range(2000))
    total = {}
    for r in results:
        for k, v in r.statistics.items():
            total[k] = total.get(k, 0) + v
    assert total == {"written": 2000, "read": 40}
    assert sum(r.batch_size for r in results) == 2000


def test_barrier_free_mode_keeps_the_contract_without_waves():
    ex = dict_id_extractor(5)
    rows = rows_of(2000, list(range(400)))
    rec, _split, par = chain(rows, ex, barrier_free=True)
    results = list(par.get_batch(50))
    assert not rec.overlaps
    assert sorted(rec.rows) == list(range(2000))
    assert all(r.batch_size <= 50 for r in results)
    total = {}
    for r in results:
        for k, v in r.statistics.items():
            total[k] = total.get(k, 0) + v
    assert total == {"written": 2000, "read": 40}


@pytest.mark.parametrize("barrier_free", [False, True])
def test_upstream_statistics_arrive_when_no_row_reaches_the_splitter(barrier_free):
    rec, _split, par = chain([], dict_id_extractor(4), source_stats={"read": 0, "invalid": 7},
                             barrier_free=barrier_free)
    results = list(par.get_batch(10))
    assert [r.statistics for r in results] == [{"read": 0, "invalid": 7}]


@pytest.mark.parametrize("barrier_free", [False, True])
def test_a_failing_bucket_batch_fails_fast_and_says_what_committed(barrier_free):
    ex = dict_id_extractor(5)
    rows = rows_of(3000, list(range(400)))
    rec, _split, par = chain(rows, ex, fail_on=1500, barrier_free=barrier_free)
    yielded = []
    with pytest.raises(RuntimeError, match="write failed") as info:
        for r in par.get_batch(50):
            yielded.append(r)
    assert len(rec.rows) < 3000
    committed = info.value.committed_batches
    if barrier_free:
        assert committed == len(yielded)
        assert sum(r.batch_size for r in yielded) == len(rec.rows)
    else:
        in_wave = sum(r.batch_size for r in committed)
        assert sum(r.batch_size for r in yielded) + in_wave == len(rec.rows)
        assert info.value.committed_waves == len(yielded)


def test_extractors_spread_ids_that_all_end_in_zero():
    ex = dict_id_extractor(10)
    cells = {ex({"start": 10 * a, "end": 10 * b}) for a in range(40) for b in range(40)}
    assert len(cells) == 100  # etl_lib 0.5's last-digit extractor: one cell
    t = tuple_id_extractor(10)
    assert len({t((10 * a, 20 * a)) for a in range(200)}) > 50
    small = canonical_integer_id_extractor(10)
    assert len({small({"start": a, "end": 0})[0] for a in range(0, 1000, 10)}) == 10


def test_constructor_checks_and_extractor_errors_are_etl_libs():
    ex = dict_id_extractor(10)
    with pytest.raises(ValueError, match="Mismatch"):
        SplittingBatchProcessor(None, 8, ex)
    with pytest.raises(ValueError, match="near_full_ratio"):
        SplittingBatchProcessor(None, 10, ex, near_full_ratio=0)
    with pytest.raises(KeyError, match="missing required keys: end"):
        ex({"start": 1})
    with pytest.raises(ValueError, match="out of range"):
        split = SplittingBatchProcessor(None, 3, lambda r: (5, 0), predecessor=Source([{}]))
        list(split.get_batch(10))


@dataclass
class ForeignResults:  # the same fields in another class: duck typing only
    chunk: list
    statistics: dict = field(default_factory=dict)
    batch_size: int = 0


def test_a_predecessor_with_another_results_class_works():
    ex = dict_id_extractor(4)
    rows = rows_of(500, list(range(100)))
    rec, _split, par = chain(rows, ex, result_type=ForeignResults)
    list(par.get_batch(25))
    assert sorted(rec.rows) == list(range(500))


class _Reporter:
    def __init__(self):
        self.events = []

    def instrument(self, task, event, payload):
        self.events.append(event)

    def report_progress(self, task, batches, expected, stats):
        self.events.append("progress")


class _Context:
    def __init__(self):
        self.reporter = _Reporter()


def test_drops_into_an_etl_lib_chain_in_both_directions():
    etl = pytest.importorskip("etl_lib.core.SplittingBatchProcessor",
                              reason="neo4j-etl-lib 0.5.1 is not installed")
    from etl_lib.core.BatchProcessor import BatchResults as EtlResults
    from etl_lib.core.ClosedLoopBatchProcessor import ClosedLoopBatchProcessor
    from etl_lib.core.ParallelBatchProcessor import ParallelBatchProcessor as EtlParallel

    ctx = _Context()
    task = object()
    rows = rows_of(1200, list(range(300)))
    ours = dict_id_extractor(5)
    # etl_lib's source results and closing processor around our splitter + parallel
    rec = Recorder(ours)
    src = Source(rows, {"read": 1}, EtlResults)
    split = SplittingBatchProcessor(ctx, 5, ours, task=task, predecessor=src)
    par = ParallelBatchProcessor(ctx, rec, task=task, predecessor=split, max_workers=3)
    closing = ClosedLoopBatchProcessor(ctx, task, par)
    out = next(closing.get_batch(40))
    assert out.statistics == {"read": 30, "written": 1200}
    assert sorted(rec.rows) == list(range(1200)) and not rec.overlaps
    assert "splitter_flush" in ctx.reporter.events and "bucket_done" in ctx.reporter.events
    # etl_lib's splitter feeding our parallel processor, and ours feeding etl_lib's
    theirs = etl.dict_id_extractor(10)  # last decimal digit: 10 buckets whatever the size
    rec2 = Recorder(theirs)
    split2 = etl.SplittingBatchProcessor(None, 10, theirs, predecessor=Source(rows))
    got = list(ParallelBatchProcessor(None, rec2, predecessor=split2).get_batch(40))
    assert sorted(rec2.rows) == list(range(1200))
    assert sum(r.statistics.get("written", 0) for r in got) == 1200
    rec3 = Recorder(ours)
    split3 = SplittingBatchProcessor(None, 5, ours, predecessor=Source(rows))
    got = list(EtlParallel(None, rec3, predecessor=split3).get_batch(40))
    assert sorted(rec3.rows) == list(range(1200)) and not rec3.overlaps
