"""``batch_map``: one function over long inputs, bounded concurrency, kill switches that
stop at once, and (with ``journal_dir``) a map that survives ``kill -9`` (issue 12).

Built on the pipeline engine, a single-stage :class:`~pympx_queues.pipeline.Pipeline`,
in one of two shapes:

* one engine item per call (``durability="fsync"``, waves, process/async/executor
  kinds): keys are input positions (scoped by ``run_id``, the journal's pipeline name)
  and the kill switch is evaluated in the engine's ``on_complete`` hook, in the
  coordinator;
* thread maps with a sliding window, in memory or durable in flush mode: one engine
  item per *lease* (see :class:`_Feed`): the workers take their calls from the input one
  at a time and hand results back in piles; the switch is evaluated by the worker whose
  call ended, under the lock that hands out the next call; durable, the workers journal
  each call themselves (:class:`_Book`), in the same records as the other shape.

Either way the switch sees every completion as it happens (the last partial batch
included).  When it trips:

* ``halt="now"``: ``stop(drain=False)``: nothing new starts, running calls are abandoned
  (thread workers see :func:`cancelled` become true, process workers are terminated);
* ``halt="soon"``: nothing new starts, running calls finish, then the run halts.

Durable maps journal each call's result (``keep_results``) with a digest of its encoded
arguments; a rerun returns stored results, re-runs only unfinished calls and refuses
changed input under the same position.  The switch's counters, its failures and its trip
are journaled state: a restart continues counting, and a tripped switch makes the next
run raise at once until :func:`reset_kill_switch` (or ``pympx-queues reset-switch DIR``).
"""

from __future__ import annotations

import hashlib
import json
import reprlib
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..journal.format import dumps as _dumps
from ..journal.format import encode_value as _encode_value
from ._model import EncodeError, PipelineError, Scheduler, Stage
from .engine import Pipeline
from .switches import KillSwitchError, Outcome

__all__ = ["batch_map", "batch_map_iter", "unmapped", "reset_kill_switch", "cancelled",
           "CallFailed", "BatchMapError", "InputChangedError", "MapStopped",
           "DEFAULT_RUN_ID"]

DEFAULT_RUN_ID = "batch_map"
STATE = "batch_map.switch"  # journaled state: the switch, the counters, the trip
FAILURES = "batch_map.failures"  # journaled state: the failures kept (written when one is)
MAX_FAILURES = 100  # failures kept in the state and in KillSwitchError
PROCESS_QUEUE = 256  # inputs a process map may read ahead of its calls (at least size)

_local = threading.local()
_summary = reprlib.Repr()
_summary.maxstring = 60
_summary.maxother = 60
_summary.maxlist = _summary.maxtuple = _summary.maxdict = 5


class unmapped:
    """An argument passed whole to every call (prefecto's / Prefect's ``unmapped``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"unmapped({self.value!r})"


class CallFailed(Exception):
    """A failed call, in place of its result (``errors="return"``), or in
    :class:`BatchMapError`.  ``index``, ``type``, ``message``, ``traceback`` (text)."""

    def __init__(self, index: int, type_: str, message: str, traceback: str = "") -> None:
        super().__init__(f"call #{index} failed: {type_}: {message}")
        self.index = index
        self.type = type_
        self.message = message
        self.traceback = traceback


class BatchMapError(Exception):
    """Calls failed (without a switch tripping) and ``errors="raise"``: raised after
    every call ended.  ``failures`` (list of :class:`CallFailed`), ``results`` (the
    results, a :class:`CallFailed` in place of each failure)."""

    def __init__(self, failures: List[CallFailed], results: Optional[List[Any]]) -> None:
        first = failures[0]
        super().__init__(f"{len(failures)} call(s) failed; first: #{first.index}: "
                         f"{first.type}: {first.message}")
        self.failures = failures
        self.results = results


class MapStopped(PipelineError):
    """The map was stopped (SIGINT/SIGTERM) before every call ran."""


class InputChangedError(PipelineError, ValueError):
    """The input at a position differs from the one journaled for this run id."""


def cancelled() -> bool:
    """True inside a call (thread kind) once the map halted with ``halt="now"``: long
    calls may check it and return early.  False elsewhere."""
    ev = getattr(_local, "cancelled", None)
    return ev is not None and ev.is_set()


# --------------------------------------------------------------------------- calling
class _Call:
    """The stage handler: rebuilds the call's arguments and calls ``fn`` (module level
    so process workers can receive it)."""

    def __init__(self, fn: Callable, slots: List[Any], kwslots: Dict[str, Any],
                 tagged: bool) -> None:
        self.fn = fn
        self.slots = slots  # per positional argument: _MAPPED or the unmapped value
        self.kwslots = kwslots
        self.tagged = tagged
        self.plain = not kwslots and all(s is _MAPPED for s in slots)

    def build(self, data: Any) -> Tuple[list, dict]:
        return self.build_row(data[2])

    def build_row(self, row: List[Any]) -> Tuple[list, dict]:
        if self.plain:  # every argument mapped and positional: the row is the arguments
            return row, _NO_KW
        vals = iter(row)
        args = [next(vals) if s is _MAPPED else s for s in self.slots]
        kw = {k: (next(vals) if s is _MAPPED else s) for k, s in self.kwslots.items()}
        return args, kw

    def __call__(self, data: Any, ctx: Any) -> Any:
        args, kw = self.build(data)
        prev = getattr(_local, "cancelled", None)
        _local.cancelled = getattr(ctx, "cancelled", None)
        try:
            out = self.fn(*args, **kw)
        finally:
            _local.cancelled = prev
        return [data[1], out] if self.tagged else out


class _MappedMarker:
    def __repr__(self) -> str:
        return "<mapped>"

    def __reduce__(self) -> str:
        return "_MAPPED"


_MAPPED = _MappedMarker()
_NO_KW: Dict[str, Any] = {}


def _async_call(call: _Call) -> Callable:
    async def handler(data: Any, ctx: Any) -> Any:
        args, kw = call.build(data)
        out = await call.fn(*args, **kw)
        return [data[1], out] if call.tagged else out
    return handler


class _MapScheduler(Scheduler):
    """FIFO with a sliding window (the stage's workers bound the calls in flight), or
    waves (a new batch starts only when the previous one has ended); nothing starts
    once the switch has tripped."""

    hand_ahead = False  # a call taken starts at once: nothing starts after a trip

    def __init__(self, size: int, waves: bool) -> None:
        super().__init__(1)
        self.wave = size
        self.waves = waves
        self.running = 0
        self.started = 0
        self.tripped = False
        self.flushed = False

    def take(self, free_workers: int) -> List[List[Any]]:
        if self.tripped:
            return []
        items = self._items
        if self.waves:
            if self.running or (len(items) < self.wave and not self.flushed):
                return []
        n = min(free_workers, len(items))
        self.running += n
        self.started += n
        return [[items.popleft()] for _ in range(n)]

    def finished(self, group: Any) -> None:
        self.running -= 1

    def flush(self) -> None:
        self.flushed = True


# --------------------------------------------------------------------------- inputs
def _check_inputs(iterables: tuple, kwargs: Dict[str, Any]
                  ) -> Tuple[List[Any], Dict[str, Any], List[Iterator], List[str]]:
    slots: List[Any] = []
    kwslots: Dict[str, Any] = {}
    its: List[Iterator] = []
    names: List[str] = []
    lengths: Dict[str, int] = {}

    def add(name: str, value: Any) -> Any:
        if isinstance(value, unmapped):
            return value.value
        if isinstance(value, (str, bytes)):
            raise TypeError(f"batch_map: {name} is a {type(value).__name__}; map over "
                            f"a list of them, or pass it whole with unmapped(...)")
        try:
            it = iter(value)
        except TypeError:
            raise TypeError(f"batch_map: {name} is not iterable ({type(value).__name__}); "
                            "pass it whole with unmapped(...)") from None
        if hasattr(value, "__len__"):
            lengths[name] = len(value)
        its.append(it)
        names.append(name)
        return _MAPPED

    for i, v in enumerate(iterables):
        slots.append(add(f"positional argument {i}", v))
    for k, v in kwargs.items():
        kwslots[k] = add(f"argument {k!r}", v)
    if not its:
        raise TypeError("batch_map: no mapped argument (every argument is unmapped)")
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{n}: {n_}" for n, n_ in lengths.items())
        raise ValueError(f"batch_map: the mapped arguments have unequal lengths ({desc})")
    return slots, kwslots, its, names


def _zip_strict(its: List[Iterator], names: List[str]) -> Iterator[list]:
    while True:
        row = []
        for it in its:
            try:
                row.append(next(it))
            except StopIteration:
                if row:
                    raise ValueError(f"batch_map: {names[len(row)]} ended before "
                                     f"{names[0]} (unequal lengths)") from None
                for j, other in enumerate(its[1:], 1):
                    try:
                        next(other)
                    except StopIteration:
                        continue
                    raise ValueError(f"batch_map: {names[0]} ended before {names[j]} "
                                     "(unequal lengths)")
                return
        yield row


_FLAT = (int, str, float, bool, type(None))


def _digest(codec: Any, value: Any) -> str:
    """A short fingerprint of a call's encoded arguments (changed input is refused)."""
    flat = type(value) is list and all(type(x) in _FLAT for x in value)
    # the journal's own codec leaves a flat row of scalars as it is
    enc = value if flat and codec.encode is _encode_value else codec.encode(value)
    raw = None
    if flat or (type(enc) is list and all(type(x) in _FLAT for x in enc)):
        try:
            raw = _dumps(enc)  # flat row of scalars: no key order to normalise
        except ValueError:  # NaN: the journal refuses the call itself, with its reason
            pass
        else:
            if len(raw) <= 16:
                return raw  # short: the row itself is its fingerprint
    if raw is None:
        raw = json.dumps(enc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                         default=repr)
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


def _digest_at(codec: Any, row: Any, index: int) -> str:
    """:func:`_digest` of the arguments of call ``index``; arguments the codec cannot
    encode fail the durable map with an error naming the call (nothing is journaled
    for it)."""
    try:
        return _digest(codec, row)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"batch_map: the arguments of call #{index} cannot be "
                          f"journaled (a durable map journals them): {exc}") from None


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


# --------------------------------------------------------------------------- the map
class _Run:
    """One map's bookkeeping, shared by the coordinator (on_complete) and the caller.

    :meth:`observe` counts one finished call and asks the switch; it runs in the
    coordinator (engine path) or, for in-memory thread maps, in the worker that ran the
    call, under :attr:`_Feed.lock` (the same lock that hands out the next call).
    """

    def __init__(self, ks: Any, halt: str, run_id: str, journal_dir: Optional[str]) -> None:
        self.ks = ks
        self.halt = halt
        self.run_id = run_id
        self.journal_dir = journal_dir
        self.pipeline: Any = None
        self.sched: Any = None
        self.feed: Any = None  # the thread lease path's _Feed
        self.book: Any = None  # the durable thread lease path's _Book (its journal)
        self.args: Dict[int, Any] = {}  # in-flight rows (bounded by the engine)
        self.completed = 0
        self.failed = 0
        self.counted = 0
        self.failures: deque = deque(maxlen=MAX_FAILURES)
        self.trip: Optional[Dict[str, Any]] = None
        self.trip_seq: Optional[int] = None  # calls started when it tripped
        self.dirty = False  # counters changed since the state was last journaled
        self.state_due = 0.0  # durable thread maps: next time successes' counters go out
        self.failures_dirty = False
        self._classify = getattr(ks, "counts_as_failure", None)
        self._describe = getattr(ks, "describe", None)

    def load(self, state: Optional[Dict[str, Any]], failures: Optional[List[Any]],
             dead: Optional[Dict[str, Any]] = None) -> None:
        """The journaled counters and failures; ``dead``: the journal's dead letters
        (key -> its Saved), where the failures' traceback texts are kept."""
        if not state:
            return
        c = state.get("counts", {})
        self.completed = c.get("completed", 0)
        self.failed = c.get("failed", 0)
        self.counted = c.get("counted", 0)
        for f in failures or state.get("failures", []):
            if "traceback" not in f and dead:
                saved = dead.get(str(f.get("index")))
                err = saved.dead if saved is not None else None
                f = dict(f, traceback=str((err or {}).get("traceback", "")))
            self.failures.append(f)
        self.trip = state.get("tripped")
        if self.ks is not None and state.get("switch") is not None and \
                hasattr(self.ks, "from_state"):
            try:
                self.ks.from_state(state["switch"])
            except (ValueError, KeyError, TypeError):  # another switch now: count afresh
                pass

    def failures_to_journal(self) -> List[Dict[str, Any]]:
        """The failures kept, for the journal: without their traceback texts, which
        each failed call's dead letter holds already (the list is written again at every
        failure: up to 100 tracebacks each time made a failure-heavy map write megabytes
        for a few hundred calls).  :meth:`load` puts them back from the dead letters."""
        return [{k: v for k, v in f.items() if k != "traceback"} for f in self.failures]

    def counts(self) -> Dict[str, int]:
        return {"completed": self.completed, "failed": self.failed,
                "counted": self.counted}

    def n_started(self) -> int:
        return self.feed.n if self.feed is not None else self.sched.started

    def started(self) -> Dict[str, Any]:
        """Calls started by this run: when the switch tripped, and in all."""
        return {"started_at_trip": self.trip_seq, "started": self.n_started()}

    def state(self) -> Dict[str, Any]:
        sw = self.ks.to_state() if self.ks is not None and hasattr(self.ks, "to_state") \
            else None
        return {"switch": sw, "counts": self.counts(), "tripped": self.trip}

    def journal_state(self) -> None:
        """Journal the counters (and the failures, when one was added)."""
        put = self.pipeline.set_state
        if self.failures_dirty:
            self.failures_dirty = False
            put(FAILURES, self.failures_to_journal())
        self.dirty = False
        put(STATE, self.state())

    def journal_state_soon(self) -> None:
        """Successes: the counters are journaled once per coordinator turn, after the
        turn's results (a crash between the two loses at most that turn's successes
        from the counters: built-in switches then trip earlier, never later)."""
        if not self.dirty:
            self.dirty = True
            import asyncio

            asyncio.get_running_loop().call_soon(self.flush_state)

    def flush_state(self) -> None:
        if self.dirty:
            self.journal_state()

    def error(self) -> KillSwitchError:
        t = self.trip or {}
        reason = t.get("reason", "kill switch tripped")
        return KillSwitchError(
            f"kill switch tripped at {_fmt_time(t.get('at'))} (call #{t.get('index')}): "
            f"{reason}; {self.failed} of {self.completed} calls failed"
            + (f"; last failure: {self.failures[-1]['type']}: "
               f"{self.failures[-1]['message']}" if self.failures else ""),
            self.ks, counts=dict(self.counts(), **self.started()), failures=list(self.failures),
            tripped_at=t.get("at"), reason=reason, run_id=self.run_id)

    def observe(self, idx: int, ok: bool, etype: Optional[str] = None, message: str = "",
                tb: str = "", row: Any = None) -> bool:
        """One finished call: count it, record a failure, ask the switch.  True when
        the switch trips now (nothing starts after this returns)."""
        if self.trip is not None:  # in flight when it tripped: not counted again
            return False
        self.completed += 1
        if ok:
            o = Outcome(idx, True)
        else:
            args = "" if row is None else _summary.repr(tuple(row))[:200]
            o = Outcome(idx, False, etype, message, tb, args)
            self.failed += 1
        ks = self.ks
        if ks is None:
            return False
        counted = self._classify(o) if self._classify is not None else not o.ok
        if not o.ok:
            if counted:
                self.counted += 1
            self.failures.append({"index": idx, "args": o.args, "type": o.error_type,
                                  "message": o.message, "traceback": o.traceback,
                                  "time": o.time, "counted": counted})
            self.failures_dirty = True
        if not ks.should_flip_switch(o):
            return False
        reason = self._describe() if self._describe is not None else \
            f"{type(ks).__name__} tripped"
        self.trip = {"at": getattr(ks, "tripped_at", None) or time.time(),
                     "index": idx, "reason": reason, "switch": type(ks).__name__}
        self.trip_seq = self.n_started()
        self.sched.tripped = True
        return True

    # in the coordinator, on every completion (engine path: one call per item)
    def on_complete(self, res: Any) -> None:
        if res.from_journal:
            return  # counted in the run that computed it (journaled counters)
        idx = res.index
        row = self.args.pop(idx, None)
        if self.trip is not None:
            self.check_soon()
            return
        e = res.error
        if res.ok:
            if self.ks is None:
                self.completed += 1
                return  # nothing to ask, nothing to journal
            flip = self.observe(idx, True)
        else:
            flip = self.observe(idx, False, e.type, e.message, e.traceback, row)
        p = self.pipeline
        if p.journal_dir is not None:
            if flip or not res.ok:  # failures and a trip: journaled before anything else
                self.journal_state()
            elif self.ks is not None:
                self.journal_state_soon()
        if flip:
            p.stop(drain=self.halt == "soon")
        self.check_soon()

    # in the coordinator, when a lease (in-memory thread path) ends
    def on_lease(self, res: Any) -> None:
        self.check_soon()

    def check_soon(self) -> None:
        if self.trip is not None and self.halt == "soon" and self.sched.running == 0:
            self.pipeline.stop(drain=False)


# ------------------------------------------------------------ in-memory thread maps
LEASE_CALLS = 256  # calls a worker runs before it hands its results back (at most) ...
LEASE_SECONDS = 0.005  # ... or once a call ends this long after the lease began


class _Feed:
    """The zipped input of an in-memory thread map, read by the workers themselves.

    Each engine item is a *lease*: one worker slot that takes calls from here one at a
    time, each when the previous one ended (a sliding window, no barrier), and hands
    their results back together (after :data:`LEASE_CALLS` calls or
    :data:`LEASE_SECONDS`).  Trivial calls then pay the coordinator's per-item cost
    once per lease, not once per call; a call slower than the lease time is a lease of
    its own.  Handing out a position and seeing a switch trip happen under one lock:
    once the switch has tripped, no call starts (P7).
    """

    def __init__(self, rows: Iterator[list], run: _Run) -> None:
        self.rows = rows
        self.run = run
        self.lock = threading.Lock()
        self.n = 0  # positions handed out (calls started)
        self.done = False  # the input ended, or raised
        self.error: Optional[BaseException] = None  # what the input raised

    def take_locked(self) -> Optional[Tuple[int, Any]]:
        """The next (position, row), or None: input exhausted or switch tripped.
        Called with :attr:`lock` held."""
        if self.done or self.run.trip is not None:
            return None
        try:
            row = next(self.rows)
        except StopIteration:
            self.done = True
            return None
        except BaseException as exc:  # unequal lengths, the user's generator
            self.error = exc
            self.done = True
            return None
        i = self.n
        self.n = i + 1
        return i, row

    def fail(self, exc: BaseException) -> None:
        """End the input with ``exc`` (raised by the map once the run has ended)."""
        with self.lock:
            if self.error is None:
                self.error = exc
            self.done = True

    def tokens(self) -> Iterator[None]:
        """The engine's source: one item per lease, until the input ends."""
        while not self.done and self.run.trip is None:
            yield None


MAX_STREAMS = 8  # journal files a durable thread map's workers write at most


class _Book:
    """The journal of a durable thread map (``durability="flush"``), written by the
    workers themselves: each worker thread appends to a journal file of its own
    (:meth:`PipelineJournal.open_stream`; one shared file made the workers queue on its
    lock: 12 us a call against 3 with eight threads), and a call's record is stored (in
    the page cache: it survives ``kill -9``) before the call is counted and before its
    worker takes the next one.  The records are the engine path's: a ``Y`` record with
    ``[digest, result]`` per finished call, an ``A`` record with ``[position, digest,
    row]`` and an ``L`` (dead) record per failed one, so either path resumes the other's
    journal.  The switch's state goes to the run's main file, under the feed's lock."""

    def __init__(self, journal: Any, codec: Any) -> None:
        self.journal = journal
        self.codec = codec
        self.replay = journal.replay
        self.rerun = bool(journal.replay.done or journal.replay.unfinished)
        self.closed = False  # set under the feed's lock when the map ends
        self._local = threading.local()
        self._streams: List[Any] = []
        self._threads = 0
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._snap_seq = 0
        self._state_seq = 0
        self.closed_state = False

    def stream(self) -> Any:
        """The calling thread's journal file (opened at its first call; past
        :data:`MAX_STREAMS` threads share them, each one file: its writer has a lock)."""
        w = getattr(self._local, "w", None)
        if w is None:
            with self._lock:
                if self.closed:
                    return None
                self._threads += 1
                if len(self._streams) < MAX_STREAMS:
                    w = self.journal.open_stream()
                    self._streams.append(w)
                else:
                    w = self._streams[self._threads % MAX_STREAMS]
            self._local.w = w
        return w

    def write(self, w: Any, records: List[Tuple[str, str]]) -> bool:
        """Append ``records`` to the thread's file; False when the map has ended (the
        call is then not journaled: the next run calls it again)."""
        if self.closed or w is None:
            return False
        try:
            w.append(records)
        except ValueError:  # closed meanwhile (halt="now": the map ended)
            if self.closed:
                return False
            raise
        return True

    def lookup(self, i: int, row: Any, d: str) -> Optional[Tuple[bool, Any]]:
        """``(ok, result or CallFailed)`` an earlier run journaled for position ``i``,
        or None: the call runs (again).  Changed input raises InputChangedError."""
        found = _stored(self.replay, self.journal, str(i))
        if found is None:
            return None
        old, value, dead = found
        _refuse_changed(self.journal, i, d, old, row, self.codec)
        if dead is not None:
            return False, CallFailed(i, str(dead.get("type", "")),
                                     str(dead.get("message", "")),
                                     str(dead.get("traceback", "")))
        return (True, value) if value is not _RUN else None

    def failed(self, w: Any, i: int, d: str, row: Any, exc: BaseException,
               tb: str) -> None:
        """Journal a failed call: accepted with its input, then dead (``redrive`` and
        ``reset_kill_switch(retry_failed=True)`` re-run it).  An input the codec cannot
        encode is not journaled: the next run calls it again."""
        from ._model import ErrorInfo

        j = self.journal
        try:
            data = j.encode([i, d, row], "the arguments of call #%d", i)
        except EncodeError:
            return
        err = ErrorInfo(type(exc).__name__, str(exc)[:2000], tb, "call", 1)
        self.write(w, j.dead_records(str(i), i, data, 0, err))

    # The switch's state goes to the run's main file.  A snapshot is taken under the
    # feed's lock (counters and switch as one), written after it is released (a write
    # under that lock, where every call passes, stalled all workers), in snapshot order:
    # an older one is dropped when a newer one was written already.  Failures and trips
    # write theirs before releasing the lock, so nothing newer can overtake them.
    def snapshot(self, run: "_Run") -> Tuple[int, Any, Dict[str, Any]]:
        """Called with the feed's lock held."""
        self._snap_seq += 1
        failures = run.failures_to_journal() if run.failures_dirty else None
        run.failures_dirty = False
        run.dirty = False
        return self._snap_seq, failures, run.state()

    def put_state(self, snap: Tuple[int, Any, Dict[str, Any]]) -> None:
        seq, failures, state = snap
        j = self.journal
        with self._state_lock:
            if seq <= self._state_seq or self.closed_state:
                return
            self._state_seq = seq
            if failures is not None:
                j.write_state(FAILURES, failures)
            j.write_state(STATE, state)

    def close(self, run: "_Run") -> None:
        """Called with the feed's lock held: the last state, then nothing more."""
        try:
            if run.dirty or run.failures_dirty:
                self.put_state(self.snapshot(run))
        finally:
            self.closed = True
            with self._state_lock:
                self.closed_state = True
            with self._lock:
                streams, self._streams = self._streams, []
            for w in streams:
                w.close()
            self.journal.end_run(finished=False)


_RUN = object()  # _stored: journaled as accepted, not finished (redriven): call it


def _stored(replay: Any, journal: Any, key: str) -> Optional[Tuple[Any, Any, Any]]:
    """What an earlier run journaled at ``key``: ``(digest, result, None)`` for a
    finished call, ``(digest, _RUN, dead error or None)`` for one that was accepted but
    did not finish (or failed), None when nothing."""
    if key in replay.done:
        v = replay.done[key]
        if v is not None:
            v = journal.decode(v)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return v[0], v[1], None
        return None, v, None
    saved = replay.unfinished.get(key)
    if saved is None:
        return None
    data = journal.decode(saved.data)
    old = data[1] if isinstance(data, (list, tuple)) and len(data) == 3 else None
    return old, _RUN, saved.dead


class _Lease:
    """The stage handler of the thread lease path: runs calls taken from the feed,
    returns ``[(position, ok, result_or_CallFailed), ...]``.  Durable (``book``): each
    call's result or failure is journaled as it ends (before it is counted and before
    the worker takes its next call), and positions an earlier run ended return their
    journaled result or failure without a call."""

    def __init__(self, call: _Call, feed: _Feed, run: _Run, book: Optional[_Book] = None
                 ) -> None:
        self.call = call
        self.feed = feed
        self.run = run
        self.book = book

    def __call__(self, _token: Any, ctx: Any) -> List[Tuple[int, bool, Any]]:
        feed, run, build, fn = self.feed, self.run, self.call.build_row, self.call.fn
        lock = feed.lock
        book = self.book
        if book is not None:
            codec, encode, rerun = book.codec, book.journal.encode, book.rerun
            record = book.journal.done_record
            w = book.stream()
        watch = run.ks is not None or book is not None
        out: List[Tuple[int, bool, Any]] = []
        prev = getattr(_local, "cancelled", None)
        _local.cancelled = ctx.cancelled
        clock = time.monotonic
        end = clock() + LEASE_SECONDS
        # the call that ended, for the switch to see: (position, exception or None, row,
        # traceback text)
        ended: Any = None
        n = 0
        try:
            while True:
                flip = False
                # One lock for "the call that ended is counted (the switch may trip)"
                # and "the next call starts": no call starts after a trip.
                with lock:
                    if ended is not None:
                        flip = self._ended(ended, out)
                        ended = None
                    got = feed.take_locked() if n < LEASE_CALLS and (
                        n == 0 or clock() < end) else None
                if flip:
                    run.pipeline.stop(drain=run.halt == "soon")
                if got is None:
                    break
                n += 1
                i, row = got
                if book is not None:
                    try:
                        d = _digest_at(codec, row, i)
                        known = book.lookup(i, row, d) if rerun else None
                    except (EncodeError, InputChangedError) as exc:
                        feed.fail(exc)  # the map raises it; nothing journaled for it
                        break
                    if known is not None:  # counted by the run that called it
                        out.append((i, known[0], known[1]))
                        continue
                args, kw = build(row)
                try:
                    value = fn(*args, **kw)
                except BaseException as exc:  # noqa: B902 - one call's failure, reported
                    tb = "".join(traceback.format_exception(type(exc), exc,
                                                            exc.__traceback__))
                    if book is not None:
                        if book.closed:
                            break  # the map has ended: not journaled, not counted
                        book.failed(w, i, d, row, exc, tb)
                    ended = (i, exc, row, tb)
                    continue
                if book is not None:
                    try:
                        rec = encode([d, value], "the result of call #%d", i)
                    except EncodeError as exc:
                        book.failed(w, i, d, row, exc, "")
                        ended = (i, exc, row, "")
                        continue
                    if not book.write(w, [record(str(i), rec)]):
                        break  # the map has ended: not journaled, not counted
                if watch:
                    ended = (i, None, row, None)
                out.append((i, True, value))
        finally:
            _local.cancelled = prev
        # The successes' counters: at a lease's end, at most once per LEASE_SECONDS for
        # all workers (once per lease, short leases under load wrote more often, and each
        # write under the lock made the next leases shorter still).
        if book is not None and run.dirty and clock() >= run.state_due:
            snap = None
            with lock:
                if run.dirty and not book.closed and clock() >= run.state_due:
                    run.state_due = clock() + LEASE_SECONDS
                    snap = book.snapshot(run)
            if snap is not None:
                book.put_state(snap)
        return out

    def _ended(self, ended: Tuple[Any, ...], out: List[Any]) -> bool:
        """Under the feed's lock: count the call that ended (journaled already), ask the
        switch.  True when the switch trips now."""
        i, exc, row, tb = ended
        run, book = self.run, self.book
        if book is not None and book.closed:
            return False
        if exc is None:
            if run.ks is None:  # (durable maps only: in memory nothing is watched)
                run.completed += 1
                return False
            flip = run.observe(i, True)
            if book is not None:
                run.dirty = True
                if flip:
                    book.put_state(book.snapshot(run))
            return flip
        name, msg = type(exc).__name__, str(exc)
        out.append((i, False, CallFailed(i, name, msg, tb)))
        flip = run.observe(i, False, name, msg, tb, row)
        if book is not None:  # failures and a trip: journaled before anything else
            book.put_state(book.snapshot(run))
        return flip


def _batch_map(fn: Callable, *iterables: Any, size: int = 8, kill_switch: Any = None,
               halt: str = "now", kind: str = "thread", executor: Any = None,
               journal_dir: Optional[str] = None, durability: str = "flush",
               run_id: Optional[str] = None, waves: bool = False, ordered: bool = True,
               errors: str = "raise", codec: Any = None,
               _into: Optional[Dict[int, Any]] = None,
                **kwargs: Any) -> Iterator[Tuple[int, Any]]:
    """:func:`batch_map_iter`; with ``_into`` (a dict) the results are stored there by
    position, in the coordinator, and nothing is yielded."""
    if not callable(fn):
        raise TypeError(f"batch_map: fn must be callable, not {fn!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"batch_map: size must be an int >= 1, not {size!r}")
    if halt not in ("now", "soon"):
        raise ValueError(f"batch_map: halt must be 'now' or 'soon', not {halt!r}")
    if errors not in ("raise", "return"):
        raise ValueError(f"batch_map: errors must be 'raise' or 'return', not {errors!r}")
    if kill_switch is not None and not hasattr(kill_switch, "should_flip_switch"):
        raise TypeError("batch_map: kill_switch needs a should_flip_switch(outcome) method "
                        f"(see pympx_queues.pipeline.switches), got {kill_switch!r}")
    if executor is not None:
        kind = "executor"
    run_id = DEFAULT_RUN_ID if run_id is None else str(run_id)
    if not run_id or any(c in run_id for c in "/\\\0") or run_id.startswith("."):
        raise ValueError(f"batch_map: run_id must be a plain name, not {run_id!r}")
    slots, kwslots, its, names = _check_inputs(iterables, kwargs)
    durable = journal_dir is not None
    call = _Call(fn, slots, kwslots, tagged=durable)
    handler: Any = _async_call(call) if kind == "async" else call

    run = _Run(kill_switch, halt, run_id, journal_dir)
    sched = _MapScheduler(size, waves)
    run.sched = sched
    # On threads with a sliding window: workers take their calls themselves and hand
    # results back in leases (_Feed); durable in flush mode, they journal each call as
    # it ends (_Book).  fsync maps keep one engine item per call (the engine's group
    # commit); waves need the scheduler's barrier.
    leased = kind == "thread" and not waves and (not durable or durability == "flush")
    failures: List[CallFailed] = []

    def pairs(res: Any) -> Any:
        """A result of the engine as (position, ok, result or CallFailed) triples."""
        if leased:
            if not res.ok:  # the lease itself failed: a defect here, not a call's
                e = res.error
                raise PipelineError(f"batch_map: a worker lease failed: {e.type}: "
                                    f"{e.message}\n{e.traceback}")
            return res.value
        if res.ok:
            return ((res.index, True, res.value[1] if durable else res.value),)
        e = res.error
        return ((res.index, False, CallFailed(res.index, e.type, e.message, e.traceback)),)

    def hook(count: Callable[[Any], None]) -> Callable[[Any], None]:
        if _into is None:
            return count  # results go to the caller through run()

        def count_and_keep(res: Any) -> None:  # in the coordinator: no hand-over per call
            count(res)
            for i, ok, value in pairs(res):
                if not ok:
                    failures.append(value)
                _into[i] = value
        return count_and_keep

    book: Optional[_Book] = None
    if leased:
        feed = run.feed = _Feed(_zip_strict(its, names), run)
        if durable:
            from .journal import JsonCodec, PipelineJournal

            j = PipelineJournal(journal_dir, run_id, durability=durability, codec=codec,
                                stages=["call"], keep_results=True)
            j.open()  # refused while another run of this journal is live
            book = run.book = _Book(j, codec if codec is not None else JsonCodec())
        stage = Stage("call", _Lease(call, feed, run, book), kind="thread", workers=size,
                      queue_size=1, scheduler=sched)
        p = Pipeline(feed.tokens(), [stage], durability=durability, name=run_id,
                     ordered=False, on_complete=hook(run.on_lease), progress=False)
    else:
        # Process workers are fed in chunks by the engine: a deeper queue lets it fill
        # them (measured: trivial calls 2x faster with the chunking engine, no change
        # without it); the other kinds gain nothing from reading further ahead.
        queue = max(size, PROCESS_QUEUE) if kind == "process" else size
        stage = Stage("call", handler, kind=kind, workers=size, queue_size=queue,
                      executor=executor, scheduler=sched)
        from .journal import JsonCodec

        codec_ = codec if codec is not None else JsonCodec()

        def source() -> Iterator[list]:
            replay = None
            j = p._journal
            if j is not None:
                replay = j.replay
            for i, row in enumerate(_zip_strict(its, names)):
                if durable:
                    d = _digest_at(codec_, row, i)
                    if replay is not None:
                        _check_same(replay, j, str(i), i, d, row, codec_)
                else:
                    d = None
                run.args[i] = row  # summarised only if the call fails
                yield [i, d, row]

        p = Pipeline(source(), [stage], journal_dir=journal_dir, durability=durability,
                     codec=codec, name=run_id, ordered=False,
                     on_complete=hook(run.on_complete), progress=False, keep_results=durable)
    run.pipeline = p
    if kill_switch is not None and hasattr(kill_switch, "reset"):
        kill_switch.reset()  # each map counts from zero, or from its journal
    if book is not None:
        states = book.journal.replay.states
        run.load(states.get(STATE), states.get(FAILURES), book.journal.replay.dead)
        if run.trip is not None:
            _close_book(book, run)
            raise run.error()
    elif durable:
        run.load(p.get_state(STATE), p.get_state(FAILURES),
                 p._journal.replay.dead if p._journal is not None else None)
        if run.trip is not None:
            p.close()
            raise run.error()

    held: Dict[int, Any] = {}
    nxt = 0
    ended = 0  # calls that ended in this run or earlier ones (from the journal)
    try:
        if _into is not None:
            p.run_all()
            ended = len(_into)
        for res in (p.run() if _into is None else ()):
            done = pairs(res)
            ended += len(done)
            for i, ok, value in done:
                if not ok:
                    failures.append(value)
                if not ordered:
                    yield i, value
                    continue
                if i != nxt:
                    held[i] = value
                    continue
                yield i, value
                nxt += 1
                while nxt in held:
                    yield nxt, held.pop(nxt)
                    nxt += 1
    finally:
        p.close()
        if book is not None:
            _close_book(book, run)
    if leased and feed.error is not None:
        raise feed.error
    if run.trip is not None:
        raise run.error()
    state = p.report.state
    if state != "finished":  # SIGINT/SIGTERM: never a silently short result
        raise MapStopped(f"batch_map {run_id!r} was {state} (a signal) before every call "
                         f"ran: {ended} of the calls ended"
                         + ("; a rerun with the same journal_dir resumes" if durable
                            else ""))
    if failures and errors == "raise":
        raise BatchMapError(sorted(failures, key=lambda f: f.index), None)


def _close_book(book: _Book, run: _Run) -> None:
    """End a durable thread map's journal: the counters written, nothing after (a
    call abandoned by ``halt="now"`` that ends later is not journaled: the next run
    calls it again)."""
    with run.feed.lock:
        book.close(run)


def batch_map_iter(fn: Callable, *iterables: Any, size: int = 8, kill_switch: Any = None,
                   halt: str = "now", kind: str = "thread", executor: Any = None,
                   journal_dir: Optional[str] = None, durability: str = "flush",
                   run_id: Optional[str] = None, waves: bool = False, ordered: bool = True,
                   errors: str = "raise", codec: Any = None,
                   **kwargs: Any) -> Iterator[Tuple[int, Any]]:
    """:func:`batch_map` as a stream of ``(index, result)`` pairs: in input order
    (``ordered=True``; results that finish early are held until their turn) or as calls
    complete (``ordered=False``: memory stays bounded whatever the input's length).  A
    failed call yields a :class:`CallFailed` in place of its result with
    ``errors="return"``; with ``errors="raise"`` (the default) the stream ends by
    raising :class:`BatchMapError`.  A tripped switch raises :class:`KillSwitchError`."""
    return _batch_map(fn, *iterables, size=size, kill_switch=kill_switch, halt=halt,
                      kind=kind, executor=executor, journal_dir=journal_dir,
                      durability=durability, run_id=run_id, waves=waves, ordered=ordered,
                      errors=errors, codec=codec, **kwargs)


def _legacy_digest(codec: Any, value: Any) -> str:
    """The fingerprint that journals written before :func:`_digest` hold (sha256 of the
    sorted JSON): computed only when the current one differs, so they still resume."""
    raw = json.dumps(codec.encode(value), sort_keys=True, separators=(",", ":"),
                     default=repr)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _check_same(replay: Any, journal: Any, key: str, index: int, digest: str,
                row: Any, codec: Any) -> None:
    found = _stored(replay, journal, key)
    if found is not None:
        _refuse_changed(journal, index, digest, found[0], row, codec)


def _refuse_changed(journal: Any, index: int, digest: str, old: Any, row: Any,
                    codec: Any) -> None:
    if old is not None and old != digest and old != _legacy_digest(codec, row):
        raise InputChangedError(
            f"batch_map: the input at position {index} differs from the one journaled "
            f"for run id {journal.name!r} in {journal.directory}: use another run_id= "
            "for different input, or delete the journal to start over")


def batch_map(fn: Callable, *iterables: Any, size: int = 8, kill_switch: Any = None,
              halt: str = "now", kind: str = "thread", executor: Any = None,
              journal_dir: Optional[str] = None, durability: str = "flush",
              run_id: Optional[str] = None, waves: bool = False, ordered: bool = True,
              errors: str = "raise", codec: Any = None, **kwargs: Any) -> Any:
    """Call ``fn`` on the zipped mapped arguments, at most ``size`` calls in flight.

    ``fn(*iterables[i]..., **kwargs[i]...)`` for each position ``i``; an argument
    wrapped in :class:`unmapped` is passed whole to every call.  Returns the list of
    results in input order (``ordered=False``: an iterator of ``(index, result)`` pairs
    in completion order, see :func:`batch_map_iter`).

    ``kill_switch``: a switch from :mod:`pympx_queues.pipeline.switches` (or any object
    with ``should_flip_switch(outcome)``), evaluated on every completion; when it trips
    nothing new starts, ``halt="now"`` abandons running calls, ``"soon"`` lets them
    finish, and the map raises :class:`KillSwitchError`.  ``waves=True``: a batch of
    ``size`` calls starts only when the previous batch has ended (prefecto's barrier).
    ``kind``: "thread" | "process" | "async", or ``executor=`` any
    ``concurrent.futures.Executor``.  ``journal_dir``: durable (see the module doc).
    """
    opts = dict(size=size, kill_switch=kill_switch, halt=halt, kind=kind, executor=executor,
                journal_dir=journal_dir, durability=durability, run_id=run_id, waves=waves,
                ordered=ordered, errors=errors, codec=codec)
    if not ordered:
        return _batch_map(fn, *iterables, **opts, **kwargs)
    # The whole list is the result: results are kept as the coordinator sees them
    # (Pipeline.run_all), without handing each one over to this thread.
    into: Dict[int, Any] = {}
    for _ in _batch_map(fn, *iterables, **opts, _into=into, **kwargs):
        pass  # pragma: no cover - nothing is yielded when collecting
    return [into[i] for i in range(len(into))]


def reset_kill_switch(journal_dir: str, run_id: Optional[str] = None, *,
                      retry_failed: bool = True) -> Dict[str, Any]:
    """Clear the journaled kill-switch state (counters, failures, trip) of ``run_id``
    in ``journal_dir``; with ``retry_failed`` (the default) the calls that failed are
    re-run by the next run too (else their failures are returned again from the
    journal).  Refused while a run of that journal is live.  Returns ``{"cleared":
    bool, "retried": [positions]}``."""
    from .journal import pipeline_prefixes, redrive_dead

    run_id = DEFAULT_RUN_ID if run_id is None else str(run_id)
    if run_id not in pipeline_prefixes(journal_dir):
        raise FileNotFoundError(f"{journal_dir}: no batch_map journal for run id "
                                f"{run_id!r} (found: {pipeline_prefixes(journal_dir)})")
    p = Pipeline([], [Stage("call", _noop)], journal_dir=journal_dir, name=run_id,
                 progress=False, keep_results=True)
    try:
        had = p.get_state(STATE) is not None
        if had:
            p.clear_state(STATE)
        if p.get_state(FAILURES) is not None:
            p.clear_state(FAILURES)
    finally:
        p.close()
    retried = redrive_dead(journal_dir, run_id) if retry_failed else []
    return {"cleared": had, "retried": sorted(int(k) for k in retried)}


def _noop(data: Any) -> Any:
    return data
