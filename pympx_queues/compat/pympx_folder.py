"""The folder queues with the exact constructor and ``get`` signatures of pympx 1.2.5.

Differences from :mod:`pympx_queues.folder` kept here on purpose for users moving over:

* ``get(timeout=None)``: ``timeout`` is in **milliseconds** (pympx), ``None`` waits forever.
* Constructors take pympx's positional parameters only; the new keyword options of the
  main classes (``durability``, ``max_retries``, ``expected_producers``, ...) are still
  accepted as keywords.
* ``task_done(path)`` takes the path ``get()`` returned (pympx 1.2.5 documented a uuid
  here but its folder queues never produced one).

Everything else (no-clobber puts, leases, recovery, DONE/FAILED per run) is the main
implementation with its guarantees.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from .. import folder as _folder
from ..folder import _identity

__all__ = ["WritableFolderQueue", "ReadableFolderQueue", "ReadableGroupedFileFolderQueue"]


def _ms_to_s(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of milliseconds or None, got {timeout!r}")
    if timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number, got {timeout!r}")
    return timeout / 1000.0


class WritableFolderQueue(_folder.WritableFolderQueue):
    """pympx: ``WritableFolderQueue(path, message_extension='.tsv', task_done_directory=None)``."""

    def __init__(self, path: Any, message_extension: str = ".tsv",
                 task_done_directory: Any = None, **kwargs: Any) -> None:
        super().__init__(path, message_extension, task_done_directory, **kwargs)


class ReadableFolderQueue(_folder.ReadableFolderQueue):
    """pympx: ``ReadableFolderQueue(path, message_extension='.tsv', task_done_directory=None,
    sorting_function=lambda x: x)``; ``get(timeout)`` in milliseconds."""

    def __init__(self, path: Any, message_extension: str = ".tsv",
                 task_done_directory: Any = None,
                 sorting_function: Optional[Callable[[str], Any]] = None,
                 **kwargs: Any) -> None:
        super().__init__(path, message_extension, task_done_directory, sorting_function,
                         **kwargs)

    def get(self, timeout: Optional[float] = None) -> Any:  # type: ignore[override]
        """Claim the next file; ``timeout`` in milliseconds (pympx).  Raises ``queue.Empty``."""
        return super().get(True, _ms_to_s(timeout))


class ReadableGroupedFileFolderQueue(_folder.ReadableGroupedFileFolderQueue):
    """pympx: ``ReadableGroupedFileFolderQueue(path, message_extension='.tsv',
    task_done_directory=None, grouping_function=lambda x: x, item_function=lambda x: x,
    list_of_items_in_group=None)``; ``get(timeout)`` in milliseconds."""

    def __init__(self, path: Any, message_extension: str = ".tsv",
                 task_done_directory: Any = None,
                 grouping_function: Callable[[str], Any] = _identity,
                 item_function: Callable[[str], Any] = _identity,
                 list_of_items_in_group: Optional[Iterable[Any]] = None,
                 **kwargs: Any) -> None:
        super().__init__(path, message_extension, task_done_directory, grouping_function,
                         item_function, list_of_items_in_group, **kwargs)

    def get(self, timeout: Optional[float] = None) -> Any:  # type: ignore[override]
        """Claim the next complete group; ``timeout`` in milliseconds (pympx)."""
        return super().get(True, _ms_to_s(timeout))
