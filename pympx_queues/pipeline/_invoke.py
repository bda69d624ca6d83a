"""Calling a handler the one way every kind calls it (data in, data out).

Runs wherever the work runs (a thread, a worker process, a dask worker): keep it small
and importable without side effects.
"""

from __future__ import annotations

import copy
import pickle
import traceback
from typing import Any, Callable, List, Optional, Tuple


def invoke(handler: Callable, takes_ctx: bool, data: Any, ctx: Any) -> Any:
    """``handler(data)`` or ``handler(data, ctx)``; a batch stage passes lists of both."""
    if takes_ctx:
        return handler(data, ctx)
    return handler(data)


def invoke_captured(handler: Callable, takes_ctx: bool, data: Any, ctx: Any
                    ) -> Tuple[Any, ...]:
    """:func:`invoke` for another process: ``("ok", output)`` or
    ``("err", exception_or_None, type_name, message, traceback_text)``.

    The traceback is formatted where it happened (it does not survive pickling); the
    exception itself travels only if it pickles (its type then decides retries).
    """
    try:
        return ("ok", invoke(handler, takes_ctx, data, ctx))
    except BaseException as exc:  # noqa: B902 - everything is reported, nothing escapes
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return error_tuple(exc)


def error_tuple(exc: BaseException) -> Tuple[Any, ...]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sendable: Optional[BaseException] = exc
    try:
        # Will the user's own exception cross the process pipe back to the coordinator?
        # dumps() finds unpicklable attributes; copy.copy() rebuilds it the way the other
        # side would (``type(exc)(*exc.args)``: a custom __init__ with other arguments
        # fails here, in the worker, not in the coordinator's reader).  Nothing is ever
        # unpickled here, and nothing of this reaches a journal (journals are JSON).
        pickle.dumps(exc)
        copy.copy(exc)
    except Exception:
        sendable = None
    return ("err", sendable, type(exc).__name__, str(exc), text)


def invoke_many(handler: Callable, takes_ctx: bool, calls: List[Tuple[Any, Any]]
                ) -> List[Tuple[Any, ...]]:
    """Several :func:`invoke_captured` calls in one round trip (executor stages)."""
    return [invoke_captured(handler, takes_ctx, d, c) for d, c in calls]
