"""Recovery: abandoned claims go back to the queue (or to the dead letters), crashed
producers' partial writes and orphaned retry sidecars go."""

from __future__ import annotations

import logging
import os
import time
from typing import List, NamedTuple, Optional, Set

from .. import _fs
from . import layout as L
from .ack import _Acknowledgement

log = logging.getLogger("pympx_queues.folder")


#: Claims this process's recovery passes have taken over and are moving right now (a
#: takeover claim of this process not in it was left by a pass that raised: recovered).
_TAKING: Set[str] = set()



class _NoLock:
    """Stands in for the recovery filelock where locks must not be used."""

    def acquire(self, timeout: float = -1, poll_interval: float = 0.05) -> None:
        pass

    def release(self) -> None:
        pass


_NO_LOCK = _NoLock()

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
        # The filelock only keeps this host's consumers from doing the same pass at once
        # (flock is not coherent across hosts on sshfs).  Correctness never rests on it:
        # every claim is first taken over by one atomic rename to a name of our own, so
        # of two passes on two hosts exactly one moves each claim, the other gets ENOENT
        # (at worst redundant work; tests/test_folder_hosts.py runs two at once).
        # On a network file system the lock is skipped altogether: flock there goes to the
        # server's lock manager (NFS: NLM), and where that does not answer (a firewall, a
        # server without lockd) flock blocks in the kernel even with a zero timeout, so
        # every consumer would hang at start for a lock that only saves redundant work.
        lock = _NO_LOCK if getattr(self, "_network", False) else self._lock()
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
            now = self._clock.now()  # lease ages on the file server's clock
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
                if not abandoned and L.is_takeover(parsed.owner) \
                        and parsed.owner.pid == os.getpid() and parsed.owner.is_local() \
                        and entry.path not in _TAKING:
                    abandoned = True  # a pass of this very process took it and failed
                if abandoned and not parsed.owner.is_local():
                    # Judged by lease: this mount's cached attributes may miss the
                    # owner's latest heartbeat (sshfs: up to 20 s); ask the server.
                    fresh = _fs.fresh_lstat(entry.path, self._tmp)
                    if fresh is None:
                        continue
                    abandoned = now - _fs.last_change(fresh, st) > self.lease_timeout
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
                # Take the claim over first: one atomic rename to a name of ours.  From
                # here its owner's task_done/heartbeat fail (fencing: a host back after
                # its lease expired cannot acknowledge it), and a second recovery pass
                # (another host's) gets ENOENT instead of publishing a second copy
                # through the link() fallback (G3).
                entry_path = self._take_over(entry.path, parsed.name)
                if entry_path is None:
                    continue  # settled, or taken over by another pass meanwhile
                try:
                    target = self._recover_claim(entry_path, name, parsed, st, abandoned)
                finally:
                    _TAKING.discard(entry_path)
                if target is None:
                    continue
                if target.startswith(self._failed + os.sep):
                    dead.append(target)
                else:
                    requeued.append(target)
            temp_removed = self._clean_tmp()
            self._sweep_retry_sidecars()
            if requeued:
                log.warning("recovered %d abandoned claim(s) in %s", len(requeued), self.path)
                self._next_rescan = 0.0
            return RecoveryReport(requeued, live, temp_removed, False, dead)
        finally:
            lock.release()

    def _silent_foreign_claims(self, since: float) -> int:
        """Claims in ``wip/`` held by consumers on other hosts that have shown no sign
        of life since ``since``, when this consumer first found every producer closed.
        A sign of life is the claim's mtime, on the file server's clock: set when it was
        claimed (on a network file system, see ``_start_lease``) and by each heartbeat.
        Not its ctime: a recovery pass's probe (``_fs.fresh_lstat`` links the file)
        changes that without any sign from the owner.

        Before DONE (G1, G6 across hosts): a consumer of another host that died holding
        a claim is recovered only once its lease expires, and if every consumer left on
        DONE before that, the message would wait in ``wip/`` for the next run.  So DONE
        waits while such claims remain: each is settled by its owner, shows a heartbeat
        (its owner lives: its claim is its own business), or expires and comes back
        through recovery, here.  A claim of this host is judged by its process at once
        (recovery), and this consumer's own claims are not waited for."""
        n = 0
        network = getattr(self, "_network", False)
        for entry in list(_fs.scandir(self._wip)):
            if entry.path in self._claims:
                continue
            parsed = L.parse_owned(entry.name)
            if parsed is None or parsed.owner.is_local():
                continue
            st = _fs.lstat(entry.path)
            if st is None or st.st_mtime > since:
                continue
            if network:
                # this mount's cached attributes may miss the latest heartbeat (sshfs:
                # up to 20 s): ask the server before waiting on it
                fresh = _fs.fresh_lstat(entry.path, self._tmp)
                if fresh is None or fresh.st_mtime > since:
                    continue
            n += 1
        return n

    def _recover_claim(self, entry_path: str, name: str, parsed: L.OwnedName,
                       st: os.stat_result, abandoned: bool) -> Optional[str]:
        """Requeue (or dead-letter) a claim taken over as ``entry_path`` (listed as
        ``name``); None when it was settled meanwhile."""
        prev = self._read_retry(parsed.name, st.st_dev, st.st_ino)
        # A crashed recovery (which had taken this claim over as ``name``)
        # already counted this attempt (G5).
        if prev.get("claim") == name:
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
                return self._dead_letter(entry_path, parsed.name, attempts, text)
            return self._requeue(entry_path, parsed.name, st, attempts, text, why,
                                 claim_rid=os.path.basename(entry_path))
        except FileNotFoundError:
            return None  # settled or recovered meanwhile

    def _take_over(self, wip_path: str, name: str) -> Optional[str]:
        """Move another owner's claim to a fresh claim name of this process (one plain
        rename to a name nobody else makes) and renew its lease; None if it is gone."""
        rid = _fs.random_id(L.TAKEOVER_RID_BYTES)
        dst = os.path.join(self._wip, L.format_owned(self._owner(rid), name))
        _TAKING.add(dst)
        if not _fs.claim_unique(wip_path, dst):
            _TAKING.discard(dst)
            return None
        _fs.touch_at(dst, self._clock.now())  # our lease, so no third pass takes it
        return dst

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
