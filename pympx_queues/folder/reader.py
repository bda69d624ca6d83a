"""The consumer side of a folder queue: :class:`ReadableFolderQueue`.

The reader is built in layers, one job per module, each using the ones below it: leases
and heartbeats (:mod:`.leases`), listing and claiming (:mod:`.claims`), retries and dead
letters (:mod:`.retries`), acknowledgement and the trash deleter (:mod:`.ack`), recovery
(:mod:`.recovery`); the state they share is declared in :class:`.base._ReaderState`.
This module holds the stream: ``get``, the end of the stream, ``close``."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from os import getpid as _getpid
from time import monotonic as _monotonic
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from .. import _fs
from ..errors import Empty, QueueClosed, QueueFailed
from ..sentinels import DONE, FAILED
from . import layout as L
from .base import DEFAULT_LEASE_TIMEOUT, DEFAULT_MAX_RETRIES, Message, PathLike
from .recovery import _Recovery
from .watch import EVENTS, POLL, Wakeups, check_mode

#: A producer's state once a successor took its registration over (``producer_key``).
SUPERSEDED = "SUPERSEDED"

log = logging.getLogger("pympx_queues.folder")


_NETWORK_LOGGED: set = set()


def _auto_wakeups(path: str) -> str:
    """Wake-ups when the caller chose none: polling on a network file system (inotify
    there sees no other host's changes), events elsewhere.  Logged once per folder.  The
    publish needs no choice: ``renameat2(RENAME_NOREPLACE)`` fails with EINVAL on such
    file systems and ``_fs`` falls back to ``link()`` by itself."""
    kind = _fs.network_fs_kind(path)
    if kind is None:
        return EVENTS
    if path not in _NETWORK_LOGGED:
        _NETWORK_LOGGED.add(path)
        log.info("%s is on a network file system (%s): polling for new messages "
                 "(pass wakeups='events' to override)", path, kind)
    return POLL


class ReadableFolderQueue(_Recovery):
    """The consumer side: claims message files one at a time.

    ``get()`` returns the path of the claimed file in ``wip/`` (its name records the owner:
    host, pid, process start time and a random id, then the original name).  Settle every
    claim with :meth:`task_done` (deleted, or moved to ``task_done_directory``) or
    :meth:`nack` (back for a retry; after ``max_retries`` attempts it goes to ``failed/``
    with the error beside it).  ``for path in queue:`` yields paths until DONE and raises
    :class:`~pympx_queues.errors.QueueFailed` on FAILED.

    :param sorting_function: ``name -> str`` sort key; lowest first (default: the name).
    :param expected_producers: DONE only once at least this many producers registered
        and all of them closed (solves the race of a consumer seeing the first producer's
        DONE before the second producer started).
    :param run_id: follow this run only (default: every run not already ended when this
        consumer was created).
    :param max_retries: attempts before a nacked message becomes a dead letter
        (``None``: retry forever).
    :param lease_timeout: seconds after which a claim held on *another host* without a
        heartbeat counts as abandoned (same-host claims are judged by process liveness).
    :param heartbeat_interval: if set, a background thread renews this object's claims
        every that many seconds (for tasks longer than ``lease_timeout``).
    :param wakeups: None (default: ``"poll"`` where ``_fs.network_fs_kind`` finds a network
        file system by its statfs type, logged once, else ``"events"``), ``"events"``
        (inotify on Linux, else a watchdog observer,
        wakes a blocked ``get`` at once), ``"watchdog"`` (always the watchdog observer) or
        ``"poll"`` (NFS/SMB: no events, rescan every ``poll_interval`` seconds).
    :param poll_interval: seconds between rescans while the queue looks empty.
    :param rescan_interval: seconds between full rescans while messages are flowing (at
        least 20x the last scan's duration, so the cost of ``get()`` stays flat).
    :param recover_interval: seconds between automatic :meth:`recover` passes.
    :param listing_delay: seconds to keep looking after every producer closed before
        DONE is returned (default 0).  Before DONE a consumer always makes its listing
        come from the file server (``_fs.refresh_listing``) and checks the last names each
        producer's DONE file lists by ``stat``; set this to the mount's listing-cache time
        on a network file system where a change through the mount does not drop its
        cached listing (docs/several-hosts.md).
    :param create: create the queue folder when it does not exist.  By default a consumer
        of a missing folder raises ``FileNotFoundError`` (a typo in the path would
        otherwise wait forever on a queue no producer writes to); producers always create
        it.  A file where the folder (or one of its sub-folders) belongs raises
        ``NotADirectoryError`` naming it.

    One object serves one thread; give each thread (or process: the object pickles, its
    observer and claims stay behind) its own.  ``close()`` stops the wake-up observer
    and the heartbeat thread.
    """

    #: Seconds a DONE file seen in a listing may stay unreadable before its producer
    #: counts as closed anyway (NFS keeps a failed lookup cached for up to acdirmax).
    DONE_READ_GRACE = 120.0

    _RUNTIME_ATTRS = ("_listing", "_cursor", "_hints", "_contention", "_lost_races", "_hb_thread", "_hb_stop", "_claims_lock", "_lock_obj",
                      "_last_scan", "_next_rescan", "_next_recover", "_next_control",
                      "_scan_watched", "_skipped", "_trash_thread", "_trash_wake", "_trash_halt",
                      "_trash_stop", "_trash_backlog", "_trash_run", "_slow_unlinks", "_fast_ack",
                      "_retry_hint", "_control_state", "_wip_prefix")

    def __init__(
        self,
        path: PathLike,
        message_extension: str = ".tsv",
        task_done_directory: Optional[PathLike] = None,
        sorting_function: Optional[Callable[[str], Any]] = None,
        *,
        expected_producers: Optional[int] = None,
        run_id: Optional[str] = None,
        max_retries: Optional[int] = DEFAULT_MAX_RETRIES,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        heartbeat_interval: Optional[float] = None,
        wakeups: Optional[str] = None,
        poll_interval: float = 1.0,
        rescan_interval: float = 30.0,
        recover_interval: float = 10.0,
        recover_on_start: bool = True,
        durability: str = _fs.FLUSH,
        dir_mode: int = _fs.DEFAULT_DIR_MODE,
        file_mode: int = _fs.DEFAULT_FILE_MODE,
        create: bool = False,
        listing_delay: Optional[float] = None,
    ) -> None:
        super().__init__(path, message_extension, task_done_directory, sorting_function,
                         durability=durability, lease_timeout=lease_timeout,
                         dir_mode=dir_mode, file_mode=file_mode, create=create)
        if expected_producers is not None:
            if isinstance(expected_producers, bool) or not isinstance(expected_producers, int) \
                    or expected_producers < 1:
                raise ValueError("expected_producers must be a positive int or None")
        self.expected_producers = expected_producers
        self.run_id = None if run_id is None else L.check_run_id(run_id)
        if max_retries is not None and (isinstance(max_retries, bool)
                                        or not isinstance(max_retries, int) or max_retries < 1):
            raise ValueError("max_retries must be a positive int or None")
        self.max_retries = max_retries
        if heartbeat_interval is not None:
            hb = _fs.check_timeout(heartbeat_interval)
            if not hb or hb >= self.lease_timeout:
                raise ValueError("heartbeat_interval must be > 0 and < lease_timeout")
        self.heartbeat_interval = heartbeat_interval
        self.poll_interval = _fs.check_timeout(poll_interval) or 0.001
        self.rescan_interval = _fs.check_timeout(rescan_interval) or 0.0
        self.recover_interval = _fs.check_timeout(recover_interval) or 0.0
        if listing_delay is None:
            listing_delay = 0.0
        self.listing_delay = _fs.check_timeout(listing_delay) or 0.0
        # On a network file system other hosts judge our claims by lease (mtime), and a
        # rename does not renew the mtime there (sshfs reports no separate ctime): each
        # claim's lease is started explicitly (see _Leases._start_lease).
        self._network = _fs.network_fs_kind(self.path) is not None
        if wakeups is None:
            wakeups = _auto_wakeups(self.path)
        self._wakeups = Wakeups(self.path, self._control, self.message_extension,
                                check_mode(wakeups), side_dir=self._retries)
        self._claims: Dict[str, str] = {}  # wip path -> original message name
        self._closed_reader = False
        self._saw_failed: Optional[List[str]] = None
        # (run, producer) -> HELO / DONE / FAILED / GONE, as this consumer has seen them
        self._seen_producers: Dict[Tuple[str, str], str] = {}
        self._done_names: Dict[str, List[str]] = {}  # DONE file -> the last names it lists
        self._done_payloads: Dict[str, dict] = {}  # DONE file -> its JSON, read once
        self._done_unread: Dict[str, float] = {}  # DONE file -> first failed read
        self._closed_at: Optional[float] = None  # monotonic: when all were first closed
        self._closed_server = 0.0  # the same moment on the file server's clock
        self._hosts_waited = 0  # silent claims of other hosts DONE waited for (logged)
        _, ended = self._scan_control()
        # Runs already ended when this consumer was created are history (G6).
        self._history: Set[str] = set(ended) if self.run_id is None else set()
        self._init_runtime()
        if recover_on_start:
            self.recover(wait=False)

    def _init_runtime(self) -> None:
        # The cached ordered listing: sorted (key, name) pairs and a cursor into them, plus
        # a small heap of names announced by wake-up events since the listing was made.
        self._listing: List[Tuple[str, str]] = []
        self._cursor = 0
        self._hints: List[Tuple[str, str]] = []
        self._contention = 0  # > 0 for a while after losing a claim race
        self._lost_races = 0  # claim races lost by this process (a figure for benchmarks)
        self._retry_hint: Set[str] = set()
        self._last_scan = 0.0
        self._next_rescan = 0.0
        self._scan_watched = False
        self._skipped = False
        now = time.monotonic()
        self._next_recover = now + self.recover_interval
        self._next_control = 0.0
        self._control_state: Optional[Tuple[bool, bool, List[str]]] = None
        self._claims_lock = threading.Lock()
        self._hb_thread: Optional[threading.Thread] = None
        self._hb_stop = threading.Event()
        # wip/<host>_<pid>_<start>_<rid>__ : this process's claims start with it
        self._wip_prefix = os.path.join(self._wip, L.format_owned(self._owner(), ""))
        self._last_incomplete: Dict[Any, List[str]] = {}
        self._runtime_pid = os.getpid()
        self._claims = {}  # claims belong to the process that made them
        self._trash_thread: Optional[threading.Thread] = None
        self._trash_wake = threading.Event()
        self._trash_halt = threading.Event()
        self._trash_stop = False
        self._trash_backlog = 0
        # > 0: route that many more acknowledgements through trash/ (see SLOW_UNLINK)
        self._trash_run = self.TRASH_RUN if self._durable else 0
        self._slow_unlinks = 0
        self._fast_ack = not self._durable and self.task_done_directory is None

    def _check_process(self) -> None:
        """Inherited through ``fork`` (not pickled): start this process's own state."""
        if self._runtime_pid != os.getpid():
            self._init_runtime()

    @property
    def wakeups(self) -> str:
        return self._wakeups.mode

    # ------------------------------------------------------------------ control state
    def _check_control(self) -> Tuple[bool, bool, List[str]]:
        """(failed, all registered producers closed, runs followed).

        What this consumer has seen is cumulative: a producer seen closed stays closed,
        and a producer whose control files disappeared after we saw them (an operator's
        ``reset``/``purge`` between runs) counts as closed, so removing the files of a run
        never leaves a consumer that was draining it waiting forever.
        """
        runs, ended = self._scan_control()
        if self.run_id is not None:
            followed = {self.run_id: runs.get(self.run_id, {})}
        else:
            followed = {r: p for r, p in runs.items() if r not in self._history}
        seen = self._seen_producers
        present = set()
        for run, run_producers in followed.items():
            for prod, kinds in run_producers.items():
                key = (run, prod)
                present.add(key)
                state = (L.FAILED if L.FAILED in kinds else L.DONE if L.DONE in kinds
                         else L.HELO)
                if seen.get(key) in (None, L.HELO):
                    seen[key] = state
        for key, state in seen.items():
            if key not in present and state == L.HELO:
                by_name = self._state_by_name(key)  # a stale listing may miss it
                if by_name is not None:
                    seen[key] = by_name
                    continue
                seen[key] = "GONE"
                log.warning("control files of producer %s (run %s) disappeared from %s "
                            "(reset or purge?); counting it as closed", key[1], key[0],
                            self._control)
        unread = self._follow_successors()
        # A producer superseded by a successor (producer_key) is closed and the pair
        # counts as one producer for expected_producers.
        producers = sum(1 for st in seen.values() if st != SUPERSEDED)
        open_ = sum(1 for st in seen.values() if st == L.HELO)
        failed = any(st == L.FAILED for st in seen.values())
        need = self.expected_producers or 1
        closed = producers >= need and open_ == 0 and not unread
        state = (failed, closed, sorted({run for run, _ in seen}))
        self._control_state = state
        self._wakeups.control_dirty = False
        self._next_control = time.monotonic() + self.poll_interval
        return state

    def _done_payload(self, run: str, owner: L.Owner) -> Optional[dict]:
        """The JSON of a producer's DONE file, read once ({} when it is not a JSON
        object); None, and read again next time, when it could not be read (on NFS a
        name this mount looked up before it existed stays "absent" for up to a minute),
        for at most ``DONE_READ_GRACE`` seconds (a DONE removed by ``purge`` never
        leaves a consumer waiting for ever)."""
        key = L.format_control(L.DONE, run, owner)
        data = self._done_payloads.get(key)
        if data is None:
            try:
                data = json.loads(_fs.read_bytes(os.path.join(self._control, key)))
            except OSError as exc:
                first = self._done_unread.setdefault(key, time.monotonic())
                if time.monotonic() - first < self.DONE_READ_GRACE:
                    return None
                log.warning("cannot read %s in %s for %.0f s (%s); counting that producer "
                            "as closed", key, self._control, self.DONE_READ_GRACE, exc)
                data = None
            except ValueError:
                data = None
            data = data if isinstance(data, dict) else {}
            self._done_payloads[key] = data
        return data

    def _state_by_name(self, key: Tuple[str, str]) -> Optional[str]:
        """A producer's state from its control files looked up by name (``stat`` is
        never stale the way a listing is); None when it has none."""
        owner = L.parse_owner(key[1])
        if owner is None:
            return None
        for kind in (L.FAILED, L.DONE, L.HELO):
            if _fs.lstat(os.path.join(self._control,
                                      L.format_control(kind, key[0], owner))) is not None:
                return kind
        return None

    def _follow_successors(self) -> int:
        """A DONE written by a successor for a dead predecessor (``producer_key``):
        the predecessor becomes SUPERSEDED and the successor is followed (G6: the stream
        ends when the successor closes, never on the predecessor's DONE alone).  The
        successor registered before it wrote that DONE, so its HELO is found by name
        even when this mount's listing does not show it yet.  Returns how many DONE
        files could not be read (their producers do not count as closed yet)."""
        seen = self._seen_producers
        todo = [k for k, st in seen.items() if st == L.DONE]
        unread = 0
        while todo:
            key = todo.pop()
            owner = L.parse_owner(key[1])
            if owner is None:
                continue
            payload = self._done_payload(key[0], owner)
            if payload is None:
                unread += 1  # superseded or not is unknown: not closed yet (G6)
                continue
            succ = payload.get("superseded_by")
            if not isinstance(succ, str) or L.parse_owner(succ) is None:
                continue
            seen[key] = SUPERSEDED
            skey = (key[0], succ)
            if seen.get(skey) in (None, L.HELO):
                # No file at all: HELO for now (the next look counts it GONE, as for
                # any producer whose control files were removed by reset or purge).
                seen[skey] = self._state_by_name(skey) or L.HELO
                if seen[skey] == L.DONE:
                    todo.append(skey)  # it may have died and been superseded in turn
        return unread

    def _claim_announced(self) -> Optional[str]:
        """Claim a message named in a DONE file that is waiting but was not listed.

        Each producer's DONE file names its last published messages; a listing that
        came from a cache (another host's mount) may not show them yet, a ``stat`` by
        name does (G6: a stale listing never ends the stream early).
        """
        for (run, prod), state in list(self._seen_producers.items()):
            if state != L.DONE:
                continue
            owner = L.parse_owner(prod)
            if owner is None:
                continue
            key = L.format_control(L.DONE, run, owner)
            names = self._done_names.get(key)
            if names is None:
                payload = self._done_payload(run, owner)
                if payload is None:
                    continue  # unreadable now: not closed yet, read again next time
                last = payload.get("last", [])
                last = last if isinstance(last, list) else []
                names = [n for n in last if isinstance(n, str) and self.is_message_name(n)]
                self._done_names[key] = names
            for name in names:
                if _fs.lstat(self._root_slash + name) is not None:
                    path = self._claim_name(name)
                    if path is not None:
                        log.info("claimed %s by name after a listing of %s missed it",
                                 name, self.path)
                        return path
        return None

    def _end_of_stream(self, sentinel: Any, runs: List[str]) -> Any:
        if sentinel is FAILED:
            self._saw_failed = runs  # sticky: every later get() returns FAILED too
        try:
            self._mark_ended(runs, "consumer saw " + repr(sentinel))
        except OSError:
            log.warning("could not mark runs %s ended in %s", runs, self._control,
                        exc_info=True)
        return sentinel

    # ------------------------------------------------------------------ get
    def get(self, block: bool = True, timeout: Optional[float] = None) -> Message:
        """Claim the next message and return its path in ``wip/``.

        Blocks (``block=True``) until a message is available, the stream ends or
        ``timeout`` seconds pass.  Returns ``FAILED`` as soon as a followed producer has
        failed, and ``DONE`` once every registered producer (at least
        ``expected_producers``) closed and a final rescan finds no message (G6).

        Raises ``queue.Empty`` when nothing arrived in time (at once with
        ``block=False``), ``ValueError`` for a negative timeout, ``QueueClosed`` after
        :meth:`close`.
        """
        if timeout is not None and not (
                (timeout.__class__ is float or timeout.__class__ is int) and timeout >= 0):
            timeout = _fs.check_timeout(timeout)  # not a plain number >= 0: check, or raise
        if self._closed_reader:
            raise QueueClosed(f"consumer of {self.path} is closed")
        if self._saw_failed is not None:
            return FAILED
        if self._runtime_pid != _getpid():
            self._init_runtime()
        wake = self._wakeups
        now = _monotonic()
        # Fast path: messages are flowing and no timer, hint or contention needs
        # attention: claim the next listed name (what _claim_next does, inlined).
        if now < self._next_control and now < self._next_rescan and now < self._next_recover \
                and not wake.control_dirty and not wake.rescan_needed and not wake._names:
            c = self._cursor
            listing = self._listing
            if c < len(listing) and not self._hints and not self._contention:
                name = listing[c][1]
                self._cursor = c + 1
                dst = self._wip_prefix + name
                claims = self._claims
                if dst not in claims:
                    if self._network:
                        self._start_lease(self._root_slash + name)
                    # dst carries this object's owner tag and no claim of ours has that
                    # name: a plain rename claims, nothing can be clobbered (G3).
                    if _fs.claim_unique(self._root_slash + name, dst):
                        claims[dst] = name  # atomic under the GIL (heartbeat copies)
                        if self._hb_thread is None and self.heartbeat_interval:
                            self._start_heartbeat()
                        return dst
                    self._lost_races += 1  # another consumer took it: spread out
                    self._contention = 256
                else:
                    self._cursor = c  # a twin of a name we hold: the general path
            path = self._claim_next()
            if path is not None:
                return path
        deadline = None if (timeout is None or not block) else now + timeout
        wake.start()
        if now >= self._next_recover:
            self._auto_recover()
        while True:
            now = time.monotonic()
            if self._wakeups.control_dirty or now >= self._next_control:
                failed, _, runs = self._check_control()
                if failed:
                    return self._end_of_stream(FAILED, runs)
            if self._wakeups.rescan_needed:  # the event queue overflowed
                self._wakeups.rescan_needed = False
                self._next_rescan = 0.0
            if self._wakeups.pending():
                self._merge_hints()
            scanned = False
            if now >= self._next_rescan:
                self._rescan()
                scanned = True
            path = self._claim_next()
            if path is not None:
                return path
            if not scanned and not self._listing_trusted(now):
                # dry: the listing is the source of truth
                self._rescan()
                path = self._claim_next()
                if path is not None:
                    return path
            state = self._control_state
            if state is None or self._wakeups.control_dirty \
                    or time.monotonic() >= self._next_control or not self._wakeups.active:
                state = self._check_control()
            failed, closed, runs = state
            if failed:
                return self._end_of_stream(FAILED, runs)
            if not closed:
                self._closed_at = None
            else:
                # Stale claims of dead consumers go back before we decide (G1, G6).
                self._auto_recover(wait=True)
                if self._network:
                    # G6 across hosts: this mount's cached listing may be ~20 s old
                    # (sshfs, NFS); a change made through it drops the cache.
                    _fs.refresh_listing(self.path)
                self._rescan()  # final rescan after seeing every DONE (G6)
                path = self._claim_next()
                if path is not None:
                    return path
                path = self._claim_announced()  # by name: a stale listing misses them
                if path is not None:
                    return path
                if self._closed_at is None:
                    self._closed_at = time.monotonic()
                    self._closed_server = self._clock.now()
                if time.monotonic() - self._closed_at >= self.listing_delay and \
                        not self._waiting_for_hosts():
                    return self._end_of_stream(DONE, runs)
                self._next_rescan = 0.0  # keep listing until listing_delay has passed
            if not block:
                raise Empty(f"no message in {self.path}")
            wait = self._wait_budget(deadline, timeout, "no message")
            if not self._wakeups.wait(wait):
                # A quiet poll interval: rescan (next round) and maybe recover.
                if time.monotonic() >= self._next_recover:
                    self._auto_recover()
                self._next_rescan = 0.0

    def _waiting_for_hosts(self) -> bool:
        """True while DONE must wait for claims of consumers on other hosts that have
        shown no sign of life since the stream closed (:meth:`_silent_foreign_claims`;
        logged once per count)."""
        n = self._silent_foreign_claims(self._closed_server)
        if n and n != self._hosts_waited:
            log.info("%s: every producer closed; before DONE, waiting for %d claim(s) of "
                     "consumers on other hosts that show no sign of life: each is "
                     "settled, heartbeats, or is recovered when its lease (%s s) expires",
                     self.path, n, self.lease_timeout)
        self._hosts_waited = n
        if n and self._clock.now() - self._closed_server > \
                2 * self.lease_timeout + self.recover_interval:
            # Recovery should have moved them by now; something keeps it from doing so
            # (permissions, a file system refusing the rename): no endless wait.
            log.warning("%s: %d claim(s) of consumers on other hosts still in wip/ %.0f s "
                        "after the stream closed and recovery could not take them over; "
                        "DONE without them (requeue them with `pympx-queues requeue`)",
                        self.path, n, self._clock.now() - self._closed_server)
            return False
        return n > 0

    def _wait_budget(self, deadline: Optional[float], timeout: Optional[float],
                     what: str) -> float:
        """Seconds to wait for a wake-up: a poll interval, cut to the time left before
        ``deadline``; raises ``queue.Empty`` when that time is up."""
        if deadline is None:
            return self.poll_interval
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Empty(f"{what} in {self.path} within {timeout} s")
        return min(self.poll_interval, remaining)

    def get_nowait(self) -> Message:
        """``get(block=False)``."""
        return self.get(block=False)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        msg = self.get()
        if msg is DONE:
            raise StopIteration
        if msg is FAILED:
            raise QueueFailed(f"a producer failed the run on {self.path}")
        return msg

    def mark_all_work_done(self) -> int:
        """pympx: claim and acknowledge every message until DONE (blocks until then).

        Returns how many messages were acknowledged; raises ``QueueFailed`` on FAILED.
        """
        n = 0
        for msg in self:
            self.task_done(msg)
            n += 1
        return n

    # ------------------------------------------------------------------ misc
    def qsize(self) -> int:
        """Messages waiting in the ready folder (one directory listing: O(files))."""
        return len(self._scan_ready())

    def empty(self) -> bool:
        return self.qsize() == 0

    def close(self) -> None:
        """Stop the wake-up observer and the heartbeat thread (claims stay claimed)."""
        self._closed_reader = True
        self._wakeups.close()
        self._hb_stop.set()
        t = self._hb_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5.0)
        self._hb_thread = None
        t = self._trash_thread
        if t is not None and self._runtime_pid == os.getpid():
            # Let the deleter finish what this consumer acknowledged (bounded in time;
            # leftovers are deleted by the next consumer's recover()).
            # One last pass over trash/ (everything this consumer acknowledged is in it),
            # then the thread ends, even while other consumers keep acknowledging.
            self._trash_stop = True
            self._trash_halt.set()
            self._trash_wake.set()
            t.join(timeout=10.0)

    def dispose(self) -> None:
        """pympx name for :meth:`close`."""
        self.close()

    def __enter__(self) -> "ReadableFolderQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._wakeups.close()
            self._hb_stop.set()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_claims"] = {}
        state["_closed_reader"] = False
        return state
