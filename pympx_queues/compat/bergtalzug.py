"""bergtalzug 0.2.0's names and calling conventions on top of :mod:`pympx_queues.pipeline`.

Users move over by changing one import::

    # from bergtalzug import ETLPipeline, ETLPipelineConfig, StageConfig, ExecutionType, WorkItem
    from pympx_queues.compat.bergtalzug import (
        ETLPipeline, ETLPipelineConfig, StageConfig, ExecutionType, WorkItem)

This module only translates: bergtalzug's config becomes :class:`~pympx_queues.pipeline.Stage`
objects, ``refill_queue`` becomes a :class:`~pympx_queues.pipeline.Refill` source keyed by
``job_id``, per-kind handler signatures are adapted to the engine's ``handler(data, ctx)``,
and the engine's results become ``WorkItemResult``.  All scheduling, retrying and
journaling is the engine's.  Works on Python 3.9+ (bergtalzug itself needs 3.14).

Where bergtalzug 0.2.0 is defective this face does what its README promises (the
differences are listed in docs/moving-from-bergtalzug.md): ``stop()`` then ``run()``
drains and returns instead of raising ``CancelledError``; a duplicate ``job_id`` is
counted and skipped with a warning instead of killing a worker; the statistics are running
counters (bergtalzug recomputes them from every result it ever kept); a process worker
that dies is replaced (bergtalzug's pool stays ``BrokenProcessPool``).  New, through the
config: ``journal_dir=`` / ``durability=`` make the pipeline crash-resumable with
``job_id`` as the key, and a stage may have ``retry=`` and ``timeout=``.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional

from ..pipeline import Pipeline, Refill, Retry, Stage

__all__ = [
    "ETLPipeline", "ETLPipelineConfig", "ExecutionType", "StageConfig", "WorkItem",
    "WorkItemMetadata", "WorkItemResult", "ItemFailed", "RESERVED_STAGE_NAMES",
]

#: Stage names bergtalzug reserves for its own item states.
RESERVED_STAGE_NAMES = {"created", "completed", "error"}


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- items
@dataclass
class WorkItemMetadata:
    """An item's lifecycle: current stage, timestamps, per-stage timings (as bergtalzug)."""

    current_stage: str = "created"
    created: datetime = field(default_factory=_now)
    completed: Optional[datetime] = None
    error_details: Optional[Dict[str, Any]] = None
    custom_metadata: Dict[str, Any] = field(default_factory=dict)
    #: {stage: {"queued"|"started"|"completed": datetime}}
    stage_timings: Dict[str, Dict[str, datetime]] = field(default_factory=dict)

    def add_stage_transition(self, stage: str, transition_type: str = "started",
                             when: Optional[datetime] = None) -> None:
        """Record a transition of ``stage`` (``queued``, ``started`` or ``completed``)."""
        self.current_stage = stage
        self.stage_timings.setdefault(stage, {})[transition_type] = when or _now()

    def get_stage_duration(self, stage: str) -> Optional[float]:
        """Seconds the item spent in ``stage`` (None if it did not finish it)."""
        timings = self.stage_timings.get(stage)
        if not timings or "started" not in timings or "completed" not in timings:
            return None
        return (timings["completed"] - timings["started"]).total_seconds()


@dataclass
class WorkItem:
    """One item: ``data``, ``metadata`` and ``job_id`` (the pipeline's key)."""

    data: Any
    metadata: WorkItemMetadata = field(default_factory=WorkItemMetadata)
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class WorkItemResult:
    """How one item ended."""

    job_id: str
    success: bool
    metadata: WorkItemMetadata
    error: Optional[BaseException] = None

    @property
    def total_duration(self) -> Optional[float]:
        """Seconds from creation to completion."""
        if self.metadata.completed is None:
            return None
        return (self.metadata.completed - self.metadata.created).total_seconds()


class ItemFailed(Exception):
    """``WorkItemResult.error`` when the original exception object is not at hand (a
    process stage, or a failure recorded by an earlier run); ``info`` is the engine's
    :class:`~pympx_queues.pipeline.ErrorInfo` (type, message, traceback text, stage)."""

    def __init__(self, info: Any) -> None:
        super().__init__(f"{info.type}: {info.message}")
        self.info = info


# --------------------------------------------------------------------------- config
class ExecutionType(str, enum.Enum):
    """Where a stage's handler runs."""

    ASYNC = "async"
    THREAD = "thread"
    PROCESS = "process"
    INTERPRETER = "interpreter"


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be an int > 0, not {value!r}")
    return value


def _non_negative_float(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{owner}.{name} must be a number of seconds >= 0, not {value!r}")
    return float(value)


@dataclass
class StageConfig:
    """One stage: ``name``, ``execution_type``, ``workers``, ``queue_size`` (bergtalzug's
    defaults), plus this library's optional ``retry`` (a
    :class:`~pympx_queues.pipeline.Retry`) and per-item ``timeout`` in seconds."""

    name: str
    execution_type: ExecutionType = ExecutionType.ASYNC
    workers: int = 5
    queue_size: int = 1000
    retry: Optional[Retry] = None
    timeout: Optional[float] = None
    #: The last stage's side effect is bracketed by a pending record (the engine's
    #: ``Stage(sink=True)``); its handler sees ``item.metadata.custom_metadata["pending"]``
    #: True when an earlier attempt may have had its effect already (a crash between).
    sink: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"StageConfig.name must be a non-empty str, not {self.name!r}")
        try:
            self.execution_type = ExecutionType(self.execution_type)
        except ValueError:
            raise ValueError(
                f"StageConfig.execution_type must be one of "
                f"{[e.value for e in ExecutionType]}, not {self.execution_type!r}") from None
        _positive_int("StageConfig", "workers", self.workers)
        _positive_int("StageConfig", "queue_size", self.queue_size)
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise ValueError("StageConfig.retry must be a pympx_queues.pipeline.Retry")
        if self.timeout is not None and not (_non_negative_float(
                "StageConfig", "timeout", self.timeout) > 0):
            raise ValueError("StageConfig.timeout must be > 0 seconds")


@dataclass
class ETLPipelineConfig:
    """bergtalzug's pipeline config, plus durability.

    ``journal_dir``: None (default) keeps everything in memory, as bergtalzug; a directory
    makes the pipeline crash-resumable (P1..P6 in DESIGN.md) with ``job_id`` as the key,
    so job ids must be stable across runs (the default uuid4 is not: give your items ids
    derived from their data).  ``durability``: ``"flush"`` survives kill -9, ``"fsync"``
    power loss.  ``codec``: encodes the items' ``data`` for the journal (default: the
    journal's JSON codec; never pickle).  ``end_on_empty``: bergtalzug's convention, an
    empty ``refill_queue`` result ends the run; set False to have an empty result mean
    "nothing now" (asked again after ``queue_refresh_rate``) and end by returning
    :attr:`ETLPipeline.END`.  ``collect_results``: ``run()`` returns the list of results
    (bergtalzug); set False on long runs to keep memory flat (callbacks still see every
    result, ``run()`` returns an empty list).
    """

    stages: List[StageConfig] = field(default_factory=list)
    pipeline_name: str = "etl_pipeline"
    queue_refresh_rate: float = 1.0
    stats_interval_seconds: float = 10.0
    enable_tracking: bool = True
    journal_dir: Optional[str] = None
    durability: str = "flush"
    codec: Any = None
    end_on_empty: bool = True
    collect_results: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ValueError("ETLPipelineConfig.stages needs at least one StageConfig")
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        self.queue_refresh_rate = _non_negative_float(
            "ETLPipelineConfig", "queue_refresh_rate", self.queue_refresh_rate)
        self.stats_interval_seconds = _non_negative_float(
            "ETLPipelineConfig", "stats_interval_seconds", self.stats_interval_seconds)
        if not isinstance(self.enable_tracking, bool):
            raise ValueError("ETLPipelineConfig.enable_tracking must be a bool")
        if self.durability not in ("flush", "fsync"):
            raise ValueError(f"ETLPipelineConfig.durability must be 'flush' or 'fsync', "
                             f"not {self.durability!r}")
        names = [s.name for s in self.stages]
        reserved = [n for n in names if n in RESERVED_STAGE_NAMES]
        if reserved:
            raise ValueError(
                f"Stage name(s) {reserved} are reserved. Reserved names: "
                f"{RESERVED_STAGE_NAMES}. Please choose different stage names.")
        if len(names) != len(set(names)):
            raise ValueError("Stage names must be unique")


# --------------------------------------------------------------------------- handlers
def _validate_handler(stage: StageConfig, handler: Callable) -> None:
    """bergtalzug's signature rules and messages (TypeError)."""
    name = getattr(handler, "__name__", "handler")
    is_async = inspect.iscoroutinefunction(handler)
    params = list(inspect.signature(handler).parameters.values())
    kind = stage.execution_type
    if kind == ExecutionType.ASYNC and not is_async:
        raise TypeError(
            f"Stage '{stage.name}' is configured with execution_type=ASYNC but handler is "
            f"not async. Expected: async def {name}(item: WorkItem) -> WorkItem")
    if kind != ExecutionType.ASYNC and is_async:
        raise TypeError(
            f"Stage '{stage.name}' is configured with execution_type={kind.value} but "
            "handler is async. Expected synchronous function.")
    if kind in (ExecutionType.ASYNC, ExecutionType.THREAD) and len(params) != 1:
        raise TypeError(
            f"Stage '{stage.name}' handler for {kind.value} execution must accept exactly 1 "
            f"parameter (item: WorkItem), got {len(params)} parameters. Expected signature: "
            f"{'async ' if is_async else ''}def {name}(item: WorkItem) -> WorkItem")
    if kind in (ExecutionType.PROCESS, ExecutionType.INTERPRETER) and len(params) != 2:
        raise TypeError(
            f"Stage '{stage.name}' handler for {kind.value} execution must accept exactly 2 "
            f"parameters (job_id: str, data: Any), got {len(params)} parameters. Expected "
            f"signature: def {name}(job_id: str, data: Any) -> Any")


def _call_in_worker(fn: Callable[[str, Any], Any], data: Any, ctx: Any) -> Any:
    """A process/interpreter stage: bergtalzug's ``fn(job_id, data) -> data``.

    Module level so that ``functools.partial(_call_in_worker, fn)`` pickles."""
    if isinstance(data, WorkItem):
        data = data.data
    return fn(ctx.key, data)


class _WorkItemCodec:
    """The journal codec: a source ``WorkItem`` is journaled as its job id and data, all
    other values (the stages' outputs: data) with the user's codec or the default one."""

    TAG = "__bergtalzug_item__"

    def __init__(self, inner: Any = None) -> None:
        if inner is None:
            from ..journal import decode_value, encode_value

            self._enc, self._dec = encode_value, decode_value
        else:
            self._enc, self._dec = inner.encode, inner.decode

    def encode(self, value: Any) -> Any:
        if isinstance(value, WorkItem):
            return {self.TAG: [value.job_id, self._enc(value.data)]}
        return self._enc(value)

    def decode(self, data: Any) -> Any:
        if type(data) is dict and len(data) == 1 and self.TAG in data:
            job_id, inner = data[self.TAG]
            return WorkItem(data=self._dec(inner), job_id=job_id)
        return self._dec(data)


class _RunningFlag:
    """``is_running``: bergtalzug's code has a property, its README calls it; both work."""

    __slots__ = ("_pipeline",)

    def __init__(self, pipeline: "ETLPipeline") -> None:
        self._pipeline = pipeline

    def __bool__(self) -> bool:
        return self._pipeline._running

    def __call__(self) -> bool:
        return self._pipeline._running

    def __eq__(self, other: object) -> bool:
        return bool(self) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(bool(self))


class _Done:
    """What ``stop()`` returns: already done, and awaitable (bergtalzug's is async)."""

    def __await__(self):
        return iter(())


# --------------------------------------------------------------------------- pipeline
class ETLPipeline:
    """Subclass it, implement ``async def refill_queue(self, count) -> list[WorkItem]``,
    register one handler per stage, then ``await run()``."""

    #: Returned by ``refill_queue`` to end the source when ``end_on_empty=False``.
    END = Refill.END

    def __init__(self, config: ETLPipelineConfig) -> None:
        if not isinstance(config, ETLPipelineConfig):
            raise TypeError("ETLPipeline needs an ETLPipelineConfig")
        self.config = config
        self.pipeline_name = config.pipeline_name
        self.logger = logging.getLogger(f"etl.{config.pipeline_name}")
        self.tracker = None  # bergtalzug's ItemTracker: the engine keeps the counts here
        self._stages = list(config.stages)
        self._stage_handlers: Dict[str, Callable] = {}
        self._callbacks: List[Callable[[WorkItemResult], None]] = []
        self._running = False
        self._pipeline: Optional[Pipeline] = None
        self._task: Optional[asyncio.Task] = None
        self._results: List[WorkItemResult] = []
        self._active: Dict[str, WorkItem] = {}   # in-flight items only (P4)
        self._errors: Dict[str, BaseException] = {}
        self._completed = 0
        self._succeeded = 0
        self._duration_sum = 0.0
        self._stage_sums: Dict[str, List[float]] = {}

    # -- bergtalzug's public methods ---------------------------------------------------------
    async def refill_queue(self, count: int) -> List[WorkItem]:
        """Up to ``count`` new items; an empty list ends the run (see ``end_on_empty``)."""
        raise NotImplementedError("subclass ETLPipeline and implement refill_queue(count)")

    def register_stage_handler(self, stage_name: str, handler: Callable) -> None:
        """Set the handler of ``stage_name``; ValueError for an unknown stage, TypeError
        when the signature does not fit the stage's execution type (bergtalzug's rules)."""
        stage = next((s for s in self._stages if s.name == stage_name), None)
        if stage is None:
            raise ValueError(f"Stage '{stage_name}' not found in pipeline configuration")
        _validate_handler(stage, handler)
        self._stage_handlers[stage_name] = handler

    def add_completion_callback(self, callback: Callable[[WorkItemResult], None]) -> None:
        """``callback(result)`` for every item that ends, as it ends (in the event loop)."""
        self._callbacks.append(callback)

    @property
    def is_running(self) -> _RunningFlag:
        """True while a run is going on; usable as ``is_running`` and ``is_running()``."""
        return _RunningFlag(self)

    async def start(self) -> None:
        """Start in the background and return; ``await run()`` waits for the end."""
        if self._task is not None:
            self.logger.warning("Pipeline is already running. Use stop() method to stop the "
                                "pipeline before starting again.")
            return
        for stage in self._stages:
            if stage.name not in self._stage_handlers:
                raise RuntimeError(f"No handler registered for stage '{stage.name}'. "
                                   "Call register_stage_handler() first.")
        self._pipeline = self._build()
        self._results = []
        self._running = True
        self._task = asyncio.ensure_future(self._drive(self._pipeline))

    async def run(self) -> List[WorkItemResult]:
        """Start if needed and wait until the source ended and every item ended (or until
        a ``stop()`` drained); returns the results (see ``collect_results``)."""
        if self._task is None:
            await self.start()
        task = self._task
        assert task is not None
        try:
            await task
        finally:
            self._running = False
            self._task = None
            self._pipeline = None
        results, self._results = self._results, []
        return results

    def stop(self) -> _Done:
        """Stop taking new items; items in flight finish; ``run()`` then returns.
        Callable with or without ``await``; a durable pipeline resumes on the next run."""
        if not self._running or self._pipeline is None:
            self.logger.warning("Pipeline is not running, nothing to stop")
            return _Done()
        self.logger.info("Stopping pipeline: %s", self.pipeline_name)
        self._pipeline.stop(drain=True)
        return _Done()

    async def get_active_items(self) -> List[WorkItem]:
        """The items in flight."""
        return list(self._active.values())

    async def get_pipeline_stats(self) -> Dict[str, Any]:
        """bergtalzug's statistics dict, from running counters (O(stages))."""
        active_by_stage: Dict[str, int] = {}
        if self._pipeline is not None:
            report = self._pipeline.stats()
            for name, st in report.stages.items():
                n = st.in_flight + st.queued
                if n:
                    active_by_stage[name] = n
        stats: Dict[str, Any] = {
            "active_items": sum(active_by_stage.values()),
            "active_by_stage": active_by_stage,
            "completed_items": self._completed,
            "success_rate": self._succeeded / self._completed if self._completed else 0,
            "average_duration_seconds":
                self._duration_sum / self._completed if self._completed else None,
        }
        for stage in self._stages:
            total, count = self._stage_sums.get(stage.name, (0.0, 0))
            stats[f"average_{stage.name}_duration_seconds"] = total / count if count else None
        return stats

    # -- translation to the engine ------------------------------------------------------------
    def _build(self) -> Pipeline:
        cfg = self.config
        stages = []
        for stage in self._stages:
            handler = self._stage_handlers[stage.name]
            kind = stage.execution_type.value
            if stage.execution_type in (ExecutionType.ASYNC, ExecutionType.THREAD):
                fn = self._async_adapter(handler) if kind == "async" \
                    else self._thread_adapter(handler)
            else:
                fn = functools.partial(_call_in_worker, handler)
            stages.append(Stage(stage.name, fn, kind=kind, workers=stage.workers,
                                queue_size=stage.queue_size, retry=stage.retry,
                                timeout=stage.timeout, sink=stage.sink))
        # refill_queue(count) is asked whenever the stages have room, for that much
        # (bergtalzug: every queue_refresh_rate seconds, for 90% of the first queue);
        # queue_refresh_rate is the pause after a "nothing now" answer.
        source = Refill(self._refill, idle=cfg.queue_refresh_rate)
        kwargs: Dict[str, Any] = {}
        if cfg.journal_dir is not None:
            kwargs.update(journal_dir=cfg.journal_dir, durability=cfg.durability,
                          codec=_WorkItemCodec(cfg.codec))
        return Pipeline(source, stages, key=lambda item: item.job_id,
                        name=cfg.pipeline_name, progress=False,
                        on_stage_complete=self._on_stage_complete, **kwargs)

    async def _refill(self, count: int) -> Any:
        try:
            items = await self.refill_queue(count)
        except Exception as exc:  # bergtalzug: logged, asked again after the refresh rate
            self.logger.error("Error in refill_queue: %s", exc)
            return []
        if items is Refill.END or (not items and self.config.end_on_empty):
            self.logger.info("No more items available, initiating shutdown")
            return Refill.END
        items = list(items or ())
        for item in items:
            if not isinstance(item, WorkItem):
                raise TypeError(f"refill_queue must return WorkItem objects, got "
                                f"{type(item).__name__}")
        return items

    def _item(self, key: str, data: Any, ctx: Any = None) -> WorkItem:
        """The WorkItem of ``key``: the source's object when this run made it, else a new
        one (an item resumed from the journal); ``data`` is the stage's input."""
        item = self._active.get(key)
        if isinstance(data, WorkItem):
            if item is None:
                self._active[key] = item = data
        elif item is None:
            self._active[key] = item = WorkItem(data=data, job_id=key)
        else:
            item.data = data
        if ctx is not None and ctx.pending:  # a sink stage's attempt after a crash
            item.metadata.custom_metadata["pending"] = True
        return item

    def _adopt(self, key: str, out: Any) -> Any:
        """A handler returned ``out`` (a WorkItem, bergtalzug's contract): keep it as the
        item, hand its data on."""
        if isinstance(out, WorkItem):
            self._active[key] = out
            return out.data
        return out  # returned bare data: passed on as the item's data

    def _async_adapter(self, handler: Callable) -> Callable:
        async def stage(data: Any, ctx: Any) -> Any:
            item = self._item(ctx.key, data, ctx)
            try:
                out = await handler(item)
            except BaseException as exc:
                self._errors[ctx.key] = exc
                raise
            return self._adopt(ctx.key, out)
        return stage

    def _thread_adapter(self, handler: Callable) -> Callable:
        def stage(data: Any, ctx: Any) -> Any:
            item = self._item(ctx.key, data, ctx)
            try:
                out = handler(item)
            except BaseException as exc:
                self._errors[ctx.key] = exc
                raise
            return self._adopt(ctx.key, out)
        return stage

    def _on_stage_complete(self, key: str, stage: str, seconds: float, ok: bool) -> None:
        item = self._active.get(key)
        now = _now()
        if item is not None:
            item.metadata.add_stage_transition(stage, "started", now - timedelta(seconds=seconds))
            item.metadata.add_stage_transition(stage, "completed", now)
        if ok:
            sums = self._stage_sums.setdefault(stage, [0.0, 0])
            sums[0] += seconds
            sums[1] += 1

    def _result(self, res: Any) -> WorkItemResult:
        key = res.key
        item = self._active.pop(key, None)
        exc = self._errors.pop(key, None)
        if item is None:
            item = WorkItem(data=res.value, job_id=key)
        meta = item.metadata
        meta.completed = _now()
        if res.ok:
            item.data = res.value
            meta.current_stage = "completed"
            return WorkItemResult(job_id=key, success=True, metadata=meta)
        meta.current_stage = "error"
        if res.error is not None:
            meta.error_details = res.error.to_json()
            if exc is None or type(exc).__name__ != res.error.type:
                exc = ItemFailed(res.error)
        return WorkItemResult(job_id=key, success=False, metadata=meta, error=exc)

    async def _drive(self, pipeline: Pipeline) -> None:
        stats_task = None
        if self.config.enable_tracking and self.config.stats_interval_seconds > 0:
            stats_task = asyncio.ensure_future(self._log_stats_every(
                self.config.stats_interval_seconds))
        keep = self.config.enable_tracking and self.config.collect_results
        try:
            async for res in pipeline.arun():
                result = self._result(res)
                self._completed += 1
                self._succeeded += result.success
                self._duration_sum += result.total_duration or 0.0
                if keep:
                    self._results.append(result)
                for callback in list(self._callbacks):
                    try:
                        callback(result)
                    except Exception as exc:  # as bergtalzug: a bad callback is logged
                        self.logger.error("Callback error: %s", exc)
        finally:
            self._running = False  # the README's `while is_running()` loop ends here
            if stats_task is not None:
                stats_task.cancel()
        report = pipeline.report
        if report.duplicate_keys:
            self.logger.warning("%d item(s) with a job_id seen before were skipped",
                                report.duplicate_keys)
        if self.config.stats_interval_seconds > 0:
            await self._log_stats()

    async def _log_stats(self) -> None:
        stats = await self.get_pipeline_stats()
        self.logger.info(
            "Pipeline Stats | Active: %d | Active items by stage: %s | Completed: %d | "
            "Success Rate: %.2f%% | Avg Duration: %.2fs", stats["active_items"],
            stats["active_by_stage"], stats["completed_items"], stats["success_rate"] * 100,
            stats["average_duration_seconds"] or 0)

    async def _log_stats_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._log_stats()
            except Exception as exc:
                self.logger.error("Error reporting stats: %s", exc)
