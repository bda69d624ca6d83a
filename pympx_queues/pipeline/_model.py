"""The engine's vocabulary: stages, retries, sources, item handles, results and reports.

Plain data and checks only; the coordinator (:mod:`.engine`) gives them behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

KINDS = ("async", "thread", "process", "interpreter", "executor")


class PipelineError(Exception):
    """A pipeline cannot be built or run as asked (the message says why)."""


class StageSignatureError(PipelineError, TypeError):
    """A stage's handler does not fit its kind (names the stage)."""


class WorkerDied(Exception):
    """A process worker died while it ran the item (signal, segfault, ``os._exit``)."""


class StageTimeout(Exception):
    """An attempt ran past its stage's ``timeout``."""


class EncodeError(PipelineError):
    """A stage's output cannot be journaled by the pipeline's codec."""


class PipelineStalled(PipelineError):
    """A run that can never end: items are held (by a stage's scheduler, or finished and
    waiting for room in the next stage) while nothing runs, no retry is due, the source
    has ended (or a ``stop(drain=True)`` waits for them) and no scheduler says what it
    waits for.  ``stage``: the first stage holding items; ``scheduler``: its scheduler's
    class name; ``held``: items that stage holds; ``holds``: stage name -> items held,
    for every stage that holds some.  The held items are not done: a durable run leaves
    them in the journal and the next run resumes them."""

    def __init__(self, message: str, stage: Optional[str] = None,
                 scheduler: Optional[str] = None, held: int = 0,
                 holds: Optional[Dict[str, int]] = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.scheduler = scheduler
        self.held = held
        self.holds = dict(holds or {})


# --------------------------------------------------------------------------- retries
@dataclass
class Retry:
    """How often and when a failed attempt of an item is tried again.

    Attempt ``n`` (1-based) that fails with a retryable exception is retried after
    ``backoff * multiplier ** (n - 1)`` seconds (at most ``max_backoff``), shifted by up to
    ``jitter`` of itself either way; after ``max_attempts`` attempts the item is a dead
    letter.  ``give_up_on`` wins over ``retry_on``.
    """

    max_attempts: int = 1
    backoff: float = 0.1
    multiplier: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 0.1
    retry_on: Tuple[type, ...] = (Exception,)
    give_up_on: Tuple[type, ...] = ()

    def __post_init__(self) -> None:
        if int(self.max_attempts) < 1:
            raise ValueError(f"Retry.max_attempts must be >= 1, not {self.max_attempts!r}")
        for name in ("backoff", "max_backoff", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"Retry.{name} must be >= 0")
        if self.multiplier < 1:
            raise ValueError("Retry.multiplier must be >= 1")
        self.retry_on = tuple(self.retry_on) if isinstance(self.retry_on, (list, tuple)) \
            else (self.retry_on,)
        self.give_up_on = tuple(self.give_up_on) if isinstance(self.give_up_on, (list, tuple)) \
            else (self.give_up_on,)

    def retryable(self, error_type: Optional[type], type_name: str = "") -> bool:
        """Whether a failure of this type may be retried (``None``: a type we only know
        by name, e.g. from another process: retried unless a ``give_up_on`` name matches)."""
        if error_type is None:
            names = {t.__name__ for t in self.give_up_on}
            return type_name not in names
        if self.give_up_on and issubclass(error_type, self.give_up_on):
            return False
        if error_type in (WorkerDied, StageTimeout):
            return True
        return issubclass(error_type, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        base = min(self.backoff * self.multiplier ** max(attempt - 1, 0), self.max_backoff)
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)


# --------------------------------------------------------------------------- sources
class _End:
    def __repr__(self) -> str:
        return "Refill.END"


class Refill:
    """A source that is asked for more: ``callback(count)`` returns up to ``count`` items.

    An empty result means "nothing now": the callback is asked again after ``idle``
    seconds.  The source ends only when the callback returns :attr:`Refill.END` or
    raises ``StopIteration``/``StopAsyncIteration`` (P6: empty is never finished).
    The callback may be a coroutine function; it runs in the coordinator's event loop
    (a plain callback runs in a thread, so it may block).
    """

    END = _End()

    def __init__(self, callback: Callable[[int], Any], *, count: Optional[int] = None,
                 idle: float = 0.05) -> None:
        if not callable(callback):
            raise TypeError("Refill needs a callable callback(count)")
        if idle < 0:
            raise ValueError("Refill idle must be >= 0")
        self.callback = callback
        self.count = count
        self.idle = idle
        self.is_async = inspect.iscoroutinefunction(callback)


# --------------------------------------------------------------------------- stages
def _accepts_ctx(handler: Callable, stage: str) -> bool:
    """True for handler(data, ctx), False for handler(data); StageSignatureError else."""
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return False  # builtins without a signature: called with the data only
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    var = any(p.kind == p.VAR_POSITIONAL for p in params)
    kw_required = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if kw_required:
        raise StageSignatureError(
            f"stage {stage!r}: handler {_name(handler)} has required keyword-only "
            f"parameter(s) {kw_required}; a handler is handler(data) or handler(data, ctx)")
    if len(required) > 2:
        raise StageSignatureError(
            f"stage {stage!r}: handler {_name(handler)} needs {len(required)} arguments; "
            "a handler is handler(data) or handler(data, ctx)")
    if len(positional) >= 2 or var:
        return True
    if len(positional) == 1:
        return False
    raise StageSignatureError(
        f"stage {stage!r}: handler {_name(handler)} takes no argument; a handler is "
        "handler(data) or handler(data, ctx)")


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class Stage:
    """One step of a pipeline: a handler run by ``workers`` workers of one kind.

    ``kind``: ``"async"`` (coroutine handlers on the coordinator's event loop),
    ``"thread"``, ``"process"`` (a supervised pool of worker processes), ``"interpreter"``
    (Python 3.14+ subinterpreters) or ``"executor"`` (any
    :class:`concurrent.futures.Executor` passed as ``executor=``, e.g. a dask client's).
    ``queue_size`` bounds the stage's input buffer (default ``2 * workers``), ``timeout``
    an attempt (seconds).  ``batch``: the handler gets a list of data (one group from the
    scheduler; ``batch=N`` with the default scheduler: up to N items) and returns a list
    of outputs of the same length.  ``sink``: the final
    stage's side effect is bracketed by a pending record (see docs/pipelines.md).
    """

    def __init__(self, name: str, handler: Callable, *, kind: Optional[str] = None,
                 workers: int = 1, queue_size: Optional[int] = None,
                 retry: Optional[Retry] = None, timeout: Optional[float] = None,
                 executor: Any = None, scheduler: Any = None, batch: "bool | int" = False,
                 sink: bool = False, start_method: Optional[str] = None) -> None:
        if not isinstance(name, str) or not name:
            raise PipelineError(f"a stage name is a non-empty str, not {name!r}")
        if kind is None:
            kind = "executor" if executor is not None else "thread"
        if kind not in KINDS:
            raise PipelineError(f"stage {name!r}: kind must be one of {KINDS}, not {kind!r}")
        if executor is not None and kind != "executor":
            raise PipelineError(f"stage {name!r}: executor= implies kind='executor', "
                                f"not {kind!r}")
        if kind == "executor" and executor is None:
            raise PipelineError(f"stage {name!r}: kind='executor' needs executor=")
        if not callable(handler):
            raise StageSignatureError(f"stage {name!r}: handler {handler!r} is not callable")
        if int(workers) < 1:
            raise PipelineError(f"stage {name!r}: workers must be >= 1, not {workers!r}")
        if queue_size is not None and int(queue_size) < 1:
            raise PipelineError(f"stage {name!r}: queue_size must be >= 1")
        if timeout is not None and not timeout > 0:
            raise PipelineError(f"stage {name!r}: timeout must be > 0 seconds")
        if retry is not None and not isinstance(retry, Retry):
            raise PipelineError(f"stage {name!r}: retry must be a Retry")
        self.batch_size = int(batch) if not isinstance(batch, bool) and batch else 1
        if queue_size is None:
            queue_size = 2 * int(workers) * self.batch_size
        self.name = name
        self.handler = handler
        self.kind = kind
        self.workers = int(workers)
        self.queue_size = int(queue_size) if queue_size is not None else 2 * self.workers
        self.retry = retry or Retry()
        self.timeout = timeout
        self.executor = executor
        self.scheduler = scheduler
        self.batch = bool(batch) or bool(getattr(scheduler, "batch", False))
        self.sink = bool(sink)
        self.start_method = start_method
        self.takes_ctx = False

    def check(self) -> None:
        """Signature and kind checks, run when the Pipeline is built."""
        is_coro = inspect.iscoroutinefunction(self.handler) or \
            inspect.iscoroutinefunction(type(self.handler).__call__)
        if self.kind == "async" and not is_coro:
            raise StageSignatureError(
                f"stage {self.name!r}: kind 'async' needs a coroutine function "
                f"(async def), got {_name(self.handler)}")
        if self.kind != "async" and is_coro:
            raise StageSignatureError(
                f"stage {self.name!r}: handler {_name(self.handler)} is a coroutine "
                f"function; use kind='async' (kind {self.kind!r} runs plain callables)")
        if self.kind == "interpreter" and sys.version_info < (3, 14):
            raise PipelineError(
                f"stage {self.name!r}: kind 'interpreter' needs Python 3.14+ "
                "(concurrent.futures.InterpreterPoolExecutor); this is Python "
                f"{sys.version_info.major}.{sys.version_info.minor}. Use kind='process'.")
        if self.kind == "interpreter" or (self.kind == "process" and self.start_method not in
                                          (None, "fork")) or (
                self.kind == "process" and self.start_method is None and
                not sys.platform.startswith("linux")):
            if getattr(self.handler, "__name__", "") == "<lambda>" or \
                    "<locals>" in getattr(self.handler, "__qualname__", ""):
                raise StageSignatureError(
                    f"stage {self.name!r}: a {self.kind} stage runs its handler in another "
                    f"{self.kind}; {_name(self.handler)} is a lambda or a local function "
                    "and cannot be sent there: define it at module level")
        self.takes_ctx = _accepts_ctx(self.handler, self.name)

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, kind={self.kind!r}, workers={self.workers})"


# --------------------------------------------------------------------------- items
class ItemContext:
    """What a handler knows about the item it runs (second argument, if it takes one).

    ``key``, ``index`` (position in the source), ``stage`` (name), ``attempt`` (1-based),
    ``metadata`` (a dict that travels with the item through the stages, in memory),
    ``cancelled`` (an event: set when the run halts now or the attempt timed out),
    ``stage_timings`` ({stage: seconds} of the stages done so far), ``pending`` (True
    when a sink stage's earlier attempt may have had its side effect already: a crash hit
    between the pending record and the done record).
    """

    __slots__ = ("key", "index", "data", "stage", "stage_index", "attempt", "metadata",
                 "_cancelled", "stage_timings", "pending", "started", "admitted",
                 "_handle", "__weakref__")

    def __init__(self, key: str, index: int, data: Any) -> None:
        self.key = key
        self.index = index
        self.data = data
        self.stage = ""
        self.stage_index = 0
        self.attempt = 1
        self.metadata: Dict[str, Any] = {}
        self._cancelled: Any = None  # made on first use (one Event per item is costly)
        self.stage_timings: Dict[str, float] = {}
        self.pending = False
        self.started = 0.0  # monotonic start of the current attempt
        self.admitted = 0.0  # monotonic time the item entered this run

    @property
    def cancelled(self) -> Any:
        ev = self._cancelled
        if ev is None:
            with _EVENT_LOCK:
                ev = self._cancelled
                if ev is None:
                    ev = self._cancelled = threading.Event()
        return ev

    def for_worker(self) -> "ItemContext":
        """A copy to send to another process (no event; ``cancelled`` never set there)."""
        c = ItemContext(self.key, self.index, None)
        c.stage, c.stage_index, c.attempt = self.stage, self.stage_index, self.attempt
        c.metadata, c.stage_timings, c.pending = dict(self.metadata), \
            dict(self.stage_timings), self.pending
        c._cancelled = _NEVER
        return c

    def __getstate__(self):
        return {"key": self.key, "index": self.index, "stage": self.stage,
                "stage_index": self.stage_index, "attempt": self.attempt,
                "metadata": self.metadata, "stage_timings": self.stage_timings,
                "pending": self.pending}

    def __setstate__(self, state):
        self.__init__(state["key"], state["index"], None)
        for k, v in state.items():
            setattr(self, k, v)
        self._cancelled = _NEVER  # in another process: the coordinator kills, not asks

    def __repr__(self) -> str:
        return f"ItemContext(key={self.key!r}, stage={self.stage!r}, attempt={self.attempt})"


class _NeverSet:
    def is_set(self) -> bool:
        return False

    def wait(self, timeout: Optional[float] = None) -> bool:
        return False


_NEVER = _NeverSet()
_EVENT_LOCK = threading.Lock()


@dataclass
class ErrorInfo:
    """Why an attempt failed: exception type name, message, traceback text."""

    type: str
    message: str
    traceback: str = ""
    stage: str = ""
    attempt: int = 0

    def to_json(self) -> Dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback,
                "stage": self.stage, "attempt": self.attempt}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ErrorInfo":
        return cls(str(data.get("type", "")), str(data.get("message", "")),
                   str(data.get("traceback", "")), str(data.get("stage", "")),
                   int(data.get("attempt", 0) or 0))

    def __str__(self) -> str:
        return f"{self.type}: {self.message} (stage {self.stage!r}, attempt {self.attempt})"


@dataclass
class ItemResult:
    """How one item ended: ``ok`` with the last stage's ``value``, or dead with ``error``."""

    key: str
    index: int
    value: Any
    ok: bool
    error: Optional[ErrorInfo] = None
    stage_timings: Dict[str, float] = field(default_factory=dict)
    from_journal: bool = False
    metadata: Dict[str, Any] = field(default_factory=dict)
    #: seconds from the item's admission in this run to its end
    elapsed: float = 0.0


@dataclass
class StageStats:
    """Counters of one stage (O(1) memory)."""

    done: int = 0
    failed_attempts: int = 0
    retried: int = 0
    dead: int = 0
    in_flight: int = 0
    queued: int = 0
    rerun: int = 0
    rate: float = 0.0
    busy_seconds: float = 0.0


@dataclass
class RunReport:
    """Counts per stage and per item state; a snapshot (:meth:`Pipeline.stats`) or the
    final report of a run."""

    stages: Dict[str, StageStats] = field(default_factory=dict)
    accepted: int = 0
    done: int = 0
    dead: int = 0
    skipped_done: int = 0
    duplicate_keys: int = 0
    resumed: int = 0
    in_flight: int = 0
    state: str = "idle"
    elapsed: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"state": self.state, "accepted": self.accepted, "done": self.done,
                "dead": self.dead, "skipped_done": self.skipped_done,
                "duplicate_keys": self.duplicate_keys, "resumed": self.resumed,
                "in_flight": self.in_flight, "elapsed": round(self.elapsed, 6),
                "stages": {n: dict(s.__dict__) for n, s in self.stages.items()}}


# --------------------------------------------------------------------------- scheduler
class Scheduler:
    """A stage's dispatch policy: which buffered items run next, in which groups.

    The default is FIFO, one item per group.  Subclasses (partitions, issue 13) may hold
    items back (claims) and group them; a batch stage's handler gets each group's data as
    a list.  Called only from the coordinator's event loop (no locking needed).
    """

    #: A Scheduler whose groups go to a handler as one list sets this True.
    batch = False
    #: Groups taken may wait in a thread stage's queue before a thread starts them
    #: (False: each group taken starts at once, e.g. nothing may start after a trip).
    hand_ahead = True

    def __init__(self, size: int = 1) -> None:
        self._items: Deque[Any] = deque()
        self.size = max(int(size), 1)

    def offer(self, item: Any) -> None:
        """An item (an :class:`ItemContext` with ``.data``, ``.key``) arrives."""
        self._items.append(item)

    def take(self, free_workers: int) -> List[List[Any]]:
        """Groups to start now (at most ``free_workers`` groups)."""
        items = self._items
        size = self.size
        if size == 1:
            n = min(free_workers, len(items))
            return [[items.popleft()] for _ in range(n)]
        groups = []
        while items and len(groups) < free_workers:
            groups.append([items.popleft() for _ in range(min(size, len(items)))])
        return groups

    def finished(self, group: List[Any]) -> None:
        """A group ended (done, failed or abandoned): free what it held."""

    def flush(self) -> None:
        """The source ended: leftovers held back for grouping may be taken now."""

    def buffered(self) -> int:
        """Items held (counted against the stage's queue bound)."""
        return len(self._items)


class FifoScheduler(Scheduler):
    """First in, first out; one item per call (the default), or up to ``size`` items
    per group for a batch stage (never waiting for a group to fill)."""


def _is_async_iterable(source: Any) -> bool:
    return hasattr(source, "__aiter__")


def _get_running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
