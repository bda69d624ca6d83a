"""neo4j etl_lib's mix-and-batch processors, on our claims scheduler.

etl_lib users drop these into their processor chains by changing an import::

    # from etl_lib.core.SplittingBatchProcessor import SplittingBatchProcessor, dict_id_extractor
    # from etl_lib.core.ParallelBatchProcessor import ParallelBatchProcessor
    from pympx_queues.compat.etl_lib import (SplittingBatchProcessor, ParallelBatchProcessor,
                                             dict_id_extractor)

The observable contract of etl_lib 0.5 is kept: the splitter yields *waves*
(:class:`ParallelBatchResult`) whose chunk is a list of bucket-batches that share no row
or column (bipartite) or no node (monopartite); the parallel processor runs each wave's
bucket-batches on ``max_workers`` threads with a fresh worker from ``worker_factory``,
merges the statistics, and fails fast.  Which cells form a wave is decided by
:class:`~pympx_queues.pipeline.partitions.ClaimScheduler`, the same scheduler behind
:func:`~pympx_queues.pipeline.partitions.run_partitioned` (barrier-free and resumable:
prefer it for new code).  Differences from etl_lib, listed in docs/moving-from-etl-lib.md:

* the id extractors mix ids with a 64-bit hash before the modulo (etl_lib's last-digit
  rule puts every multiple of 10 in one bucket; its "canonical" multiply is a no-op for
  small ids): the cells differ, the non-overlap rule does not;
* upstream statistics reach the caller even when no row reaches the splitter (one empty
  wave carries them);
* the burst path is a stated buffer maximum (``max_buffered``) that really triggers;
* a failed bucket-batch's error names the wave and the bucket that committed before it.
"""

from __future__ import annotations

import abc
import logging
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

from ..pipeline.claims import Grid, hash_id
from ..pipeline.partitions import ClaimScheduler, merge_statistics

__all__ = ["BatchResults", "BatchProcessor", "SplittingBatchProcessor",
           "ParallelBatchProcessor", "ParallelBatchResult", "tuple_id_extractor",
           "dict_id_extractor", "canonical_integer_id_extractor", "merge_summary",
           "append_result"]


@dataclass
class BatchResults:
    """A batch of data with its statistics (etl_lib's ``BatchResults``)."""

    chunk: List[Any]
    statistics: dict = field(default_factory=dict)
    batch_size: int = field(default=sys.maxsize)


class ParallelBatchResult(BatchResults):
    """One wave: ``chunk`` is a list of bucket-batches that may run at the same time."""


def merge_summary(summary_1: dict, summary_2: dict) -> dict:
    """etl_lib's merge: values of the same key are added."""
    return merge_statistics(dict(summary_1 or {}), summary_2)


def append_result(org: BatchResults, stats: dict) -> BatchResults:
    return BatchResults(chunk=org.chunk, statistics=merge_summary(org.statistics, stats),
                        batch_size=org.batch_size)


class BatchProcessor(abc.ABC):
    """A link of a processor chain: ``get_batch(max_batch_size)`` yields BatchResults,
    usually built from ``self.predecessor.get_batch(...)``."""

    def __init__(self, context: Any, task: Any = None, predecessor: Any = None) -> None:
        self.context = context
        self.predecessor = predecessor
        self.task = task
        self.logger = logging.getLogger(f"{self.__class__.__module__}.{self.__class__.__name__}")

    @abc.abstractmethod
    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        """Yield batches of at most ``max_batch_size`` rows (where the processor can)."""

    def _instrument(self, event_type: str, payload: dict) -> None:
        reporter = getattr(self.context, "reporter", None)
        if self.task is None or reporter is None:
            return
        reporter.instrument(self.task, event_type, payload)


def _extractor(ids: Callable[[Any], Tuple[Any, Any]], table_size: int,
               monopartite: bool) -> Callable[[Any], Tuple[int, int]]:
    if type(table_size) is not int or table_size < 1:
        raise ValueError(f"table_size must be a positive int, got {table_size!r}")

    def extractor(item: Any) -> Tuple[int, int]:
        a, b = ids(item)
        return hash_id(a) % table_size, hash_id(b) % table_size

    extractor.table_size = table_size  # type: ignore[attr-defined]
    extractor.monopartite = monopartite  # type: ignore[attr-defined]
    return extractor


def tuple_id_extractor(table_size: int = 10) -> Callable[[Any], Tuple[int, int]]:
    """``(a, b)`` tuples -> ``(row, col)`` (mixed ids, not etl_lib's last digit)."""
    def ids(item: Any) -> Tuple[Any, Any]:
        try:
            a, b = item
        except (TypeError, ValueError):
            raise ValueError(f"Failed to extract ID from item {item!r}: not a pair") from None
        return a, b
    return _extractor(ids, table_size, False)


def dict_id_extractor(table_size: int = 10, start_key: str = "start",
                      end_key: str = "end") -> Callable[[Any], Tuple[int, int]]:
    """Dict rows -> ``(row, col)`` from ``start_key`` and ``end_key``."""
    def ids(item: Any) -> Tuple[Any, Any]:
        missing = [k for k in (start_key, end_key) if k not in item]
        if missing:
            raise KeyError(f"Item missing required keys: {', '.join(missing)}")
        return item[start_key], item[end_key]
    return _extractor(ids, table_size, False)


def canonical_integer_id_extractor(table_size: int = 10, start_key: str = "start",
                                   end_key: str = "end", monopartite: bool = True
                                   ) -> Callable[[Any], Tuple[int, int]]:
    """Dict rows with int (or str) ids; ``monopartite`` folds ``(a, b)`` and ``(b, a)``
    into one cell, as etl_lib's splitter does for extractors that say so."""
    def ids(item: Any) -> Tuple[Any, Any]:
        try:
            return item[start_key], item[end_key]
        except KeyError:
            raise KeyError(f"Item missing keys: {start_key} or {end_key}") from None
    return _extractor(ids, table_size, monopartite)


class _Row:
    """A row as the scheduler sees it (``data``, ``key``, ``metadata``)."""

    __slots__ = ("data", "key", "metadata")

    def __init__(self, data: Any, key: int) -> None:
        self.data = data
        self.key = key
        self.metadata: Dict[str, Any] = {}


class SplittingBatchProcessor(BatchProcessor):
    """Buckets the predecessor's rows on a ``table_size x table_size`` grid and yields
    waves of non-overlapping bucket-batches (etl_lib's ``SplittingBatchProcessor``).

    A wave goes out when a bucket is full (``max_batch_size``), joined by free buckets at
    least ``near_full_ratio`` full; when ``max_buffered`` rows (default
    ``burst_multiplier * max_batch_size``) wait, the fullest free buckets go out early;
    leftovers go out at the end.  The last wave carries the upstream statistics (an empty
    wave when no row arrived).
    """

    def __init__(self, context: Any, table_size: Optional[int],
                 id_extractor: Callable[[Any], Tuple[int, int]], task: Any = None,
                 predecessor: Any = None, near_full_ratio: float = 0.85,
                 burst_multiplier: int = 25, max_buffered: Optional[int] = None) -> None:
        super().__init__(context, task, predecessor)
        expected = getattr(id_extractor, "table_size", None)
        if table_size is None:
            if expected is None:
                raise ValueError("table_size must be specified if id_extractor has no "
                                 "defined table_size")
            table_size = expected
        elif expected is not None and expected != table_size:
            raise ValueError(f"Mismatch between provided table_size ({table_size}) and "
                             f"id_extractor table_size ({expected}).")
        if not 0 < near_full_ratio <= 1.0:
            raise ValueError(f"near_full_ratio must be in (0, 1], got {near_full_ratio}")
        if burst_multiplier < 1:
            raise ValueError(f"burst_multiplier must be >= 1, got {burst_multiplier}")
        self.table_size = table_size
        self.near_full_ratio = near_full_ratio
        self.burst_multiplier = burst_multiplier
        self.max_buffered = max_buffered
        self._monopartite = bool(getattr(id_extractor, "monopartite", False))
        self.grid = Grid(table_size, cell_of=id_extractor, monopartite=self._monopartite)

    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        if self.predecessor is None:
            return
        limit = self.max_buffered or self.burst_multiplier * max_batch_size
        sched = ClaimScheduler(self.grid, max_batch_size, max_buffered=limit,
                               near_full=self.near_full_ratio)
        stats: Dict[str, Any] = {}
        pending: Optional[ParallelBatchResult] = None
        n = 0

        def waves() -> Generator[ParallelBatchResult, None, None]:
            while True:
                groups = sched.take(self.table_size * self.table_size)
                if not groups:
                    return
                for g in groups:
                    sched.finished(g)  # a wave is handed over whole: its claims end here
                yield ParallelBatchResult(chunk=[[r.data for r in g] for g in groups],
                                          statistics={},
                                          batch_size=sum(len(g) for g in groups))

        for upstream in self.predecessor.get_batch(max_batch_size):
            stats = merge_summary(stats, getattr(upstream, "statistics", None) or {})
            for row in upstream.chunk:
                sched.offer(_Row(row, n))
                n += 1
            for wave in waves():
                if pending is not None:
                    yield pending
                pending = wave
        sched.flush()
        for wave in waves():
            if pending is not None:
                yield pending
            pending = wave
        if pending is None:  # no row reached the splitter: the statistics still do
            pending = ParallelBatchResult(chunk=[], statistics={}, batch_size=0)
        pending.statistics = stats
        yield pending


class ParallelBatchProcessor(BatchProcessor):
    """Runs each wave's bucket-batches on ``max_workers`` threads, one fresh worker from
    ``worker_factory()`` per bucket-batch, and yields one merged BatchResults per wave
    (etl_lib's ``ParallelBatchProcessor``; fail-fast: the first failed bucket-batch
    cancels the rest of its wave and raises)."""

    def __init__(self, context: Any, worker_factory: Callable[[], BatchProcessor],
                 task: Any = None, predecessor: Any = None, max_workers: int = 4,
                 prefetch: int = 4) -> None:
        super().__init__(context, task, predecessor)
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.worker_factory = worker_factory
        self.max_workers = max_workers
        self.prefetch = prefetch

    class SingleBatchWrapper(BatchProcessor):
        """Predecessor of a per-bucket worker: yields its one bucket-batch."""

        def __init__(self, context: Any, batch: List[Any]) -> None:
            super().__init__(context=context, predecessor=None)
            self._batch = batch

        def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
            yield BatchResults(chunk=self._batch, statistics={}, batch_size=len(self._batch))

    def _process_bucket_batch(self, bucket_batch: List[Any]) -> BatchResults:
        worker = self.worker_factory()
        worker.predecessor = self.SingleBatchWrapper(self.context, bucket_batch)
        return next(worker.get_batch(len(bucket_batch)))

    def get_batch(self, max_batch_size: int) -> Generator[BatchResults, None, None]:
        if self.predecessor is None:
            return
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="PBP_worker_") as pool:
            for wave in self.predecessor.get_batch(max_batch_size):
                merged = dict(wave.statistics or {})
                chunk: List[Any] = []
                total = 0
                futures = [pool.submit(self._process_bucket_batch, b) for b in wave.chunk]
                try:
                    for f in as_completed(futures):
                        out = f.result()
                        merged = merge_summary(merged, out.statistics or {})
                        total += out.batch_size
                        chunk.extend(out.chunk if isinstance(out.chunk, list) else [out.chunk])
                except BaseException:
                    for g in futures:
                        g.cancel()
                    raise
                yield BatchResults(chunk=chunk, statistics=merged, batch_size=total)
