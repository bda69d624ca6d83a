"""Claiming: the ordered listing of the ready folder, wake-up hints, and claiming a
message by one atomic rename into ``wip/``."""

from __future__ import annotations

import errno
import heapq
import logging
import os
import random as _random
import time
from typing import List, Optional, Tuple

from .. import _fs
from . import layout as L
from .base import PathLike
from .leases import _Leases

log = logging.getLogger("pympx_queues.folder")


class _Claims(_Leases):
    """A layer of :class:`~pympx_queues.folder.ReadableFolderQueue`: listing and claiming."""

    # ------------------------------------------------------------------ listing
    def _scan_ready(self) -> List[str]:
        """One listing of the root: valid, regular message files (litter skipped)."""
        ext = self.message_extension
        names: List[str] = []
        append = names.append
        common = L._COMMON_VALID.fullmatch  # valid_message_name's shortcut, inlined
        valid = L.valid_message_name
        for entry in _fs.scandir(self.path):
            name = entry.name
            if not name.endswith(ext):
                continue
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if not regular:
                if not entry.is_dir(follow_symlinks=False) and _fs.lstat(entry.path) is not None:
                    # (gone since the listing: claimed by another consumer; a network file
                    # system's listing may be seconds old)
                    self._warn_once("ready:" + name, "skipping non-regular entry %r in %s "
                                    "(symlink, FIFO or device)", name, self.path)
                continue
            if common(name) is None and not valid(name):
                if not _fs.is_litter(name):
                    self._warn_once("ready:" + name, "skipping file with an unusable name %r "
                                    "in %s", name, self.path)
                continue
            append(name)
        return names

    def _rescan(self) -> None:
        t0 = time.monotonic()
        self._wakeups.names()  # the listing below supersedes the hints received so far
        self._wakeups.side.clear()  # so does the listing of retries/ below
        names = self._scan_ready()
        # Listed after the root: a sidecar written before its message was returned to
        # the root is seen here (a hint for task_done, which removes it).
        self._retry_hint = {n for n in (L.parse_retry_sidecar(e.name)
                                        for e in _fs.scandir(self._retries)) if n}
        if self._sorting_function is None:
            names.sort()
            listing = [(n, n) for n in names]
        else:
            key = self.sorting_function
            listing = [(key(n), n) for n in names]
            listing.sort()
        self._listing = listing
        self._cursor = 0
        self._hints = []
        self._listed(t0)

    def _listed(self, t0: float) -> None:
        """Note a full listing of the ready folder begun at ``t0`` (monotonic): nothing of
        it was skipped yet, and the next one is due after ``rescan_interval`` (at least
        20x this one's duration, so the cost of ``get()`` stays flat)."""
        self._skipped = False
        # The wake-up watch was running before this listing began: every name published
        # after it reaches us as a hint (or as an overflow that forces a relist).
        self._scan_watched = self._wakeups.active
        now = time.monotonic()
        self._last_scan = now
        self._next_rescan = now + max(self.rescan_interval, 20 * (now - t0))

    def _listing_trusted(self, now: float) -> bool:
        """True when a dry cached listing need not be listed again right now.

        Holds while the last listing was made with the wake-up watch running (so every
        later arrival is announced by a hint), no event was lost (overflow), no name of
        that listing was jumped over, and it is younger than ``poll_interval``.  Thundering
        herd fix: a wake-up makes every waiting consumer try the hinted names only, not
        list the whole folder again; the periodic listing stays the source of truth.
        """
        wake = self._wakeups
        return (self._scan_watched and not self._skipped and not wake.rescan_needed
                and now - self._last_scan < self.poll_interval and wake.active)

    def _merge_hints(self) -> None:
        names = self._wakeups.names()
        if not names:
            return
        key = self.sorting_function
        valid = L.valid_message_name
        for name in names:
            if valid(name):
                heapq.heappush(self._hints, (key(name), name))

    def _has_candidates(self) -> bool:
        return self._cursor < len(self._listing) or bool(self._hints)

    # ------------------------------------------------------------------ claiming
    def _claim_prefix(self) -> str:
        pid = os.getpid()
        if self._runtime_pid != pid:
            self._init_runtime()
        return self._wip_prefix

    def _claim_name(self, name: str) -> Optional[str]:
        dst = self._claim_prefix() + name
        if self._network:
            self._start_lease(self._root_slash + name)
        if dst not in self._claims:
            # dst carries this object's owner tag and no claim of ours has that name:
            # nothing can be clobbered, a plain rename claims (G3).
            if not _fs.claim_unique(self._root_slash + name, dst):
                return None
        else:
            # Same name claimed twice by this object (a twin put later while the first is
            # still held): a fresh random id keeps the two claims apart.
            dst = os.path.join(self._wip, L.format_owned(self._owner(_fs.random_id()), name))
            try:
                if _fs.claim_listed(self._root_slash + name, dst) is None:  # no-clobber
                    return None
            except FileExistsError:
                return None
        self._claims[dst] = name  # atomic under the GIL (heartbeat copies)
        if self._hb_thread is None and self.heartbeat_interval:
            self._start_heartbeat()
        return dst

    #: While consumers contend (a claim race was lost recently), each takes a random one of
    #: the next CONTENTION_WINDOW names instead of the very next: a single consumer keeps
    #: strict order, several stop colliding on every name.
    CONTENTION_WINDOW = 16

    #: How a contended consumer picks its next name. ``"spread"`` (default): after a lost
    #: race the consumer moves to a random point of the rest of its listing and works on
    #: in order from there (wrapping round), so consumers settle in separate stretches
    #: and stop meeting on the same names.  ``"window"``: the earlier policy (a random one of
    #: the next CONTENTION_WINDOW names).  Uncontended, both keep strict order.
    claim_policy = "spread"

    def _claim_next(self) -> Optional[str]:
        listing = self._listing
        hints = self._hints
        fails = 0
        while True:
            c = self._cursor
            n = len(listing)
            if hints and (c >= n or hints[0] < listing[c]):
                name = heapq.heappop(hints)[1]
            elif c < n:
                if self._contention > 0 and n - c > 1 and self.claim_policy != "spread":
                    j = c + _random.randrange(min(self.CONTENTION_WINDOW, n - c))
                    listing[c], listing[j] = listing[j], listing[c]
                name = listing[c][1]
                self._cursor = c + 1
            else:
                return None
            path = self._claim_name(name)
            if path is not None:
                if self._contention > 0:
                    self._contention -= 1
                return path
            # Lost a race: another consumer works through the same listing right here.
            # Jump ahead a random distance (growing with repeated losses) so consumers
            # spread out.  Skipped names are not lost: the others take them, or our next
            # rescan finds them.
            fails += 1
            self._lost_races += 1
            self._contention = 256
            if self.claim_policy == "spread" and fails == 1:
                # Move to our own share of the rest of the listing: rotate it so that it
                # starts at a random point and wraps round.  The names before that point
                # come last, none is skipped; the others work elsewhere.  Repeated losses
                # in one call (a drained listing) jump ahead as the window policy does.
                c = self._cursor
                k = int(_random.random() * (n - c))
                if k:
                    listing[c:] = listing[c + k:] + listing[c:c + k]
                continue
            c = self._cursor
            jump = _random.randrange(min(n - c, 1 << min(fails + 3, 10)) + 1)
            if jump:
                self._skipped = True  # those names are found again by the next listing
            self._cursor = c + jump

    # ------------------------------------------------------------------ the claims held
    def _resolve(self, path: PathLike) -> Tuple[str, str]:
        claim = self._claims.get(path) if isinstance(path, str) else None  # type: ignore[call-overload]
        if claim is not None:  # the exact string get() returned: the common case
            return path, claim  # type: ignore[return-value]
        p = os.path.abspath(os.fspath(path))
        with self._claims_lock:
            claim = self._claims.get(p)
        if claim is not None:
            return p, claim
        if os.path.dirname(p) != self._wip:
            raise ValueError(f"{os.fspath(path)!r} is not a claimed message of {self.path} "
                             "(pass the path get() returned)")
        parsed = L.parse_owned(os.path.basename(p))
        if parsed is None:
            raise ValueError(f"{os.fspath(path)!r} is not a work-in-progress name")
        return p, parsed.name

    def _forget(self, path: str) -> None:
        with self._claims_lock:
            self._claims.pop(path, None)

    def _lost(self, path: str) -> FileNotFoundError:
        self._forget(path)
        return FileNotFoundError(
            errno.ENOENT, "claim no longer held (requeued by recover()/reset(force=True) or "
            "settled twice); the message may be delivered again", path)

    @property
    def claims(self) -> List[str]:
        """Paths of the claims this object holds (in this process)."""
        with self._claims_lock:
            return list(self._claims)
