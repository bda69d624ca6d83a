"""Recovery: abandoned claims go back to the queue (or to the dead letters), crashed
producers' partial writes and orphaned retry sidecars go."""

from __future__ import annotations

import logging
import os
import time
from typing import List, NamedTuple, Set

from .. import _fs
from . import layout as L
from .ack import _Acknowledgement
from .base import _now

log = logging.getLogger("pympx_queues.folder")


class RecoveryReport(NamedTuple):
    """What one :meth:`ReadableFolderQueue.recover` pass did."""

    requeued: List[str]  # message paths put back in the ready folder
    live: int  # claims left alone because their owner is alive / lease fresh
    temp_removed: List[str]  # crashed producers' partial writes removed
    skipped: bool  # another process held the recovery lock (automatic passes only)
    dead_lettered: List[str] = []  # claims whose owners died max_retries times (poison)


class _Recovery(_Acknowledgement):
    """A layer of :class:`~pympx_queues.folder.ReadableFolderQueue`: recovery passes."""

    def _auto_recover(self, wait: bool = False) -> None:
        self._next_recover = time.monotonic() + self.recover_interval
        try:
            self.recover(wait=wait)
        except OSError:
            log.warning("automatic recovery of %s failed", self.path, exc_info=True)

    def recover(self, wait: bool = True, include_live: bool = False) -> RecoveryReport:
        """Requeue abandoned claims and remove crashed producers' partial writes.

        A claim is abandoned when its owner process is gone (same host: pid + start time)
        or, for another host, when its lease expired (no heartbeat for ``lease_timeout``
        seconds).  Live claims are never touched unless ``include_live`` (an operator's
        decision).  A claim abandoned for the ``max_retries``-th time (its consumers keep
        dying on it) goes to the dead letters instead of back to the queue.  Idempotent and crash-safe (G5): each claim moves back by one rename.
        Runs automatically at consumer start, every ``recover_interval`` seconds and
        before DONE.  With ``wait=False`` it skips the pass when another process holds the
        recovery lock.
        """
        from filelock import Timeout

        self._kick_trash()
        lock = self._lock()
        try:
            # filelock polls a held lock every 50 ms by default: a consumer reaching the
            # end of the stream right after another would idle that long for a pass
            # that takes a millisecond.
            lock.acquire(timeout=-1 if wait else 0, poll_interval=0.002)
        except Timeout:
            return RecoveryReport([], 0, [], True, [])
        try:
            requeued: List[str] = []
            dead: List[str] = []
            live = 0
            now = _now()
            for entry in list(_fs.scandir(self._wip)):
                name = entry.name
                if not _fs.entry_is_regular(entry):
                    if not _fs.is_litter(name):
                        self._warn_once("wip:" + name, "skipping non-regular %r in %s",
                                        name, self._wip)
                    continue
                parsed = L.parse_owned(name)
                if parsed is None:
                    if not _fs.is_litter(name):
                        self._warn_once("wip:" + name, "skipping unparseable claim %r in %s",
                                        name, self._wip)
                    continue
                st = _fs.lstat(entry.path)
                if st is None:
                    continue
                abandoned = parsed.owner.abandoned(entry.path, self.lease_timeout, now, st)
                if not include_live and not abandoned:
                    live += 1
                    continue
                if st.st_nlink > 1:
                    # link()+unlink() claim (no renameat2: NFS, some FUSE) cut between the
                    # two: the ready name still holds the same file, the claim never
                    # completed.  Drop the wip name only; never publish a second copy (G3).
                    twin = _fs.lstat(os.path.join(self.path, parsed.name))
                    if twin is not None and (twin.st_dev, twin.st_ino) == (st.st_dev, st.st_ino):
                        if _fs.remove_claim(entry.path):
                            if self._durable:
                                _fs.fsync_dir(self._wip)  # G5: the half claim is gone for good
                            requeued.append(os.path.join(self.path, parsed.name))
                        continue
                prev = self._read_retry(parsed.name, st.st_dev, st.st_ino)
                if prev.get("claim") == name:  # a crashed recovery already counted it (G5)
                    attempts = int(prev.get("attempts", 1))
                else:
                    attempts = int(prev.get("attempts", 0)) + 1
                why = ("forced requeue" if not abandoned
                       else "owner died" if parsed.owner.is_local() else "lease expired")
                text = f"claim by {parsed.owner.format()} recovered: {why}"
                try:
                    if self.max_retries is not None and attempts >= self.max_retries \
                            and why != "forced requeue":
                        # A message whose consumers keep dying is poison: stop the loop.
                        dead.append(self._dead_letter(entry.path, parsed.name, attempts, text))
                        continue
                    target = self._requeue(entry.path, parsed.name, st, attempts, text, why,
                                           claim_rid=name)
                except FileNotFoundError:
                    continue  # settled or recovered meanwhile
                requeued.append(target)
            temp_removed = self._clean_tmp()
            self._sweep_retry_sidecars()
            if requeued:
                log.warning("recovered %d abandoned claim(s) in %s", len(requeued), self.path)
                self._next_rescan = 0.0
            return RecoveryReport(requeued, live, temp_removed, False, dead)
        finally:
            lock.release()

    def _wip_names(self) -> Set[str]:
        out = set()
        for entry in _fs.scandir(self._wip):
            parsed = L.parse_owned(entry.name)
            if parsed is not None:
                out.add(parsed.name)
        return out

    def _sweep_retry_sidecars(self) -> int:
        """Remove retry sidecars whose message is neither waiting nor claimed any more
        (their ``task_done`` ran in a consumer that did not know of them, or crashed)."""
        candidates = []
        for entry in _fs.scandir(self._retries):
            name = L.parse_retry_sidecar(entry.name)
            if name is not None and _fs.entry_is_regular(entry):
                candidates.append((name, entry.path))
        if not candidates:
            return 0
        root = self.path
        candidates = [(n, p) for n, p in candidates if _fs.lstat(os.path.join(root, n)) is None]
        if not candidates:
            return 0
        in_wip = self._wip_names()
        removed = 0
        for name, path in candidates:
            # Root, wip/, root again: a message moving between them is seen in one of them.
            if name in in_wip or _fs.lstat(os.path.join(root, name)) is not None:
                continue
            if _fs.unlink_quiet(path):
                removed += 1
        return removed
