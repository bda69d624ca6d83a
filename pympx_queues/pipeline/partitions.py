"""Non-overlapping key partitions: bucket-batches under claims, without wave barriers (P8).

Rows are buffered per cell of a :class:`~pympx_queues.pipeline.claims.Grid` and handed to
workers as *bucket-batches* (at most ``batch_size`` rows of one cell).  A batch starts only
when none of its claims is held by a running batch, and a batch that ends frees its claims
at once: a straggler delays only the cells that conflict with it, never a whole wave.

:class:`ClaimScheduler` is the engine's :class:`~pympx_queues.pipeline.Scheduler` for that;
:func:`run_partitioned` runs a handler over rows with it (in memory or durable: each
bucket-batch is acknowledged in the journal when its worker returns, and a restarted run
re-runs only the rows of unacknowledged batches).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, Iterable, List, Optional, Set, Tuple

from ._model import Scheduler, Stage
from .claims import Cell, Grid
from .engine import Pipeline

log = logging.getLogger("pympx_queues.pipeline.partitions")

__all__ = ["ClaimScheduler", "BatchInfo", "PartitionReport", "PartitionError",
           "run_partitioned", "merge_statistics", "Grid"]


def merge_statistics(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """etl_lib's rule: numeric counters with the same name are added."""
    if not b:
        return a
    for k, v in b.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            a[k] = a.get(k, 0) + v
        else:
            a.setdefault(k, v)
    return a


class ClaimScheduler(Scheduler):
    """Dispatch rows as bucket-batches so that no two running batches share a claim.

    ``batch_size``: rows per bucket-batch at most.  ``max_buffered``: the stated maximum of
    rows held back waiting for their cell to fill (default ``batch_size * table_size**2``,
    one full batch per cell); when it is reached the fullest cells whose claims are free
    go out early, partly filled (the early-flush policy).  Free workers take full and
    near-full cells (``near_full`` of a batch) first, largest first, then cells at least
    ``min_fill`` rows full, so a worker idles only while every waiting cell is nearly
    empty or conflicts with a running batch.  Leftovers go out when the source ends
    (:meth:`flush`).

    Called from the engine's coordinator loop only (no locking).
    """

    batch = True

    def __init__(self, grid: Grid, batch_size: int, *, max_buffered: Optional[int] = None,
                 near_full: float = 0.85, min_fill: Optional[int] = None) -> None:
        super().__init__(batch_size)
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 < near_full <= 1:
            raise ValueError(f"near_full must be in (0, 1], got {near_full!r}")
        self.grid = grid
        self.batch_size = batch_size
        n = grid.table_size
        self.max_buffered = max_buffered if max_buffered is not None else batch_size * n * n
        if self.max_buffered < 1:
            raise ValueError(f"max_buffered must be positive, got {max_buffered!r}")
        self.near_full = near_full
        #: a worker with nothing better to do takes a cell this full (default a quarter
        #: of a batch): fewer, fuller batches versus idle workers
        self.min_fill = max(1, batch_size // 4) if min_fill is None else max(1, min_fill)
        self._cells: Dict[Cell, Deque[Any]] = {}
        self._count = 0
        self._busy: Set[Hashable] = set()
        self._running: Dict[int, Tuple[Cell, Tuple[Hashable, ...], float, int]] = {}
        self._flushing = False
        # instrumentation (O(cells))
        self.histogram: Dict[Cell, int] = {}
        self.early_flushes = 0
        self.batches_started = 0
        self.peak_buffered = 0
        self._area = 0.0  # integral of running batches over time
        self._t_last = time.monotonic()
        self._t0 = self._t_last
        self.finished_batches: Deque["BatchInfo"] = deque()

    # ------------------------------------------------------------------ Scheduler
    def offer(self, item: Any) -> None:
        cell = item.metadata.get("cell") if hasattr(item, "metadata") else None
        if cell is None:
            cell = self.grid.cell(item.data)
            if hasattr(item, "metadata"):
                item.metadata["cell"] = cell
        q = self._cells.get(cell)
        if q is None:
            q = self._cells[cell] = deque()
        q.append(item)
        self._count += 1
        if self._count > self.peak_buffered:
            self.peak_buffered = self._count

    def take(self, free_workers: int) -> List[List[Any]]:
        if free_workers <= 0 or not self._count:
            return []
        size = self.batch_size
        cells = self._cells
        if self._flushing or self._count >= self.max_buffered:
            if not self._flushing:
                self.early_flushes += 1  # the buffer is at its stated maximum
            floors = [1]
        else:
            # Full and near-full cells first; then, so that no worker idles while rows
            # wait, cells at least ``min_fill`` full (work-conserving).
            floors = [max(1, int(size * self.near_full)), self.min_fill]
        groups: List[List[Any]] = []
        busy = self._busy
        claims_of = self.grid.claims
        now = time.monotonic()
        self._tick(now)
        for floor in floors:
            candidates = [(len(q), cell) for cell, q in cells.items() if len(q) >= floor]
            candidates.sort(key=lambda t: (-t[0], t[1]))
            for _n, cell in candidates:
                claims = claims_of(cell)
                if any(c in busy for c in claims):
                    continue
                q = cells[cell]
                group = [q.popleft() for _ in range(min(size, len(q)))]
                if not q:
                    del cells[cell]
                self._count -= len(group)
                busy.update(claims)
                self._running[id(group)] = (cell, claims, now, self._count)
                self.histogram[cell] = self.histogram.get(cell, 0) + len(group)
                self.batches_started += 1
                groups.append(group)
                if len(groups) >= free_workers:
                    return groups
        return groups

    def finished(self, group: List[Any]) -> None:
        entry = self._running.pop(id(group), None)
        if entry is None:
            return
        cell, claims, started, buffered = entry
        now = time.monotonic()
        self._tick(now)
        self._busy.difference_update(claims)  # P8: claims freed at once, no barrier
        self.finished_batches.append(BatchInfo(cell, len(group), now - started, buffered,
                                               group[0].key if group else None))

    def flush(self) -> None:
        self._flushing = True

    def buffered(self) -> int:
        return self._count

    # ------------------------------------------------------------------ figures
    def _tick(self, now: float) -> None:
        self._area += len(self._running) * (now - self._t_last)
        self._t_last = now

    def running_claims(self) -> Set[Hashable]:
        return set(self._busy)

    def mean_parallelism(self) -> float:
        """Mean number of batches running since the scheduler was made."""
        self._tick(time.monotonic())
        span = self._t_last - self._t0
        return self._area / span if span > 0 else 0.0

    def skewed(self, factor: float = 4.0) -> bool:
        """True when the fullest cell got more than ``factor`` times the mean row count
        of the cells that can hold rows."""
        if not self.histogram:
            return False
        n = self.grid.table_size
        usable = n * (n + 1) // 2 if self.grid.monopartite else n * n
        mean = sum(self.histogram.values()) / usable
        return max(self.histogram.values()) > factor * mean and sum(self.histogram.values()) \
            >= usable


@dataclass
class BatchInfo:
    """One bucket-batch: its cell, rows, seconds it ran, rows buffered when it started,
    and the key of its first row."""

    cell: Cell
    rows: int
    seconds: float
    buffered: int
    first_key: Optional[str] = None
    ok: bool = True
    error: Optional[str] = None


@dataclass
class PartitionReport:
    """What a partitioned run did."""

    rows_done: int = 0
    rows_failed: int = 0
    rows_from_journal: int = 0
    batches_committed: List[BatchInfo] = field(default_factory=list)
    batches_from_journal: int = 0  # committed by an earlier run of the same journal
    batches_failed: List[BatchInfo] = field(default_factory=list)
    statistics: Dict[str, Any] = field(default_factory=dict)
    mean_parallelism: float = 0.0
    early_flushes: int = 0
    peak_buffered: int = 0
    skewed: bool = False
    histogram: Dict[Cell, int] = field(default_factory=dict)
    state: str = "finished"


class PartitionError(Exception):
    """A partitioned run with ``fail_fast`` stopped at a failed batch; ``.report`` says
    exactly which bucket-batches committed and which failed."""

    def __init__(self, message: str, report: PartitionReport) -> None:
        super().__init__(message)
        self.report = report


class _BatchCall:
    """The worker side: runs the user's handler over one bucket-batch; returns one output
    per row (the first carries the batch's statistics).  Picklable for process workers."""

    def __init__(self, handler: Callable[[List[Any]], Any]) -> None:
        self.handler = handler

    def __call__(self, rows: List[Any]) -> List[Any]:
        stats = self.handler(rows)
        if stats is not None and not isinstance(stats, dict):
            raise TypeError(f"a partition handler returns None or a dict of statistics, "
                            f"got {type(stats).__name__}")
        return [{"stats": stats or {}, "rows": len(rows)}] + [None] * (len(rows) - 1)


class _AsyncBatchCall(_BatchCall):
    async def __call__(self, rows: List[Any]) -> List[Any]:  # type: ignore[override]
        stats = await self.handler(rows)
        if stats is not None and not isinstance(stats, dict):
            raise TypeError(f"a partition handler returns None or a dict of statistics, "
                            f"got {type(stats).__name__}")
        return [{"stats": stats or {}, "rows": len(rows)}] + [None] * (len(rows) - 1)


def run_partitioned(rows: Iterable[Any], handler: Callable[[List[Any]], Any], *,
                    grid: Optional[Grid] = None, table_size: int = 10,
                    ids: Optional[Callable[[Any], Tuple[Any, Any]]] = None,
                    monopartite: bool = False, batch_size: int = 1000, workers: int = 4,
                    kind: str = "thread", executor: Any = None,
                    max_buffered: Optional[int] = None, fail_fast: bool = True,
                    key: Optional[Callable[[Any], str]] = None,
                    journal_dir: Optional[str] = None, durability: str = "flush",
                    retry: Any = None, on_batch: Optional[Callable[[BatchInfo], None]] = None,
                    upstream_statistics: Optional[Dict[str, Any]] = None,
                    name: str = "partitions", progress: Optional[bool] = False,
                    ) -> PartitionReport:
    """Run ``handler(rows_of_one_bucket_batch)`` over ``rows`` so that no two running
    batches share a claim (P8), with no barrier between batches.

    ``handler`` returns None or a dict of numeric statistics (merged across batches).
    Rows are placed by ``grid`` (or ``Grid(table_size, ids, monopartite=...)``); a row
    whose ids cannot be placed stops the run with a clear error before it is accepted.
    ``fail_fast``: the first failed batch stops the run (running batches finish) and
    :class:`PartitionError` carries the report; otherwise failed rows are counted and the
    run goes on.  ``journal_dir``: durable; each bucket-batch is acknowledged when its
    worker returns, and a rerun over the same rows (same keys: ``key`` or the position)
    re-runs only rows of unacknowledged batches.  ``on_batch(BatchInfo)`` is called in
    the coordinator as each batch ends.
    """
    if grid is None:
        grid = Grid(table_size, ids, monopartite=monopartite)
    sched = ClaimScheduler(grid, batch_size, max_buffered=max_buffered)
    call = _AsyncBatchCall(handler) if kind == "async" else _BatchCall(handler)
    stage = Stage("partition", call, kind=kind, workers=workers, executor=executor,
                  scheduler=sched, retry=retry,
                  queue_size=sched.max_buffered)

    def placed(source: Iterable[Any]) -> Iterable[Any]:
        for i, row in enumerate(source):
            try:
                grid.cell(row)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"row {i}: {exc}") from None
            yield row

    report = PartitionReport(statistics=dict(upstream_statistics or {}))
    pipe = Pipeline(placed(rows), [stage], key=key, journal_dir=journal_dir,
                    durability=durability, name=name, keep_results=journal_dir is not None,
                    progress=progress)
    started: Dict[str, BatchInfo] = {}  # first key -> batch ended, result not yet seen

    def note_batches() -> None:
        while sched.finished_batches:
            info = sched.finished_batches.popleft()
            if info.first_key is not None:
                started[info.first_key] = info

    stopped = False
    for res in pipe.run():
        note_batches()
        value = res.value
        info = started.pop(res.key, None)
        if res.ok:
            is_head = isinstance(value, dict) and "stats" in value
            if res.from_journal:
                report.rows_from_journal += 1
                if is_head:
                    report.batches_from_journal += 1
            else:
                report.rows_done += 1
            if is_head:
                merge_statistics(report.statistics, value["stats"])
            if info is not None:
                report.batches_committed.append(info)
                if on_batch is not None:
                    on_batch(info)
        else:
            report.rows_failed += 1
            if info is not None:
                info.ok = False
                info.error = f"{res.error.type}: {res.error.message}" if res.error else None
                report.batches_failed.append(info)
                if on_batch is not None:
                    on_batch(info)
            if fail_fast and not stopped:
                stopped = True
                pipe.stop(drain=True)
    report.mean_parallelism = sched.mean_parallelism()
    report.early_flushes = sched.early_flushes
    report.peak_buffered = sched.peak_buffered
    report.histogram = dict(sched.histogram)
    report.skewed = sched.skewed()
    if report.skewed:
        log.warning("partitions %s: cell histogram is skewed (fullest cell %d rows of %d): "
                    "few batches can run at once; check the ids or the grid size", name,
                    max(report.histogram.values()), sum(report.histogram.values()))
    if stopped:
        report.state = "stopped"
        raise PartitionError(f"partitioned run {name!r} stopped at a failed bucket-batch "
                             f"({report.rows_failed} row(s) failed, "
                             f"{len(report.batches_committed)} batch(es) committed)", report)
    return report
