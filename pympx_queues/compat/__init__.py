"""Drop-in names and signatures of the original ``pympx.queuing`` module.

Users moving over can change one import line::

    # from pympx.queuing import PersistentQueue, WritableFolderQueue, ReadableFolderQueue
    from pympx_queues.compat import PersistentQueue, WritableFolderQueue, ReadableFolderQueue

Where the main API differs (for example folder-queue ``get(timeout)`` in milliseconds in
pympx, seconds in the main API) these classes keep pympx's meaning.  Everything else is the
main implementation, with its guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "PersistentQueue": ".pympx_persistent",
    "WritableFolderQueue": ".pympx_folder",
    "ReadableFolderQueue": ".pympx_folder",
    "ReadableGroupedFileFolderQueue": ".pympx_folder",
}

if TYPE_CHECKING:  # what the lazy loader below returns, visible to type checkers
    from .pympx_folder import ReadableFolderQueue as ReadableFolderQueue
    from .pympx_folder import \
        ReadableGroupedFileFolderQueue as ReadableGroupedFileFolderQueue
    from .pympx_folder import WritableFolderQueue as WritableFolderQueue
    from .pympx_persistent import PersistentQueue as PersistentQueue

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pympx_queues.compat' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
