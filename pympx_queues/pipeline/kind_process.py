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

Workers are started with ``multiprocessing``'s ``spawn`` method by default (safe in a
process with threads; the handler must be importable: a module-level function).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable, List, Optional, Set

from ._invoke import error_tuple, invoke_captured
from ._model import ItemContext, Stage, WorkerDied

log = logging.getLogger("pympx_queues.pipeline")

PR_SET_PDEATHSIG = 1


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


def _worker_main(conn: Any, handler: Callable, takes_ctx: bool, coordinator: int) -> None:
    set_parent_death_signal()
    if os.getppid() != coordinator:  # the coordinator died before the request took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides about stops
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Worker:
    __slots__ = ("proc", "conn", "fut", "group", "fd")

    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.fd = conn.fileno()
        self.fut: Optional[asyncio.Future] = None
        self.group: Optional[List[ItemContext]] = None


class ProcessRunner:
    remote = True

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop,
                 start_method: Optional[str] = None) -> None:
        self.stage = stage
        self.loop = loop
        self._mp = multiprocessing.get_context(start_method or "spawn")
        self._idle: List[_Worker] = []
        self._all: Set[_Worker] = set()
        self._by_fut: dict = {}
        self.started = 0  # workers started (replacements included)
        self.deaths = 0
        for _ in range(stage.workers):  # start them all now: spawning overlaps
            self._idle.append(self._start())

    def _start(self) -> _Worker:
        parent, child = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(
            target=_worker_main, name=f"pipeline-{self.stage.name}",
            args=(child, self.stage.handler, self.stage.takes_ctx, os.getpid()),
            daemon=True)
        proc.start()
        child.close()  # only the worker holds its end: its death is an EOF here
        w = _Worker(proc, parent)
        self._all.add(w)
        self.started += 1
        self.loop.add_reader(w.fd, self._readable, w)
        return w

    @property
    def pids(self) -> List[int]:
        return [w.proc.pid for w in self._all]

    def submit(self, data: Any, ctx: Any, group: Optional[List[ItemContext]] = None
               ) -> "asyncio.Future":
        w = self._idle.pop() if self._idle else self._start()
        fut = self.loop.create_future()
        w.fut, w.group = fut, group
        self._by_fut[fut] = w
        try:
            w.conn.send((data, ctx))
        except (OSError, EOFError):  # died while idle: the EOF handler reaps it
            self._reap(w, fail=True)
        except Exception:  # data that does not pickle: the item fails, the worker is fine
            w.fut, w.group = None, None
            del self._by_fut[fut]
            self._idle.append(w)
            raise
        return fut

    def _readable(self, w: _Worker) -> None:
        try:
            reply = w.conn.recv()
        except (EOFError, OSError):
            self._reap(w, fail=True)
            return
        fut = w.fut
        w.fut, w.group = None, None
        if fut is not None:
            self._by_fut.pop(fut, None)
            if not fut.done():
                fut.set_result(reply)
        self._idle.append(w)

    def _reap(self, w: _Worker, *, fail: bool, kill: bool = False) -> None:
        if w not in self._all:
            return
        self._all.discard(w)
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
        if w in self._idle:
            self._idle.remove(w)
        fut = w.fut
        w.fut = None
        if fut is not None:
            self._by_fut.pop(fut, None)
        if not kill:
            self.deaths += 1
            keys = [g.key for g in (w.group or [])]
            log.warning("stage %r: worker process %s %s%s; a new one takes the next item",
                        self.stage.name, w.proc.pid, describe_exit(code),
                        f" while running key(s) {keys}" if keys else "")
        if fail and fut is not None and not fut.done():
            keys = [g.key for g in (w.group or [])]
            fut.set_exception(WorkerDied(
                f"worker process {w.proc.pid} of stage {self.stage.name!r} "
                f"{describe_exit(code)} while running key(s) {keys}"))

    def abandon(self, fut: "asyncio.Future", group: List[ItemContext], reason: str) -> None:
        """Kill the worker running ``fut`` (timeout or halt); a new one starts on demand."""
        w = self._by_fut.get(fut)
        if w is not None:
            self._reap(w, fail=False, kill=True)
        if not fut.done():
            fut.cancel()

    def close(self, wait: bool = True) -> None:
        for w in list(self._all):
            if w.fut is None:
                try:
                    w.conn.send(None)
                except (OSError, EOFError):
                    pass
        for w in list(self._all):
            if w.fut is not None or not wait:
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
            self._all.discard(w)
        self._idle.clear()
