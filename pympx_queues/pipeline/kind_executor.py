"""``kind="executor"`` (any :class:`concurrent.futures.Executor`, e.g. a dask client's
``get_executor()``) and ``kind="interpreter"`` (Python 3.14+ ``InterpreterPoolExecutor``).

The handler runs through :func:`._invoke.invoke_captured`, so the traceback text comes
back even from a cluster; the executor belongs to the user and is never shut down here
(the interpreter pool is ours and is).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from typing import Any, List

from ._invoke import invoke_captured
from ._model import ItemContext, PipelineError, Stage


class ExecutorRunner:
    remote = True
    direct = False  # a future per group (the executor's own)

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop,
                 executor: "cf.Executor | None" = None, owned: bool = False) -> None:
        self.stage = stage
        self.loop = loop
        self.executor = executor if executor is not None else stage.executor
        self._owned = owned
        self._handler = stage.handler
        self._ctx = stage.takes_ctx

    def submit(self, data: Any, ctx: Any) -> "asyncio.Future":
        fut = self.executor.submit(invoke_captured, self._handler, self._ctx, data, ctx)
        return asyncio.wrap_future(fut, loop=self.loop)

    def abandon(self, fut: "asyncio.Future", group: List[ItemContext], reason: str) -> None:
        fut.cancel()

    def close(self, wait: bool = True) -> None:
        if self._owned:
            self.executor.shutdown(wait=wait, cancel_futures=True)


def interpreter_runner(stage: Stage, loop: asyncio.AbstractEventLoop) -> ExecutorRunner:
    pool_type = getattr(cf, "InterpreterPoolExecutor", None)
    if pool_type is None:  # checked at build time too; kept for a clear error here
        raise PipelineError(f"stage {stage.name!r}: kind 'interpreter' needs Python 3.14+")
    return ExecutorRunner(stage, loop, pool_type(stage.workers), owned=True)
