"""pympx_queues.compat.etl_lib keeps etl_lib 0.5's observable contract."""

from __future__ import annotations

import collections
import threading

import pytest

from pympx_queues.compat.etl_lib import (BatchProcessor, BatchResults,
                                         ParallelBatchProcessor, ParallelBatchResult,
                                         SplittingBatchProcessor,
                                         canonical_integer_id_extractor, dict_id_extractor,
                                         tuple_id_extractor)


class Source(BatchProcessor):
    def __init__(self, rows, stats=None, chunk=100):
        super().__init__(None)
        self.rows, self.stats, self.chunk = rows, stats or {}, chunk

    def get_batch(self, max_batch_size):
        for i in range(0, len(self.rows), self.chunk):
            yield BatchResults(self.rows[i:i + self.chunk], dict(self.stats), self.chunk)


def claims(rows, mono):
    out = set()
    ext = canonical_integer_id_extractor(8) if mono else None
    for r in rows:
        if mono:
            a, b = ext(r)
            out.update({("n", a), ("n", b)})
        else:
            a, b = tuple_id_extractor(8)(r)
            out.update({("r", a), ("c", b)})
    return out


def test_waves_hold_non_overlapping_bucket_batches_and_every_row_once():
    rows = [(i, (i * 13) % 500) for i in range(2000)]
    split = SplittingBatchProcessor(None, 8, tuple_id_extractor(8), predecessor=Source(rows))
    seen = []
    for wave in split.get_batch(40):
        assert isinstance(wave, ParallelBatchResult)
        used = set()
        for bucket in wave.chunk:
            assert 0 < len(bucket) <= 40
            cells = {tuple_id_extractor(8)(r) for r in bucket}
            assert len(cells) == 1
            c = claims(bucket, False)
            assert not c & used
            used |= c
            seen.extend(bucket)
    assert sorted(seen) == sorted(rows)


def test_monopartite_waves_share_no_node():
    rows = [{"start": i % 97, "end": (i * 7) % 89} for i in range(1500)]
    ext = canonical_integer_id_extractor(6)
    split = SplittingBatchProcessor(None, 6, ext, predecessor=Source(rows))
    n = 0
    for wave in split.get_batch(30):
        used = set()
        for bucket in wave.chunk:
            r, c = sorted(ext(bucket[0]))
            nodes = {r, c}
            assert not nodes & used
            used |= nodes
            n += len(bucket)
    assert n == len(rows)


def test_strided_ids_spread_over_buckets():
    """etl_lib's last-digit rule puts every multiple of 10 in one bucket."""
    ext = dict_id_extractor(10)
    cells = {ext({"start": 10 * i, "end": 10 * j}) for i in range(50) for j in range(50)}
    assert len(cells) > 50


def test_an_empty_source_yields_one_empty_wave():
    split = SplittingBatchProcessor(None, 4, tuple_id_extractor(4), predecessor=Source([]))
    out = list(split.get_batch(10))
    assert len(out) == 1 and out[0].chunk == [] and out[0].statistics == {}


def test_upstream_statistics_reach_the_last_wave():
    class WithStats(BatchProcessor):
        def get_batch(self, max_batch_size):
            yield BatchResults([], {"read": 5}, 0)
            yield BatchResults([], {"read": 2}, 0)

    split = SplittingBatchProcessor(None, 4, tuple_id_extractor(4), predecessor=WithStats(None))
    out = list(split.get_batch(10))
    assert out[-1].statistics == {"read": 7}


def test_parallel_processor_merges_statistics_and_runs_buckets_in_parallel():
    rows = [(i, 1000 + i) for i in range(800)]
    lock = threading.Lock()
    running = collections.Counter()

    class Worker(BatchProcessor):
        def get_batch(self, max_batch_size):
            for b in self.predecessor.get_batch(max_batch_size):
                with lock:
                    running["now"] += 1
                    running["max"] = max(running["max"], running["now"])
                with lock:
                    running["now"] -= 1
                yield BatchResults(b.chunk, {"written": len(b.chunk)}, len(b.chunk))

    split = SplittingBatchProcessor(None, 4, tuple_id_extractor(4), predecessor=Source(rows))
    par = ParallelBatchProcessor(None, lambda: Worker(None), predecessor=split, max_workers=4)
    total = {}
    for res in par.get_batch(50):
        for k, v in res.statistics.items():
            total[k] = total.get(k, 0) + v
    assert total["written"] == 800


def test_parallel_processor_fails_fast():
    rows = [(i, i) for i in range(200)]

    class Bad(BatchProcessor):
        def get_batch(self, max_batch_size):
            for b in self.predecessor.get_batch(max_batch_size):
                if any(a == 42 for a, _ in b.chunk):
                    raise RuntimeError("row 42")
                yield BatchResults(b.chunk, {}, len(b.chunk))

    split = SplittingBatchProcessor(None, 4, tuple_id_extractor(4), predecessor=Source(rows))
    par = ParallelBatchProcessor(None, lambda: Bad(None), predecessor=split)
    with pytest.raises(RuntimeError, match="row 42"):
        list(par.get_batch(20))


def test_table_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="Mismatch"):
        SplittingBatchProcessor(None, 5, tuple_id_extractor(4))
    with pytest.raises(ValueError, match="near_full_ratio"):
        SplittingBatchProcessor(None, 4, tuple_id_extractor(4), near_full_ratio=0)
