"""``kind="thread"``: plain callables on a pool of ``workers`` threads.

A thread cannot be killed: on a timeout or a halt the item's ``ctx.cancelled`` is set and
its result, if it ever comes, is ignored.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

from ._invoke import invoke
from ._model import ItemContext, Stage


class ThreadRunner:
    remote = False

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop) -> None:
        self.stage = stage
        self.loop = loop
        self._pool = ThreadPoolExecutor(stage.workers,
                                        thread_name_prefix=f"pipeline-{stage.name}")
        self._handler = stage.handler
        self._ctx = stage.takes_ctx

    def submit(self, data: Any, ctx: Any) -> "asyncio.Future":
        return self.loop.run_in_executor(self._pool, invoke, self._handler, self._ctx,
                                         data, ctx)

    def abandon(self, fut: "asyncio.Future", group: List[ItemContext], reason: str) -> None:
        for item in group:
            item.cancelled.set()
        fut.cancel()

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
