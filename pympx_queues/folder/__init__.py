"""Folder queues: a directory is the queue, each message is a file.

* :class:`WritableFolderQueue` (producers) publishes files without ever overwriting one
  and registers itself in ``control/`` (HELO on start, DONE on ``close()``, FAILED on
  ``fail()``).
* :class:`ReadableFolderQueue` (consumers) claims the next file by one atomic rename into
  ``wip/`` and returns its path; ``task_done`` / ``nack`` settle the claim.
* :class:`ReadableGroupedFileFolderQueue` hands out only complete sets of files.

The layout on disk is described (and formatted/parsed) in :mod:`pympx_queues.folder.layout`;
every system call goes through :mod:`pympx_queues._fs`.

Runs
----
Every control file carries a *run id*.  A producer's run id is ``run_id=`` when given
(several producers of one batch may share it) or a fresh, time-sortable id.  A run is
*ended* once a consumer has seen it end (it writes ``control/ENDED__<run>.json`` when it
returns DONE or FAILED) or once a new producer starts after it FAILED.  A consumer created
with ``run_id=None`` ignores the runs that were already ended when it was created, and
follows every other run: so a stale DONE or FAILED from an earlier run never ends a new
run (DESIGN G6).  A consumer created with ``run_id="x"`` follows that run only.
"""

from __future__ import annotations

from ..sentinels import DONE, FAILED
from .base import _identity as _identity  # compat.pympx_folder imports it from here
from .grouped import ReadableGroupedFileFolderQueue
from .reader import ReadableFolderQueue
from .recovery import RecoveryReport
from .writer import WritableFolderQueue

__all__ = [
    "WritableFolderQueue", "ReadableFolderQueue", "ReadableGroupedFileFolderQueue",
    "RecoveryReport", "DONE", "FAILED",
]
