"""Partitioned stages: bucket-batches that share no claim run in parallel, no waves (P8).

Rows are buffered per cell (see :mod:`.claims`) and handed to free workers as
*bucket-batches*: up to ``batch_size`` rows of one cell.  A batch holds its cell's claims
from the moment it is taken until it ends; no other batch with a common claim starts
meanwhile, and a batch that ends frees its claims at once (no barrier: a straggler delays
only the cells that conflict with it).

Which cells run next (:meth:`ClaimScheduler.take`, one pass over the candidate cells):

* Candidates are the cells with ``min_fill * batch_size`` rows (a worker would idle
  otherwise), the cells of the most loaded claim once they hold that many rows between
  them (its batches run one at a time: its chain bounds the run, so it never idles),
  any cell once the source has ended (leftovers), and any cell when the buffer is at
  ``max_buffered`` and nothing can start otherwise (early flush: no cell is ready, or
  nothing runs).  A full buffer with batches running and ready cells takes ready cells:
  one hub's backlog must not push every other cell out in tiny batches.
* Fullest first (up to ``batch_size``), then the most loaded claims.  A cell passed over
  ``starve_after`` times (its claims held while a lower-ranked cell got a worker) gets
  priority, and the first such cell reserves its free claims until it can run (no
  starvation; one reservation at a time, so a straggler never stalls every cell).

Buffering is bounded: the stage's queue bound is ``max_buffered`` rows (default one
batch per cell, at most 1024 batches), so the source waits when the buffer is full.

The engine reports each batch's outcome (:meth:`ClaimScheduler.ended`): the scheduler
knows exactly which bucket-batches committed; with ``journal_dir`` each committed batch
is one ``B`` record of its rows' keys, so a restart re-runs only unacknowledged rows.
With ``fail_fast`` the first batch that fails for good stops new batches; the run halts
when the running ones end (their outcome is recorded), leaving the rest for a rerun.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set

from ._model import ErrorInfo, PipelineError, Retry, Scheduler, Stage, _accepts_ctx
from .claims import ClaimError, Grid, as_extractor, expected_skew, skew, start_end

log = logging.getLogger("pympx_queues.pipeline.partitions")

#: why a batch was taken
FULL, FILL, PRESSURE, END = "full", "fill", "pressure", "end"


@dataclass
class BatchInfo:
    """One bucket-batch: what ran, why, for how long, and how it ended."""

    id: int
    cell: Any
    rows: int
    keys: List[str]
    reason: str  # full | fill | pressure | end
    buffered: int  # rows buffered (all cells) when the batch was taken, its rows included
    running: int  # batches running once this one started, itself included
    started: float  # monotonic
    seconds: float = 0.0
    ok: Optional[bool] = None
    error: Optional[ErrorInfo] = None
    retrying: bool = False
    statistics: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PartitionReport:
    """What a partitioned stage did (O(cells) memory; batch lists only if kept)."""

    batches: int = 0
    committed: int = 0
    failed: int = 0
    rows_committed: int = 0
    rows_failed: int = 0
    rows_rejected: int = 0  # rows without valid claims (dead letters)
    reasons: Dict[str, int] = field(default_factory=dict)
    max_buffered: int = 0  # the bound
    peak_buffered: int = 0
    mean_running: float = 0.0
    peak_running: int = 0
    statistics: Dict[str, Any] = field(default_factory=dict)
    histogram: Dict[Any, int] = field(default_factory=dict)
    skew: float = 1.0
    tripped: bool = False
    error: Optional[BaseException] = None
    committed_batches: List[BatchInfo] = field(default_factory=list)
    failed_batches: List[BatchInfo] = field(default_factory=list)
    run: Any = None  # the pipeline's RunReport (run_partitioned)

    @property
    def mean_rows(self) -> float:
        return self.rows_committed / self.committed if self.committed else 0.0

    # the first partitions API's names
    @property
    def rows_done(self) -> int:
        return self.rows_committed

    @property
    def mean_parallelism(self) -> float:
        return self.mean_running

    @property
    def batches_committed(self) -> List[BatchInfo]:
        """Committed batches (kept with ``keep_batches=True``)."""
        return self.committed_batches

    @property
    def early_flushes(self) -> int:
        return self.reasons.get(PRESSURE, 0)


class PartitionError(PipelineError):
    """A partitioned run stopped early (fail-fast or an item without valid claims).

    ``report`` (a :class:`PartitionReport`) says which bucket-batches committed; the
    rows of the others are unfinished in the journal (a rerun does them) or dead letters.
    """

    def __init__(self, message: str, report: PartitionReport) -> None:
        super().__init__(message)
        self.report = report


def merge_statistics(into: Dict[str, Any], stats: Any) -> Dict[str, Any]:
    """Add the numeric values of ``stats`` into ``into`` (etl_lib's merge_summary; values
    that are not numbers are kept from the latest batch)."""
    if not stats:
        return into
    for k, v in stats.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            old = into.get(k, 0)
            into[k] = (old if isinstance(old, (int, float)) else 0) + v
        else:
            into[k] = v
    return into


class _Run:
    __slots__ = ("info", "claims", "released", "reported")

    def __init__(self, info: BatchInfo, claims: tuple) -> None:
        self.info = info
        self.claims = claims
        self.released = False
        self.reported = False


class ClaimScheduler(Scheduler):
    """A stage :class:`~pympx_queues.pipeline.Scheduler` running bucket-batches whose
    claims never overlap (see the module docstring for the policy).

    ``claims``: an extractor (:func:`~.claims.dict_claims`, :func:`~.claims.tuple_claims`,
    :func:`~.claims.bipartite`, :func:`~.claims.monopartite`, :class:`~.claims.Claims`),
    an etl_lib-style ``fn(row) -> (row_bucket, col_bucket)`` with ``table_size``, or None:
    bipartite claims of ``start``/``end`` keys or positions 0/1 on a ``table_size`` grid
    (default 10).
    ``batch_size``: most rows per batch.  ``max_buffered``: most rows held (default one
    batch per cell, capped at 1024 batches).  ``min_fill``: a cell this full (fraction of
    ``batch_size``) goes to a worker that would idle otherwise (1.0: only full batches
    before the buffer fills or the source ends).  ``fail_fast``: the first batch that
    fails for good (after its retries) stops new batches and halts the run once the
    running ones ended.  ``on_batch(info: BatchInfo)``: called as each batch ends.
    ``keep_batches``: keep every :class:`BatchInfo` in the report (failed ones are always
    kept).  ``max_running``: most batches started at once (:func:`partitioned_stage`
    sets the stage's workers: a process pool would queue a second batch per worker, which
    holds its claims while it waits).  ``hot_chain``: the cells of the most loaded claim
    may start once they hold ``min_fill`` rows between them (see :meth:`_hot_cells`; the
    etl_lib face turns it off: its waves take near-full cells only).  ``skew_warning``: warn at the end of the source when the busiest cell holds
    this many times the mean (and more than chance explains).
    """

    #: A batch taken starts at once: with fail_fast no batch starts after a failure.
    hand_ahead = False

    batch = True

    def __init__(self, claims: Any = None, batch_size: int = 1000, *,
                 table_size: Optional[int] = None, max_buffered: Optional[int] = None,
                 min_fill: float = 0.5, fail_fast: bool = True,
                 on_batch: Optional[Callable[[BatchInfo], Any]] = None,
                 keep_batches: bool = False, skew_warning: float = 3.0,
                 starve_after: int = 8, max_running: Optional[int] = None,
                 hot_chain: bool = True) -> None:
        self.extractor = as_extractor(claims, table_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PipelineError(f"batch_size must be an int >= 1, not {batch_size!r}")
        super().__init__(batch_size)  # size: the engine counts a running batch as its rows
        if not 0 < min_fill <= 1:
            raise PipelineError(f"min_fill must be in (0, 1], not {min_fill!r}")
        self.batch_size = batch_size
        cells = getattr(self.extractor, "cells", None) or 64
        if max_buffered is None:
            max_buffered = min(cells, 1024) * batch_size
        if isinstance(max_buffered, bool) or not isinstance(max_buffered, int) or \
                max_buffered < 1:
            raise PipelineError(f"max_buffered must be an int >= 1, not {max_buffered!r}")
        self.max_buffered = max_buffered
        self.min_fill = float(min_fill)
        self._fill_rows = max(1, math.ceil(self.min_fill * batch_size))  # a 'ready' cell
        self.fail_fast = bool(fail_fast)
        self.on_batch = on_batch
        self.keep_batches = bool(keep_batches)
        self.skew_warning = float(skew_warning)
        self.starve_after = int(starve_after)
        self.max_running = max_running
        self.hot_chain = bool(hot_chain)
        self._pipeline: Any = None
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._cells: Dict[Any, Deque[Any]] = {}
        self._claims_of: Dict[Any, tuple] = {}
        self._cells_of: Dict[Any, Set[Any]] = {}  # claim -> cells with rows that need it
        self._ready: Set[Any] = set()  # cells with >= _min_rows rows
        self._skips: Counter = Counter()
        self._load: Counter = Counter()  # claim -> rows buffered that need it
        self._held: Dict[Any, int] = {}  # claim -> batch id
        self._runs: Dict[int, _Run] = {}  # id(group) -> run
        self._buffered = 0
        self._dirty = True  # something changed since take() last found nothing to start
        self._flushed = False
        self._tripped = False
        self._next_id = 0
        self._running = 0
        self._area = 0.0  # integral of running batches over time
        self._t_first: Optional[float] = None
        self._t_last = 0.0
        self._histogram: Counter = Counter()
        self.report = PartitionReport(max_buffered=self.max_buffered)

    def attach(self, pipeline: Any, stage: Any) -> None:
        """Called by the engine when a run starts: the stage's queue bound must hold
        ``max_buffered`` rows (else the early flush triggers at the smaller bound)."""
        if self._runs:
            raise PipelineError("a ClaimScheduler serves one stage of one run at a time")
        self._pipeline = pipeline
        bound = getattr(stage, "queue_size", None)
        keep = self.max_buffered
        self._reset()
        if bound is not None and bound < keep:
            log.debug("stage %r: queue_size %d < max_buffered %d: buffering up to %d rows",
                      getattr(stage, "name", "?"), bound, keep, bound)
            self.report.max_buffered = bound
        self._bound = min(keep, bound) if bound is not None else keep

    _bound = 0

    @property
    def bound(self) -> int:
        """Rows buffered at which the early flush starts (max_buffered, or a smaller
        stage queue bound)."""
        return self._bound or self.max_buffered

    # ------------------------------------------------------------------ Scheduler
    def offer(self, item: Any) -> None:
        try:
            cell = self.extractor.cell(item.data)
        except Exception as exc:
            if not isinstance(exc, ClaimError):
                exc = ClaimError(f"claims of key {getattr(item, 'key', '?')!r}: "
                                 f"{type(exc).__name__}: {exc}")
            self.report.rows_rejected += 1
            if self.fail_fast and self._pipeline is not None and self._pipeline.running:
                # nothing more starts; the run halts once the running batches ended
                log.error("key %r has no valid claims: %s; fail-fast: no new batch "
                          "starts", getattr(item, "key", "?"), exc)
                if self.report.error is None:
                    self.report.error = exc
                self._trip()
            raise exc  # the engine makes the row a dead letter with this error
        q = self._cells.get(cell)
        if q is None:
            q = self._cells[cell] = deque()
            self._dirty = True
            if cell not in self._claims_of:
                self._claims_of[cell] = tuple(self.extractor.claims(cell))
            cells_of = self._cells_of
            for c in self._claims_of[cell]:
                got = cells_of.get(c)
                if got is None:
                    got = cells_of[c] = set()
                got.add(cell)
        q.append(item)
        load = self._load
        fill = self._fill_rows
        for c in self._claims_of[cell]:
            load[c] += 1
            if load[c] == fill:
                self._dirty = True  # a claim's chain may start (_hot_cells)
        if len(q) == self._fill_rows:
            self._ready.add(cell)
            self._dirty = True
        self._buffered += 1
        if self._buffered == self.bound:
            self._dirty = True
        if self._buffered > self.report.peak_buffered:
            self.report.peak_buffered = self._buffered
        if item.attempt == 1:
            self._histogram[cell] += 1

    def buffered(self) -> int:
        return self._buffered

    def flush(self) -> None:
        """The source ended: every buffered row may go, in batches of up to batch_size."""
        if not self._flushed:
            self._flushed = True
            self._dirty = True
            self._check_skew()

    def take(self, free_workers: int) -> List[List[Any]]:
        if self.max_running is not None:
            # a process pool queues a second group per worker; a queued group would hold
            # its claims while it waits
            free_workers = min(free_workers, self.max_running - self._running)
        if self._tripped or free_workers <= 0 or not self._buffered or not self._dirty:
            return []
        pressure = self._buffered >= self.bound
        if self._flushed or (pressure and (not self._running or not self._ready)):
            # the buffer is full and no cell is ready to go: any cell may (else the
            # source would wait for ever); while batches run and ready cells exist, a
            # full buffer takes ready cells (a batch that ends makes room too): a buffer
            # full of one hot claim's backlog must not send the other cells out in tiny
            # batches, each paying a batch's fixed cost
            pool: Iterable[Any] = self._cells
            reason = END if self._flushed else PRESSURE
        else:
            pool = self._ready
            reason = FILL
            hot = self._hot_cells()
            if hot:
                pool = self._ready | hot
            elif not pool:
                return []
        cells = self._cells
        skips = self._skips
        starve = self.starve_after
        load = self._load
        claims_of = self._claims_of
        # the fullest cells first (a batch's fixed cost is paid once per batch), among
        # equally full ones the most loaded claims (they bound the run: keep them busy);
        # cells that waited too long before everything
        size = self.batch_size
        cands = sorted(pool, key=lambda c: (skips[c] < starve,
                                            -min(len(cells[c]), size),
                                            -sum(load[x] for x in claims_of[c])))
        held = self._held
        reserved: Set[Any] = set()
        groups: List[List[Any]] = []
        blocked: List[Any] = []
        for cell in cands:
            claims = self._claims_of[cell]
            if any(c in held or c in reserved for c in claims):
                blocked.append(cell)
                if skips[cell] >= starve and not reserved:
                    # the longest-waiting cell keeps what it needs free until it runs
                    # (one at a time: a straggler must not make every cell wait)
                    reserved.update(claims)
                continue
            groups.append(self._start(cell, claims, reason))
            # a skip: a cell ranked above this one waited for its claims while this one
            # got a worker (counting every scan made each cell 'starving' within a few
            # batches, and starving cells went first however few rows they held)
            for other in blocked:
                skips[other] += 1
            blocked.clear()
            if len(groups) >= free_workers:
                break
        else:
            self._dirty = False  # nothing more starts until a cell, a claim or the mode changes
        return groups

    def _hot_cells(self) -> Set[Any]:
        """The cells of the most loaded claim when it is free and its cells hold at least
        ``min_fill`` rows between them (else nothing): that claim's batches run one at a
        time, so its chain bounds the run; it must never idle while it has work, even
        before any one of its cells is ready (a hot node's rows spread over every cell of
        its row and column)."""
        load = self._load
        if not self.hot_chain or not load or len(load) > 4096:  # 4096: Claims(fn), no grid
            return set()
        hot = max(load, key=load.__getitem__)
        if load[hot] < self._fill_rows or hot in self._held:
            return set()
        return self._cells_of.get(hot, set())

    def _start(self, cell: Any, claims: tuple, reason: str) -> List[Any]:
        q = self._cells[cell]
        n = min(self.batch_size, len(q))
        buffered = self._buffered
        group = [q.popleft() for _ in range(n)]
        self._buffered -= n
        if n == self.batch_size:
            reason = FULL
        if not q:
            del self._cells[cell]
            self._ready.discard(cell)
            for c in claims:
                self._cells_of[c].discard(cell)
        elif len(q) < self._fill_rows:
            self._ready.discard(cell)
        self._skips.pop(cell, None)
        load = self._load
        for c in claims:
            load[c] -= n
            if not load[c]:
                del load[c]
        now = time.monotonic()
        self._tick(now)
        self._running += 1
        bid = self._next_id
        self._next_id += 1
        info = BatchInfo(bid, cell, n, [g.key for g in group], reason, buffered,
                         self._running, now)
        for c in claims:
            self._held[c] = bid
        self._runs[id(group)] = _Run(info, claims)
        rep = self.report
        rep.batches += 1
        rep.reasons[reason] = rep.reasons.get(reason, 0) + 1
        if self._running > rep.peak_running:
            rep.peak_running = self._running
        return group

    def finished(self, group: List[Any]) -> None:
        """A batch ended: its claims are free at once."""
        run = self._runs.get(id(group))
        if run is None or run.released:
            return
        run.released = True
        self._dirty = True
        for c in run.claims:
            if self._held.get(c) == run.info.id:
                del self._held[c]
        self._tick(time.monotonic())
        self._running -= 1
        if run.reported:
            del self._runs[id(group)]
        self._maybe_halt()

    def ended(self, group: List[Any], ok: bool, outputs: Optional[List[Any]],
              error: Optional[ErrorInfo], seconds: float, retrying: bool = False) -> None:
        """The engine's report of a batch's outcome (after its journal records)."""
        run = self._runs.get(id(group))
        if run is None or run.reported:
            return
        run.reported = True
        if run.released:
            del self._runs[id(group)]
        info = run.info
        info.seconds = seconds
        info.ok = ok
        info.error = error
        info.retrying = retrying
        rep = self.report
        if ok:
            stats = _batch_statistics(outputs)
            if stats:
                info.statistics = stats
                merge_statistics(rep.statistics, stats)
            rep.committed += 1
            rep.rows_committed += info.rows
            if self.keep_batches:
                rep.committed_batches.append(info)
        else:
            rep.failed += 1
            rep.rows_failed += info.rows
            rep.failed_batches.append(info)
            if self.fail_fast and not retrying:
                log.error("bucket-batch %d (cell %r, %d rows) failed: %s; fail-fast: no new "
                          "batch starts", info.id, info.cell, info.rows, error)
                if rep.error is None:
                    rep.error = PartitionError(
                        f"bucket-batch {info.id} (cell {info.cell!r}, {info.rows} rows) "
                        f"failed: {error}", rep)
                self._trip()
        if self.on_batch is not None:
            try:
                self.on_batch(info)
            except Exception as exc:
                log.exception("on_batch callback raised; halting after the running batches")
                if rep.error is None:
                    rep.error = exc
                self._trip()
        self._maybe_halt()

    # ------------------------------------------------------------------ helpers
    def _trip(self) -> None:
        self._tripped = True
        self.report.tripped = True
        self._maybe_halt()

    def _maybe_halt(self) -> None:
        if self._tripped and self._running == 0 and self._pipeline is not None and \
                self._pipeline.running:
            self._pipeline.stop(drain=False)  # nothing runs: nothing is abandoned

    def _tick(self, now: float) -> None:
        if self._t_first is None:
            self._t_first = now
        else:
            self._area += self._running * (now - self._t_last)
        self._t_last = now

    def _check_skew(self) -> None:
        hist = self._histogram
        cells = getattr(self.extractor, "cells", None) or len(hist)
        counts = list(hist.values()) + [0] * max(cells - len(hist), 0)
        rows = sum(counts)
        s = skew(counts)
        self.report.skew = s
        if rows >= 10 * len(counts) and s > max(self.skew_warning, expected_skew(rows, len(counts))):
            top = ", ".join(f"{c!r}: {n}" for c, n in hist.most_common(3))
            log.warning("cell histogram is skewed: the busiest cell holds %.1fx the mean "
                        "(%d rows over %d cells; busiest %s): those rows run one batch at "
                        "a time; a larger table_size or other claims spread them",
                        s, rows, len(counts), top)

    def snapshot(self) -> PartitionReport:
        """The report so far (mean running batches, histogram filled in)."""
        rep = self.report
        if self._t_first is not None and self._t_last > self._t_first:
            rep.mean_running = self._area / (self._t_last - self._t_first)
        rep.histogram = dict(self._histogram)
        if not self._flushed:
            counts = list(self._histogram.values())
            rep.skew = skew(counts) if counts else 1.0
        return rep

    def fullest(self) -> int:
        """Rows in the fullest cell (0 when nothing is buffered)."""
        return max(map(len, self._cells.values()), default=0)

    @property
    def tripped(self) -> bool:
        return self._tripped

    @property
    def running(self) -> int:
        """Batches running now."""
        return self._running

    def held_claims(self) -> Dict[Any, int]:
        """Claim -> id of the batch holding it (a copy)."""
        return dict(self._held)


def _batch_statistics(outputs: Optional[List[Any]]) -> Optional[Dict[str, Any]]:
    """A batch's counters: its first output when it is a dict and the others are None
    (what :func:`partitioned_stage` makes of a handler returning a dict)."""
    if not outputs or not isinstance(outputs[0], dict):
        return None
    if any(o is not None for o in outputs[1:]):
        return None
    return outputs[0]


# --------------------------------------------------------------------------- stage
class BatchCall:
    """A partitioned stage's handler: ``fn(rows)`` or ``fn(rows, ctxs)`` returning None,
    a dict of counters (merged across batches) or one output per row.  Picklable when
    ``fn`` is (process stages)."""

    def __init__(self, fn: Callable, takes_ctx: bool) -> None:
        self.fn = fn
        self.takes_ctx = takes_ctx

    def __call__(self, rows: List[Any], ctxs: Any) -> List[Any]:
        out = self.fn(rows, ctxs) if self.takes_ctx else self.fn(rows)
        n = len(rows)
        if out is None:
            return [None] * n
        if isinstance(out, dict):
            return [out] + [None] * (n - 1)
        if isinstance(out, (list, tuple)) and len(out) == n:
            return list(out)
        raise PipelineError(f"a partitioned handler returns None, a dict of counters or "
                            f"a list of {n} outputs, not {type(out).__name__}")


def partitioned_stage(name: str, handler: Callable, claims: Any = None, *,
                      batch_size: int = 1000,
                      workers: int = 4, kind: str = "thread",
                      table_size: Optional[int] = None, max_buffered: Optional[int] = None,
                      min_fill: float = 0.5, fail_fast: bool = True,
                      on_batch: Optional[Callable[[BatchInfo], Any]] = None,
                      keep_batches: bool = False, starve_after: int = 8,
                      retry: Optional[Retry] = None,
                      timeout: Optional[float] = None, executor: Any = None,
                      grid: Any = None, ids: Optional[Callable] = None,
                      monopartite: bool = False, **stage_kw: Any) -> Stage:
    """A :class:`Stage` whose handler gets bucket-batches (lists of rows) that share no
    claim with any other running batch.  ``handler(rows)`` (or ``handler(rows, ctxs)``)
    returns None, a dict of counters or one output per row.  The stage's scheduler is
    ``stage.scheduler`` (a :class:`ClaimScheduler`; its ``report`` after the run).
    The first API's ``grid=`` (same as ``claims``), ``ids=fn(row) -> (start, end)`` and
    ``monopartite=`` still work."""
    if grid is not None:
        if claims is not None:
            raise PipelineError("give claims= or grid=, not both")
        claims = grid
    if ids is not None or monopartite:
        if claims is not None:
            raise PipelineError("ids=/monopartite= build the claims: not with claims=")
        claims = Grid(table_size if table_size is not None else 10, ids,
                      monopartite=monopartite) if ids is not None else \
            start_end(table_size if table_size is not None else 10, monopartite=True)
    sched = ClaimScheduler(claims, batch_size, table_size=table_size,
                           max_buffered=max_buffered, min_fill=min_fill,
                           fail_fast=fail_fast, on_batch=on_batch, keep_batches=keep_batches,
                           starve_after=starve_after, max_running=workers)
    takes_ctx = _accepts_ctx(handler, name)
    if executor is not None:
        kind = "executor"
    return Stage(name, BatchCall(handler, takes_ctx), kind=kind, workers=workers,
                 queue_size=sched.max_buffered, retry=retry, timeout=timeout,
                 executor=executor, scheduler=sched, **stage_kw)


def run_partitioned(source: Any, handler: Callable, claims: Any = None, *,
                    batch_size: int = 1000,
                    workers: int = 4, kind: str = "thread", journal_dir: Optional[str] = None,
                    key: Optional[Callable] = None, durability: str = "flush",
                    name: str = "partitions", progress: Optional[bool] = False,
                    statistics: Optional[Dict[str, Any]] = None, stop_signals: bool = True,
                    upstream_statistics: Optional[Dict[str, Any]] = None,
                    **stage_kw: Any) -> PartitionReport:
    """Run ``handler`` over ``source``'s rows in bucket-batches (one partitioned stage)
    and return the :class:`PartitionReport`; raises :class:`PartitionError` (with the
    report) when the run stopped early.  ``statistics``: counters from upstream, merged
    into the report's statistics whether or not any row arrives.  Other keyword arguments
    go to :func:`partitioned_stage`."""
    from .engine import Pipeline

    if upstream_statistics:  # the first API's name
        statistics = merge_statistics(dict(statistics or {}), upstream_statistics)
    stage = partitioned_stage(name, handler, claims, batch_size=batch_size, workers=workers,
                              kind=kind, **stage_kw)
    sched: ClaimScheduler = stage.scheduler
    with Pipeline(source, [stage], key=key, journal_dir=journal_dir, durability=durability,
                  name=name, progress=progress, stop_signals=stop_signals) as p:
        run_report = p.run_all()
    rep = sched.snapshot()
    if statistics:
        rep.statistics = merge_statistics(dict(statistics), rep.statistics)
    rep.run = run_report
    if rep.error is not None:
        if isinstance(rep.error, PartitionError):
            raise rep.error
        raise PartitionError(f"partitioned run stopped: {rep.error}", rep) from rep.error
    return rep
