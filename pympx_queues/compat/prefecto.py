"""``prefecto.concurrency``'s ``BatchTask`` and kill switches, on :func:`batch_map`.

Change ``from prefecto.concurrency import BatchTask`` (and ``kill_switch``'s names) to
``from pympx_queues.compat.prefecto import ...``.  Differences a user can notice (all
fixes; docs/moving-from-prefecto.md lists them with examples):

* The switch is evaluated on every completion, the last batch and a single-batch map
  included; when it trips nothing new starts, running calls are cancelled
  (``halt="now"``, the default; ``halt="soon"`` lets them finish) and ``map`` raises
  :class:`KillSwitchError` carrying ``.ks``, the counts and every failure's cause.
* Batches are waves by default (prefecto's barrier between batches); ``waves=False``
  gives a sliding window (a finished call frees its slot at once).
* ``map`` returns one finished ``concurrent.futures.Future`` per element in input order
  (a failed call's future holds a :class:`CallError`).  With Prefect 3 installed, a
  Prefect task is called as a task run of the calling flow (each worker thread runs it
  in a copy of the caller's context), so maps of several batches work where prefecto
  raises ``AttributeError`` (``get_state``).  Without Prefect, an object that only looks
  like a task has its ``.fn`` called directly, with a warning.
* ``journal_dir=`` makes the map durable (results, switch counters and trips survive a
  restart; see :func:`pympx_queues.pipeline.batch_map.batch_map`).
* Switches take ``ignore=`` / ``counts=`` to classify exceptions; switch counters can be
  journaled (``to_state``) and reset (``reset()``).
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import Future
from typing import Any, Callable, List, Optional

from ..pipeline.batch_map import CallFailed, batch_map, unmapped
from ..pipeline.switches import AnyFailed, Count, KillSwitch, KillSwitchError, Rate

log = logging.getLogger("pympx_queues.compat")

__all__ = ["BatchTask", "unmapped", "KillSwitch", "AnyFailedSwitch", "CountSwitch",
           "RateSwitch", "KillSwitchError"]


class AnyFailedSwitch(AnyFailed):
    """Trips on the first failed (or crashed) call."""


class CountSwitch(Count):
    """Trips when ``max_count`` calls have failed."""


class RateSwitch(Rate):
    """Trips when at least ``min_sample`` calls finished and the failed fraction is at
    least ``max_fail_rate``."""


def _is_prefect_task(task: Any) -> bool:
    try:
        from prefect import Task
    except ImportError:
        return False
    return isinstance(task, Task)


class _InFlow:
    """Calls a Prefect task inside the flow context it was mapped from (threads)."""

    def __init__(self, task: Any, context: contextvars.Context) -> None:
        self.task = task
        self.context = context

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.context.copy().run(self.task, *args, **kwargs)


class CallError(Exception):
    """The exception set on a failed call's future when the original exception could
    not travel (a process worker); ``type``, ``message``, ``traceback`` (text)."""


class BatchTask:
    """Wraps a callable (or a Prefect task's function) to map it in batches of ``size``.

    ``kill_switch``: a :class:`KillSwitch` (TypeError otherwise, as in prefecto).
    Extra keywords (all optional, ours): ``journal_dir``, ``run_id``, ``durability``,
    ``halt``, ``waves`` (default True), ``kind``, ``executor`` -- see ``batch_map``.
    """

    def __init__(self, task: Any, size: int, kill_switch: Optional[KillSwitch] = None, *,
                 journal_dir: Optional[str] = None, run_id: Optional[str] = None,
                 durability: str = "flush", halt: str = "now", waves: bool = True,
                 kind: str = "thread", executor: Any = None) -> None:
        if kill_switch is not None and not isinstance(kill_switch, KillSwitch):
            raise TypeError("Expected 'kill_switch' to be a subclass of 'KillSwitch', got "
                            f"{type(kill_switch)}.")
        fn: Callable = task
        self._prefect = _is_prefect_task(task)
        if not self._prefect and hasattr(task, "fn") and hasattr(task, "map") \
                and callable(task.fn):
            log.warning("BatchTask: %r looks like a Prefect task but Prefect 3 is not "
                        "importable: its function runs outside Prefect's orchestration",
                        getattr(task, "name", task))
            fn = task.fn
        if not callable(fn):
            raise TypeError(f"BatchTask needs a callable or a Prefect task, not {task!r}")
        self.task = task
        self.fn = fn
        self.size = size
        self._kill_switch = kill_switch
        self._opts = dict(journal_dir=journal_dir, run_id=run_id, durability=durability,
                          halt=halt, waves=waves, kind=kind, executor=executor)

    def map(self, *args: Any, **kwargs: Any) -> List[Future]:
        """Call the task on the zipped arguments (``unmapped(x)`` passes ``x`` whole);
        one finished ``Future`` per element, in input order.  Raises
        :class:`KillSwitchError` when the switch trips."""
        fn = self.fn
        if self._prefect:
            # A Prefect 3 task is called as a task run of the calling flow: each worker
            # thread runs it in a copy of the caller's context (where the flow run is).
            fn = _InFlow(self.task, contextvars.copy_context())
        futures: List[Future] = []
        for value in batch_map(fn, *args, size=self.size, kill_switch=self._kill_switch,
                               errors="return", **self._opts, **kwargs):
            f: Future = Future()
            if isinstance(value, CallFailed):
                err = CallError(f"{value.type}: {value.message}")
                err.type, err.message, err.traceback = value.type, value.message, \
                    value.traceback  # type: ignore[attr-defined]
                f.set_exception(err)
            else:
                f.set_result(value)
            futures.append(f)
        return futures
