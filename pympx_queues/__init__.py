"""pympx_queues: crash-resumable file-and-folder queues for Python ETL.

* :class:`PersistentQueue` - a ``multiprocessing.JoinableQueue`` that journals every
  ``put`` and ``task_done`` so a restarted run requeues exactly the unfinished work.
* :class:`WritableFolderQueue` / :class:`ReadableFolderQueue` /
  :class:`ReadableGroupedFileFolderQueue` - a directory is the queue, each message a file.

Importing the package has no side effects on ``multiprocessing`` (no start method is set,
no process or manager is started); queue classes are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ConsumerDied,
    Empty,
    Full,
    IncompleteGroupsError,
    JournalCorruptError,
    NotAQueueError,
    PympxQueueError,
    QueueClosed,
    QueueFailed,
)
from .sentinels import DONE, FAILED, is_sentinel

__version__ = "0.1.0"

_LAZY = {
    "PersistentQueue": ".persistent",
    "Message": ".persistent",
    "WritableFolderQueue": ".folder",
    "ReadableFolderQueue": ".folder",
    "ReadableGroupedFileFolderQueue": ".folder",
}

if TYPE_CHECKING:  # what the lazy loader below returns, visible to type checkers
    from .folder import ReadableFolderQueue as ReadableFolderQueue
    from .folder import ReadableGroupedFileFolderQueue as ReadableGroupedFileFolderQueue
    from .folder import WritableFolderQueue as WritableFolderQueue
    from .persistent import Message as Message
    from .persistent import PersistentQueue as PersistentQueue

__all__ = [
    "DONE", "FAILED", "is_sentinel",
    "Empty", "Full", "PympxQueueError", "QueueFailed", "QueueClosed",
    "JournalCorruptError", "IncompleteGroupsError", "NotAQueueError", "ConsumerDied",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pympx_queues' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
