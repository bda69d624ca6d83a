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
import pickle
import signal
import sys
import time
import weakref
from collections import deque
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Deque, List, Optional, Sequence

from ._invoke import error_tuple, invoke_captured
from ._model import ItemContext, PipelineError, Stage, StageTimeout, WorkerDied

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
                 state: Any, inherited: Sequence[Any] = ()) -> None:
    set_parent_death_signal()
    if os.getppid() != coordinator:  # the coordinator died before the request took effect
        os._exit(0)
    for other in inherited:  # forked: the coordinator's ends of every pipe, ours included
        other.close()  # (else our own recv never sees EOF when the coordinator is gone)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides about stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. `timeout` signals the whole group
    clock = time.monotonic
    started = 0
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        replies: List[Any] = []
        last = clock()
        left = len(chunk)
        for data, ctx in chunk:
            if started >= state[STATE_ALLOW]:  # the run stopped: start nothing more,
                replies.append(NOT_STARTED)  # the coordinator takes these items back
                left -= 1
                continue
            # The coordinator reads these two when the worker dies or an attempt may be
            # past its timeout: which item of the chunk runs, and since when (0: none).
            started += 1
            state[STATE_SINCE] = clock()
            state[STATE_STARTED] = started
            replies.append(invoke_captured(handler, takes_ctx, data, ctx))
            state[STATE_SINCE] = 0.0
            left -= 1
            if left and clock() - last > PARTIAL_AFTER:  # slow items: results go early
                if not _send_replies(conn, replies, handler):
                    return
                replies = []
                last = clock()
        if not _send_replies(conn, replies, handler):
            return


def _send_replies(conn: Any, replies: List[Any], handler: Callable) -> bool:
    try:
        conn.send(replies)
        return True
    except (EOFError, OSError):
        return False
    except Exception:  # an output that does not pickle fails its item only
        pass
    fixed = []
    for r in replies:
        try:
            pickle.dumps(r)
            fixed.append(r)
        except Exception as exc:
            fixed.append(error_tuple(TypeError(
                f"the output of stage handler {getattr(handler, '__qualname__', handler)} "
                f"cannot be sent back from the worker process: {exc}")))
    try:
        conn.send(fixed)
        return True
    except (EOFError, OSError):
        return False


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


#: Slots of a worker's shared state (doubles): items it started so far, and the
#: ``time.monotonic()`` at which the current one started (0.0 between items).
STATE_STARTED = 0
STATE_SINCE = 1
#: ... and the coordinator's word: start items only while ``started < allow`` (lowered to
#: the items started so far when the run stops: what is queued in a chunk comes back).
STATE_ALLOW = 2
NOT_STARTED = ("not-started",)
#: A worker sends the results it has when a chunk has run this long (seconds).
PARTIAL_AFTER = 0.005
#: Items per message at most, and a chunk's target duration (seconds): chunks shrink to
#: one item when items are slow, so that no worker sits on a queue of slow items while
#: another has none.
CHUNK_MAX = 32
CHUNK_SECONDS = 0.01
#: Bytes of unread messages allowed in a worker's pipe.  Above it the coordinator waits
#: for the worker to take what it has: a send never blocks the event loop (a blocked
#: coordinator and a worker blocked sending its results would wait for each other).
PIPE_BYTES = 64 * 1024


class _Job:
    __slots__ = ("data", "ctx", "group", "abandoned", "msg_bytes")

    def __init__(self, data: Any, ctx: Any, group: List[ItemContext]) -> None:
        self.data, self.ctx, self.group = data, ctx, group
        self.abandoned = False
        self.msg_bytes = 0  # set on the last job of a message: its size in the pipe

    @property
    def keys(self) -> List[str]:
        return [g.key for g in self.group]


class _Worker:
    __slots__ = ("proc", "conn", "fd", "jobs", "timer", "state", "replied", "piped")

    def __init__(self, proc: Any, conn: Any, state: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.fd = conn.fileno()
        self.jobs: Deque[_Job] = deque()  # sent, in order, not replied yet
        self.timer: Any = None
        self.state = state
        self.replied = 0  # replies read so far (jobs[0] is the reply number replied + 1)
        self.piped = 0  # bytes of messages the worker may not have read yet

    def running(self) -> int:
        """Index in ``jobs`` of the job that runs now (-1: between items)."""
        return int(self.state[STATE_STARTED]) - self.replied - 1


class ProcessRunner:
    """Chunked dispatch: groups handed over in one event-loop turn go to the workers as
    a few messages of several items each (up to ``CHUNK_MAX``, fewer when items are
    slow), and each worker sends its results back in one message per chunk (or every
    ``PARTIAL_AFTER`` seconds).  Each worker holds at most two chunks' worth of items:
    the next chunk is in its pipe when the current one ends.

    Per-item semantics stay: each worker publishes, in shared memory, which item of its
    chunks runs and since when.  A death fails that item (``WorkerDied``; the engine
    retries or dead-letters it) and sends the worker's other items (not started, or
    finished with their results unsent) to the other workers without an attempt
    counted; a timeout kills the worker only when that item has run past it.
    """

    remote = True
    direct = True
    handles_timeout = True

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop,
                 start_method: Optional[str] = None) -> None:
        self.stage = stage
        self.loop = loop
        self.done: Optional[Callable[[Any, Any], None]] = None  # set by the engine
        self._mp = multiprocessing.get_context(start_method or default_start_method())
        self._all: List[_Worker] = []
        self._pending: Deque[_Job] = deque()
        self._dispatch_due = False
        self._held = False
        self.per_worker = 2 * CHUNK_MAX
        self.slots = stage.workers * self.per_worker
        self._item_seconds = 0.0  # moving average: seconds per item between replies
        self._last_reply = 0.0
        self.started = 0  # workers started (replacements included)
        self.deaths = 0
        self._closed = False
        for _ in range(stage.workers):  # start them all now: spawning overlaps
            self._start()

    def _start(self) -> _Worker:
        parent, child = self._mp.Pipe(duplex=True)
        forked = self._mp.get_start_method() == "fork"
        inherited = [parent] + [c for c in list(_PARENT_ENDS) if not c.closed] \
            if forked else []
        state = self._mp.RawArray("d", 3)
        state[STATE_ALLOW] = float("inf")
        proc = self._mp.Process(
            target=_worker_main, name=f"pipeline-{self.stage.name}",
            args=(child, self.stage.handler, self.stage.takes_ctx, os.getpid(), state,
                  inherited),
            daemon=True)
        proc.start()
        child.close()  # only the worker holds its end: its death is an EOF here
        w = _Worker(proc, parent, state)
        _PARENT_ENDS.add(parent)
        self._all.append(w)
        self.started += 1
        self.loop.add_reader(w.fd, self._readable, w)
        return w

    @property
    def pids(self) -> List[int]:
        return [w.proc.pid for w in self._all]

    # -- dispatch
    def start(self, data: Any, ctx: Any, group: List[ItemContext]) -> _Job:
        if self._closed:
            raise PipelineError(f"stage {self.stage.name!r} is closed")
        job = _Job(data, ctx, group)
        self._pending.append(job)
        if not self._dispatch_due:
            self._dispatch_due = True
            self.loop.call_soon(self._dispatch)
        return job

    def _chunk_size(self) -> int:
        avg = self._item_seconds
        if avg <= 0:
            return CHUNK_MAX
        return max(1, min(CHUNK_MAX, int(CHUNK_SECONDS / avg)))

    def _dispatch(self) -> None:
        self._dispatch_due = False
        pending = self._pending
        if self._closed:
            return
        while len(self._all) < self.stage.workers:
            self._start()
        size = self._chunk_size()
        while pending:
            sent = False
            for w in sorted(self._all, key=lambda w: len(w.jobs)):
                room = self.per_worker - len(w.jobs)
                if room <= 0 or not pending:
                    continue
                share = -(-len(pending) // len(self._all))  # spread, not pile on one
                k = min(size, room, share)
                if k < size and len(w.jobs) >= size:
                    continue  # busy for a chunk yet: wait for a full chunk (no dribble)
                if self._send(w, k):
                    sent = True
            if not sent:
                break  # every worker is full or its pipe is: replies dispatch again

    def _send(self, w: _Worker, k: int) -> bool:
        """Send the next ``k`` pending jobs to ``w``; False when nothing was sent."""
        pending = self._pending
        chunk = []
        while pending and len(chunk) < k:
            job = pending.popleft()
            if not job.abandoned:
                chunk.append(job)
        if not chunk:
            return False
        try:
            buf = _dumps([(job.data, job.ctx) for job in chunk])
        except Exception:  # some data does not pickle: those items fail, not the chunk
            good = []
            for job in chunk:
                try:
                    _dumps((job.data, job.ctx))
                    good.append(job)
                except Exception as exc:
                    self.loop.call_soon(self._fail, job, exc)
            pending.extendleft(reversed(good))
            return bool(good) and self._send(w, len(good))
        if w.jobs and w.piped + len(buf) > PIPE_BYTES:
            if len(chunk) > 1:  # try a smaller chunk; a single big item waits its turn
                pending.extendleft(reversed(chunk))
                return self._send(w, len(chunk) // 2)
            pending.appendleft(chunk[0])
            return False
        try:
            w.conn.send_bytes(buf)
        except (OSError, EOFError):  # died meanwhile: its EOF handler reaps it
            pending.extendleft(reversed(chunk))
            self._reap(w, fail=True)
            return True
        if w.state[STATE_ALLOW] != INF:  # sent after a stop: these may start
            w.state[STATE_ALLOW] = INF
        chunk[-1].msg_bytes = len(buf)
        w.piped += len(buf)
        w.jobs.extend(chunk)
        self._arm(w)
        return True

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.abandoned:
            self.done(job, ("exc", exc))  # type: ignore[misc]

    # -- results
    def _readable(self, w: _Worker) -> None:
        try:
            replies = w.conn.recv()
        except (EOFError, OSError):
            self._reap(w, fail=True)
            return
        now = time.monotonic()
        ended = []
        jobs = w.jobs
        for reply in replies:
            if not jobs:  # pragma: no cover - a reply nobody waits for
                break
            job = jobs.popleft()
            w.replied += 1
            if job.msg_bytes:
                w.piped -= job.msg_bytes
            if not job.abandoned:
                ended.append((job, ("back", None) if reply == NOT_STARTED else ("ok", reply)))
        if replies:
            # the stage's seconds per item between replies: the chunk size's guide
            per = (now - self._last_reply) / len(replies) if self._last_reply else 0.0
            self._last_reply = now
            if 0 < per < 60:
                self._item_seconds = per if not self._item_seconds else \
                    0.8 * self._item_seconds + 0.2 * per
        if not jobs and w.timer is not None:
            w.timer.cancel()
            w.timer = None
        done = self.done
        for job, outcome in ended:
            done(job, outcome)  # type: ignore[misc]
        if self._pending and not self._dispatch_due:
            self._dispatch_due = True
            self.loop.call_soon(self._dispatch)

    # -- timeouts
    def _arm(self, w: _Worker) -> None:
        if self.stage.timeout is not None and w.jobs and w.timer is None:
            w.timer = self.loop.call_later(self.stage.timeout, self._check_timeout, w)

    def _check_timeout(self, w: _Worker) -> None:
        w.timer = None
        if not w.jobs or w not in self._all:
            return
        timeout = self.stage.timeout
        idx = w.running()
        since = w.state[STATE_SINCE]
        now = time.monotonic()
        if 0 <= idx < len(w.jobs) and since > 0 and now - since >= timeout:
            self._reap(w, fail=False, kill=True, head_error=StageTimeout(
                f"stage {self.stage.name!r}: attempt ran past its timeout of "
                f"{timeout} s (worker process {w.proc.pid} killed)"))
            return
        wait = since + timeout - now if since > 0 else timeout
        w.timer = self.loop.call_later(max(wait, 0.001), self._check_timeout, w)

    # -- deaths
    def _reap(self, w: _Worker, *, fail: bool, kill: bool = False,
              head_error: Optional[BaseException] = None) -> None:
        """Remove a worker; its running item fails, its other items go to the others."""
        if w not in self._all:
            return
        idx = w.running()  # read before the kill: the state is the worker's last word
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
        # The item that ran when the worker died; between items (or dying while it read
        # a chunk) the first unfinished one is blamed, so that an item that kills
        # workers before it starts is still dead-lettered in the end.
        culprit = jobs[idx] if 0 <= idx < len(jobs) else (jobs[0] if jobs else None)
        if not kill:
            self.deaths += 1
            log.warning("stage %r: worker process %s %s%s; a new one takes the next item",
                        self.stage.name, w.proc.pid, describe_exit(code),
                        f" while running key(s) {culprit.keys}" if culprit else "")
        back = [j for j in jobs if j is not culprit and not j.abandoned]
        if self._held:  # stopping: what did not start goes back to the engine
            for job in back:
                self.loop.call_soon(self._give_back, job)
        else:
            self._pending.extendleft(reversed(back))  # not started or results lost: again
        if culprit is not None and not culprit.abandoned:
            if head_error is not None:
                self.loop.call_soon(self._fail, culprit, head_error)
            elif fail:
                self.loop.call_soon(self._fail, culprit, WorkerDied(
                    f"worker process {w.proc.pid} of stage {self.stage.name!r} "
                    f"{describe_exit(code)} while running key(s) {culprit.keys}"))
            else:  # abandoned for a halt: nothing to report
                pass
        if not self._closed and (self._pending or len(self._all) < self.stage.workers):
            if not self._dispatch_due:
                self._dispatch_due = True
                self.loop.call_soon(self._dispatch)

    def hold(self) -> None:
        """The run stops: items handed over but not started come back to the engine
        (``("back", None)``), which starts them again only if its scheduler still
        wants them (a drain does; a tripped kill switch does not: P7)."""
        self._held = True
        for w in self._all:
            w.state[STATE_ALLOW] = w.state[STATE_STARTED]
        while self._pending:
            self.loop.call_soon(self._give_back, self._pending.popleft())

    def _give_back(self, job: _Job) -> None:
        if not job.abandoned:
            self.done(job, ("back", None))  # type: ignore[misc]

    def abandon(self, job: Any, group: List[ItemContext], reason: str) -> None:
        """Forget ``job`` (a halt): the worker holding it is killed, so that nothing of
        its chunk starts after the halt (P7); its other items go to the others."""
        job.abandoned = True
        for w in self._all:
            if job in w.jobs:
                self._reap(w, fail=False, kill=True)
                return

    def close(self, wait: bool = True) -> None:
        self._closed = True
        self._pending.clear()
        for w in list(self._all):
            if not w.jobs:
                try:
                    w.conn.send(None)
                except (OSError, EOFError):
                    pass
        for w in list(self._all):
            if w.jobs or not wait:
                for job in w.jobs:
                    job.abandoned = True
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


INF = float("inf")


def _dumps(obj: Any) -> bytes:
    return bytes(ForkingPickler.dumps(obj))
