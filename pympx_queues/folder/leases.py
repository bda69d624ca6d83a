"""Leases: a claim's mtime is its lease, renewed by heartbeats (:meth:`.layout.Owner.abandoned`
judges it).

Across hosts the lease is an mtime on the *file server's* clock: heartbeats write
``ServerClock.now()`` (this host's clock plus the offset measured by a probe file) and a
recovery pass compares it with its own ``ServerClock.now()``, so hosts whose clocks
disagree judge the same age.  Fencing needs no token: recovery first renames a claim to a
name of its own, after which the old owner's ``task_done``/``nack`` fail with
``FileNotFoundError`` ("claim no longer held") and its heartbeats return False."""

from __future__ import annotations

import logging
import os
import threading
from typing import Sequence, Union

from .. import _fs
from . import layout as L
from .base import PathLike, _ReaderState

log = logging.getLogger("pympx_queues.folder")


class _Leases(_ReaderState):
    """A layer of :class:`~pympx_queues.folder.ReadableFolderQueue`: leases and heartbeats."""

    def heartbeat(self, path: Union[PathLike, Sequence[PathLike]]) -> bool:
        """Renew the lease of a claim (or of every path in a list); False if one is gone.

        Touches the claimed file (its mtime is the lease).  Raises ``ValueError`` for a
        path that is not a claim in this queue's ``wip/``.
        """
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        ok = True
        for p in paths:
            ap = os.path.abspath(os.fspath(p))
            if os.path.dirname(ap) != self._wip or L.parse_owned(os.path.basename(ap)) is None:
                raise ValueError(f"{os.fspath(p)!r} is not a claim of {self.path}")
            ok = _fs.touch_at(ap, self._clock.now()) and ok
        return ok

    def _start_lease(self, path: str) -> None:
        """Start the lease of a claim about to be made: the ready file's mtime set to
        the server clock's now, *before* the claiming rename (which keeps the mtime).

        On a local file system the claim's rename sets its ctime, which leases count; on
        sshfs no ctime is reported, and a message that waited longer than the lease
        would look abandoned to another host's recovery the moment it is claimed (a
        touch after the rename left that window open: hosts.py caught fresh claims
        being taken over).  A lost race only touched the winner's message."""
        _fs.touch_at(path, self._clock.now())

    def _start_heartbeat(self) -> None:
        self._hb_stop.clear()
        t = threading.Thread(target=self._heartbeat_loop, name=f"pympx-heartbeat-{self.path}",
                             daemon=True)
        self._hb_thread = t
        t.start()

    def _heartbeat_loop(self) -> None:
        interval = float(self.heartbeat_interval or 1.0)
        while not self._hb_stop.wait(interval):
            with self._claims_lock:
                paths = list(self._claims)
            if paths:
                now = self._clock.now()
                for p in paths:
                    _fs.touch_at(p, now)
