"""The coordinator: one event loop that admits items, dispatches them to the stages'
executors, journals their progress and streams their results (DESIGN.md section 7).

Everything here runs on the coordinator's event loop, single-threaded, except the public
thread-safe calls (:meth:`Pipeline.stop`, :meth:`Pipeline.stats`, the state calls),
which hand over to the loop.  Workers never write the journal; only this loop does.

Flow of an item: the source yields it; it gets a key; a done key is skipped (P3); it is
journaled as accepted (``A``) and offered to stage 0's scheduler.  A stage starts groups
while it has free workers; a finished group's outputs are journaled (``S``, or ``B`` for
a batch group, ``Y`` after the last stage) and move to the next stage's buffer when it has
room, else they wait (holding a worker slot of their stage: backpressure, P4).  A failed
attempt is journaled (``E``), retried after its backoff, then dead-lettered (``L``).

A process stage first in line (default scheduler, handler without ``ctx``, a plain
iterable source) takes the source in *lots* instead: a slice of the source admitted in
one step (``A`` records in one append), handed to the runner as one object, and its
successes accounted for per reply message (one ``B`` record); an item becomes an
:class:`ItemContext` only when it fails, comes back on a stop, moves on to a next stage
or goes to a listener (see ``_offer_lot``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue as _queue
import signal
import threading
import time
import traceback
from collections import deque
from typing import Any, AsyncIterator, Callable, Deque, Dict, Iterator, List, Optional

from ._keys import KeySet, close_keys
from ._model import (EncodeError, ErrorInfo, FifoScheduler, ItemContext, ItemResult,
                     PipelineError, PipelineStalled, Refill, RunReport, Stage, StageStats,
                     StageTimeout, _is_async_iterable)

log = logging.getLogger("pympx_queues.pipeline")

_DONE = object()  # end of the result stream (run() / arun())


class _Halt(Exception):
    pass


#: Most items a lot takes from the source at once (see Pipeline._feed_lots), in steps
#: of PULL_STEP items, and no longer than PULL_SECONDS when the source is slow.
LOT_ADMIT = 4096
PULL_STEP = 64
PULL_SECONDS = 0.005


class _Lot:
    """Items admitted together for a process stage (see Pipeline._offer_lot): their
    data, keys (None: by position), source positions and admission numbers."""

    __slots__ = ("datas", "keys", "indices", "seqs", "admitted", "started")

    def __init__(self, datas: List[Any], keys: Optional[List[str]], indices: Any,
                 seqs: Any) -> None:
        self.datas, self.keys, self.indices, self.seqs = datas, keys, indices, seqs
        self.admitted = self.started = 0.0

    def key(self, i: int) -> str:
        keys = self.keys
        return keys[i] if keys is not None else str(self.indices[i])


class _Keyed:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


class _StageRun:
    """A stage's live state during a run (O(workers + queue_size) items)."""

    __slots__ = ("stage", "index", "sched", "runner", "running", "blocked", "stats",
                 "retrying", "last", "futs", "slots", "lot_items")

    def __init__(self, stage: Stage, index: int, last: bool) -> None:
        self.stage = stage
        self.index = index
        self.sched = stage.scheduler if stage.scheduler is not None else \
            FifoScheduler(stage.batch_size)
        self.runner: Any = None
        self.running = 0  # groups holding a worker
        self.blocked: Deque[ItemContext] = deque()  # done here, waiting for room next
        self.retrying = 0
        self.stats = StageStats()
        self.last = last
        self.futs: Dict[Any, Any] = {}  # running future -> (group, timer, started)
        self.slots = stage.workers  # groups running at once (a runner may pipeline more)
        self.lot_items = 0  # items handed to the runner in lots, not ended yet

    def queued(self) -> int:
        """Items waiting for this stage: buffered, waiting for a retry, or handed to a
        runner that holds more groups than it has workers (they wait there for a worker,
        and count against the stage's queue_size)."""
        extra = self.running + self.lot_items - self.stage.workers
        return self.sched.buffered() + self.retrying + (extra if extra > 0 else 0)


class Pipeline:
    """A source and stages, run by one coordinator; durable with ``journal_dir``.

    See ``docs/pipelines.md`` and ``docs/dev/pipeline-api.md`` for the full contract.
    """

    def __init__(self, source: Any, stages: List[Stage], *, key: Optional[Callable] = None,
                 journal_dir: Optional[str] = None, durability: str = "flush",
                 codec: Any = None, name: str = "pipeline", ordered: bool = False,
                 on_complete: Optional[Callable[[ItemResult], Any]] = None,
                 on_stage_complete: Optional[Callable[[str, str, float, bool], Any]] = None,
                 progress: Optional[bool] = None, keep_results: bool = False,
                 stop_signals: bool = True, prefetch: int = 0) -> None:
        if isinstance(stages, Stage):
            stages = [stages]
        stages = list(stages)
        if not stages:
            raise PipelineError("a pipeline needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise PipelineError(f"stage names must be unique: {names}")
        for s in stages:
            if not isinstance(s, Stage):
                raise PipelineError(f"stages must be Stage objects, not {s!r}")
            s.check()
        if not (isinstance(source, Refill) or _is_async_iterable(source)
                or hasattr(source, "__iter__")):
            raise PipelineError("source must be an iterable, an async iterable or a Refill")
        if key is not None and not callable(key):
            raise PipelineError("key must be a callable item -> str")
        if codec is not None and not (hasattr(codec, "encode") and hasattr(codec, "decode")):
            raise PipelineError("codec needs encode(value) and decode(json) methods")
        self.source = source
        self.stages = stages
        self.key = key
        self.name = name
        self.ordered = bool(ordered)
        self.on_complete = on_complete
        self.on_stage_complete = on_stage_complete
        self.progress = progress
        self.keep_results = bool(keep_results)
        self.stop_signals = stop_signals
        self.prefetch = int(prefetch)
        self.journal_dir = journal_dir
        self.durability = durability
        self.codec = codec
        self._journal: Any = None
        if journal_dir is not None:
            from .journal import PipelineJournal

            self._journal = PipelineJournal(journal_dir, name, durability=durability,
                                            codec=codec, stages=names,
                                            keep_results=self.keep_results)
        else:
            from .journal import check_durability

            check_durability(durability)
        self._state: Dict[str, Any] = {}
        self._state_loaded = False
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._running = False
        self._stop_request: Optional[bool] = None  # None, or drain flag
        self._report = RunReport(stages={s.name: StageStats() for s in stages})
        self._runs: List[_StageRun] = []
        self._error: Optional[BaseException] = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ public API
    @property
    def running(self) -> bool:
        """True from the start of run()/run_all()/arun() until the run has ended."""
        return self._running

    @property
    def report(self) -> RunReport:
        """The report of the current or last run (see :meth:`stats` for a copy)."""
        return self._report

    def stats(self) -> RunReport:
        """A snapshot of the counters; thread-safe, callable from any thread."""
        r = self._report
        out = RunReport(stages={}, accepted=r.accepted, done=r.done, dead=r.dead,
                        skipped_done=r.skipped_done, duplicate_keys=r.duplicate_keys,
                        resumed=r.resumed, in_flight=r.in_flight, state=r.state,
                        elapsed=(time.monotonic() - self._t0) if self._running
                        else r.elapsed)
        for sr in list(self._runs) or []:
            st = StageStats(**sr.stats.__dict__)
            # handed over, not started
            extra = max(sr.running + sr.lot_items - sr.stage.workers, 0)
            st.in_flight = sum(len(v[0]) for v in list(sr.futs.values())) + \
                sr.lot_items - extra
            st.queued = sr.sched.buffered() + len(sr.blocked) + sr.retrying + extra
            st.rate = st.done / out.elapsed if out.elapsed > 0 else 0.0
            out.stages[sr.stage.name] = st
        if not out.stages:
            out.stages = {n: StageStats(**s.__dict__) for n, s in r.stages.items()}
        return out

    def stop(self, drain: bool = True) -> None:
        """Stop taking new items; ``drain`` finishes the admitted ones, else they are
        abandoned (threads see ``ctx.cancelled``, process workers are killed).  The
        journal is closed cleanly; the next run resumes.  Thread-safe; callable from
        callbacks and handlers."""
        with self._lock:
            if self._stop_request is None or (self._stop_request and not drain):
                self._stop_request = bool(drain)
            loop = self._loop
        if loop is None:
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:  # from a callback or an async handler: nothing new starts after this
            self._on_stop()
            return
        try:
            loop.call_soon_threadsafe(self._on_stop)
        except RuntimeError:  # loop closed: the run is over
            pass

    def wake(self) -> None:
        """Offer the free workers to the stages' schedulers again.  Thread-safe.  A
        scheduler whose ``waiting()`` named something it waits for calls this once that
        happened (else the engine asks it again only when an item ends or arrives)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # loop closed: the run is over
            pass

    def set_state(self, name: str, value: Any) -> None:
        """Store a JSON value under ``name`` (journaled: kept across runs and crashes)."""
        if not isinstance(name, str) or not name:
            raise ValueError("state name must be a non-empty str")
        self._load_state()
        if self._journal is not None:
            self._journal.write_state(name, value)
        self._state[name] = value

    def get_state(self, name: str) -> Any:
        self._load_state()
        return self._state.get(name)

    def clear_state(self, name: str) -> None:
        self._load_state()
        if self._journal is not None:
            self._journal.clear_state(name)
        self._state.pop(name, None)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Abandon a run in progress and close the journal."""
        if self._running:
            self.stop(drain=False)
            t = getattr(self, "_thread", None)
            if t is not None and t is not threading.current_thread():
                t.join(30)
        if self._journal is not None:
            self._journal.close()

    def run(self) -> Iterator[ItemResult]:
        """Run in a coordinator thread; yield each item's result as it ends.  Leaving the
        loop early abandons the run (``stop(drain=False)``)."""
        results: "_queue.SimpleQueue" = _queue.SimpleQueue()
        self._start_thread(results.put)
        restore = self._install_signals()
        try:
            while True:
                try:
                    r = results.get(timeout=0.5)
                except _queue.Empty:
                    continue
                if r is _DONE:
                    break
                self._released()
                yield r
        finally:
            if self._running:
                self.stop(drain=False)
            self._thread.join()
            restore()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def run_all(self) -> RunReport:
        """Run to the end; results go to the callbacks only.  Returns the report."""
        self._start_thread(None)
        restore = self._install_signals()
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            restore()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._report

    async def arun(self) -> AsyncIterator[ItemResult]:
        """:meth:`run` on the caller's event loop."""
        q: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._main(q.put_nowait, detach=True))
        try:
            while True:
                r = await q.get()
                if r is _DONE:
                    break
                self._released()
                yield r
        finally:
            if not task.done():
                self.stop(drain=False)
            await task
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    async def arun_all(self) -> RunReport:
        await self._main(None, detach=True)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._report

    # ------------------------------------------------------------------ plumbing
    def _start_thread(self, emit: Optional[Callable]) -> None:
        if self._running:
            raise PipelineError(f"pipeline {self.name!r} is already running")
        self._running = True  # set before the thread starts (stop() sees it)

        def target() -> None:
            try:
                asyncio.run(self._main(emit))
            except BaseException as exc:  # pragma: no cover - reported to the caller
                self._error = exc
                self._running = False
                if emit is not None:
                    emit(_DONE)

        self._thread = threading.Thread(target=target, name=f"pipeline-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _install_signals(self) -> Callable[[], None]:
        if not self.stop_signals or threading.current_thread() is not threading.main_thread():
            return lambda: None
        saved = {}

        def handler(signum: int, frame: Any) -> None:
            drain = self._stop_request is None  # a second signal abandons
            log.warning("pipeline %r: %s: %s", self.name, signal.Signals(signum).name,
                        "stopping after the items in flight" if drain else
                        "abandoning the items in flight")
            self.stop(drain=drain)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                saved[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):  # pragma: no cover
                pass

        def restore() -> None:
            for sig, old in saved.items():
                signal.signal(sig, old)
        return restore

    def _released(self) -> None:
        """A streamed result was taken by the consumer: room for one more item."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._release_one)
            except RuntimeError:
                pass

    def _release_one(self) -> None:
        self._live -= 1
        self._wake_feeder()

    def _load_state(self) -> None:
        if self._state_loaded:
            return
        if self._journal is not None:
            self._journal.open()
            self._state = dict(self._journal.replay.states)
        self._state_loaded = True

    # ------------------------------------------------------------------ the run
    async def _main(self, emit: Optional[Callable], detach: bool = False) -> None:
        if detach:
            if self._running:
                raise PipelineError(f"pipeline {self.name!r} is already running")
            self._running = True
        loop = asyncio.get_running_loop()
        self._t0 = time.monotonic()
        self._lots: Optional[_StageRun] = None
        self._lot_it: Optional[Iterator[Any]] = None
        self._lot_error: Optional[BaseException] = None
        self._pull_due = False
        self._emit_fn = emit
        self._live = 0
        # P4 in items (rows): a stage holds up to queue_size buffered items plus workers
        # running groups of up to group_size(s) items each (a batch is its rows, not one).
        self._cap = sum(s.queue_size + s.workers * group_size(s) for s in self.stages) + \
            self.prefetch
        self._seq = 0
        self._next_out = 0
        self._held: Dict[int, ItemResult] = {}
        self._feeder_wait: Optional[asyncio.Future] = None
        self._pump_due = False
        self._soon = loop.call_soon
        self._listening = emit is not None or self.on_complete is not None or self.ordered
        self._idle_wait: Optional[asyncio.Future] = None
        self._source_done = False
        self._stalled: Optional[PipelineStalled] = None
        self._stall_check_due = False
        self._halted = False
        self._seen: Optional[KeySet] = KeySet(
            spill_dir=self._journal.directory if self._journal is not None else None,
            name=self.name) if self.key is not None else None  # P4: bounded, spills
        self._report = rep = RunReport(stages={s.name: StageStats() for s in self.stages},
                                       state="running")
        self._runs = [_StageRun(s, i, i == len(self.stages) - 1)
                      for i, s in enumerate(self.stages)]
        for sr in self._runs:
            rep.stages[sr.stage.name] = sr.stats
        progress = None
        try:
            journal = self._journal
            self._replay = None
            if journal is not None:
                journal.open(fresh=True)
                self._replay = journal.replay
                self._state = dict(journal.replay.states)
                self._state_loaded = True
            with self._lock:
                self._loop = loop
                if self._stop_request is not None:  # stop() before the loop existed
                    loop.call_soon(self._on_stop)
            # Process pools first: their workers fork before any stage thread exists.
            for sr in sorted(self._runs, key=lambda sr: sr.stage.kind != "process"):
                sr.runner = _make_runner(sr.stage, loop)
                if sr.runner.direct:
                    sr.runner.done = functools.partial(self._ended, sr)
                sr.slots = getattr(sr.runner, "slots", sr.stage.workers)
            self._lots = self._lot_stage()
            for sr in self._runs:  # a scheduler that acts on its run (partitions: fail-fast)
                attach = getattr(sr.sched, "attach", None)
                if attach is not None:
                    attach(self, sr.stage)
            from .progress import start_progress

            progress = start_progress(self, self.progress)
            resumed = self._resumed_items()
            feeder = loop.create_task(self._feed(resumed))
            try:
                await self._until_idle(feeder)
            finally:
                if not feeder.done():
                    feeder.cancel()
                    try:
                        await feeder
                    except (asyncio.CancelledError, Exception):
                        pass
            if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                raise feeder.exception()  # type: ignore[misc]
        except BaseException as exc:
            if not isinstance(exc, _Halt):
                self._error = exc
                rep.state = "failed"
        finally:
            self._abandon_all()
            for sr in self._runs:
                if sr.runner is not None:
                    try:
                        sr.runner.close(wait=not self._halted)
                    except Exception:  # pragma: no cover
                        log.exception("closing stage %r", sr.stage.name)
            if progress is not None:
                progress.close()
            if self._journal is not None:
                if (rep.state == "running" or self._stalled is not None) and \
                        not self._halted:
                    try:
                        await self._journal.drain()  # results released after their fsync
                    except Exception:  # pragma: no cover - reported by close below
                        log.exception("pipeline %r: journal drain", self.name)
                self._journal.end_run(finished=rep.state == "running" and
                                      self._source_done and self._stop_request is None)
            close_keys(self._seen)  # its scratch files
            if rep.state == "running":
                rep.state = ("finished" if self._stop_request is None else
                             "stopped" if self._stop_request else "halted")
            rep.elapsed = time.monotonic() - self._t0
            rep.in_flight = 0
            for sr in self._runs:
                sr.stats.in_flight = 0
                sr.stats.queued = sr.sched.buffered() + len(sr.blocked)
                sr.stats.rate = sr.stats.done / rep.elapsed if rep.elapsed > 0 else 0.0
            with self._lock:
                self._loop = None
                self._stop_request = None
            self._running = False
            if emit is not None:
                emit(_DONE)

    async def _until_idle(self, feeder: "asyncio.Task") -> None:
        loop = asyncio.get_running_loop()
        while True:
            if feeder.done() and feeder.exception() is not None:
                return
            if self._halted:
                return
            if self._stalled is not None:
                if self._stop_request:  # a drain ends stopped: the rest waits for a run
                    return
                raise self._stalled
            if self._source_done and self._nothing_in_flight():
                return
            self._idle_wait = loop.create_future()
            await self._idle_wait

    def _nothing_in_flight(self) -> bool:
        return self._report.in_flight == 0

    def _wake_idle(self) -> None:
        w = self._idle_wait
        if w is not None and not w.done() and (
                self._halted or (self._source_done and self._report.in_flight == 0)):
            w.set_result(None)

    def _wake_feeder(self) -> None:
        w = self._feeder_wait
        if w is not None and not w.done():
            w.set_result(None)

    def _on_stop(self) -> None:
        drain = self._stop_request
        if drain is None:
            return
        self._source_done = True  # admit nothing more
        self._wake_feeder()
        for sr in self._runs:  # what a runner holds but has not started comes back
            hold = getattr(sr.runner, "hold", None)
            if hold is not None:
                hold()
        if not drain:
            self._halted = True
            self._report.state = "halted"
        else:
            # Draining finishes what was admitted: a scheduler holding items back for a
            # fuller group (partitions) must release them now, or the drain never ends.
            for sr in self._runs:
                sr.sched.flush()
            self._pump()
        self._wake_idle()

    # ------------------------------------------------------------------ admission
    def _resumed_items(self) -> List[ItemContext]:
        replay = self._replay
        if replay is None:
            return []
        items = []
        for key, saved in replay.unfinished.items():
            if saved.dead is not None:
                continue
            ctx = ItemContext(key, saved.index, self._journal.decode(saved.data))
            ctx.stage_index = saved.stage
            ctx.pending = saved.pending
            items.append(ctx)
        self._report.resumed = len(items)
        return items

    def _room(self) -> bool:
        if self._live >= self._cap:
            return False
        s0 = self._runs[0]
        return s0.queued() < s0.stage.queue_size

    async def _wait_room(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._room() and not self._source_done:
            self._feeder_wait = loop.create_future()
            await self._feeder_wait

    async def _feed(self, resumed: List[ItemContext]) -> None:
        for ctx in resumed:
            await self._wait_room()
            if self._source_done:
                return
            # Not added to the seen keys: a replayed source offers it once more, and that
            # offer is the resumed item itself, not a duplicate (_offer_source skips it).
            self._admit(ctx, journal=False)
        source = self.source
        index = 0
        try:
            if isinstance(source, Refill):
                await self._feed_refill(source)
            elif _is_async_iterable(source):
                async for item in source:
                    await self._wait_room()
                    if self._source_done:
                        return
                    self._offer_source(item, index)
                    index += 1
            elif self._lots is not None:
                await self._feed_lots(iter(source))
            else:
                it = iter(source)
                while True:
                    if not self._room():
                        await self._wait_room()
                    if self._source_done:
                        return
                    try:
                        item = next(it)
                    except StopIteration:
                        break
                    self._offer_source(item, index)
                    index += 1
                    if not index & 63:
                        # A stage with a deep buffer (partitions) would otherwise take the
                        # whole source before the loop hears of a finished group: let
                        # completions in now and then, so workers never idle meanwhile.
                        await asyncio.sleep(0)
        finally:
            if not self._source_done:
                self._source_done = True
                for sr in self._runs:
                    sr.sched.flush()
                self._pump()
            self._wake_idle()

    async def _feed_refill(self, source: Refill) -> None:
        loop = asyncio.get_running_loop()
        index = 0
        while not self._source_done:
            await self._wait_room()
            if self._source_done:
                return
            want = source.count or max(self._cap - self._live, 1)
            try:
                if source.is_async:
                    batch = await source.callback(want)
                else:
                    batch = await loop.run_in_executor(None, source.callback, want)
            except (StopIteration, StopAsyncIteration):
                return
            if batch is Refill.END:
                return
            got = 0
            for item in (batch or ()):
                if item is Refill.END:
                    return
                # a Refill may return more than asked: the bound holds by waiting here
                await self._wait_room()
                if self._source_done:
                    return
                self._offer_source(item, index)
                index += 1
                got += 1
            if not got:
                await asyncio.sleep(source.idle)  # "nothing now" is not the end (P6)

    def _offer_source(self, item: Any, index: int) -> None:
        if self.key is None:
            key = str(index)
        else:
            key = self.key(item)
            if not isinstance(key, str):
                key = str(key)
        seen = self._seen
        if seen is not None and not seen.add(key):
            self._report.duplicate_keys += 1
            log.warning("pipeline %r: duplicate key %r from the source skipped",
                        self.name, key)
            return
        replay = self._replay
        if replay is not None:
            if key in replay.unfinished:
                saved = replay.unfinished[key]
                if saved.dead is not None:
                    self._skip_journaled(key, index, None, saved.dead)
                return  # resumed from the journal already (P1)
            if key in replay.done:
                self._skip_journaled(key, index, replay.done[key], None)
                return
        ctx = ItemContext(key, index, item)
        self._admit(ctx, journal=replay is not None)

    def _skip_journaled(self, key: str, index: int, value: Any, error: Any) -> None:
        """A key that ended in an earlier run (P3): skipped, or its result replayed."""
        rep = self._report
        rep.skipped_done += 1
        if not self.keep_results:
            return
        if error is None:
            value = self._journal.decode(value) if value is not None else None
        res = ItemResult(key, index, value, error is None,
                         ErrorInfo.from_json(error) if error is not None else None,
                         from_journal=True)
        self._live += 1
        seq = self._seq
        self._seq += 1
        self._emit(res, seq)

    def _admit(self, ctx: ItemContext, journal: bool) -> None:
        rep = self._report
        ctx._handle = self._seq  # admission order (ordered results)
        ctx.admitted = time.monotonic()
        self._seq += 1
        self._live += 1
        rep.accepted += 1
        rep.in_flight += 1
        if not journal and ctx.stage_index < len(self._runs):
            self._runs[ctx.stage_index].stats.rerun += 1  # resumed where it was (P2)
        if journal:
            try:
                self._journal.accept(ctx.key, ctx.index, ctx.data)
            except EncodeError as exc:
                self._dead(ctx, self._runs[0], ErrorInfo(
                    "EncodeError", str(exc), "", self._runs[0].stage.name, 0),
                    journal_ok=False)
                return
        sr = self._runs[ctx.stage_index] if ctx.stage_index < len(self._runs) else None
        if sr is None:  # resumed after its last stage (a crash before its Y record)
            self._finish(ctx, ctx.data, self._runs[-1])
            return
        ctx.stage = sr.stage.name
        self._offer(sr, ctx)
        self._pump()

    # ------------------------------------------------------------------ dispatch
    def _pump(self) -> None:
        """Dispatch soon: one pass per event-loop turn serves every completion, admission
        and retry of that turn (a pass per event was most of the per-item cost)."""
        if not self._pump_due:
            self._pump_due = True
            self._soon(self._pump_now)

    def _pump_now(self) -> None:
        self._pump_due = False
        if self._halted:
            return
        runs = self._runs
        started = False
        for sr in reversed(runs):
            # pull finished items of the previous stage into this stage's buffer
            if sr.index > 0:
                prev = runs[sr.index - 1]
                q = sr.stage.queue_size
                while prev.blocked and sr.queued() < q:
                    item = prev.blocked.popleft()
                    self._enter(sr, item)
            free = sr.slots - sr.running - len(sr.blocked)
            if free > 0 and sr.sched.buffered():
                groups = sr.sched.take(free)
                if not groups and sr.running == 0 and \
                        sr.sched.buffered() + sr.retrying >= sr.stage.queue_size:
                    # A scheduler waiting for more items than its queue holds would wait
                    # forever (its bound stops the source): let it release leftovers.
                    sr.sched.flush()
                    groups = sr.sched.take(free)
                for group in groups:
                    if group:
                        self._start(sr, group)
                        started = True
        if self._room():
            self._wake_feeder()
        if not started and self._report.in_flight and not self._stall_check_due and \
                self._idle_stages() and self._source_waits():
            self._stall_check_due = True
            self._soon(self._check_stall)

    # ------------------------------------------------------------------ stalls
    def _source_waits(self) -> bool:
        """No item comes from the source unless an item in flight moves: it has ended
        (or a stop), or it waits for room that only the items in flight can make (stage
        0 is full, or no result waits for the consumer to take it)."""
        if self._source_done:
            return True
        w = self._feeder_wait
        if w is None or w.done():
            return False
        s0 = self._runs[0]
        return s0.queued() >= s0.stage.queue_size or self._live <= self._report.in_flight

    def _idle_stages(self) -> bool:
        """Nothing runs in any stage and no retry is due (no event of ours is coming).
        Items a process stage holds in lots (sent or queued in its runner) count as
        running: their replies are coming."""
        for sr in self._runs:
            if sr.running or sr.retrying or sr.lot_items:
                return False
        return True

    def _check_stall(self) -> None:
        """Items are in flight, yet nothing runs, no retry is due and the source has
        ended (or it waits for room only they can make, or a drain waits for them).
        Unless a scheduler says what it waits for, or journal records are still being
        synced (their callbacks may stop the run: a tripped kill switch), nothing can
        ever change this state: the run fails with :class:`PipelineStalled` instead of
        waiting for ever; a draining stop ends the run stopped, the held items left for
        the next run (a tripped kill switch's scheduler refuses them by design, P7).
        Checked one loop turn after the pump that found it (completions already queued
        get their turn first)."""
        self._stall_check_due = False
        if self._halted or self._stalled is not None or not self._report.in_flight or \
                self._pump_due or not self._idle_stages() or not self._source_waits():
            return
        j = self._journal
        if j is not None and j.syncing():
            j.after_sync(self._pump)  # look again once the callbacks of the sync ran
            return
        for sr in self._runs:
            waiting = getattr(sr.sched, "waiting", None)
            what = waiting() if waiting is not None else None
            if what is None or what is False or what == "":
                continue
            if isinstance(what, (int, float)) and not isinstance(what, bool):
                self._loop.call_later(max(float(what), 0.0), self._pump)
            log.debug("pipeline %r: stage %r's scheduler waits for %r", self.name,
                      sr.stage.name, what)
            return
        self._stalled = self._stall_error()
        if self._stop_request:
            log.warning("%s", self._stalled)
        else:
            log.error("%s", self._stalled)
        w = self._idle_wait
        if w is not None and not w.done():
            w.set_result(None)

    def _stall_error(self) -> PipelineStalled:
        holds: Dict[str, int] = {}
        parts = []
        culprit = None  # a scheduler that holds items and starts none with workers free
        for sr in self._runs:
            n = sr.sched.buffered()
            free = max(sr.slots - sr.running - len(sr.blocked), 0)
            if n or sr.blocked:
                holds[sr.stage.name] = n + len(sr.blocked)
            if n and free:
                parts.append(f"stage {sr.stage.name!r}: its scheduler "
                             f"{type(sr.sched).__name__} holds {n} item(s) and starts "
                             f"none of them with {free} worker(s) free")
                if culprit is None:
                    culprit = sr
            if sr.blocked:
                nxt = self._runs[sr.index + 1].stage.name
                queued = f"{n} item(s) queued behind " if n and not free else ""
                parts.append(f"stage {sr.stage.name!r}: {queued}{len(sr.blocked)} finished "
                             f"item(s) wait for room in stage {nxt!r}")
        first = culprit
        if first is None:
            first = next((sr for sr in self._runs if sr.stage.name in holds), None)
        in_flight = self._report.in_flight
        if not parts:
            parts.append(f"{in_flight} item(s) in flight but no stage holds them")
        keep = ("they are not done: the journal keeps them and the next run resumes them"
                if self._journal is not None else "they are not done")
        if self._stop_request:  # a drain: what can finish has; the run ends stopped
            msg = (f"pipeline {self.name!r}: stop(drain=True) cannot finish the items "
                   f"held: " + "; ".join(parts) + f"; nothing runs and no retry is due: "
                   f"the run ends stopped; {keep}")
        else:
            why = ("the source has ended" if self._source_done else
                   "the source waits for room that only these items can make")
            msg = (f"pipeline {self.name!r} can never end: " + "; ".join(parts) +
                   f"; nothing runs, no retry is due and {why}.  A scheduler that waits "
                   f"for something says so in waiting() (docs/pipelines.md, custom "
                   f"schedulers); {keep}")
        return PipelineStalled(msg, first.stage.name if first is not None else None,
                               type(first.sched).__name__ if first is not None else None,
                               holds.get(first.stage.name, 0) if first is not None else 0,
                               holds)

    def _enter(self, sr: _StageRun, item: ItemContext) -> None:
        item.stage = sr.stage.name
        item.stage_index = sr.index
        item.attempt = 1
        self._offer(sr, item)

    def _offer(self, sr: _StageRun, item: ItemContext) -> None:
        """Give an item to the stage's scheduler.  A scheduler that refuses it (raises,
        e.g. partitions: a row without valid claims) makes it a dead letter with that
        error, as a handler's exception would (P5); the run goes on."""
        try:
            sr.sched.offer(item)
        except Exception as exc:
            self._dead(item, sr, ErrorInfo(type(exc).__name__, str(exc),
                                           traceback.format_exc(), sr.stage.name,
                                           item.attempt))

    def _start(self, sr: _StageRun, group: List[ItemContext]) -> None:
        stage = sr.stage
        runner = sr.runner
        now = time.monotonic()
        for item in group:
            item.stage = stage.name
            item.stage_index = sr.index
            item.started = now
            ev = item._cancelled
            if ev is not None and ev.is_set():
                ev.clear()
        sr.running += 1
        remote = runner.remote
        if remote and not stage.takes_ctx:
            ctx: Any = None  # handler(data): no context copied and pickled per item
            data = [g.data for g in group] if stage.batch else group[0].data
        elif stage.batch:
            data = [g.data for g in group]
            ctx = [g.for_worker() for g in group] if remote else list(group)
        else:
            data = group[0].data
            ctx = group[0].for_worker() if remote else group[0]
        if stage.sink and self._journal is not None:
            self._journal.pending(group, sr.index)
            if self._journal.fsync:  # the side effect starts once R is durable
                self._journal.after_sync(lambda: self._submit(sr, group, data, ctx, now))
                return
        self._submit(sr, group, data, ctx, now)

    def _submit(self, sr: _StageRun, group: List[ItemContext], data: Any, ctx: Any,
                now: float) -> None:
        if self._halted:
            return
        stage = sr.stage
        runner = sr.runner
        try:
            if runner.direct:  # the runner calls self._ended itself, no future per item
                fut = runner.start(data, ctx, group)
            else:
                fut = runner.submit(data, ctx)
        except Exception as exc:
            sr.running -= 1
            tb = traceback.format_exc()
            attempts = [item.attempt for item in group]
            for item in group:
                self._failed(sr, item, exc, ErrorInfo(type(exc).__name__, str(exc),
                             tb, stage.name, item.attempt))
            sr.sched.finished(group)
            self._group_ended(sr, group, False, None, ErrorInfo(
                type(exc).__name__, str(exc), tb, stage.name, attempts[0]), 0.0, attempts)
            return
        timer = None
        if stage.timeout is not None and not getattr(runner, "handles_timeout", False):
            timer = self._loop.call_later(stage.timeout, self._timed_out, sr, fut)
        sr.futs[fut] = (group, timer, now)
        if not runner.direct:
            fut.add_done_callback(lambda f, sr=sr: self._group_done(sr, f))

    def _timed_out(self, sr: _StageRun, fut: Any) -> None:
        entry = sr.futs.pop(fut, None)
        if entry is None:
            return
        group, _timer, started = entry
        sr.runner.abandon(fut, group, "timeout")
        sr.running -= 1
        sr.sched.finished(group)
        err = StageTimeout(f"stage {sr.stage.name!r}: attempt ran past its timeout of "
                           f"{sr.stage.timeout} s")
        attempts = [item.attempt for item in group]
        for item in group:
            item.cancelled.set()
            self._failed(sr, item, err, ErrorInfo("StageTimeout", str(err), "",
                                                 sr.stage.name, item.attempt),
                         seconds=time.monotonic() - started)
        self._group_ended(sr, group, False, None, ErrorInfo(
            "StageTimeout", str(err), "", sr.stage.name, attempts[0]),
            time.monotonic() - started, attempts)
        self._pump()
        self._wake_idle()

    def _group_done(self, sr: _StageRun, fut: Any) -> None:
        """A future-based runner's group ended (executor stages)."""
        if fut not in sr.futs:  # timed out or abandoned already
            if not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning
            return
        if fut.cancelled():
            outcome: Any = ("exc", PipelineError("cancelled"))
        elif fut.exception() is not None:
            outcome = ("exc", fut.exception())
        else:
            outcome = ("ok", fut.result())
        self._ended(sr, fut, outcome)

    def _ended(self, sr: _StageRun, handle: Any, outcome: Any) -> None:
        """A group ended with ``("ok", output)`` or ``("exc", exception)``; direct
        runners call this for each group, on the loop, never from inside ``start``."""
        entry = sr.futs.pop(handle, None)
        if entry is None:  # timed out or abandoned already
            return
        group, timer, started = entry
        if timer is not None:
            timer.cancel()
        sr.running -= 1
        sr.sched.finished(group)
        if outcome[0] == "back":  # handed over but never started (a stop): re-offered,
            for item in group:  # the scheduler decides whether it starts (P7)
                sr.sched.offer(item)
            self._pump()
            self._wake_idle()
            return
        seconds = time.monotonic() - started
        sr.stats.busy_seconds += seconds
        if sr.stage.batch:
            self._batch_done(sr, group, outcome, seconds)
        elif (outcome[0] == "ok" and not sr.runner.remote
              and getattr(sr.sched, "ended", None) is None):  # no one to tell: short way
            self._succeeded(sr, group[0], outcome[1], seconds)
        else:
            self._one_done(sr, group[0], outcome, seconds)
        if not self._pump_due:
            self._pump_due = True
            self._soon(self._pump_now)
        if self._source_done or self._halted:
            self._wake_idle()

    def _unpack(self, sr: _StageRun, outcome: Any, item_attempt: int) -> Any:
        """(ok, value_or_exc, ErrorInfo|None) from a runner's outcome."""
        kind, value = outcome
        if kind == "exc":
            exc = value
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return False, exc, ErrorInfo(type(exc).__name__, str(exc), tb,
                                         sr.stage.name, item_attempt)
        if sr.runner.remote:
            if value[0] == "ok":
                return True, value[1], None
            _tag, exc, tname, msg, tb = value
            return False, exc, ErrorInfo(tname, msg, tb, sr.stage.name, item_attempt)
        return True, value, None

    def _one_done(self, sr: _StageRun, item: ItemContext, outcome: Any, seconds: float) -> None:
        ok, value, err = self._unpack(sr, outcome, item.attempt)
        attempts = [item.attempt]
        if ok:
            self._succeeded(sr, item, value, seconds)
        else:
            self._failed(sr, item, value, err, seconds=seconds)
        self._group_ended(sr, [item], ok, [value] if ok else None, err, seconds, attempts)

    def _batch_done(self, sr: _StageRun, group: List[ItemContext], outcome: Any,
                    seconds: float) -> None:
        ok, value, err = self._unpack(sr, outcome, group[0].attempt)
        if ok and (not isinstance(value, (list, tuple)) or len(value) != len(group)):
            exc = PipelineError(f"stage {sr.stage.name!r}: a batch handler must return a "
                                f"list of {len(group)} outputs, got {type(value).__name__}"
                                f"{'' if not hasattr(value, '__len__') else ' of ' + str(len(value))}")
            ok, value, err = False, exc, ErrorInfo("PipelineError", str(exc), "",
                                                  sr.stage.name, group[0].attempt)
        attempts = [item.attempt for item in group]
        if not ok:
            for item in group:
                e = ErrorInfo(err.type, err.message, err.traceback, err.stage, item.attempt)
                self._failed(sr, item, value, e, seconds=seconds)
            self._group_ended(sr, group, False, None, err, seconds, attempts)
            return
        outputs = list(value)
        if self._journal is not None:
            try:
                self._journal.batch_done(group, sr.index, outputs, sr.last)
            except EncodeError as exc:
                err = ErrorInfo("EncodeError", str(exc), "", sr.stage.name, attempts[0])
                for item in group:
                    self._failed(sr, item, exc, ErrorInfo("EncodeError", str(exc), "",
                                                         sr.stage.name, item.attempt),
                                 seconds=seconds)
                self._group_ended(sr, group, False, None, err, seconds, attempts)
                return
        self._group_ended(sr, group, True, outputs, None, seconds, attempts)
        for item, out in zip(group, outputs):
            self._succeeded(sr, item, out, seconds, journaled=True)

    def _group_ended(self, sr: _StageRun, group: List[ItemContext], ok: bool,
                     outputs: Optional[List[Any]], err: Optional[ErrorInfo], seconds: float,
                     attempts: List[int]) -> None:
        """Tell a scheduler with an ``ended`` hook how a group ended (after its records
        are journaled): ``ok`` with its outputs, or failed with ``err``; ``retrying``: the
        failed items will be tried again (else they are dead letters, or the run halted).
        Partitions use it to know which bucket-batches committed and to fail fast."""
        ended = getattr(sr.sched, "ended", None)
        if ended is not None:
            retrying = not ok and any(item.attempt > a for item, a in zip(group, attempts))
            ended(group, ok, outputs, err, seconds, retrying)

    def _succeeded(self, sr: _StageRun, item: ItemContext, output: Any, seconds: float,
                   journaled: bool = False) -> None:
        stage = sr.stage
        if self._journal is not None and not journaled:
            try:
                if sr.last:
                    self._journal.done(item.key, output)
                else:
                    self._journal.stage_done(item.key, sr.index, output)
            except EncodeError as exc:
                self._failed(sr, item, exc, ErrorInfo("EncodeError", str(exc), "",
                                                     stage.name, item.attempt),
                             seconds=seconds)
                return
        sr.stats.done += 1
        item.stage_timings[stage.name] = seconds
        item.pending = False
        if self.on_stage_complete is not None:
            self._callback(self.on_stage_complete, item.key, stage.name, seconds, True)
        if sr.last:
            self._finish(item, output, sr, journaled=True)
            return
        item.data = output
        nxt = self._runs[sr.index + 1]
        if not sr.blocked and nxt.queued() < nxt.stage.queue_size:
            self._enter(nxt, item)
        else:
            sr.blocked.append(item)

    def _failed(self, sr: _StageRun, item: ItemContext, exc: Any, err: ErrorInfo,
                seconds: float = 0.0) -> None:
        stage = sr.stage
        sr.stats.failed_attempts += 1
        if self.on_stage_complete is not None:
            self._callback(self.on_stage_complete, item.key, stage.name, seconds, False)
        retry = stage.retry
        etype = type(exc) if isinstance(exc, BaseException) else None
        if isinstance(exc, EncodeError):
            retryable = False
        else:
            retryable = retry.retryable(etype, err.type)
        if self._journal is not None:
            self._journal.attempt_failed(item.key, sr.index, item.attempt, err)
        if self._halted:
            return
        if retryable and item.attempt < retry.max_attempts:
            sr.stats.retried += 1
            item.attempt += 1
            sr.retrying += 1
            delay = retry.delay(item.attempt - 1)
            self._loop.call_later(delay, self._retry_now, sr, item)
            return
        self._dead(item, sr, err)

    def _retry_now(self, sr: _StageRun, item: ItemContext) -> None:
        sr.retrying -= 1
        if self._halted:
            return
        self._offer(sr, item)
        self._pump()

    def _dead(self, item: ItemContext, sr: _StageRun, err: ErrorInfo,
              journal_ok: bool = True) -> None:
        sr.stats.dead += 1
        rep = self._report
        rep.dead += 1
        rep.in_flight -= 1
        if self._journal is not None:
            self._journal.dead(item.key, sr.index, err)
        log.warning("pipeline %r: key %r dead at stage %r after %d attempt(s): %s: %s",
                    self.name, item.key, sr.stage.name, item.attempt, err.type, err.message)
        res = ItemResult(item.key, item.index, None, False, err, dict(item.stage_timings),
                         metadata=item.metadata,
                         elapsed=time.monotonic() - item.admitted if item.admitted else 0.0)
        self._emit(res, item._handle)

    def _finish(self, item: ItemContext, output: Any, sr: _StageRun,
                journaled: bool = False) -> None:
        rep = self._report
        if not journaled and self._journal is not None:
            self._journal.done(item.key, output)
        rep.done += 1
        rep.in_flight -= 1
        if not self._listening:  # nobody takes results: no ItemResult per item
            j = self._journal
            if j is not None and j.fsync:
                j.after_sync(self._release_quietly)  # the item ends once durable
            else:
                self._release_quietly()
            return
        res = ItemResult(item.key, item.index, output, True, None, item.stage_timings,
                         metadata=item.metadata,
                         elapsed=time.monotonic() - item.admitted if item.admitted else 0.0)
        self._emit(res, item._handle)

    def _emit(self, res: ItemResult, seq: int) -> None:
        if self.ordered:
            self._held[seq] = res
            while self._next_out in self._held:
                r = self._held.pop(self._next_out)
                self._next_out += 1
                self._deliver(r)
        else:
            self._deliver(res)

    def _deliver(self, res: ItemResult) -> None:
        j = self._journal
        if j is not None and j.fsync:
            j.after_sync(lambda: self._deliver_now(res))  # results only once durable
        else:
            self._deliver_now(res)

    def _deliver_now(self, res: ItemResult) -> None:
        if self.on_complete is not None:
            self._callback(self.on_complete, res)
        if self._emit_fn is not None:
            self._emit_fn(res)  # _live drops when the consumer takes it
        else:
            self._live -= 1
            if self._feeder_wait is not None and self._room():
                self._wake_feeder()
        self._wake_idle()

    def _release_quietly(self) -> None:
        self._live -= 1
        if self._feeder_wait is not None and self._room():
            self._wake_feeder()
        self._wake_idle()

    def _callback(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.error("pipeline %r: callback %r raised; halting the run\n%s", self.name,
                      getattr(fn, "__qualname__", fn), traceback.format_exc())
            if self._error is None:
                self._error = exc
            self.stop(drain=False)

    # ------------------------------------------------------------------ lots
    # A process stage first in line, with the default scheduler and a handler that
    # takes no ctx, gets the source's items in lots: taken from the source in one step,
    # admitted with O(1) bookkeeping (per item only what keys, duplicates, resumes and
    # the journal need), handed to the runner as one object and accounted for per reply
    # message.  An item becomes an ItemContext only when it needs one: it failed (retry,
    # dead letter), came back (a stop), or goes on to a next stage or to a listener.
    def _lot_stage(self) -> Optional[_StageRun]:
        sr = self._runs[0]
        st = sr.stage
        if (st.kind == "process" and st.scheduler is None and type(sr.sched) is
                FifoScheduler and not st.batch and not st.sink and not st.takes_ctx
                and getattr(sr.runner, "start_lot", None) is not None):
            sr.runner.lot_done = functools.partial(self._lot_done, sr)
            sr.runner.lot_fail = functools.partial(self._lot_fail, sr)
            sr.runner.lot_back = functools.partial(self._lot_back, sr)
            sr.runner.lot_settled = self._lots_settled
            return sr
        return None

    def _lot_room(self, sr: _StageRun) -> int:
        """Items admissible now (P4: the same bound as one by one; items done here and
        waiting for room in the next stage hold theirs, as they hold workers there)."""
        return min(self._cap - self._live,
                   sr.stage.queue_size - sr.queued() - len(sr.blocked), LOT_ADMIT)

    async def _feed_lots(self, it: Iterator[Any]) -> None:
        """The feeder of a lot stage: the first lot, then whenever there is room.  A
        reply that frees room also takes the next lot (``_pull_lot``, soon after
        ``_release_many``: once per loop turn, no task switch per lot); this task waits
        for the end."""
        self._lot_it = it
        self._lot_index = 0
        try:
            while self._lot_it is not None:
                if not self._room():
                    await self._wait_room()
                if self._source_done or self._lot_it is None:
                    break
                self._pull_lot()
                await asyncio.sleep(0)  # completions and dispatch before the next lot
        finally:
            self._lot_it = None
        err, self._lot_error = self._lot_error, None
        if err is not None:
            raise err

    def _pull_lot(self) -> None:
        """Take the next lot from the source, as many items as there is room for; at
        the source's end (or its error) the feeder task finishes."""
        self._pull_due = False
        it = self._lot_it
        sr = self._lots
        if it is None or sr is None or self._source_done:
            return
        k = self._lot_room(sr)
        if k <= 0:
            return
        items: List[Any] = []
        ended = False
        try:
            # A slow source must not hold the loop (completions wait) nor the items it
            # gave (workers wait): take it in steps, and stop after PULL_SECONDS.
            until = time.monotonic() + PULL_SECONDS
            while len(items) < k:
                step = min(PULL_STEP, k - len(items))
                part = list(itertools.islice(it, step))
                items += part
                if len(part) < step:  # islice stops early only at the end
                    ended = True
                    break
                if time.monotonic() > until:
                    break
        except BaseException as exc:  # the source failed: the run fails with it
            self._lot_error = exc
            ended = True
        if items:
            self._offer_lot(sr, items, self._lot_index)
            self._lot_index += len(items)
        if ended:
            self._lot_it = None
            self._wake_feeder()

    def _offer_lot(self, sr: _StageRun, items: List[Any], index0: int) -> None:
        """Admit ``items`` (source positions ``index0...``) as one lot."""
        n = len(items)
        now = time.monotonic()
        key = self.key
        replay = self._replay
        rep = self._report
        if key is None and replay is None:  # keys by position, nothing journaled
            lot = _Lot(items, None, range(index0, index0 + n), range(self._seq, self._seq + n))
            self._seq += n
        else:
            seen = self._seen
            journal = self._journal
            # a first run has nothing to skip: no look-up per key then
            unfinished = replay.unfinished if replay is not None and replay.unfinished \
                else None
            done = replay.done if replay is not None and len(replay.done) else None
            datas: List[Any] = []
            keys: List[str] = []
            indices: List[int] = []
            seqs: List[int] = []  # admission numbers in source order (ordered results)
            for off, item in enumerate(items):
                i = index0 + off
                if key is None:
                    k = str(i)
                else:
                    k = key(item)
                    if not isinstance(k, str):
                        k = str(k)
                if seen is not None and not seen.add(k):
                    rep.duplicate_keys += 1
                    log.warning("pipeline %r: duplicate key %r from the source skipped",
                                self.name, k)
                    continue
                if unfinished is not None and k in unfinished:
                    saved = unfinished[k]
                    if saved.dead is not None:
                        self._skip_journaled(k, i, None, saved.dead)
                    continue  # resumed from the journal already (P1)
                if done is not None and k in done:
                    self._skip_journaled(k, i, done[k], None)
                    continue
                datas.append(item)
                keys.append(k)
                indices.append(i)
                seqs.append(self._seq)
                self._seq += 1
            if journal is not None and keys:
                bad = journal.accept_many(keys, indices, datas)  # one append for the lot
                if bad:  # data that cannot be journaled: a dead letter each, as one by one
                    next_seq = self._seq
                    for n, _exc in bad:
                        self._seq = seqs[n]  # _admit numbers it: its place in the source
                        self._admit(ItemContext(keys[n], indices[n], datas[n]), journal=True)
                    self._seq = next_seq
                    for n, _exc in reversed(bad):
                        del keys[n], indices[n], datas[n], seqs[n]
            lot = _Lot(datas, keys, indices, seqs)
        m = len(lot.datas)
        if not m:
            return
        lot.admitted = lot.started = now
        self._live += m
        rep.accepted += m
        rep.in_flight += m
        sr.lot_items += m
        sr.runner.start_lot(lot)

    def _lot_item(self, sr: _StageRun, lot: "_Lot", i: int) -> ItemContext:
        """Item ``i`` of a lot as an ItemContext of ``sr`` (attempt 1)."""
        ctx = ItemContext(lot.key(i), lot.indices[i], lot.datas[i])
        ctx._handle = lot.seqs[i]
        ctx.admitted = lot.admitted
        ctx.started = lot.started
        ctx.stage = sr.stage.name
        ctx.stage_index = sr.index
        return ctx

    def _lot_done(self, sr: _StageRun, lot: "_Lot", first: int, outputs: List[Any],
                  errors: List[Any]) -> None:
        """Items ``first...`` of ``lot`` ran: ``outputs`` in order (None for a failed
        one), ``errors`` the failed ones as (position in outputs, error tuple)."""
        seconds = time.monotonic() - lot.started
        m = len(outputs)
        sr.lot_items -= m
        if errors:
            bad = {pos for pos, _ in errors}
            good = [first + pos for pos in range(m) if pos not in bad]
            outs = [outputs[i - first] for i in good]
        else:
            good, outs = range(first, first + m), outputs
        g = len(good)
        if g:
            sr.stats.busy_seconds += seconds * g
            journaled = True
            if self._journal is not None:
                try:
                    self._journal.batch_done([_Keyed(lot.key(i)) for i in good], sr.index,
                                             outs, sr.last)
                except EncodeError:  # one by one: only the outputs that cannot fail
                    journaled = False
            if sr.last and journaled and not self._listening and \
                    self.on_stage_complete is None:  # nobody hears of each: in bulk
                sr.stats.done += g
                rep = self._report
                rep.done += g
                rep.in_flight -= g
                j = self._journal
                if j is not None and j.fsync:  # the items end once durable
                    j.after_sync(functools.partial(self._release_many, g))
                else:
                    self._release_many(g)
            else:
                for i, out in zip(good, outs):
                    self._succeeded(sr, self._lot_item(sr, lot, i), out, seconds,
                                    journaled=journaled)
        for pos, value in errors:
            item = self._lot_item(sr, lot, first + pos)
            ok, exc, err = self._unpack(sr, ("ok", value), item.attempt)
            self._failed(sr, item, exc, err, seconds=seconds)
        self._lot_ended()

    def _lot_fail(self, sr: _StageRun, lot: "_Lot", i: int, exc: BaseException) -> None:
        """Item ``i`` of ``lot`` failed in the coordinator's eyes (its worker died, it
        ran past its timeout)."""
        sr.lot_items -= 1
        item = self._lot_item(sr, lot, i)
        _ok, exc, err = self._unpack(sr, ("exc", exc), item.attempt)
        self._failed(sr, item, exc, err, seconds=time.monotonic() - lot.started)
        self._lot_ended()

    def _lot_back(self, sr: _StageRun, lot: "_Lot", start: int, stop: int) -> None:
        """Items ``start:stop`` of ``lot`` did not start (a stop; or data that does not
        pickle): each goes to the scheduler as an item of its own, which starts it only
        if the run still wants it (a drain does, a halt does not: P7)."""
        sr.lot_items -= stop - start
        for i in range(start, stop):
            sr.sched.offer(self._lot_item(sr, lot, i))
        self._lot_ended()

    def _lot_ended(self) -> None:
        self._pump()
        if self._source_done or self._halted:
            self._wake_idle()

    def _lots_settled(self) -> None:
        """The runner handled a reply: the next lot now if its items freed room."""
        if self._pull_due:
            self._pull_lot()

    def _release_many(self, n: int) -> None:
        self._live -= n
        if self._lot_it is not None:
            if not self._pull_due:  # the next lot once this turn's replies are in
                self._pull_due = True
                self._soon(self._pull_lot)
        elif self._feeder_wait is not None and self._room():
            self._wake_feeder()
        self._wake_idle()

    def _abandon_all(self) -> None:
        for sr in self._runs:
            for fut, (group, timer, _started) in list(sr.futs.items()):
                if timer is not None:
                    timer.cancel()
                for item in group:
                    item.cancelled.set()
                try:
                    sr.runner.abandon(fut, group, "halt")
                except Exception:  # pragma: no cover
                    log.exception("abandoning a group of stage %r", sr.stage.name)
            sr.futs.clear()


def group_size(stage: Stage) -> int:
    """Most items in one group (one handler call) of ``stage``: its scheduler's ``size``
    (a batch stage's ``batch=N``, a partitioned stage's ``batch_size``), else 1."""
    size = getattr(stage.scheduler, "size", None) if stage.scheduler is not None else None
    return max(int(size if size is not None else stage.batch_size), 1)


def _make_runner(stage: Stage, loop: asyncio.AbstractEventLoop) -> Any:
    kind = stage.kind
    if kind == "async":
        from .kind_async import AsyncRunner

        return AsyncRunner(stage, loop)
    if kind == "thread":
        from .kind_thread import ThreadRunner

        return ThreadRunner(stage, loop)
    if kind == "process":
        from .kind_process import ProcessRunner

        return ProcessRunner(stage, loop, getattr(stage, "start_method", None))
    if kind == "interpreter":
        from .kind_executor import interpreter_runner

        return interpreter_runner(stage, loop)
    from .kind_executor import ExecutorRunner

    return ExecutorRunner(stage, loop)

