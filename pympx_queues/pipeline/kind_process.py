"""``kind="process"``: a supervised pool of worker processes (P5).

Not :class:`concurrent.futures.ProcessPoolExecutor`: that pool is broken for good after
one worker dies.  Here each worker is one process with one pipe to the coordinator:

* a worker that dies (SIGKILL, segfault, ``os._exit``) closes its pipe; the coordinator
  sees the EOF at once, fails the item's attempt with :class:`WorkerDied` (the engine
  retries it or dead-letters it) and starts a replacement for the next item;
* a hung handler past its stage's timeout: the worker is killed (SIGKILL) and replaced;
* nothing outlives the coordinator: each worker asks the kernel for SIGKILL when its
  parent dies (Linux ``PR_SET_PDEATHSIG``) and then checks that its parent is still the
  coordinator (it may have died before the request); a worker also exits when its pipe
  reaches EOF.  Workers are started from the coordinator's event-loop thread, which lives
  as long as the run (the death signal follows the thread that forked the worker).

Workers are started with ``multiprocessing``'s ``fork`` method on Linux by default (as
``ProcessPoolExecutor`` did there before Python 3.14): scripts need no ``__main__`` guard
and handlers need not be importable.  They are forked from the event-loop thread before
the stages' threads start; replacements are forked later, while other threads run, so a
handler that needs a lock another thread held at that moment could block: pass
``Stage(start_method="spawn")`` (or ``"forkserver"``) for a clean interpreter per worker
(module-level handler, ``if __name__ == "__main__":`` guard in the script).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

from ._invoke import error_tuple, invoke_captured
from ._model import ItemContext, Stage, StageTimeout, WorkerDied

log = logging.getLogger("pympx_queues.pipeline")

PR_SET_PDEATHSIG = 1
#: The coordinator's ends of every worker pipe in this process (a forked worker closes
#: its copies of them).
_PARENT_ENDS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits
    (Linux only; returns False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover
        return False


def _worker_main(conn: Any, handler: Callable, takes_ctx: bool, coordinator: int,
                 inherited: Sequence[Any] = ()) -> None:
    set_parent_death_signal()
    if os.getppid() != coordinator:  # the coordinator died before the request took effect
        os._exit(0)
    for other in inherited:  # forked: the coordinator's ends of every pipe, ours included
        other.close()  # (else our own recv never sees EOF when the coordinator is gone)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides about stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. `timeout` signals the whole group
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        reply = invoke_captured(handler, takes_ctx, msg[0], msg[1])
        try:
            conn.send(reply)
        except (EOFError, OSError, BrokenPipeError):
            return
        except Exception as exc:  # an output that does not pickle fails its item only
            conn.send(error_tuple(TypeError(
                f"the output of stage handler {getattr(handler, '__qualname__', handler)} "
                f"cannot be sent back from the worker process: {exc}")))


def default_start_method() -> str:
    return "fork" if sys.platform.startswith("linux") else "spawn"


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Job:
    __slots__ = ("fut", "data", "ctx", "keys")

    def __init__(self, fut: "asyncio.Future", data: Any, ctx: Any) -> None:
        self.fut, self.data, self.ctx = fut, data, ctx
        self.keys = [c.key for c in (ctx if isinstance(ctx, list) else [ctx])]


class _Worker:
    __slots__ = ("proc", "conn", "fd", "jobs", "timer")

    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.fd = conn.fileno()
        self.jobs: Deque[_Job] = deque()  # sent, in order; jobs[0] is running
        self.timer: Any = None


class ProcessRunner:
    """Each worker has up to ``DEPTH`` items in its pipe (the next one is there when the
    current one ends: no idle round trip).  The item at the head of a worker's pipe is
    the one running: a death fails that one (``WorkerDied``) and the items queued behind
    it go to another worker without an attempt counted; its timeout runs from the moment
    it reached the head."""

    remote = True
    direct = False
    handles_timeout = True
    DEPTH = 2

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop,
                 start_method: Optional[str] = None) -> None:
        self.stage = stage
        self.loop = loop
        self._mp = multiprocessing.get_context(start_method or default_start_method())
        self._all: List[_Worker] = []
        self._by_fut: Dict[Any, _Worker] = {}
        self.slots = stage.workers * self.DEPTH
        self.started = 0  # workers started (replacements included)
        self.deaths = 0
        for _ in range(stage.workers):  # start them all now: spawning overlaps
            self._start()

    def _start(self) -> _Worker:
        parent, child = self._mp.Pipe(duplex=True)
        forked = self._mp.get_start_method() == "fork"
        inherited = [parent] + [c for c in list(_PARENT_ENDS) if not c.closed] \
            if forked else []
        proc = self._mp.Process(
            target=_worker_main, name=f"pipeline-{self.stage.name}",
            args=(child, self.stage.handler, self.stage.takes_ctx, os.getpid(), inherited),
            daemon=True)
        proc.start()
        child.close()  # only the worker holds its end: its death is an EOF here
        w = _Worker(proc, parent)
        _PARENT_ENDS.add(parent)
        self._all.append(w)
        self.started += 1
        self.loop.add_reader(w.fd, self._readable, w)
        return w

    @property
    def pids(self) -> List[int]:
        return [w.proc.pid for w in self._all]

    def _pick(self) -> _Worker:
        best = min(self._all, key=lambda w: len(w.jobs)) if self._all else None
        if best is None or (len(best.jobs) and len(self._all) < self.stage.workers):
            best = self._start()
        return best

    def submit(self, data: Any, ctx: Any) -> "asyncio.Future":
        fut = self.loop.create_future()
        self._send(_Job(fut, data, ctx))
        return fut

    def _send(self, job: _Job) -> None:
        w = self._pick()
        try:
            w.conn.send((job.data, job.ctx))
        except (OSError, EOFError):  # died meanwhile: its EOF handler reaps it
            self._reap(w, fail=True)
            self._send(job)
            return
        except Exception:  # data that does not pickle: the item fails, not the worker
            raise
        w.jobs.append(job)
        self._by_fut[job.fut] = w
        if len(w.jobs) == 1:
            self._arm(w)

    def _arm(self, w: _Worker) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if self.stage.timeout is not None and w.jobs:
            w.timer = self.loop.call_later(self.stage.timeout, self._timed_out, w)

    def _timed_out(self, w: _Worker) -> None:
        w.timer = None
        if not w.jobs or w not in self._all:
            return
        head = w.jobs[0]
        self._reap(w, fail=False, kill=True, head_error=StageTimeout(
            f"stage {self.stage.name!r}: attempt ran past its timeout of "
            f"{self.stage.timeout} s (worker process {w.proc.pid} killed)"))
        _ = head

    def _readable(self, w: _Worker) -> None:
        try:
            reply = w.conn.recv()
        except (EOFError, OSError):
            self._reap(w, fail=True)
            return
        if not w.jobs:  # pragma: no cover - a reply nobody waits for
            return
        job = w.jobs.popleft()
        self._by_fut.pop(job.fut, None)
        self._arm(w)
        if not job.fut.done():
            job.fut.set_result(reply)

    def _reap(self, w: _Worker, *, fail: bool, kill: bool = False,
              head_error: Optional[BaseException] = None) -> None:
        """Remove a worker; its running item fails, the ones queued behind it move."""
        if w not in self._all:
            return
        self._all.remove(w)
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        try:
            self.loop.remove_reader(w.fd)
        except (ValueError, OSError):  # pragma: no cover
            pass
        if kill and w.proc.is_alive():
            try:
                os.kill(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        w.proc.join(2.0)
        code = w.proc.exitcode
        try:
            w.conn.close()
        except OSError:  # pragma: no cover
            pass
        jobs = list(w.jobs)
        w.jobs.clear()
        for job in jobs:
            self._by_fut.pop(job.fut, None)
        head = jobs[0] if jobs else None
        if not kill:
            self.deaths += 1
            log.warning("stage %r: worker process %s %s%s; a new one takes the next item",
                        self.stage.name, w.proc.pid, describe_exit(code),
                        f" while running key(s) {head.keys}" if head else "")
        if head is not None and not head.fut.done():
            if head_error is not None:
                head.fut.set_exception(head_error)
            elif fail:
                head.fut.set_exception(WorkerDied(
                    f"worker process {w.proc.pid} of stage {self.stage.name!r} "
                    f"{describe_exit(code)} while running key(s) {head.keys}"))
        for job in jobs[1:]:  # never started: sent again, no attempt counted
            if not job.fut.done():
                self._send(job)

    def abandon(self, fut: "asyncio.Future", group: List[ItemContext], reason: str) -> None:
        """Kill the worker running ``fut`` (a halt); a new one starts on demand."""
        w = self._by_fut.get(fut)
        if w is not None:
            if w.jobs and w.jobs[0].fut is fut:
                self._reap(w, fail=False, kill=True)
            else:  # still queued behind another item: just forget it
                for job in list(w.jobs):
                    if job.fut is fut:
                        w.jobs.remove(job)
                self._by_fut.pop(fut, None)
        if not fut.done():
            fut.cancel()

    def close(self, wait: bool = True) -> None:
        for w in list(self._all):
            if not w.jobs:
                try:
                    w.conn.send(None)
                except (OSError, EOFError):
                    pass
        for w in list(self._all):
            if w.jobs or not wait:
                for job in w.jobs:
                    if not job.fut.done():
                        job.fut.cancel()
                w.jobs.clear()
                self._reap(w, fail=False, kill=True)
        for w in list(self._all):
            try:
                self.loop.remove_reader(w.fd)
            except (ValueError, OSError):  # pragma: no cover
                pass
            w.proc.join(2.0)
            if w.proc.is_alive():
                os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.join(2.0)
            w.conn.close()
            self._all.remove(w)
