"""``pympx.queuing.PersistentQueue`` with its original signatures, on our journals.

Differences from pympx 1.2.5 that a user can notice (all fixes):

* ``DONE``/``FAILED`` are :mod:`pympx_queues.sentinels` objects, not ``0``/``-1``, so a
  message ``0`` or ``-1`` no longer ends the stream; iteration raises
  :class:`~pympx_queues.errors.QueueFailed` instead of ``UpstreamFailureError``.
* Journals are checksummed JSON files (one per process and run, never overwritten), not
  ``_requested_PID*.tsv`` / ``_completed_PID*.tsv``; outstanding work counts every earlier
  run, and two equal messages are two pieces of work.
* With the default ``return_same`` hooks messages round-trip as typed JSON (tuples stay
  tuples of ints, not tuples of strings).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence

from .. import persistent as _main
from ..sentinels import is_sentinel

log = logging.getLogger("pympx_queues.compat")

__all__ = ["PersistentQueue"]

return_same = _main.return_same


class PersistentQueue(_main.PersistentQueue):
    """Drop-in for ``pympx.queuing.PersistentQueue`` (same constructor and methods).

    ``put`` skips an object equal to one already requeued by
    :meth:`requeue_unprocessed_work` (pympx's ``requeued_work`` rule), so a producer that
    starts from the beginning after a crash does not queue requeued work twice.  The main
    API does this by idempotency ``key`` instead, which is exact for equal messages.
    """

    def __init__(self, pickup_file_prefix: Optional[str] = None,
                 current_pickup_dir: Optional[str] = None,
                 previous_pickup_dir: Optional[str] = None,
                 formatter_list: Sequence[Callable[[Any], Any]] = [return_same],  # noqa: B006
                 converter_list: Sequence[Callable[[Any], Any]] = [return_same],  # noqa: B006
                 number_of_workers: int = 1, use_queue: bool = True) -> None:
        super().__init__(pickup_file_prefix, current_pickup_dir, previous_pickup_dir,
                         formatter_list, converter_list, number_of_workers, use_queue)
        self.formatter_list = list(formatter_list)
        self.converter_list = list(converter_list)
        self.requeued_work: List[Any] = []

    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None
            ) -> None:  # type: ignore[override]
        """Journal and queue ``obj`` (pympx: returns None; ``put(DONE)`` is allowed)."""
        if is_sentinel(obj):
            self._ensure_process()
            self._check_open()
            if self.use_queue:
                self._enqueue_sentinel(obj, block, timeout)
            return None
        if self.requeued_work and obj in self.requeued_work:
            log.debug("not putting %r: it was requeued from an earlier run", obj)
            return None
        super().put(obj, block, timeout)
        return None

    def put_nowait(self, obj: Any) -> None:  # type: ignore[override]
        """Equivalent to ``put(obj, False)``."""
        self.put(obj, False)

    def task_done(self, obj: Any) -> None:  # type: ignore[override]
        """Journal the completion of ``obj`` (a message got by this process)."""
        super().task_done(obj)

    def requeue_unprocessed_work(self) -> None:  # type: ignore[override]
        """Requeue the unfinished work of earlier runs (pympx: returns None)."""
        bodies = [m.body for m in self.get_outstanding_messages() if m.id not in self._requeued]
        super().requeue_unprocessed_work()
        self.requeued_work.extend(bodies)

    @property
    def list_of_outstanding_work(self) -> List[Any]:
        """pympx attribute: the unfinished work of earlier runs."""
        return self.get_list_of_outstanding_work()
