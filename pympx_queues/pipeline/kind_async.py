"""``kind="async"``: coroutine handlers on the coordinator's event loop.

Without a timeout a stage runs ``workers`` long-lived worker tasks that take groups from
a deque and hand each outcome straight to the coordinator (no task, future or callback
per item: that was most of the per-item cost).  A handler still runs inside a task
(``asyncio.current_task()``, ``asyncio.timeout()`` and libraries that need them work).
With a timeout each attempt is its own task, which the timeout cancels.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Set

from ._model import ItemContext, PipelineError, Stage

log = logging.getLogger("pympx_queues.pipeline")

#: A worker task lets the loop run other callbacks after this many items in a row that
#: did not suspend (trivial handlers would otherwise hold the loop).
YIELD_EVERY = 32


class _Job:
    __slots__ = ("data", "ctx", "task", "abandoned")

    def __init__(self, data: Any, ctx: Any) -> None:
        self.data = data
        self.ctx = ctx
        self.task: Optional[asyncio.Task] = None
        self.abandoned = False


class AsyncRunner:
    """Worker tasks (``direct``: outcomes go to ``self.done(job, outcome)``), or one task
    per attempt when the stage has a timeout."""

    remote = False

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop) -> None:
        self.stage = stage
        self.loop = loop
        self._handler = stage.handler
        self._ctx = stage.takes_ctx
        self.direct = stage.timeout is None
        self.done: Optional[Callable[[Any, Any], None]] = None  # set by the engine
        self.slots = stage.workers
        self._q: Deque[_Job] = deque()
        self._idle: Deque[asyncio.Future] = deque()
        self._tasks: Set[asyncio.Task] = set()
        self._closed = False

    # -- one task per attempt (timeouts)
    def submit(self, data: Any, ctx: Any) -> "asyncio.Future":
        coro = self._handler(data, ctx) if self._ctx else self._handler(data)
        return self.loop.create_task(coro)

    # -- worker tasks
    def start(self, data: Any, ctx: Any, group: List[ItemContext]) -> _Job:
        if self._closed:
            raise PipelineError(f"stage {self.stage.name!r} is closed")
        job = _Job(data, ctx)
        self._q.append(job)
        idle = self._idle
        while idle:
            w = idle.popleft()
            if not w.done():
                w.set_result(None)
                break
        else:
            if len(self._tasks) < self.stage.workers:
                self._tasks.add(self.loop.create_task(self._work()))
        return job

    async def _work(self) -> None:
        me = asyncio.current_task()
        q = self._q
        handler = self._handler
        takes_ctx = self._ctx
        loop = self.loop
        in_a_row = 0
        while True:
            if not q:
                w = loop.create_future()
                self._idle.append(w)
                await w
                in_a_row = 0
                continue
            job = q.popleft()
            if job.abandoned:
                continue
            job.task = me
            try:
                out = await (handler(job.data, job.ctx) if takes_ctx else handler(job.data))
            except asyncio.CancelledError:
                if job.abandoned or self._closed:
                    raise  # this worker is being stopped (halt); a new one takes its place
                outcome: Any = ("exc", PipelineError("cancelled"))
            except Exception as exc:
                outcome = ("exc", exc)
            else:
                outcome = ("ok", out)
            job.task = None
            try:
                self.done(job, outcome)  # type: ignore[misc]
            except Exception:  # pragma: no cover - an engine defect: keep the worker
                log.exception("stage %r: handing back an outcome", self.stage.name)
            in_a_row += 1
            if in_a_row >= YIELD_EVERY:
                in_a_row = 0
                await asyncio.sleep(0)

    def abandon(self, job: Any, group: List[ItemContext], reason: str) -> None:
        if not isinstance(job, _Job):
            job.cancel()
            return
        job.abandoned = True
        task = job.task
        if task is not None:  # running: stop its worker; a new one starts on demand
            self._tasks.discard(task)
            task.cancel()

    def close(self, wait: bool = True) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        self._tasks.clear()
        for w in self._idle:
            if not w.done():
                w.cancel()
        self._idle.clear()
        self._q.clear()
