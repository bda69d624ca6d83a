"""PersistentQueue: a ``multiprocessing.JoinableQueue`` that journals puts and acks.

Every ``put`` is written to an append-only pickup journal before it reaches the queue,
and every ``task_done`` is written before it is acknowledged.  After a crash (``kill -9``
of any producer or consumer, or with ``durability="fsync"`` a power loss) the next run
finds exactly the unfinished work and :meth:`PersistentQueue.requeue_unprocessed_work`
puts it back, under its original message ids.

Message ids and ``task_done``
    Every put gets a message id (``put`` returns it).  The queue carries ``(id, body)``;
    ``get()`` returns the body, as ``queue.Queue`` does, and the consuming process
    remembers the id of every body it got and has not acknowledged yet.
    ``task_done(body)`` acknowledges the unacknowledged message of this process that *is*
    ``body`` (identity), else the oldest one equal to it; ``task_done()`` with no
    argument acknowledges the oldest.  So two equal messages are two pieces of work, and
    each needs its own ``task_done``.  When the exact id matters (acks from another
    process, out-of-order acks of equal bodies), use :meth:`PersistentQueue.get_message`,
    which returns a picklable :class:`Message` ``(id, body)``, and pass that message (or
    ``id=...``) to ``task_done``.

See the module :mod:`pympx_queues.journal` for the journal format and layout.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.reduction
import multiprocessing.util
import os
import re
import select
import threading
import time
import weakref
from collections import deque
from queue import Empty, Full
from typing import (Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence,
                    Tuple, Union)

from .. import _fs
from .. import journal as jr
from ..errors import ConsumerDied, QueueClosed, QueueFailed
from ..sentinels import DONE, FAILED, is_sentinel

log = logging.getLogger("pympx_queues.persistent")

__all__ = ["PersistentQueue", "Message", "return_same"]

_MISSING: Any = object()

#: Message ids this library makes: the putting process's 12-hex id prefix (also the random
#: part of its journal's name), a dot, a hex counter.
_ID_RE = re.compile(r"[0-9a-f]{12}\.[0-9a-f]+")


class Message(NamedTuple):
    """A message with its id, as returned by :meth:`PersistentQueue.get_message`."""

    id: str
    body: Any


class _Batch:
    """Messages that travel as one queue item (``put_many(..., together=True)``)."""

    __slots__ = ("items",)

    def __init__(self, items: List[Tuple[str, Any]]) -> None:
        self.items = items

    def __reduce__(self) -> Any:
        return (_Batch, (self.items,))


def return_same(x: Any) -> Any:
    """Identity formatter/converter (picklable, unlike a lambda)."""
    return x


def _default_context() -> Any:
    """The context of the start method in force, without fixing the default one.

    ``multiprocessing.get_context()`` with no argument would freeze the default start
    method (a later ``set_start_method`` then fails); asking by name does not.
    """
    method = multiprocessing.get_start_method(allow_none=True)
    if method is None:
        method = multiprocessing.get_all_start_methods()[0]  # the platform default
    return multiprocessing.get_context(method)


class _Consumers:
    """Which processes took messages from a queue, and how many each still holds.

    A table in shared memory (inherited by the processes the queue is passed to), one
    slot per consumer process: ``(pid, start time, held, reading)``.  A process claims a
    slot the first time it takes from the queue and from then on writes only its own
    ``held`` (messages taken out of the pipe and not acknowledged yet, under its own
    lock) and ``reading`` (1 while it holds the pipe's read lock), so the hot paths pay
    a store and no shared lock.  ``join()`` reads the table to find consumers that died
    holding messages, or holding the read lock (multiprocessing never releases it then:
    nobody can take from the queue again); the exit of a producer reads it to know
    whether anybody is left to read the pipe.  A slot whose process is gone and held
    nothing is reused.
    """

    SLOTS = 256
    _FIELDS = 4  # pid, start time, held, reading

    def __init__(self, ctx: Any) -> None:
        self._array = ctx.RawArray("q", self.SLOTS * self._FIELDS)
        self._lock = ctx.Lock()
        self._view: Any = None

    def __getstate__(self) -> Tuple[Any, Any]:
        return self._array, self._lock

    def __setstate__(self, state: Tuple[Any, Any]) -> None:
        self._array, self._lock = state
        self._view = None

    @property
    def view(self) -> Any:
        if self._view is None:
            self._view = memoryview(self._array).cast("B").cast("q")
        return self._view

    def register(self) -> int:
        """Claim a slot for this process; the index of its ``held`` cell (-1: table full,
        this process is not tracked)."""
        pid, start = os.getpid(), _fs.my_start_time()
        v = self.view
        with self._lock:
            free = -1
            for base in range(0, len(v), self._FIELDS):
                if v[base] == pid and v[base + 1] == start:
                    return base + 2  # already registered (a second copy of the queue)
                if free < 0 and (v[base] == 0 or (
                        v[base + 2] == 0 and v[base + 3] == 0
                        and not _fs.process_alive(v[base], v[base + 1]))):
                    free = base
            if free < 0:
                log.warning("more than %d consumer processes: pid %d is not tracked by "
                            "join()", self.SLOTS, pid)
                return -1
            v[free + 2] = v[free + 3] = 0
            v[free + 1] = start
            v[free] = pid
            return free + 2

    def _entries(self) -> List[Tuple[int, int, int, int]]:
        v = self.view
        return [(v[b], v[b + 1], v[b + 2], v[b + 3])
                for b in range(0, len(v), self._FIELDS) if v[b]]

    def dead_holders(self) -> List[Tuple[int, int, bool]]:
        """(pid, held, reading) of each registered process that is gone and held
        messages or the read lock."""
        return [(pid, held, reading == _RECEIVING)
                for pid, start, held, reading in self._entries()
                if (held > 0 or reading == _RECEIVING) and not _fs.process_alive(pid, start)]

    def give_back_read_lock(self, lock: Any) -> None:
        """Release the pipe's read lock for a consumer killed while it waited for data
        (multiprocessing never would: every other consumer would wait forever).  Only
        while waiting: no byte of a message had been read, so the pipe is intact."""
        v = self.view
        with self._lock:
            for b in range(0, len(v), self._FIELDS):
                if v[b] and v[b + 3] == _WAITING and not _fs.process_alive(v[b], v[b + 1]):
                    log.warning("consumer pid %d was killed inside get(): releasing the "
                                "queue's read lock it held", v[b])
                    v[b + 3] = 0
                    try:
                        lock.release()
                    except ValueError:  # pragma: no cover - released already
                        pass

    def abandoned(self, children: Sequence[Any] = ()) -> bool:
        """True when no process is left that reads, or may yet read, the queue's pipe:
        some process took from it or was started with it (``children``: the Popen
        objects of the processes this one sent it to), and all of them but the caller
        (which is exiting) are dead."""
        me, entries = os.getpid(), self._entries()
        if any(reading == _RECEIVING and not _fs.process_alive(pid, start)
               for pid, start, _, reading in entries):
            return True  # killed inside a message: the pipe cannot be read any more
        readers = [(pid, start) for pid, start, _, _ in entries if pid != me]
        children = [c for c in children if getattr(c, "pid", None)]
        if not readers and not children:
            return False  # nobody known yet: they may still be starting
        return not any(_fs.process_alive(pid, start) for pid, start in readers) \
            and not any(c.poll() is None for c in children)


#: ``reading`` cell of the consumer table: the process holds the pipe's read lock and
#: waits for data (a kill then leaves the pipe intact: the lock can be given back), or
#: it is receiving a message (a kill may leave half a message in the pipe).
_WAITING, _RECEIVING = 1, 2


class _ReadLock:
    """The pipe's read lock, marked in this process's slot of the consumer table while
    held (``cells[at]``; ``at`` is -1 until the process registers as a consumer)."""

    __slots__ = ("lock", "cells", "at")

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.cells: Any = None
        self.at = -1

    def acquire(self, block: bool = True, timeout: Optional[float] = None) -> bool:
        got = self.lock.acquire(block, timeout)
        if got and self.at >= 0:
            self.cells[self.at] = _WAITING
        return bool(got)

    def receiving(self) -> None:
        if self.at >= 0:
            self.cells[self.at] = _RECEIVING

    def release(self) -> None:
        if self.at >= 0:
            self.cells[self.at] = 0
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _JoinableQueue(multiprocessing.queues.JoinableQueue):  # type: ignore[type-arg]
    """``multiprocessing.JoinableQueue`` that knows its consumers (see :class:`_Consumers`).

    Two things differ: ``join(timeout)`` raises :class:`ConsumerDied` instead of waiting
    forever for messages a dead consumer held, and a process that put messages does not
    hang at exit when every consumer of the pipe is dead.
    """

    #: How often a waiting ``join()`` looks for dead consumers (seconds).
    POLL = 0.1

    def __init__(self, maxsize: int = 0, *, ctx: Any) -> None:
        super().__init__(maxsize, ctx=ctx)
        self.consumers = _Consumers(ctx)
        self._children: List[Any] = []
        self._rlock: Any = _ReadLock(self._rlock)
        self._waiter: Any = None  # (pid, select.poll() on the reader) for get()

    def __getstate__(self) -> Any:
        marked, self._rlock = self._rlock, self._rlock.lock  # the lock itself travels
        try:
            base: Any = super().__getstate__()  # only while spawning a process
            state = base + (self.consumers,)
        finally:
            self._rlock = marked
        popen = multiprocessing.context.get_spawning_popen()
        if popen is not None:
            self._children.append(popen)  # a process that may read the pipe (see exit)
        return state

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state[:-1])
        self.consumers = state[-1]
        self._children = []
        self._rlock = _ReadLock(self._rlock)
        self._waiter = None

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """``multiprocessing.Queue.get``, telling the consumer table whether this process
        waits for data or receives a message while it holds the read lock."""
        if self._closed:  # type: ignore[attr-defined]
            raise ValueError(f"Queue {self!r} is closed")
        rlock, poll = self._rlock, self._poll  # type: ignore[attr-defined]
        if block and timeout is None:
            lock, cells, at = rlock.lock, rlock.cells, rlock.at  # rlock, inlined
            lock.acquire()
            try:
                waiter = self._waiter
                if waiter is None or waiter[0] != os.getpid():
                    # One poll object per process: Connection.poll(None) would build a
                    # selector per call (several microseconds).
                    waiter = (os.getpid(), select.poll())
                    waiter[1].register(self._reader.fileno(),  # type: ignore[attr-defined]
                                       select.POLLIN)
                    self._waiter = waiter
                if at >= 0:
                    cells[at] = _WAITING
                waiter[1].poll()
                if at >= 0:
                    cells[at] = _RECEIVING
                res = self._recv_bytes()  # type: ignore[attr-defined]
            finally:
                if at >= 0:
                    cells[at] = 0
                lock.release()
            self._sem.release()  # type: ignore[attr-defined]
        else:
            if block:
                deadline = time.monotonic() + timeout  # type: ignore[operator]
            if not rlock.acquire(block, timeout):
                raise Empty
            try:
                if block:
                    if not poll(deadline - time.monotonic()):
                        raise Empty
                elif not poll():
                    raise Empty
                rlock.receiving()
                res = self._recv_bytes()  # type: ignore[attr-defined]
                self._sem.release()  # type: ignore[attr-defined]
            finally:
                rlock.release()
        # unserialize the data after having released the lock
        return multiprocessing.reduction.ForkingPickler.loads(res)

    def _start_thread(self) -> None:
        super()._start_thread()  # type: ignore[misc]
        # Runs at the exit of this process before multiprocessing's own finalizers
        # (priority 10 closes the feeder, -5 joins it).
        multiprocessing.util.Finalize(self, _JoinableQueue._flush_at_exit,
                                      [weakref.ref(self), self.consumers], exitpriority=20)

    @staticmethod
    def _flush_at_exit(ref: Any, consumers: _Consumers) -> None:
        """Wait until the feeder thread has written every message to the pipe, as
        multiprocessing does, but stop waiting when every consumer that took from the
        queue is dead: nobody will ever read the pipe again, and the feeder would block
        the exit forever.  Abandoning the unwritten messages is safe because each of
        them was journaled before it was queued (G1): the next run requeues them.
        While no process that could read is known yet (none took from the queue, this
        process started none with it) the wait is multiprocessing's: the consumers may
        still be starting.
        """
        q = ref()
        thread = getattr(q, "_thread", None)
        if q is None or thread is None or q._joincancelled:
            return
        q.close()  # the feeder ends once it has flushed its buffer
        while True:
            thread.join(_JoinableQueue.POLL)
            if not thread.is_alive():
                return
            consumers.give_back_read_lock(q._rlock.lock)
            if consumers.abandoned(q._children):
                log.warning("every consumer of the queue is dead: exiting without writing "
                            "the messages left in its pipe (they are in the journal; the "
                            "next run requeues them)")
                q.cancel_join_thread()
                return

    def join(self, timeout: Optional[float] = None) -> bool:  # type: ignore[override]
        """Wait until every task is done: True; False after ``timeout`` seconds.

        Raises :class:`ConsumerDied` when a consumer died holding messages.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        unfinished = self._unfinished_tasks._semlock  # type: ignore[attr-defined]
        while True:
            step = self.POLL if deadline is None else min(self.POLL,
                                                          deadline - time.monotonic())
            with self._cond:  # type: ignore[attr-defined]
                if unfinished._is_zero():
                    return True
                if step > 0:
                    self._cond.wait(step)  # type: ignore[attr-defined]
                    if unfinished._is_zero():
                        return True
            self.consumers.give_back_read_lock(self._rlock.lock)
            dead = self.consumers.dead_holders()
            if dead:
                raise ConsumerDied(
                    "join(): consumer process(es) died holding work of this queue: "
                    + ", ".join(f"pid {pid} ({held} message{'s' if held != 1 else ''}"
                                + (", killed while receiving one: the queue's pipe cannot "
                                   "be read any more" if receiving else "") + ")"
                                for pid, held, receiving in dead)
                    + "; that work can never be acknowledged in this run (it is in the "
                    "journal: the next run's requeue_unprocessed_work() puts it back)",
                    tuple(pid for pid, _, _ in dead))
            if deadline is not None and time.monotonic() >= deadline:
                return False


def _check_hooks(name: str, hooks: Optional[Sequence[Callable[[Any], Any]]]
                 ) -> Optional[Tuple[Callable[[Any], Any], ...]]:
    if hooks is None:
        return None
    hooks = tuple(hooks)
    if not hooks or not all(callable(h) for h in hooks):
        raise TypeError(f"{name} must be a non-empty sequence of callables")
    if all(h is return_same or getattr(h, "__name__", "") == "return_same" for h in hooks):
        return None  # pympx's default: plain tagged JSON round-trips better
    return hooks


# Per-process attributes: never pickled, rebuilt in each process that uses the queue.
_PROCESS_STATE = ("_pid", "_lock", "_ilock", "_writer", "_inflight", "_ids", "_id_prefix",
                  "_closed", "_fast", "_keys_put", "_local_items", "_ctx", "_buffer",
                  "_batch_of", "_batch_left", "_batch_ids", "_registered", "_held_at",
                  "_held", "_prefix_journaled", "_run_rands")

# Queues of this process, reset in a forked child (its parent's journal, locks and
# unacknowledged messages are not its own).  Spawned children go through __setstate__.
_LIVE_QUEUES: "weakref.WeakSet[PersistentQueue]" = weakref.WeakSet()
_fork_hook_installed = False


def _after_fork_in_child() -> None:
    for q in list(_LIVE_QUEUES):
        q._pid = None
        q._ensure_process()


def _track(q: "PersistentQueue") -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_installed = True
    _LIVE_QUEUES.add(q)


class PersistentQueue:
    """A joinable multiprocessing queue whose work survives crashes (pympx API).

    :param pickup_file_prefix: names this queue's journals in the pickup dirs (default
        ``"unlabeled_queue"``); one pickup dir may hold several queues.
    :param current_pickup_dir: where this run journals its puts and acks (created, mode
        ``dir_mode``).  It may be the same directory run after run: earlier runs found in
        it are read, and compacted when they are finished.  ``None``: nothing is
        journaled (a plain joinable queue).
    :param previous_pickup_dir: an extra directory of earlier runs (pympx's rotation of
        one directory per run).  Its unfinished work is carried forward into
        ``current_pickup_dir`` when this queue is created; it is only read.
    :param formatter_list: optional per-field functions turning a message (or each item
        of a tuple/list message) into JSON-able values for the journal; the default
        journals JSON directly (tuples, bytes, sets and nested data round-trip).
    :param converter_list: the inverse functions, used when earlier work is requeued.
    :param number_of_workers: consumers, i.e. how many DONE/FAILED ``close``/``fail`` put.
    :param use_queue: ``False`` journals only: ``get`` then replays the journals of this
        run (all puts must be finished first, single consumer), as in pympx.
    :param durability: ``"flush"`` (default; a put or ack survives the crash of any
        process) or ``"fsync"`` (also power loss; each put/ack waits for an fsync, shared
        by concurrent threads; use :meth:`put_many` / :meth:`task_done_many` to batch).
    :param maxsize: bound of the in-memory queue (0: unbounded).
    :param context: a ``multiprocessing`` context or start-method name for the underlying
        queue; default: the start method in force (not fixed by this call).  Use the
        context you start your processes with.
    :param compact: recover torn journal tails and compact finished runs at creation.
    :param lock_timeout: seconds to wait for the pickup dir's compaction lock.

    The constructor reads earlier runs (blocks on file I/O and, briefly, the pickup
    dir's filelock).  It raises :class:`~pympx_queues.errors.JournalCorruptError` when an
    earlier journal is corrupt (see ``pympx-queues repair``), ``ValueError``/``TypeError``
    for bad arguments.

    The object pickles into child processes (spawn, forkserver, fork); each process
    writes its own journal.

    Crashed consumers: :meth:`join` raises :class:`~pympx_queues.errors.ConsumerDied`
    (naming the pids) rather than wait forever for work a dead consumer held.  A process
    that put messages waits at its exit, as with ``multiprocessing``, until they are in
    the queue's pipe, but not when every process that read from the queue (or that this
    one started with it) is dead: what is left in the pipe is in the journal already.
    """

    #: pympx's identity formatter, kept as a class attribute for compatibility.
    return_same = staticmethod(return_same)

    def __init__(self, pickup_file_prefix: Optional[str] = None,
                 current_pickup_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                 previous_pickup_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                 formatter_list: Optional[Sequence[Callable[[Any], Any]]] = None,
                 converter_list: Optional[Sequence[Callable[[Any], Any]]] = None,
                 number_of_workers: int = 1, use_queue: bool = True, *,
                 durability: str = _fs.FLUSH, maxsize: int = 0,
                 context: Any = None, compact: bool = True, lock_timeout: float = 60.0,
                 file_mode: int = _fs.DEFAULT_FILE_MODE,
                 dir_mode: int = _fs.DEFAULT_DIR_MODE) -> None:
        self.pickup_file_prefix = jr.check_prefix(
            "unlabeled_queue" if pickup_file_prefix is None else pickup_file_prefix)
        if isinstance(number_of_workers, bool) or not isinstance(number_of_workers, int) \
                or number_of_workers < 0:
            raise ValueError(f"number_of_workers must be an int >= 0, got {number_of_workers!r}")
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0, got {maxsize!r}")
        self.durability = _fs.check_durability(durability)
        self.number_of_workers = number_of_workers
        self.use_queue = bool(use_queue)
        self.current_pickup_dir = (os.path.abspath(os.fspath(current_pickup_dir))
                                   if current_pickup_dir is not None else None)
        self.previous_pickup_dir = (os.path.abspath(os.fspath(previous_pickup_dir))
                                    if previous_pickup_dir is not None else None)
        if not self.use_queue and self.current_pickup_dir is None:
            raise ValueError("use_queue=False needs a current_pickup_dir to journal into")
        self._formatters = _check_hooks("formatter_list", formatter_list)
        self._converters = _check_hooks("converter_list", converter_list)
        if (self._formatters is None) != (self._converters is None):
            raise ValueError("formatter_list and converter_list must be given together")
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.run_id = jr.new_run_id()

        # Earlier runs: recovered, compacted, and summarised for requeue and keys.
        history = self._load_history(compact, lock_timeout)
        # Work a still-running writer holds is its own, not unfinished work (G3).
        outstanding = history.outstanding(exclude_live=True)
        if history.live_ids:
            log.warning("queue %s: %d message(s) belong to runs whose processes are still "
                        "running; they are not requeued (dispose() those queues first)",
                        self.pickup_file_prefix, len({r.id for r in history.outstanding()}
                                                     & history.live_ids))
        self._outstanding: List[Tuple[str, Optional[str], Any]] = [
            (r.id, r.key, r.body) for r in outstanding]
        self._outstanding_keys: Dict[str, int] = {
            key: i for i, (_, key, _) in enumerate(self._outstanding) if key is not None}
        self._outstanding_ids = frozenset(mid for mid, _, _ in self._outstanding)
        self._done_keys = frozenset(history.keys_done())
        self._requeued: set = set()
        if self._outstanding:
            log.info("queue %s: %d unfinished message(s) from earlier runs",
                     self.pickup_file_prefix, len(self._outstanding))

        self._ctx = self._resolve_context(context)
        self.joinable_queue = (_JoinableQueue(maxsize, ctx=self._ctx.get_context())
                               if self.use_queue else None)
        self._pid: Optional[int] = None
        self._ensure_process()

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _resolve_context(context: Any) -> Any:
        if context is None:
            return _default_context()
        if isinstance(context, str):
            return multiprocessing.get_context(context)
        return context

    def _load_history(self, compact: bool, lock_timeout: float) -> jr.History:
        current, previous = self.current_pickup_dir, self.previous_pickup_dir
        if current is not None:
            _fs.makedirs(current, self.dir_mode, what="pickup dir")
            if compact:
                history, _ = jr.compact(current, self.pickup_file_prefix,
                                        extra_dirs=[previous] if previous else [],
                                        exclude_run=self.run_id, durability=self.durability,
                                        file_mode=self.file_mode, lock_timeout=lock_timeout)
                return history
        dirs = [d for d in (current, previous) if d is not None]
        return jr.scan_dirs(dirs, self.pickup_file_prefix, exclude_run=self.run_id)

    def _ensure_process(self) -> None:
        """(Re)build per-process state in a new process (after fork or unpickling)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        old_writer = getattr(self, "_writer", None)
        if old_writer is not None and old_writer.pid != pid:
            old_writer.forget()  # the parent's journal: close our copy of its fd only
        self._pid = pid
        self._lock = threading.RLock()
        self._ilock = threading.Lock()  # guards _inflight
        self._writer: Optional[jr.JournalWriter] = None
        self._inflight: Dict[str, Any] = {}  # id -> body, oldest first
        # Messages of together-batches got by this process but not handed out yet, and
        # which batch each handed-out one belongs to (one join() count per batch).
        self._buffer: "deque[Tuple[str, Any]]" = deque()
        self._batch_of: Dict[str, int] = {}
        self._batch_left: Dict[int, int] = {}
        self._batch_ids = itertools.count()
        self._ids = itertools.count()
        self._id_prefix = _fs.random_id(6)
        self._closed = False
        self._fast = self.use_queue  # hot paths allowed (cleared by close/fail)
        self._keys_put: set = set()
        self._local_items: Optional[List[Any]] = None
        # join()'s view of this process: registered as a consumer at its first get, then
        # _held[_held_at] = messages taken and not acknowledged (see _Consumers).
        self._registered = False
        self._held_at = -1
        self._held: Any = None
        self._prefix_journaled = False  # a journal of ours is named after _id_prefix
        self._run_rands: set = set()  # id prefixes of this run's journals (task_done(id=))
        if getattr(self, "_ctx", None) is None:
            self._ctx = None
        _track(self)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        for name in _PROCESS_STATE:
            state.pop(name, None)
        state["_requeued"] = set(self._requeued)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = None
        self._ctx = None
        self._ensure_process()

    @property
    def journaling(self) -> bool:
        """True when puts and acks are journaled (a ``current_pickup_dir`` was given)."""
        return self.current_pickup_dir is not None

    @property
    def journal_path(self) -> Optional[str]:
        """The journal this process writes (None until it first writes)."""
        writer = getattr(self, "_writer", None)
        return writer.path if writer is not None else None

    def _get_writer(self) -> Optional[jr.JournalWriter]:
        if self.current_pickup_dir is None:
            return None
        writer = self._writer
        if writer is None or writer.closed:
            for _ in range(3):
                # The first journal of a process is named after its id prefix, so that
                # task_done(id=...) in another process can tell a real id from a typo.
                rand = None if self._prefix_journaled else self._id_prefix
                try:
                    writer = jr.JournalWriter(
                        self.current_pickup_dir, self.pickup_file_prefix, self.run_id,
                        durability=self.durability, file_mode=self.file_mode, rand=rand)
                    self._prefix_journaled = True
                    break
                except FileExistsError:  # random id collision: draw again
                    self._prefix_journaled = True
                    continue
            else:  # pragma: no cover
                raise FileExistsError("could not create a unique journal file name")
            self._writer = writer
        return writer

    def _journal(self, records: Sequence[Tuple[str, str]]) -> None:
        writer = self._get_writer()
        if writer is not None:
            writer.append(records)

    # ------------------------------------------------------------------ codec
    def _encode(self, obj: Any) -> Any:
        """JSON-able journal form of a message; raises TypeError/ValueError, writes nothing."""
        if self._formatters is None:
            return jr.encode_value(obj)
        f = self._formatters
        if isinstance(obj, (tuple, list)):
            if len(obj) > len(f):
                raise ValueError(f"message has {len(obj)} fields but formatter_list has "
                                 f"{len(f)} functions")
            return {jr.TAG_FORMATTED: [jr.encode_value(f[n](x)) for n, x in enumerate(obj)]}
        return {jr.TAG_FORMATTED: jr.encode_value(f[0](obj))}

    def _decode(self, data: Any) -> Any:
        if isinstance(data, dict) and len(data) == 1 and jr.TAG_FORMATTED in data:
            inner = data[jr.TAG_FORMATTED]
            c = self._converters or (return_same,)
            if isinstance(inner, list):
                return tuple(c[min(n, len(c) - 1)](jr.decode_value(x))
                             for n, x in enumerate(inner))
            return c[0](jr.decode_value(inner))
        return jr.decode_value(data)

    # ------------------------------------------------------------------ producer side
    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed(f"queue {self.pickup_file_prefix} is closed for puts in this "
                              "process (close() or fail() was called)")

    def _new_id(self) -> str:
        return f"{self._id_prefix}.{next(self._ids):x}"

    def _put_batch(self, objs: Sequence[Any], keys: Sequence[Optional[str]],
                   block: bool, timeout: Optional[float],
                   ids: Optional[Sequence[str]] = None,
                   together: bool = False) -> List[Optional[str]]:
        self._ensure_process()
        self._check_open()
        timeout = _fs.check_timeout(timeout)
        plan: List[Tuple[str, Any, str, bool]] = []  # (id, obj, record payload, requeue)
        result: List[Optional[str]] = []
        with self._lock:
            batch_keys: set = set()
            for n, obj in enumerate(objs):
                if is_sentinel(obj):
                    raise ValueError("put DONE/FAILED with close()/fail(), not put()")
                key = keys[n]
                if key is not None and not isinstance(key, str):
                    raise TypeError(f"key must be a str, got {type(key).__name__}")
                mid = ids[n] if ids is not None else None
                requeue = mid is not None
                if key is not None and not requeue:
                    if key in self._done_keys or key in self._keys_put or key in batch_keys:
                        result.append(None)  # idempotent: already done or already queued
                        continue
                    index = self._outstanding_keys.get(key)
                    if index is not None:
                        mid = self._outstanding[index][0]  # redo it under its first id
                        requeue = True
                        if mid in self._requeued:
                            result.append(None)
                            continue
                if key is not None:
                    batch_keys.add(key)
                if mid is None:
                    mid = self._new_id()
                body = (jr.dumps_value(obj) if self._formatters is None
                        else jr.dumps(self._encode(obj)))
                if key is None and not requeue:
                    record = f'{{"i":"{mid}","m":{body}}}'  # ids of our own need no escaping
                else:
                    extra = {"k": key} if key is not None else {}
                    if requeue:
                        extra["r"] = 1
                    record = f'{{"i":{jr.dumps(mid)},"m":{body},{jr.dumps(extra)[1:]}'
                plan.append((mid, obj, record, requeue))
                result.append(mid)
            if not plan:
                return result
            # G1: the records are written (and in fsync mode synced) before the queue
            # sees the messages and before put returns.
            self._journal([(jr.KIND_PUT, p) for _, _, p, _ in plan])
            self._requeued.update(mid for mid, _, _, requeue in plan if requeue)
            self._keys_put.update(batch_keys)
        if self.use_queue and together:
            assert self.joinable_queue is not None
            try:
                self.joinable_queue.put(_Batch([(mid, obj) for mid, obj, _, _ in plan]),
                                        block, timeout)
            except Full:
                self._journal([(jr.KIND_CANCEL, jr.dumps({"i": m})) for m, _, _, _ in plan])
                raise
        elif self.use_queue:
            assert self.joinable_queue is not None
            for n, (mid, obj, _, _) in enumerate(plan):
                try:
                    self.joinable_queue.put((mid, obj), block, timeout)
                except Full:
                    # Withdraw what never reached the queue, so the journal stays true.
                    self._journal([(jr.KIND_CANCEL, jr.dumps({"i": m}))
                                   for m, _, _, _ in plan[n:]])
                    raise
        return result

    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None, *,
            key: Optional[str] = None) -> Optional[str]:
        """Journal ``obj`` then put it on the queue; return its message id.

        Blocks on the journal write (and fsync in fsync mode) and, with a bounded queue,
        for a free slot (``block``/``timeout`` as in ``queue.Queue``; ``queue.Full`` when
        none frees up, and the journal records the put as withdrawn).

        ``key`` makes the put idempotent across restarts: a key completed in an earlier
        (unfinished) run, or already put by this process, is skipped and ``None``
        returned; a key still outstanding from an earlier run is put under its original
        id, so completing it completes the old work.

        Raises :class:`~pympx_queues.errors.QueueClosed` after ``close()``/``fail()`` in
        this process, ``TypeError`` for a message the journal cannot encode (an
        unsupported type, a container that contains itself) and ``ValueError`` for a NaN
        or infinite float, a negative timeout or a DONE/FAILED sentinel; nothing is written
        then.
        """
        writer = self._writer
        if key is None and self._fast and obj is not DONE and obj is not FAILED \
                and (self.current_pickup_dir is None
                     or (writer is not None and writer._fd is not None)):
            # Hot path (no key, no lock): journal one record, then queue the message.
            if timeout is not None and not ((type(timeout) is float or type(timeout) is int)
                                            and timeout >= 0):
                timeout = _fs.check_timeout(timeout)  # raises
            mid = f"{self._id_prefix}.{next(self._ids):x}"
            if writer is not None:
                body = (jr.dumps_value(obj) if self._formatters is None
                        else jr.dumps(self._encode(obj)))
                # G1: written (synced in fsync mode) before the queue sees it.  The body
                # is encoded first: a bad message raises with nothing written.
                writer.append_one(jr.KIND_PUT, f'{{"i":"{mid}","m":{body}}}')
            try:
                self.joinable_queue.put((mid, obj), block, timeout)  # type: ignore[union-attr]
            except Full:
                if writer is not None:
                    writer.append_one(jr.KIND_CANCEL, f'{{"i":"{mid}"}}')
                raise
            return mid
        return self._put_batch([obj], [key], block, timeout)[0]

    def put_nowait(self, obj: Any, *, key: Optional[str] = None) -> Optional[str]:
        """``put(obj, block=False)``."""
        return self.put(obj, False, key=key)

    def put_many(self, objs: Sequence[Any], block: bool = True,
                 timeout: Optional[float] = None, *,
                 keys: Optional[Sequence[Optional[str]]] = None,
                 together: bool = False) -> List[Optional[str]]:
        """Put several messages with one journal write (one fsync in fsync mode).

        Same rules and errors as :meth:`put`; all messages are encoded before anything is
        written, so a bad one fails the whole call with nothing written.  Returns the ids
        (``None`` for skipped keys).

        ``together=True`` also sends them as one item of the in-memory queue: one
        consumer takes the whole batch (its ``get``/``get_many`` hand the messages out
        one by one), which saves most of ``multiprocessing``'s per-message cost.  That
        consumer must acknowledge them itself (``join`` counts the batch as one task).
        """
        objs = list(objs)
        if keys is None:
            keys = [None] * len(objs)
        elif len(keys) != len(objs):
            raise ValueError("keys must have one entry per message")
        return self._put_batch(objs, list(keys), block, timeout, together=together)

    def _put_sentinels(self, sentinel: Any, kind: str) -> None:
        self._ensure_process()
        with self._lock:
            was_closed, self._closed = self._closed, True
            self._fast = False
            if was_closed:
                if sentinel is DONE:
                    return  # close() is idempotent: one DONE per worker, once
                self._check_open()  # fail() after close()/fail(): QueueClosed, as put
            self._journal([(kind, jr.dumps({"workers": self.number_of_workers}))])
        if self.use_queue:
            for _ in range(self.number_of_workers):
                self._enqueue_sentinel(sentinel)

    def _enqueue_sentinel(self, sentinel: Any, block: bool = True,
                          timeout: Optional[float] = None) -> None:
        """Queue a sentinel that ``join()`` does not wait for (it is not work)."""
        assert self.joinable_queue is not None
        self.joinable_queue.put(sentinel, block, timeout)
        self.joinable_queue.task_done()  # settles the count the put just raised

    def close(self) -> None:
        """End the stream: journal the close and put one DONE per worker.

        Puts from this process raise :class:`QueueClosed` afterwards; a second
        ``close()`` does nothing.  May block on a full bounded queue.  The queue stays
        usable for ``get``/``task_done``/``join``.
        """
        self._put_sentinels(DONE, jr.KIND_CLOSE)

    def fail(self) -> None:
        """Fail the run: journal it and put one FAILED per worker (consumers stop).

        Raises :class:`~pympx_queues.errors.QueueClosed` after ``close()`` or ``fail()``
        in this process (the stream has already ended; nothing is written).
        """
        self._ensure_process()
        self._check_open()
        log.error("queue %s: failing the run (FAILED to %d worker(s))",
                  self.pickup_file_prefix, self.number_of_workers)
        self._put_sentinels(FAILED, jr.KIND_FAIL)

    @contextlib.contextmanager
    def producing(self) -> Iterator["PersistentQueue"]:
        """``with q.producing():`` closes the stream on success, fails it on an exception."""
        try:
            yield self
        except BaseException:
            if not self._closed:  # closed inside the block: the stream already ended
                self.fail()
            raise
        self.close()

    # ------------------------------------------------------------------ consumer side
    def _load_local_items(self) -> List[Any]:
        """use_queue=False: this run's journaled, unfinished puts, then DONE."""
        assert self.current_pickup_dir is not None
        history = jr.scan_dirs([self.current_pickup_dir], self.pickup_file_prefix)
        run = history.runs.get(self.run_id)
        items: List[Any] = []
        if run is not None:
            for mid, req in history.requested.items():
                if req.run == self.run_id and mid not in history.completed \
                        and mid not in history.cancelled:
                    items.append((mid, self._decode(req.body)))
        return items

    def _take(self, block: bool, timeout: Optional[float]) -> Any:
        self._ensure_process()
        timeout = _fs.check_timeout(timeout)
        if not self.use_queue:
            with self._lock:
                if self._local_items is None:
                    self._local_items = self._load_local_items()
                if not self._local_items:
                    return DONE
                item = self._local_items.pop(0)
        else:
            assert self.joinable_queue is not None
            if self._buffer:
                with self._ilock:
                    if self._buffer:
                        item = self._buffer.popleft()
                        self._inflight[item[0]] = item[1]
                        return item
            if not self._registered:
                self._register()
            item = self.joinable_queue.get(block, timeout)
            if is_sentinel(item):
                return item  # settled for join() when it was put
            if type(item) is _Batch:
                return self._unpack(item)
        mid, obj = item
        with self._ilock:
            self._inflight[mid] = obj
            self._note_held()
        return item

    def _register(self) -> None:
        """First take in this process: claim a slot in the queue's consumer table."""
        consumers = self.joinable_queue.consumers  # type: ignore[union-attr]
        with self._ilock:
            if not self._registered:
                self._held = consumers.view
                self._held_at = consumers.register()
                self._registered = True
                if self._held_at >= 0:  # mark the read lock while this process holds it
                    rlock = self.joinable_queue._rlock  # type: ignore[union-attr]
                    rlock.cells, rlock.at = self._held, self._held_at + 1

    def _note_held(self) -> None:
        """Publish how many messages this process holds (call with ``_ilock`` held)."""
        if self._held_at >= 0:
            self._held[self._held_at] = len(self._inflight) + len(self._buffer)

    def _unpack(self, batch: _Batch) -> Tuple[str, Any]:
        """Keep a together-batch in this process; hand out its first message."""
        with self._ilock:
            token = next(self._batch_ids)
            self._batch_left[token] = len(batch.items)
            for mid, _ in batch.items:
                self._batch_of[mid] = token
            self._buffer.extend(batch.items[1:])
            first = batch.items[0]
            self._inflight[first[0]] = first[1]
            self._note_held()
        return first

    def _settle(self, mids: Sequence[str]) -> None:
        """Tell ``join()``: one task per single message, one per fully acked batch."""
        n = 0
        with self._ilock:
            for mid in mids:
                token = self._batch_of.pop(mid, None) if self._batch_of else None
                if token is None:
                    n += 1
                    continue
                left = self._batch_left[token] - 1
                if left:
                    self._batch_left[token] = left
                else:
                    del self._batch_left[token]
                    n += 1
        for _ in range(n):
            self.joinable_queue.task_done()  # type: ignore[union-attr]
        with self._ilock:  # after the ack: a kill in between over-reports, never hangs
            self._note_held()

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the next message body (or DONE / FAILED).

        Blocks until a message arrives if ``block`` (at most ``timeout`` seconds, then
        ``queue.Empty``); with ``block=False`` raises ``queue.Empty`` at once when none
        is ready.  The id is remembered for :meth:`task_done`.  ``ValueError`` for a
        negative timeout.
        """
        if self.use_queue and not self._buffer:
            if timeout is not None and not ((type(timeout) is float or type(timeout) is int)
                                            and timeout >= 0):
                timeout = _fs.check_timeout(timeout)  # raises
            if not self._registered:
                self._register()
            item = self.joinable_queue.get(block, timeout)  # type: ignore[union-attr]
            if item is DONE or item is FAILED:
                return item  # sentinels were settled for join() when they were put
            if type(item) is _Batch:
                return self._unpack(item)[1]
            with self._ilock:
                self._inflight[item[0]] = item[1]
                if self._held_at >= 0:  # _note_held(), inlined on the hot path
                    self._held[self._held_at] = len(self._inflight) + len(self._buffer)
            return item[1]
        item = self._take(block, timeout)
        return item if is_sentinel(item) else item[1]

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(False)

    def get_message(self, block: bool = True, timeout: Optional[float] = None
                    ) -> Union[Message, Any]:
        """Like :meth:`get` but returns a :class:`Message` ``(id, body)`` (or a sentinel)."""
        item = self._take(block, timeout)
        return item if is_sentinel(item) else Message(*item)

    def get_many(self, max_items: int, block: bool = True,
                 timeout: Optional[float] = None) -> List[Any]:
        """Up to ``max_items`` bodies: waits (like :meth:`get`) for the first only.

        A DONE/FAILED sentinel ends the batch and is its last element.  Pair with
        :meth:`task_done_many` to acknowledge a batch with one journal write.
        """
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        out = [self.get(block, timeout)]
        from_batch = bool(self._buffer)
        if from_batch:
            with self._ilock:  # the rest of a together-batch, in one go
                buffer, inflight = self._buffer, self._inflight
                while buffer and len(out) < max_items:
                    mid, body = buffer.popleft()
                    inflight[mid] = body
                    out.append(body)
        while len(out) < max_items and not is_sentinel(out[-1]):
            if from_batch and not self._buffer:
                break  # the rest of a together-batch only: leave the queue to the others
            try:
                out.append(self.get(False))
            except Empty:
                break
        return out

    def _resolve(self, obj: Any, mid: Optional[str]) -> Tuple[str, Any]:
        """(id, body popped from the in-flight map or _MISSING) for one ack."""
        if isinstance(obj, Message):
            mid = obj.id
        inflight = self._inflight
        if mid is not None:
            if not isinstance(mid, str):
                raise TypeError(f"message id must be a str, got {type(mid).__name__}")
            value = inflight.pop(mid, _MISSING)
            if value is _MISSING and not self._known_id(mid):
                raise ValueError(f"task_done: unknown message id {mid!r}: no message with "
                                 f"that id was put on queue {self.pickup_file_prefix} in "
                                 "this run or left by an earlier one (nothing written)")
            return mid, value
        if not inflight:
            raise ValueError("task_done() called more times than this process called get()")
        if obj is _MISSING:
            key = next(iter(inflight))
            return key, inflight.pop(key)
        for key, value in inflight.items():
            if value is obj:
                del inflight[key]
                return key, value
        for key, value in inflight.items():
            try:
                equal = bool(value == obj)
            except Exception:
                equal = False
            if equal:
                del inflight[key]
                return key, value
        raise ValueError(f"task_done({obj!r}): no unacknowledged message equal to it was "
                         "got by this process")

    def _known_id(self, mid: str) -> bool:
        """True if ``mid`` names a message of this queue that this process did not get.

        O(1): an id left by an earlier run, or an id made by a process of this run (its
        prefix names one of this run's journals; the directory is listed again only for
        a prefix not seen yet).  Without a journal only the id's form can be checked.
        """
        if mid in self._outstanding_ids:
            return True
        if not _ID_RE.fullmatch(mid):
            return False
        prefix = mid[:12]
        if prefix == self._id_prefix or self.current_pickup_dir is None:
            return True
        if prefix not in self._run_rands:
            self._run_rands = {name.rand for _, name in jr.list_journals(
                self.current_pickup_dir, self.pickup_file_prefix) if name.run == self.run_id}
        return prefix in self._run_rands

    def task_done(self, obj: Any = _MISSING, *, id: Optional[str] = None) -> None:
        """Acknowledge one message: journal its completion, then settle it for ``join``.

        ``obj`` is a body returned by ``get`` in this process (see the module doc for how
        equal bodies are told apart), a :class:`Message`, or omitted (the oldest
        unacknowledged message of this process); ``id=`` names the message exactly (it
        may have been got by another process).  Blocks on the journal write (and fsync in
        fsync mode).  ``ValueError`` when nothing matches, or for an id that no process
        put on this queue (nothing is written then).
        """
        if id is None and self.use_queue and type(obj) is not Message \
                and obj is not DONE and obj is not FAILED:
            # Hot path: one record, ids of our own making need no JSON escaping.
            inflight = self._inflight
            with self._ilock:
                for mid in inflight:  # the oldest: acks in the order of the gets, O(1)
                    value = inflight[mid]
                    if value is obj or obj is _MISSING:
                        del inflight[mid]
                    else:
                        mid, value = self._resolve(obj, None)
                    break
                else:
                    mid, value = self._resolve(obj, None)  # raises ValueError
            writer = self._writer
            try:
                if (writer is None or writer._fd is None) and self.current_pickup_dir is not None:
                    with self._lock:
                        writer = self._get_writer()  # a new journal after a failed one
                if writer is not None:
                    # G4: the completion is journaled (synced in fsync mode) before the ack.
                    writer.append_one(jr.KIND_DONE, f'{{"i":"{mid}"}}')
            except BaseException:
                with self._ilock:
                    self._inflight[mid] = value  # a failed ack changes nothing
                raise
            if self._batch_of:
                self._settle((mid,))
            else:
                self.joinable_queue.task_done()  # type: ignore[union-attr]
                if self._held_at >= 0:
                    with self._ilock:  # after the ack: a kill in between never hangs join
                        self._held[self._held_at] = len(inflight) + len(self._buffer)
            return
        self.task_done_many([obj], ids=[id])

    def task_done_many(self, objs: Sequence[Any], *,
                       ids: Optional[Sequence[Optional[str]]] = None) -> None:
        """Acknowledge several messages with one journal write (one fsync in fsync mode).

        Sentinels in ``objs`` are ignored (so ``get_many``'s result can be passed back).
        """
        self._ensure_process()
        objs = list(objs)
        if ids is None:
            ids = [None] * len(objs)
        if len(ids) != len(objs):
            raise ValueError("ids must have one entry per message")
        resolved: List[str] = []
        with self._lock:
            taken: List[Tuple[str, Any]] = []
            try:
                with self._ilock:
                    inflight = self._inflight
                    for obj, mid in zip(objs, ids):
                        if mid is None and is_sentinel(obj):
                            continue
                        if mid is None and inflight and obj is not _MISSING:
                            # Acks in the order of the gets (get_many -> task_done_many):
                            # the oldest unacknowledged body is the one, O(1).
                            oldest = next(iter(inflight))
                            if inflight[oldest] is obj:
                                resolved.append(oldest)
                                taken.append((oldest, inflight.pop(oldest)))
                                continue
                        m, value = self._resolve(obj, mid)
                        resolved.append(m)
                        taken.append((m, value))
                if resolved:
                    # G4: the completion is journaled (synced in fsync mode) before the ack.
                    # Ids given by the caller are JSON-escaped; ids from the queue are ours.
                    given = {m for m in ids if m is not None}
                    given.update(o.id for o in objs if isinstance(o, Message))
                    self._journal([(jr.KIND_DONE, jr.dumps({"i": m}) if m in given
                                    else f'{{"i":"{m}"}}') for m in resolved])
            except BaseException:
                # A failed ack changes nothing: the messages stay unacknowledged.
                with self._ilock:
                    back = {m: v for m, v in taken if v is not _MISSING}
                    back.update(self._inflight)
                    self._inflight.clear()
                    self._inflight.update(back)
                raise
            if not resolved:
                return
        if self.use_queue:
            self._settle(resolved)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Block until every message put on the queue has been acknowledged.

        Returns True then; with a ``timeout`` (seconds) returns False if that time passes
        first (like ``threading.Event.wait``).  Raises
        :class:`~pympx_queues.errors.ConsumerDied`, naming the process ids, as soon as a
        consumer process died (``kill -9``, a crash, or an exit) holding messages it got
        and had not acknowledged: those can never be acknowledged in this run, so the
        wait would be endless.  They are in the journal; the next run requeues them.
        A message acknowledged by id in another process than the one that got it counts
        as held by its getter until then.  ``ValueError`` for a negative timeout.
        """
        timeout = _fs.check_timeout(timeout)
        if not self.use_queue:
            return True
        assert self.joinable_queue is not None
        return self.joinable_queue.join(timeout)

    def qsize(self) -> int:
        """Approximate number of messages (and sentinels) waiting in the queue."""
        if not self.use_queue:
            return 0 if self.empty() else len(self._local_items or [])
        assert self.joinable_queue is not None
        return self.joinable_queue.qsize() + len(self._buffer)

    def empty(self) -> bool:
        """True when no message is waiting (approximate, like ``multiprocessing``)."""
        if not self.use_queue:
            self._ensure_process()
            with self._lock:
                if self._local_items is None:
                    self._local_items = self._load_local_items()
                return not self._local_items
        assert self.joinable_queue is not None
        return not self._buffer and self.joinable_queue.empty()

    def __iter__(self) -> "PersistentQueue":
        return self

    def __next__(self) -> Any:
        """The next body; StopIteration at DONE, :class:`QueueFailed` at FAILED.

        The consumer still acknowledges each body with :meth:`task_done`.
        """
        msg = self.get()
        if msg is DONE:
            raise StopIteration
        if msg is FAILED:
            log.error("queue %s: FAILED received", self.pickup_file_prefix)
            raise QueueFailed(f"upstream failure: FAILED received on queue "
                              f"{self.pickup_file_prefix}")
        return msg

    def dispose(self) -> None:
        """Stop using the queue in this process: close this process's journal.

        Unacknowledged messages stay outstanding for the next run.  Idempotent; a later
        put or ack opens a new journal file.
        """
        self._ensure_process()
        with self._lock:
            writer, self._writer = self._writer, None
            if self._inflight:
                log.debug("queue %s: %d message(s) left unacknowledged by pid %d",
                          self.pickup_file_prefix, len(self._inflight), os.getpid())
        if writer is not None:
            writer.close()

    def __enter__(self) -> "PersistentQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.dispose()

    # ------------------------------------------------------------------ earlier runs
    def get_outstanding_messages(self) -> List[Message]:
        """Unfinished work of earlier runs (as found when this queue was created)."""
        return [Message(mid, self._decode(body)) for mid, _, body in self._outstanding]

    def get_list_of_outstanding_work(self) -> List[Any]:
        """Bodies of the unfinished work of earlier runs (all of them, not only the last)."""
        return [m.body for m in self.get_outstanding_messages()]

    def requeue_unprocessed_work(self) -> int:
        """Put the unfinished work of earlier runs back on the queue under its own ids.

        Safe before or after consumer processes start.  Work already requeued (by this
        call or by a keyed put in this process, or in the parent before it started this
        process) is not put twice.  Returns the number of messages requeued.  Same
        blocking and errors as :meth:`put_many`.
        """
        self._ensure_process()
        todo = [(mid, key, body) for mid, key, body in self._outstanding
                if mid not in self._requeued]
        if not todo:
            return 0
        log.debug("queue %s: requeuing %s", self.pickup_file_prefix,
                  ", ".join(mid for mid, _, _ in todo[:20]))
        objs = [self._decode(body) for _, _, body in todo]
        ids = [mid for mid, _, _ in todo]
        # Keys are recorded but not re-checked: these ids are outstanding by definition.
        self._put_batch(objs, [key for _, key, _ in todo], True, None, ids=ids)
        with self._lock:
            self._keys_put.update(key for _, key, _ in todo if key is not None)
        log.info("queue %s: requeued %d message(s) from earlier runs",
                 self.pickup_file_prefix, len(todo))
        return len(todo)

    def mark_all_work_done(self) -> None:
        """Drain the queue until DONE, acknowledging every message (pympx meaning).

        Blocks until DONE arrives; raises :class:`QueueFailed` on FAILED.
        """
        for msg in self:
            self.task_done(msg)

    def __repr__(self) -> str:
        where = self.current_pickup_dir or "memory"
        return (f"<PersistentQueue {self.pickup_file_prefix!r} run={self.run_id} "
                f"at {where} durability={self.durability}>")
