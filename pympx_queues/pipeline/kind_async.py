"""``kind="async"``: coroutine handlers as tasks on the coordinator's event loop."""

from __future__ import annotations

import asyncio
from typing import Any, List

from ._model import ItemContext, Stage


class AsyncRunner:
    """Starts one task per group; a timeout cancels the task."""

    remote = False

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop) -> None:
        self.stage = stage
        self.loop = loop
        self._handler = stage.handler
        self._ctx = stage.takes_ctx

    def submit(self, data: Any, ctx: Any) -> "asyncio.Future":
        coro = self._handler(data, ctx) if self._ctx else self._handler(data)
        return self.loop.create_task(coro)

    def abandon(self, fut: "asyncio.Future", group: List[ItemContext], reason: str) -> None:
        fut.cancel()

    def close(self, wait: bool = True) -> None:
        pass
