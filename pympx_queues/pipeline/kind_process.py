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

Items travel many to a message.  Groups the engine hands over one by one go out in
chunks (a list of ``(data, ctx)``; one reply per chunk).  A process stage first in line
with the default scheduler and a handler that takes no ``ctx`` is fed in *lots* instead
(:meth:`ProcessRunner.start_lot`): the engine admits a slice of the source as one
object, messages carry plain lists of data (``("L", [data, ...])``), and the reply is
one list of outputs with the failed items listed apart, so that the coordinator spends
per message, not per item, what it can.  Either way each worker publishes in shared
memory which item runs and since when: a death or a timeout is charged to exactly that
item, and a stop takes back what has not started.

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
import struct
import sys
import time
import weakref
from collections import deque
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

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
                 state: Any, inherited: Sequence[Any] = (), timed: bool = True) -> None:
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
        if type(chunk) is tuple:  # a lot: ("L", [data, ...])
            started = _run_lot(conn, handler, chunk[1], state, started, timed)
            if started < 0:
                return
            continue
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


def _run_lot(conn: Any, handler: Callable, datas: List[Any], state: Any, started: int,
             timed: bool) -> int:
    """Run the items of a lot message: ``handler(data)`` each, in order, publishing in
    ``state`` which one runs (as for a chunk).  The reply is ``(outputs, errors, back)``:
    one output per item run (None for a failed one), ``errors`` the failed ones as
    ``(position in outputs, error tuple)``, ``back`` the items at the end not started
    (the run stopped).  A partial reply (``back`` 0, fewer outputs than items) goes
    every ``PARTIAL_AFTER`` seconds and after a failed item (so that a death later in
    the message does not undo its attempt, nor the outputs before it).  Returns the new
    started count, -1 on EOF."""
    clock = time.monotonic
    outputs: List[Any] = []
    errors: List[Any] = []
    append = outputs.append
    last = clock()
    left = len(datas)
    back = 0
    for data in datas:
        if started >= state[STATE_ALLOW]:  # the run stopped: these come back
            back = left
            break
        started += 1
        if timed:
            state[STATE_SINCE] = clock()
        state[STATE_STARTED] = started
        try:
            append(handler(data))
        except BaseException as exc:  # noqa: B902 - reported, never escapes
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            errors.append((len(outputs), error_tuple(exc)))
            append(None)
            last = 0.0  # a failure is reported at once (a later death keeps it)
        if timed:
            state[STATE_SINCE] = 0.0
        left -= 1
        if left and clock() - last > PARTIAL_AFTER:  # slow items: results go early
            if not _send_lot_reply(conn, outputs, errors, 0, handler):
                return -1
            outputs, errors = [], []
            append = outputs.append
            last = clock()
    if not _send_lot_reply(conn, outputs, errors, back, handler):
        return -1
    return started


def _send_lot_reply(conn: Any, outputs: List[Any], errors: List[Any], back: int,
                    handler: Callable) -> bool:
    try:
        conn.send_bytes(_dumps((outputs, errors, back)))
        return True
    except (EOFError, OSError):
        return False
    except Exception:  # an output that does not pickle fails its item only
        pass
    failed = {pos for pos, _ in errors}
    for pos, out in enumerate(outputs):
        if pos in failed:
            continue
        try:
            pickle.dumps(out)
        except Exception as exc:
            outputs[pos] = None
            errors.append((pos, error_tuple(TypeError(
                f"the output of stage handler {getattr(handler, '__qualname__', handler)} "
                f"cannot be sent back from the worker process: {exc}"))))
    try:
        conn.send((outputs, errors, back))
        return True
    except (EOFError, OSError):
        return False


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
#: Items per message of a lot at most (items the engine admitted together and hands over
#: as one list, see :meth:`ProcessRunner.start_lot`): lots are cut to
#: ``CHUNK_SECONDS`` of work per message as chunks are, but may grow this large when
#: items are quick (the stage's ``queue_size`` bounds them first).
LOT_MAX = 4096
#: Bytes of unread messages allowed in a worker's pipe.  Above it the coordinator waits
#: for the worker to take what it has: a send never blocks the event loop (a blocked
#: coordinator and a worker blocked sending its results would wait for each other).
PIPE_BYTES = 64 * 1024


class _Job:
    """One item (one group of the engine) sent in a chunk message."""

    __slots__ = ("data", "ctx", "group", "abandoned", "msg_bytes")
    n = 1  # items

    def __init__(self, data: Any, ctx: Any, group: List[ItemContext]) -> None:
        self.data, self.ctx, self.group = data, ctx, group
        self.abandoned = False
        self.msg_bytes = 0  # set on the last job of a message: its size in the pipe

    @property
    def keys(self) -> List[str]:
        return [g.key for g in self.group]


class _Unit:
    """Items ``start:stop`` of a lot (the engine's object: ``datas``, ``key(i)``), sent
    or to be sent as one message.  ``start`` moves on as partial replies come in."""

    __slots__ = ("lot", "start", "stop", "abandoned", "msg_bytes")

    def __init__(self, lot: Any, start: int, stop: int) -> None:
        self.lot, self.start, self.stop = lot, start, stop
        self.abandoned = False
        self.msg_bytes = 0

    @property
    def n(self) -> int:
        return self.stop - self.start


class _Worker:
    __slots__ = ("proc", "conn", "fd", "jobs", "timer", "state", "replied", "piped",
                 "items", "msgs", "inbuf")

    def __init__(self, proc: Any, conn: Any, state: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.fd = conn.fileno()
        self.jobs: Deque[Any] = deque()  # _Job and _Unit sent, in order, not replied yet
        self.timer: Any = None
        self.state = state
        self.replied = 0  # items replied so far (the head item is number replied + 1)
        self.piped = 0  # bytes of messages the worker may not have read yet
        self.items = 0  # items sent and not replied
        self.msgs = 0  # messages sent and not wholly replied
        self.inbuf = b""  # the start of a reply not wholly read yet

    def running(self) -> int:
        """Position among the unreplied items of the one that runs now (-1: between
        items)."""
        return int(self.state[STATE_STARTED]) - self.replied - 1

    def locate(self, pos: int) -> Tuple[Any, int]:
        """(job or unit, index in its lot) of unreplied item ``pos``; (None, -1) if none."""
        for job in self.jobs:
            n = job.n
            if pos < n:
                return job, (job.start + pos if type(job) is _Unit else -1)
            pos -= n
        return None, -1


class ProcessRunner:
    """Chunked dispatch: groups handed over in one event-loop turn go to the workers as
    a few messages of several items each (up to ``CHUNK_MAX``, fewer when items are
    slow), and each worker sends its results back in one message per chunk (or every
    ``PARTIAL_AFTER`` seconds).  Each worker holds at most two chunks' worth of items:
    the next chunk is in its pipe when the current one ends.

    Lots (:meth:`start_lot`): the engine may hand over many items in one call, with no
    per-item object; they go out as messages of up to ``LOT_MAX`` items, each worker
    brought up to an even share, and come back as one list of outputs per message with
    the failed ones listed apart (``lot_done``), so that the coordinator accounts for a
    message's successes at once.

    Per-item semantics stay: each worker publishes, in shared memory, which item of its
    messages runs and since when.  A death fails that item (``WorkerDied``; the engine
    retries or dead-letters it) and sends the worker's other items (not started, or
    finished with their results unsent) to the other workers without an attempt
    counted; a timeout kills the worker only when that item has run past it; a stop
    takes back what has not started.
    """

    remote = True
    direct = True
    handles_timeout = True

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop,
                 start_method: Optional[str] = None) -> None:
        self.stage = stage
        self.loop = loop
        self.done: Optional[Callable[[Any, Any], None]] = None  # set by the engine
        # set by the engine when it hands over lots: (lot, start, outputs, errors),
        # (lot, index, exception), (lot, start, stop)
        self.lot_done: Optional[Callable[[Any, int, List[Any], List[Any]], None]] = None
        self.lot_fail: Optional[Callable[[Any, int, BaseException], None]] = None
        self.lot_back: Optional[Callable[[Any, int, int], None]] = None
        self.lot_settled: Optional[Callable[[], None]] = None  # after a lot reply
        self._mp = multiprocessing.get_context(start_method or default_start_method())
        self._all: List[_Worker] = []
        self._pending: Deque[Any] = deque()  # _Job and _Unit not sent yet
        self._dispatch_due = False
        self._held = False
        self.per_worker = 2 * CHUNK_MAX
        self.slots = stage.workers * self.per_worker
        self._item_seconds = 0.0  # moving average: seconds per item between replies
        self._last_reply = 0.0
        self.started = 0  # workers started (replacements included)
        self.deaths = 0
        self.messages = 0  # messages sent to workers (for benchmarks and tests)
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
                  inherited, self.stage.timeout is not None),
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
        self._dispatch_soon()
        return job

    def start_lot(self, lot: Any) -> None:
        """Hand over items ``0:len(lot.datas)`` of ``lot`` at once (handlers that take
        no ``ctx``).  Each item ends in exactly one of ``lot_done`` (its output or its
        error), ``lot_fail`` (its worker died or it timed out) or ``lot_back`` (the run
        stopped before it started, or its data does not pickle: the engine runs it
        again as a single item)."""
        if self._closed:
            raise PipelineError(f"stage {self.stage.name!r} is closed")
        if lot.datas:
            self._pending.append(_Unit(lot, 0, len(lot.datas)))
            self._dispatch_soon()

    def _dispatch_soon(self) -> None:
        if not self._dispatch_due:
            self._dispatch_due = True
            self.loop.call_soon(self._dispatch)

    def _chunk_size(self) -> int:
        avg = self._item_seconds
        if avg <= 0:
            return CHUNK_MAX
        return max(1, min(CHUNK_MAX, int(CHUNK_SECONDS / avg)))

    def _lot_size(self) -> int:
        """Items per lot message: ``CHUNK_SECONDS`` of work, and at most half of what
        a worker's share of the stage's queue holds (each worker has the message it
        runs and the next one; a larger size would leave it idle between them)."""
        avg = self._item_seconds
        if avg <= 0:
            return CHUNK_MAX  # nothing measured yet: as a chunk (the items may be slow)
        stage = self.stage
        share = (stage.queue_size + stage.workers) // (2 * stage.workers)
        return max(1, min(LOT_MAX, int(CHUNK_SECONDS / avg), share))

    def _dispatch(self) -> None:
        self._dispatch_due = False
        pending = self._pending
        if self._closed:
            return
        while len(self._all) < self.stage.workers:
            self._start()
        while pending:
            sent = False
            if type(pending[0]) is _Unit:
                # a lot: bring the least loaded workers up to an even share of what is
                # held and pending, in messages of up to _lot_size() items, two messages
                # per worker at most (the one it runs and the next)
                size = self._lot_size()
                total = sum(j.n for j in pending)
                even = -(-(total + sum(w.items for w in self._all)) // len(self._all))
                for w in sorted(self._all, key=_load):
                    if not pending or type(pending[0]) is not _Unit:
                        break
                    if w.msgs >= 2:
                        continue  # the message it runs and the next one: enough
                    k = min(size, even - w.items)
                    if k <= 0 or (w.items and k < size // 2):
                        continue  # busy: a message this small waits for the next reply
                    if self._send_unit(w, k):
                        sent = True
            else:
                size = self._chunk_size()
                for w in sorted(self._all, key=_load):
                    room = self.per_worker - w.items
                    if room <= 0 or not pending or type(pending[0]) is _Unit:
                        continue
                    share = -(-len(pending) // len(self._all))  # spread, not pile on one
                    k = min(size, room, share)
                    if k < size and w.items >= size:
                        continue  # busy for a chunk yet: wait for a full chunk (no dribble)
                    if self._send(w, k):
                        sent = True
            if not sent:
                break  # every worker is full or its pipe is: replies dispatch again

    def _send(self, w: _Worker, k: int) -> bool:
        """Send the next ``k`` pending jobs to ``w``; False when nothing was sent."""
        pending = self._pending
        chunk = []
        while pending and len(chunk) < k and type(pending[0]) is _Job:
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
        return self._post(w, buf, chunk, len(chunk))

    def _send_unit(self, w: _Worker, k: int) -> bool:
        """Send up to ``k`` items of the lot units at the head of the pending jobs, as
        one message (items of several lots may share it)."""
        pending = self._pending
        parts: List[_Unit] = []
        left = k
        while left and pending and type(pending[0]) is _Unit:
            unit = pending[0]
            if unit.n > left:
                part = _Unit(unit.lot, unit.start, unit.start + left)
                unit.start += left
            else:
                part = pending.popleft()
            parts.append(part)
            left -= part.n
        if not parts:
            return False
        if len(parts) == 1:
            datas = parts[0].lot.datas[parts[0].start:parts[0].stop]
        else:
            datas = []
            for part in parts:
                datas.extend(part.lot.datas[part.start:part.stop])
        try:
            buf = _dumps(("L", datas))
        except Exception:  # some data does not pickle: the engine runs them one by one
            for part in parts:  # (and fails just those)
                self.loop.call_soon(self._lot_back, part)
            return True
        if w.jobs and w.piped + len(buf) > PIPE_BYTES:
            pending.extendleft(reversed(parts))
            if len(datas) > 1:  # a smaller message; a single big item waits its turn
                return self._send_unit(w, len(datas) // 2)
            return False
        return self._post(w, buf, parts, len(datas))

    def _post(self, w: _Worker, buf: bytes, entries: List[Any], items: int) -> bool:
        """Write one message (``entries``: jobs or lot units, ``items`` items in all) to
        ``w`` and book it as running there; on a broken pipe the entries go back to the
        head of the pending jobs and the worker is reaped."""
        try:
            w.conn.send_bytes(buf)
        except (OSError, EOFError):  # died meanwhile: its EOF handler reaps it
            self._pending.extendleft(reversed(entries))
            self._reap(w, fail=True)
            return True
        self.messages += 1
        if w.state[STATE_ALLOW] != INF:  # sent after a stop: these may start
            w.state[STATE_ALLOW] = INF
        entries[-1].msg_bytes = len(buf)
        w.piped += len(buf)
        w.jobs.extend(entries)
        w.items += items
        w.msgs += 1
        self._arm(w)
        return True

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.abandoned:
            self.done(job, ("exc", exc))  # type: ignore[misc]

    def _lot_back(self, unit: _Unit) -> None:
        if not unit.abandoned and unit.n > 0:
            self.lot_back(unit.lot, unit.start, unit.stop)  # type: ignore[misc]

    def _lot_fail(self, unit: _Unit, index: int, exc: BaseException) -> None:
        if not unit.abandoned:
            self.lot_fail(unit.lot, index, exc)  # type: ignore[misc]

    # -- results
    def _readable(self, w: _Worker) -> None:
        """Read what the worker's pipe holds (one ``read``, not the two of
        ``Connection.recv``: a length, then the message) and handle every whole reply in
        it, in order; EOF (the worker died) only once its earlier replies are in."""
        try:
            data = os.read(w.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):  # pragma: no cover - spurious wake-up
            return
        except OSError:
            data = b""
        if not data:
            self._reap(w, fail=True)
            return
        buf = w.inbuf + data if w.inbuf else data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            size, = _LEN.unpack_from(buf, pos)
            head = 4
            if size == -1:  # multiprocessing's framing of messages of 2 GiB and more
                if end - pos < 12:
                    break
                size, = _LEN64.unpack_from(buf, pos + 4)
                head = 12
            if end - pos < head + size:
                break
            # A reply of one of this stage's own worker processes over its private pipe
            # (what Connection.recv unpickles too); never a journal or a message.
            reply = pickle.loads(memoryview(buf)[pos + head:pos + head + size])
            pos += head + size
            self._reply(w, reply)
            if w not in self._all:  # reaped meanwhile (an abandon): the rest is moot
                return
        w.inbuf = buf[pos:] if pos < end else b""

    def _reply(self, w: _Worker, reply: Any) -> None:
        now = time.monotonic()
        jobs = w.jobs
        if type(reply) is tuple:  # a lot message's outputs (or the first of them)
            self._lot_reply(w, reply)
            settled = self.lot_settled
            if settled is not None:
                settled()  # the engine may take the next lot now, with the room freed
            if self._pending:
                self._dispatch()  # and it goes out in this turn, not two turns later
            return
        else:
            ended = []
            for r in reply:
                if not jobs:  # pragma: no cover - a reply nobody waits for
                    break
                job = jobs.popleft()
                w.replied += 1
                w.items -= 1
                if job.msg_bytes:  # the last job of its message
                    w.piped -= job.msg_bytes
                    w.msgs -= 1
                if not job.abandoned:
                    ended.append((job, ("back", None) if r == NOT_STARTED else ("ok", r)))
            self._measure(now, len(reply))
            if not jobs and w.timer is not None:
                w.timer.cancel()
                w.timer = None
            done = self.done
            for job, outcome in ended:
                done(job, outcome)  # type: ignore[misc]
        if self._pending and not self._dispatch_due:
            self._dispatch_due = True
            self.loop.call_soon(self._dispatch)

    def _lot_reply(self, w: _Worker, reply: Any) -> None:
        """``(outputs, errors, back)`` for the next items of ``w``'s lot units (one
        message may span several units, a partial reply part of one)."""
        outputs, errors, back = reply
        jobs = w.jobs
        m = len(outputs)
        count = m + back
        w.replied += count
        w.items -= count
        ended = []
        pos = 0
        if errors and len(errors) > 1:
            errors.sort(key=_first)
        while pos < count and jobs:
            unit = jobs[0]
            first = unit.start
            if pos < m:  # ran
                take = min(unit.n, m - pos)
                if pos == 0 and take == m:
                    outs, errs = outputs, errors
                else:
                    outs = outputs[pos:pos + take]
                    errs = [(p - pos, e) for p, e in errors if pos <= p < pos + take]
                ended.append((unit, first, outs, errs))
            else:  # did not start (a stop)
                take = min(unit.n, count - pos)
                ended.append((unit, first, None, first + take))
            unit.start += take
            pos += take
            if unit.start >= unit.stop:
                jobs.popleft()
                if unit.msg_bytes:  # the last unit of its message
                    w.piped -= unit.msg_bytes
                    w.msgs -= 1
        self._measure(time.monotonic(), count)
        if not jobs and w.timer is not None:
            w.timer.cancel()
            w.timer = None
        for unit, first, outs, rest in ended:
            if unit.abandoned:
                continue
            if outs is not None:
                self.lot_done(unit.lot, first, outs, rest)  # type: ignore[misc]
            else:
                self.lot_back(unit.lot, first, rest)  # type: ignore[misc]

    def _measure(self, now: float, count: int) -> None:
        """The stage's seconds per item between replies: the chunk size's guide."""
        if count:
            per = (now - self._last_reply) / count if self._last_reply else 0.0
            self._last_reply = now
            if 0 < per < 60:
                self._item_seconds = per if not self._item_seconds else \
                    0.8 * self._item_seconds + 0.2 * per

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
        if 0 <= idx < w.items and since > 0 and now - since >= timeout:
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
        # The item that ran when the worker died; between items (or dying while it read
        # a message) the first unfinished one is blamed, so that an item that kills
        # workers before it starts is still dead-lettered in the end.
        culprit, at = w.locate(idx if 0 <= idx < w.items else 0)
        jobs = list(w.jobs)
        w.jobs.clear()
        w.items = w.msgs = 0
        if culprit is not None:
            keys = culprit.keys if type(culprit) is _Job else [culprit.lot.key(at)]
        if not kill:
            self.deaths += 1
            log.warning("stage %r: worker process %s %s%s; a new one takes the next item",
                        self.stage.name, w.proc.pid, describe_exit(code),
                        f" while running key(s) {keys}" if culprit is not None else "")
        back: List[Any] = []
        for job in jobs:
            if job.abandoned:
                continue
            if job is not culprit:
                job.msg_bytes = 0
                back.append(job)
            elif type(job) is _Unit:  # the lot's other items of that message go again
                for s, e in ((job.start, at), (at + 1, job.stop)):
                    if e > s:
                        back.append(_Unit(job.lot, s, e))
        if self._held:  # stopping: what did not start goes back to the engine
            for job in back:
                self.loop.call_soon(self._give_back if type(job) is _Job else
                                    self._lot_back, job)
        else:
            self._pending.extendleft(reversed(back))  # not started or results lost: again
        if culprit is not None and not culprit.abandoned:
            err: Optional[BaseException] = head_error
            if err is None and fail:
                err = WorkerDied(
                    f"worker process {w.proc.pid} of stage {self.stage.name!r} "
                    f"{describe_exit(code)} while running key(s) {keys}")
            if err is None:  # abandoned for a halt: nothing to report
                pass
            elif type(culprit) is _Job:
                self.loop.call_soon(self._fail, culprit, err)
            else:
                self.loop.call_soon(self._lot_fail, culprit, at, err)
        if not self._closed and (self._pending or len(self._all) < self.stage.workers):
            self._dispatch_soon()

    def hold(self) -> None:
        """The run stops: items handed over but not started come back to the engine
        (``("back", None)``, or ``lot_back``), which starts them again only if its
        scheduler still wants them (a drain does; a tripped kill switch does not: P7)."""
        self._held = True
        for w in self._all:
            w.state[STATE_ALLOW] = w.state[STATE_STARTED]
        while self._pending:
            job = self._pending.popleft()
            self.loop.call_soon(self._give_back if type(job) is _Job else self._lot_back,
                                job)

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
#: Bytes read from a worker's pipe at once (a pipe holds 64 KiB by default).
READ_SIZE = 64 * 1024
_LEN = struct.Struct("!i")  # multiprocessing.Connection's framing: a length, then bytes
_LEN64 = struct.Struct("!Q")


def _load(w: _Worker) -> int:
    return w.items


def _first(pair: Tuple[int, Any]) -> int:
    return pair[0]


def _dumps(obj: Any) -> bytes:
    """``obj`` pickled for a pipe: plain ``pickle`` when it can (several times faster
    than a ``ForkingPickler`` per message), else ``ForkingPickler`` (its reducers for
    connections, sockets and the like).  The other end reads both with ``recv``."""
    try:
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        return bytes(ForkingPickler.dumps(obj))


PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
