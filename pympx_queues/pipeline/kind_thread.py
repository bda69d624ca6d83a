"""``kind="thread"``: plain callables on ``workers`` threads of the stage's own.

The threads take groups from one queue and put outcomes in one deque; the coordinator's
loop is woken once for whatever has piled up since its last look (not once per item).
The stage is handed groups ahead of its threads (:data:`AHEAD`), so that a thread that
ends one finds the next waiting.

A thread cannot be killed.  An attempt that runs past its stage's ``timeout`` (or is in
flight when the run halts) is *abandoned*: the item's ``ctx.cancelled`` is set, the
engine retries or dead-letters it, and a new thread takes the abandoned thread's place,
so the stage keeps its ``workers`` threads and the run never waits for the stuck one.
The abandoned thread keeps running the handler until the handler returns (a handler that
loops forever keeps its thread forever; check ``ctx.cancelled``); its outcome is thrown
away and the thread then ends.  Threads are daemon threads: a stuck one does not keep
the interpreter alive at exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Set

from ._invoke import invoke
from ._model import ItemContext, PipelineError, Stage

log = logging.getLogger("pympx_queues.pipeline")

#: Groups per thread a thread stage may hold, running plus queued ahead (the queued
#: ones at most the stage's queue_size).  Measured, 3-stage bench pipeline, 4 threads:
#: 42-46 us/item without, 30-32 with 2, 26 with 4, 22-24 with 8.
AHEAD = 8


class _Job:
    __slots__ = ("data", "ctx", "thread", "abandoned")

    def __init__(self, data: Any, ctx: Any) -> None:
        self.data = data
        self.ctx = ctx
        self.thread: Optional[threading.Thread] = None
        self.abandoned = False


class ThreadRunner:
    remote = False
    direct = True  # outcomes go to self.done(job, outcome) on the loop

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop) -> None:
        self.stage = stage
        self.loop = loop
        self.done: Optional[Callable[[Any, Any], None]] = None  # set by the engine
        # Up to AHEAD groups per thread are handed over ahead, queued for the next free
        # thread: a thread that ends one takes the next without sleeping, and without a
        # round trip through the loop for each (the wake of a sleeping thread per item
        # was most of a thread stage's cost).  Not when that would change what a group
        # handed over means: with a timeout (it counts from the attempt's start, the
        # engine's clock runs from the hand-over), in a sink (its pending record, "the
        # side effect may have started", is written at the hand-over), or with a
        # scheduler that refuses to have groups wait (``hand_ahead = False``:
        # batch_map's, where nothing may start after its switch trips, also when
        # running calls are let finish; fail-fast partitions).  A queued group that the
        # run abandons (halt, stop without drain) never starts.
        ahead = stage.timeout is None and not stage.sink and \
            getattr(stage.scheduler, "hand_ahead", True)
        self.ahead = min(stage.workers * (AHEAD - 1), stage.queue_size) if ahead else 0
        self.slots = stage.workers + self.ahead
        self._handler = stage.handler
        self._takes_ctx = stage.takes_ctx
        self._in: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self._out: Deque[Any] = deque()
        self._wake_due = False
        self._lock = threading.Lock()  # a job's thread/abandoned pair changes together
        self._threads: Set[threading.Thread] = set()  # live, not abandoned
        self._made = 0
        self._closed = False
        self.abandoned_threads = 0
        for _ in range(stage.workers):
            self._spawn()

    def _spawn(self) -> None:
        self._made += 1
        t = threading.Thread(target=self._work, daemon=True,
                             name=f"pipeline-{self.stage.name}-{self._made}")
        self._threads.add(t)
        t.start()

    def start(self, data: Any, ctx: Any, group: List[ItemContext]) -> _Job:
        if self._closed:
            raise PipelineError(f"stage {self.stage.name!r} is closed")
        job = _Job(data, ctx)
        self._in.put(job)
        return job

    def _work(self) -> None:
        me = threading.current_thread()
        get = self._in.get
        out = self._out
        lock = self._lock
        handler = self._handler
        takes_ctx = self._takes_ctx
        while True:
            job = get()
            if job is None:
                return
            with lock:
                if job.abandoned:
                    continue
                job.thread = me
            try:
                outcome: Any = ("ok", invoke(handler, takes_ctx, job.data, job.ctx))
            except BaseException as exc:  # noqa: B902 - every failure is the item's
                outcome = ("exc", exc)
            with lock:
                if job.abandoned:  # given up on: a replacement took this thread's place
                    return
                job.thread = None
            out.append((job, outcome))
            if not self._wake_due:
                self._wake_due = True
                try:
                    self.loop.call_soon_threadsafe(self._hand_back)
                except RuntimeError:  # the loop is closed: the run is over
                    return

    def _hand_back(self) -> None:
        # Cleared before draining: an outcome appended after the drain ends schedules
        # another call (the thread sees the flag down), one appended before is drained.
        self._wake_due = False
        out = self._out
        done = self.done
        while out:
            job, outcome = out.popleft()
            try:
                done(job, outcome)  # type: ignore[misc]
            except Exception:  # pragma: no cover - an engine defect: keep draining
                log.exception("stage %r: handing back an outcome", self.stage.name)

    def abandon(self, job: Any, group: List[ItemContext], reason: str) -> None:
        for item in group:
            item.cancelled.set()
        with self._lock:
            job.abandoned = True
            stuck = job.thread
        if stuck is not None and stuck in self._threads:
            self._threads.discard(stuck)
            self.abandoned_threads += 1
            if reason != "halt" and not self._closed:
                log.warning("stage %r: thread %s abandoned (%s) while running key(s) %s; "
                            "it keeps running until its handler returns, a new thread "
                            "takes its place", self.stage.name, stuck.name, reason,
                            [g.key for g in group])
                self._spawn()

    def close(self, wait: bool = True) -> None:
        self._closed = True
        live = list(self._threads)
        self._threads.clear()
        for _ in live:
            self._in.put(None)
        if wait:
            for t in live:
                t.join()
