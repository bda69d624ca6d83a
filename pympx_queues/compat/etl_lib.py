"""neo4j etl_lib 0.5's mix-and-batch processors, with the claims scheduler underneath.

Users of ``etl_lib.core`` change their imports::

    # from etl_lib.core.BatchProcessor import BatchProcessor, BatchResults
    # from etl_lib.core.SplittingBatchProcessor import SplittingBatchProcessor, dict_id_extractor
    # from etl_lib.core.ParallelBatchProcessor import ParallelBatchProcessor
    from pympx_queues.compat.etl_lib import (BatchProcessor, BatchResults,
        SplittingBatchProcessor, ParallelBatchProcessor, dict_id_extractor)

The constructors, ``get_batch(max_batch_size)`` generators and the observable contract
are etl_lib's: the splitter yields *waves* (a ``ParallelBatchResult`` whose ``chunk`` is
a list of bucket-batches that share no row or column, or no node when monopartite), every
wave but the last carries empty statistics and the last carries the merged upstream
statistics; the parallel processor runs one worker per bucket-batch, merges the workers'
statistics, yields one ``BatchResults`` per wave and fails fast.  Objects are duck-typed:
etl_lib's own ``BatchResults``, predecessors and workers (``CypherBatchSink``...) work.

Differences (docs/moving-from-etl-lib.md lists them all):

* The id extractors mix ids with SplitMix64/BLAKE2b before the modulo instead of taking
  the last decimal digit (ids that are all multiples of 10 no longer land in one bucket)
  or Knuth's multiplier (a no-op for small ids); the ``(row, col)`` they return differ.
* Waves are chosen by :class:`~pympx_queues.pipeline.partitions.ClaimScheduler`; its
  buffer bound (``max_buffered``, default one batch per cell) triggers early waves (the
  ``burst_multiplier`` path of etl_lib never triggered; it is accepted and unused).
* Upstream statistics reach the end even when no row reaches the splitter (an empty
  wave carries them).
* A failure in a wave raises the worker's exception (as etl_lib) with
  ``exc.committed_batches`` (the ``BatchResults`` of the wave's bucket-batches that
  finished) and ``exc.committed_waves`` (waves finished before it) attached; in
  barrier-free mode ``exc.committed_batches`` is the number of bucket-batches that
  committed (each was yielded before the exception).
* ``ParallelBatchProcessor(..., barrier_free=True)`` behind our splitter drops the waves:
  each bucket-batch starts as soon as its claims are free (our pipeline engine's
  scheduling) and one ``BatchResults`` is yielded per bucket-batch.
"""

from __future__ import annotations

import abc
import logging
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

from ..pipeline.claims import CellFn, ClaimError, hash64
from ..pipeline.partitions import ClaimScheduler

__all__ = [
    "BatchResults", "BatchProcessor", "ParallelBatchResult", "SplittingBatchProcessor",
    "ParallelBatchProcessor", "tuple_id_extractor", "dict_id_extractor",
    "canonical_integer_id_extractor", "canonical_int_or_str_id_extractor",
    "merge_summary", "append_result",
]


# --------------------------------------------------------------------------- results
@dataclass
class BatchResults:
    """A batch of data (``chunk``) with ``statistics`` and its ``batch_size``."""

    chunk: List[Any]
    statistics: dict = field(default_factory=dict)
    batch_size: int = field(default=sys.maxsize)


class ParallelBatchResult(BatchResults):
    """One wave: ``chunk`` is a list of bucket-batches, one per worker."""


def merge_summary(summary_1: dict, summary_2: dict) -> dict:
    """Add two dicts of numbers key by key (etl_lib's ``merge_summary``)."""
    return {k: summary_1.get(k, 0) + summary_2.get(k, 0) for k in set(summary_1) | set(summary_2)}


def append_result(org: Any, stats: dict) -> BatchResults:
    """``org`` with ``stats`` merged into its statistics."""
    return BatchResults(chunk=org.chunk, statistics=merge_summary(org.statistics or {}, stats),
                        batch_size=org.batch_size)


class BatchProcessor(abc.ABC):
    """A link of a chain: ``get_batch(max_batch_size)`` yields ``BatchResults``, usually
    pulled from ``predecessor``."""

    def __init__(self, context: Any, task: Any = None, predecessor: Any = None) -> None:
        self.context = context
        self.predecessor = predecessor
        self.task = task
        self.logger = logging.getLogger(f"{self.__class__.__module__}.{self.__class__.__name__}")

    @abc.abstractmethod
    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        """Yield batches of at most ``max_batch_size`` items (waves excepted)."""

    def _instrument(self, event_type: str, payload: dict) -> None:
        if self.task is None or self.context is None:
            return
        reporter = getattr(self.context, "reporter", None)
        if reporter is not None and hasattr(reporter, "instrument"):
            reporter.instrument(self.task, event_type, payload)


# --------------------------------------------------------------------------- extractors
def _extractor(fn: Callable, table_size: int, monopartite: bool = False) -> Callable:
    fn.table_size = table_size  # type: ignore[attr-defined]
    fn.monopartite = monopartite  # type: ignore[attr-defined]
    return fn


def tuple_id_extractor(table_size: int = 10) -> Callable[[Tuple[Any, Any]], Tuple[int, int]]:
    """``(a, b)`` -> ``(bucket(a), bucket(b))`` on a ``table_size`` grid (64-bit mix)."""
    def extractor(item: Tuple[Any, Any]) -> Tuple[int, int]:
        try:
            a, b = item
        except (TypeError, ValueError):
            raise ValueError(f"Failed to extract ID from item {item!r}: expected a pair")
        return _cell(a, b, item, table_size)
    return _extractor(extractor, table_size)


def dict_id_extractor(table_size: int = 10, start_key: str = "start",
                      end_key: str = "end") -> Callable[[Dict[str, Any]], Tuple[int, int]]:
    """``{start_key: a, end_key: b}`` -> ``(bucket(a), bucket(b))`` (64-bit mix)."""
    def extractor(item: Dict[str, Any]) -> Tuple[int, int]:
        missing = [k for k in (start_key, end_key) if k not in item]
        if missing:
            raise KeyError(f"Item missing required keys: {', '.join(missing)}")
        return _cell(item[start_key], item[end_key], item, table_size)
    return _extractor(extractor, table_size)


def canonical_integer_id_extractor(table_size: int = 10, start_key: str = "start",
                                   end_key: str = "end", monopartite: bool = True
                                   ) -> Callable[[Dict[str, Any]], Tuple[int, int]]:
    """Integer ids, mixed (SplitMix64); ``monopartite`` (default) folds ``(a, b)`` and
    ``(b, a)`` into one cell."""
    def extractor(item: Dict[str, Any]) -> Tuple[int, int]:
        try:
            s, e = item[start_key], item[end_key]
        except KeyError:
            raise KeyError(f"Item missing keys: {start_key} or {end_key}")
        if not (isinstance(s, int) and isinstance(e, int)) or isinstance(s, bool) \
                or isinstance(e, bool):
            raise ValueError(f"Failed to extract ID: integer ids expected, got "
                             f"{s!r} and {e!r}")
        return _cell(s, e, item, table_size)
    return _extractor(extractor, table_size, monopartite)


def canonical_int_or_str_id_extractor(table_size: int = 10, start_key: str = "start",
                                      end_key: str = "end", monopartite: bool = True
                                      ) -> Callable[[Dict[str, Any]], Tuple[int, int]]:
    """Integer or string ids (strings by BLAKE2b, as etl_lib), mixed before the modulo."""
    def extractor(item: Dict[str, Any]) -> Tuple[int, int]:
        s, e = item[start_key], item[end_key]
        for v in (s, e):
            if not isinstance(v, (int, str)) or isinstance(v, bool):
                raise TypeError(f"Expected int or str, got {type(v).__name__}")
        return _cell(s, e, item, table_size)
    return _extractor(extractor, table_size, monopartite)


def _cell(a: Any, b: Any, item: Any, table_size: int) -> Tuple[int, int]:
    try:
        return hash64(a) % table_size, hash64(b) % table_size
    except ClaimError as exc:
        raise ValueError(f"Failed to extract ID from item {item!r}: {exc}") from None


# --------------------------------------------------------------------------- splitter
class _Row:
    __slots__ = ("key", "data", "attempt")

    def __init__(self, key: int, data: Any) -> None:
        self.key = key
        self.data = data
        self.attempt = 1


class SplittingBatchProcessor(BatchProcessor):
    """Buckets rows with ``id_extractor(item) -> (row, col)`` on a ``table_size`` grid and
    yields waves of non-overlapping bucket-batches (``ParallelBatchResult``).

    During streaming a wave is emitted when a bucket is full (``max_batch_size`` rows),
    filled up with buckets at least ``near_full_ratio`` full; when ``max_buffered`` rows
    are held, a wave of the fullest buckets is emitted whatever their fill; at the end of
    the source, leftovers go in capped waves.  Statistics: every wave carries ``{}`` but
    the last, which carries the merged upstream statistics (a wave without bucket-batches
    carries them when no row arrived).
    """

    def __init__(self, context: Any, table_size: Optional[int], id_extractor: Callable,
                 task: Any = None, predecessor: Any = None, near_full_ratio: float = 0.85,
                 burst_multiplier: int = 25, max_buffered: Optional[int] = None) -> None:
        super().__init__(context, task, predecessor)
        expected = getattr(id_extractor, "table_size", None)
        if expected is not None:
            if table_size is None:
                table_size = expected
            elif table_size != expected:
                raise ValueError(f"Mismatch between provided table_size ({table_size}) and "
                                 f"id_extractor table_size ({expected}).")
        elif table_size is None:
            raise ValueError("table_size must be specified if id_extractor has no defined "
                             "table_size")
        if not 0 < near_full_ratio <= 1.0:
            raise ValueError(f"near_full_ratio must be in (0, 1], got {near_full_ratio}")
        if burst_multiplier < 1:
            raise ValueError(f"burst_multiplier must be >= 1, got {burst_multiplier}")
        self.table_size = table_size
        self._id_extractor = id_extractor
        self._monopartite = bool(getattr(id_extractor, "monopartite", False))
        self.near_full_ratio = float(near_full_ratio)
        self.burst_multiplier = int(burst_multiplier)
        self.max_buffered = max_buffered
        self.grid = CellFn(id_extractor, table_size, self._monopartite)

    def scheduler(self, max_batch_size: int, **kw: Any) -> ClaimScheduler:
        """The claims scheduler this splitter's waves (or barrier-free runs) come from."""
        kw.setdefault("min_fill", self.near_full_ratio)
        kw.setdefault("max_buffered", self.max_buffered)
        kw.setdefault("hot_chain", False)  # etl_lib's waves: full and near-full cells
        return ClaimScheduler(self.grid, max_batch_size, **kw)

    def rows(self, max_batch_size: int, stats: Dict[str, Any]) -> Generator[Any, None, None]:
        """The predecessor's rows one by one; upstream statistics merged into ``stats``."""
        if self.predecessor is None:
            return
        for upstream in self.predecessor.get_batch(max_batch_size):
            if upstream.statistics:
                stats.update(merge_summary(stats, upstream.statistics))
            yield from upstream.chunk

    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        if self.predecessor is None:
            return
        sched = self.scheduler(max_batch_size)
        stats: Dict[str, Any] = {}
        pending: Optional[ParallelBatchResult] = None
        n = 0
        upstream_rows = self.rows(max_batch_size, stats)
        for item in upstream_rows:
            sched.offer(_Row(n, item))  # a bad (row, col) raises ClaimError (a ValueError)
            n += 1
            # a wave when a bucket is full, or when the buffer reached its bound
            while sched.fullest() >= max_batch_size or sched.buffered() >= sched.bound:
                wave = self._wave(sched)
                if wave is None:
                    break
                if pending is not None:
                    yield pending
                pending = wave
        sched.flush()
        while sched.buffered():
            wave = self._wave(sched)
            if wave is None:  # pragma: no cover - nothing runs, so a cell is always free
                break
            if pending is not None:
                yield pending
            pending = wave
        if pending is None:
            if stats:  # no row reached the splitter: the statistics still do
                yield ParallelBatchResult(chunk=[], statistics=stats, batch_size=0)
            return
        yield ParallelBatchResult(chunk=pending.chunk, statistics=stats,
                                  batch_size=pending.batch_size)

    def _wave(self, sched: ClaimScheduler) -> Optional[ParallelBatchResult]:
        t0 = time.perf_counter()
        buffered = sched.buffered()
        groups = sched.take(self.table_size)
        if not groups:
            return None
        for g in groups:  # the wave's consumer runs them; their claims go with the wave
            sched.finished(g)
            sched.ended(g, True, None, None, 0.0)
        chunk = [[r.data for r in g] for g in groups]
        sizes = sorted(len(b) for b in chunk)
        self._instrument("splitter_flush", {
            "wave_size": len(chunk), "emitted_rows": sum(sizes), "bucket_min": sizes[0],
            "bucket_p50": sizes[len(sizes) // 2], "bucket_max": sizes[-1],
            "buffered_before": buffered, "table_size": self.table_size,
            "dt_ms": round((time.perf_counter() - t0) * 1000.0, 3)})
        return ParallelBatchResult(chunk=chunk, statistics={}, batch_size=sum(sizes))


# --------------------------------------------------------------------------- parallel
class _SingleBatch(BatchProcessor):
    """The predecessor of one worker: exactly one batch."""

    def __init__(self, context: Any, batch: List[Any]) -> None:
        super().__init__(context, None, None)
        self._batch = batch

    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        yield BatchResults(chunk=self._batch, statistics={}, batch_size=len(self._batch))


class ParallelBatchProcessor(BatchProcessor):
    """Runs ``worker_factory()`` workers over the bucket-batches of each wave of its
    predecessor, ``max_workers`` at a time, prefetching up to ``prefetch`` waves; yields
    one merged ``BatchResults`` per wave; the first failure cancels what has not started,
    waits for what runs and is raised.

    ``barrier_free=True`` (behind a :class:`SplittingBatchProcessor` of this module):
    no waves; each bucket-batch starts as soon as a worker is free and no running batch
    shares its claims; one ``BatchResults`` per bucket-batch.
    """

    SingleBatchWrapper = _SingleBatch

    def __init__(self, context: Any, worker_factory: Callable[[], Any], task: Any = None,
                 predecessor: Any = None, max_workers: int = 4, prefetch: int = 4,
                 barrier_free: bool = False) -> None:
        super().__init__(context, task, predecessor)
        self.worker_factory = worker_factory
        self.max_workers = max_workers
        self.prefetch = prefetch
        self.barrier_free = bool(barrier_free)
        if self.barrier_free and predecessor is not None and \
                not isinstance(predecessor, SplittingBatchProcessor):
            raise ValueError("barrier_free=True needs a pympx_queues.compat.etl_lib."
                             "SplittingBatchProcessor as predecessor (it knows the claims)")

    def _process_bucket_batch(self, bucket_batch: List[Any]) -> Any:
        wrapper = self.SingleBatchWrapper(self.context, bucket_batch)
        worker = self.worker_factory()
        worker.predecessor = wrapper
        start = time.perf_counter()
        result = next(worker.get_batch(len(bucket_batch)))
        self._instrument("bucket_done", {
            "rows": result.batch_size,
            "dt_ms": round((time.perf_counter() - start) * 1000.0, 3)})
        return result

    def _process_wave(self, pool: ThreadPoolExecutor, wave: Any, done_waves: int
                      ) -> BatchResults:
        t0 = time.perf_counter()
        merged = dict(wave.statistics or {})
        chunk: List[Any] = []
        total = 0
        futures = [pool.submit(self._process_bucket_batch, b) for b in wave.chunk]
        for f in as_completed(futures):  # the first failure cancels what has not started
            try:
                out = f.result()
            except BaseException as exc:
                for g in futures:
                    g.cancel()
                wait(futures)  # the running ones finish: their outcome is known
                try:
                    exc.committed_batches = [  # type: ignore[attr-defined]
                        g.result() for g in futures
                        if not g.cancelled() and g.exception() is None]
                    exc.committed_waves = done_waves  # type: ignore[attr-defined]
                except AttributeError:  # pragma: no cover - exceptions with __slots__
                    pass
                self.logger.exception("bucket processing failed")
                raise
            merged = merge_summary(merged, out.statistics or {})
            total += out.batch_size
            chunk.extend(out.chunk if isinstance(out.chunk, list) else [out.chunk])
        self._instrument("parallel_wave_done", {
            "buckets": len(wave.chunk), "rows": total, "max_workers": self.max_workers,
            "prefetch": self.prefetch,
            "dt_ms": round((time.perf_counter() - t0) * 1000.0, 3)})
        return BatchResults(chunk=chunk, statistics=merged, batch_size=total)

    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        if self.barrier_free:
            yield from self._barrier_free(max_batch_size)
            return
        waves: "queue.Queue[Any]" = queue.Queue(max(self.prefetch, 1))
        end = object()
        failure: List[BaseException] = []
        stop = threading.Event()

        def producer() -> None:
            try:
                for wave in self.predecessor.get_batch(max_batch_size):
                    while not stop.is_set():
                        try:
                            waves.put(wave, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:
                failure.append(exc)
            finally:
                while not stop.is_set():
                    try:
                        waves.put(end, timeout=0.1)
                        break
                    except queue.Full:
                        continue

        t = threading.Thread(target=producer, daemon=True, name="prefetcher")
        t.start()
        done = 0
        try:
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="PBP_worker_") as pool:
                while True:
                    wave = waves.get()
                    if wave is end:
                        if failure:
                            raise failure[0]
                        break
                    result = self._process_wave(pool, wave, done)
                    done += 1
                    yield result
        finally:
            stop.set()

    def _barrier_free(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        """Bucket-batches through the pipeline engine with a ClaimScheduler: no waves."""
        from ..pipeline import Pipeline, Stage

        splitter: SplittingBatchProcessor = self.predecessor
        stats: Dict[str, Any] = {}
        results: "queue.Queue[Any]" = queue.Queue()
        end = object()
        errors: List[BaseException] = []
        sched = splitter.scheduler(max_batch_size, hot_chain=True)  # no waves here

        def handler(rows: List[Any]) -> List[Any]:
            try:
                results.put(self._process_bucket_batch(rows))
            except BaseException as exc:
                errors.append(exc)
                raise
            return [None] * len(rows)

        stage = Stage("etl_lib", handler, kind="thread", workers=self.max_workers,
                      queue_size=sched.max_buffered, scheduler=sched)
        pipeline = Pipeline(splitter.rows(max_batch_size, stats), [stage], progress=False,
                            stop_signals=False, name="etl_lib")
        failure: List[BaseException] = []

        def run() -> None:
            try:
                pipeline.run_all()
            except BaseException as exc:  # pragma: no cover - reported below
                failure.append(exc)
            finally:
                results.put(end)

        threading.Thread(target=run, daemon=True, name="etl_lib-barrier-free").start()
        pending: Optional[BatchResults] = None
        try:
            while True:
                r = results.get()
                if r is end:
                    break
                if pending is not None:
                    yield pending
                pending = r
        finally:
            if pipeline.running:  # the consumer left early
                pipeline.stop(drain=False)
        rep = sched.snapshot()
        if failure:
            raise failure[0]
        if rep.error is not None:
            if pending is not None:
                yield pending  # every committed bucket-batch is yielded before the error
            exc = errors[0] if errors else rep.error
            try:
                exc.committed_batches = rep.committed  # type: ignore[attr-defined]
            except AttributeError:  # pragma: no cover
                pass
            raise exc
        if pending is None:
            if stats:
                yield BatchResults(chunk=[], statistics=stats, batch_size=0)
            return
        yield BatchResults(chunk=pending.chunk,
                           statistics=merge_summary(dict(pending.statistics or {}), stats),
                           batch_size=pending.batch_size)
