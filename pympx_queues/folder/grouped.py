"""A consumer that hands out complete sets of files: :class:`ReadableGroupedFileFolderQueue`."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from .. import _fs
from ..errors import Empty, IncompleteGroupsError, QueueClosed
from ..sentinels import DONE, FAILED
from . import layout as L
from .base import PathLike, _format_error, _identity
from .reader import ReadableFolderQueue

log = logging.getLogger("pympx_queues.folder")


class ReadableGroupedFileFolderQueue(ReadableFolderQueue):
    """A consumer that hands out complete sets of files.

    ``grouping_function(name)`` gives a file's group (for example a business date),
    ``item_function(name)`` its item (for example a business unit); a group is handed out
    once one file of every item in ``list_of_items_in_group`` is waiting.  ``get()``
    returns the list of claimed paths, sorted by name.  The claim is all-or-nothing: if
    another consumer takes one file first, the files already claimed go back.

    Files whose item is not in the set (or whose functions raise) are *foreign*: logged
    once, listed in :attr:`foreign_files`, never claimed.  Groups still incomplete when
    the stream ends are reported: with ``on_incomplete="raise"`` (default) ``get()``
    raises :class:`~pympx_queues.errors.IncompleteGroupsError` (``.groups`` maps each
    group to the files present) instead of returning DONE; with ``"return"`` it logs a
    warning, stores them in :attr:`incomplete_groups` and returns DONE.  The files stay
    in the folder either way.  ``task_done``/``nack``/``heartbeat`` take the whole list.
    """

    def __init__(
        self,
        path: PathLike,
        message_extension: str = ".tsv",
        task_done_directory: Optional[PathLike] = None,
        grouping_function: Callable[[str], Any] = _identity,
        item_function: Callable[[str], Any] = _identity,
        list_of_items_in_group: Optional[Iterable[Any]] = None,
        *,
        sorting_function: Optional[Callable[[str], Any]] = None,
        on_incomplete: str = "raise",
        **kwargs: Any,
    ) -> None:
        items = set(list_of_items_in_group or [])
        if not items:
            raise ValueError("list_of_items_in_group must name at least one item")
        if on_incomplete not in ("raise", "return"):
            raise ValueError("on_incomplete must be 'raise' or 'return'")
        self.grouping_function = grouping_function
        self.item_function = item_function
        self.set_of_items_in_group = items
        self.on_incomplete = on_incomplete
        self.incomplete_groups: Dict[Any, List[str]] = {}
        self._foreign: Set[str] = set()
        self._gnames: Optional[Set[str]] = None
        self._gclass: Dict[str, Optional[Tuple[Any, Any]]] = {}
        super().__init__(path, message_extension, task_done_directory, sorting_function,
                         **kwargs)

    _RUNTIME_ATTRS = ReadableFolderQueue._RUNTIME_ATTRS + ("_gnames", "_gclass")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._gnames = None  # the cached listing (names believed ready)
        self._gclass = {}  # name -> (group, item) or None (foreign), for cached names

    @property
    def foreign_files(self) -> List[str]:
        """Names seen in the folder whose item is not in the set (never claimed)."""
        return sorted(self._foreign)

    def _classify(self, name: str) -> Optional[Tuple[Any, Any]]:
        try:
            group = self.grouping_function(name)
            item = self.item_function(name)
        except Exception as exc:
            self._foreign.add(name)
            self._warn_once("foreign:" + name, "file %r: grouping/item function raised %r; "
                            "not claimed", name, exc)
            return None
        if item not in self.set_of_items_in_group:
            self._foreign.add(name)
            self._warn_once("foreign:" + name, "file %r has item %r, not in the set %r; "
                            "not claimed", name, item, sorted(map(str, self.set_of_items_in_group)))
            return None
        return group, item

    def _groups(self, names: Iterable[str]) -> Dict[Any, Dict[Any, List[str]]]:
        groups: Dict[Any, Dict[Any, List[str]]] = {}
        memo = self._gclass
        foreign: Set[str] = set()
        for name in names:
            if name in memo:
                gi = memo[name]
            else:
                gi = memo[name] = self._classify(name)
            if gi is None:
                foreign.add(name)
                continue
            groups.setdefault(gi[0], {}).setdefault(gi[1], []).append(name)
        self._foreign = foreign
        return groups

    def _group_listing(self, fresh: bool = False) -> Set[str]:
        """The cached set of ready names: listed again only when ``fresh``, on overflow,
        or when ``rescan_interval`` passed; otherwise updated from wake-up hints
        (DESIGN.md 4: finding the next group must not list the folder per ``get()``)."""
        wake = self._wakeups
        if wake.rescan_needed:
            wake.rescan_needed = False
            fresh = True
        names = self._gnames
        now = time.monotonic()
        if fresh or names is None or now >= self._next_rescan:
            wake.names()  # superseded by the listing below
            names = self._gnames = set(self._scan_ready())
            self._gclass = {n: gi for n, gi in self._gclass.items() if n in names}
            self._listed(now)
        elif wake.pending():
            ext = self.message_extension
            valid = L.valid_message_name
            for n in wake.names():
                if n.endswith(ext) and valid(n):
                    names.add(n)
        return names

    def _claim_group(self, names: List[str]) -> Optional[List[str]]:
        claimed: List[str] = []
        cache = self._gnames if self._gnames is not None else set()
        for name in sorted(names):  # same order in every consumer: losers fail early
            path = self._claim_name(name)
            cache.discard(name)  # claimed now, or gone (another consumer took it)
            if path is None:
                for done in reversed(claimed):  # roll back the partial claim
                    self._rollback(done)
                return None
            claimed.append(path)
        return claimed

    def _rollback(self, wip_path: str) -> None:
        with self._claims_lock:
            claim = self._claims.pop(wip_path, None)
        name = claim if claim else L.parse_owned(os.path.basename(wip_path)).name  # type: ignore[union-attr]
        try:
            back = self._move_noclobber(wip_path, self.path, name)  # G1: never lost/clobbers
            if self._gnames is not None:
                self._gnames.add(os.path.basename(back))
        except OSError:
            log.error("could not roll back partial group claim %s; recover() will return it",
                      wip_path, exc_info=True)

    def _try_groups(self, names: Iterable[str]) -> Optional[List[str]]:
        groups = self._groups(list(names))
        key = self.sorting_function
        complete = []
        for items in groups.values():
            if len(items) == len(self.set_of_items_in_group):
                chosen = [sorted(v, key=lambda n: (key(n), n))[0] for v in items.values()]
                complete.append((min((key(n), n) for n in chosen), chosen))
        complete.sort(key=lambda c: c[0])
        for _, chosen in complete:
            got = self._claim_group(chosen)
            if got is not None:
                return sorted(got)
        self._last_incomplete = {
            g: sorted(n for v in items.values() for n in v)
            for g, items in groups.items() if len(items) != len(self.set_of_items_in_group)
        }
        return None

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Claim the next complete group; returns the sorted list of claimed paths.

        Blocks and ends like :meth:`ReadableFolderQueue.get`; at the end of the stream,
        incomplete groups are reported as the class docstring says.  Raises
        ``queue.Empty`` on timeout, ``IncompleteGroupsError`` (``on_incomplete="raise"``).
        """
        timeout = _fs.check_timeout(timeout)
        if self._closed_reader:
            raise QueueClosed(f"consumer of {self.path} is closed")
        self._check_process()
        deadline = None if (timeout is None or not block) else time.monotonic() + timeout
        self._wakeups.start()
        if time.monotonic() >= self._next_recover:
            self._auto_recover()
        if self._saw_failed is not None:
            return FAILED
        wake = self._wakeups
        while True:
            state = self._control_state
            if state is None or wake.control_dirty or not wake.active \
                    or time.monotonic() >= self._next_control:
                state = self._check_control()
            failed, closed, runs = state
            if failed:
                return self._end_of_stream(FAILED, runs)
            before = self._last_scan
            got = self._try_groups(self._group_listing())
            if got is not None:
                return got
            if self._last_scan == before and not self._listing_trusted(time.monotonic()):
                got = self._try_groups(self._group_listing(fresh=True))  # dry: relist
                if got is not None:
                    return got
            if closed:
                self._auto_recover(wait=True)
                if self._network:
                    _fs.refresh_listing(self.path)  # G6: not this mount's cached listing
                got = self._try_groups(self._group_listing(fresh=True))  # final (G6)
                if got is not None:
                    return got
                if self._closed_at is None:
                    self._closed_at = time.monotonic()
                    self._closed_server = self._clock.now()
                if time.monotonic() - self._closed_at < self.listing_delay or \
                        self._waiting_for_hosts():
                    if not block:
                        raise Empty(f"no complete group in {self.path}")
                    self._wait_budget(deadline, timeout, "no complete group")
                    wake.wait(self.poll_interval)
                    continue
                self._end_of_stream(DONE, runs)
                self.incomplete_groups = dict(self._last_incomplete)
                if self.incomplete_groups:
                    if self.on_incomplete == "raise":
                        raise IncompleteGroupsError(self.incomplete_groups)
                    log.warning("%d incomplete group(s) left in %s at end of stream: %s",
                                len(self.incomplete_groups), self.path,
                                sorted(map(str, self.incomplete_groups))[:10])
                return DONE
            if not block:
                raise Empty(f"no complete group in {self.path}")
            wait = self._wait_budget(deadline, timeout, "no complete group")
            if not wake.wait(wait):
                if time.monotonic() >= self._next_recover:
                    self._auto_recover()
                self._next_rescan = 0.0  # a quiet poll interval: list again

    def _group_paths(self, paths: Union[PathLike, Sequence[PathLike]]) -> List[PathLike]:
        if isinstance(paths, (str, os.PathLike)):
            return [paths]
        return list(paths)

    def task_done(self, paths: Union[PathLike, Sequence[PathLike]]) -> None:  # type: ignore[override]
        """Acknowledge a whole group (the list ``get()`` returned); one fsync per group."""
        self.task_done_many(self._group_paths(paths))

    def nack(self, paths: Union[PathLike, Sequence[PathLike]], error: Any = None) -> List[str]:  # type: ignore[override]
        """Return a whole group for a retry (or to dead letters, all together)."""
        items = self._group_paths(paths)
        attempt = 0
        for p in items:
            with self._claims_lock:
                known = os.path.abspath(os.fspath(p)) in self._claims
            if known or os.path.exists(p):
                attempt = max(attempt, self.attempts(p))
        text = _format_error(error)
        return [self._give_back(*self._held(p), attempt, text) for p in items]
