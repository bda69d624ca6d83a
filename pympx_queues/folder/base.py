"""What producers and consumers of a folder queue share: paths, names, control files,
the temp-file sweep, the recovery lock and pickling."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from .. import _fs
from . import layout as L
from .watch import Wakeups

log = logging.getLogger("pympx_queues.folder")


PathLike = Union[str, "os.PathLike[str]"]
Message = Union[str, Any]

#: Default lease for claims held by consumers on *other* hosts (same-host claims are
#: judged by process liveness, never by age).
DEFAULT_LEASE_TIMEOUT = 600.0
DEFAULT_MAX_RETRIES = 5


def _identity(x: Any) -> Any:
    """Default grouping/item function (module level so queues pickle into children)."""
    return x


def _now() -> float:
    return time.time()


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def _format_error(error: Any) -> str:
    if error is None:
        return ""
    if isinstance(error, BaseException):
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return str(error)


class _FolderQueue:
    """Shared plumbing: paths, modes, names, pickling."""

    #: Seconds a temp file of a producer on *another host* must stay unchanged (judged
    #: on the file server's clock) before a recovery pass moves it aside into
    #: ``tmp/abandoned/`` (never deletes it).  Only the producer's own host can tell by
    #: its pid that a writer is gone; from elsewhere a slow or partitioned producer
    #: looks exactly like a dead one, so this is long: a day.  A producer whose temp
    #: file was moved aside fails its ``put`` with a clear error, nothing is published.
    TMP_ABANDON_AGE = 24 * 3600.0
    #: Probe files (``.pympx-probe-*``, see ``_fs.server_time``) left in ``tmp/`` by a
    #: process killed mid-probe are removed after this many seconds.
    PROBE_MAX_AGE = 3600.0

    def __init__(
        self,
        path: PathLike,
        message_extension: str = ".tsv",
        task_done_directory: Optional[PathLike] = None,
        sorting_function: Optional[Callable[[str], Any]] = None,
        *,
        durability: str = _fs.FLUSH,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        dir_mode: int = _fs.DEFAULT_DIR_MODE,
        file_mode: int = _fs.DEFAULT_FILE_MODE,
        create: bool = True,
    ) -> None:
        if path is None or os.fspath(path) == "":
            raise ValueError("path must name a folder")
        self.path = os.path.abspath(os.fspath(path))
        if not create and not os.path.lexists(self.path):
            parent = os.path.dirname(self.path)
            while not os.path.lexists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise _fs.not_a_folder(parent, "parent of the queue folder")
            raise FileNotFoundError(
                errno.ENOENT, "no queue folder here; a consumer does not create one (pass "
                "create=True, or start a producer first: producers create it)", self.path)
        self.message_extension = L.normalise_extension(message_extension)
        self.durability = _fs.check_durability(durability)
        lt = _fs.check_timeout(lease_timeout)
        if not lt:
            raise ValueError("lease_timeout must be > 0 seconds")
        self.lease_timeout = lt
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.task_done_directory = (
            None if task_done_directory is None else os.path.abspath(os.fspath(task_done_directory))
        )
        if sorting_function is not None and not callable(sorting_function):
            raise TypeError("sorting_function must be callable")
        self._sorting_function = sorting_function
        self._tmp = os.path.join(self.path, L.TMP_DIR)
        self._wip = os.path.join(self.path, L.WIP_DIR)
        self._failed = os.path.join(self.path, L.FAILED_DIR)
        self._retries = os.path.join(self.path, L.RETRIES_DIR)
        self._control = os.path.join(self.path, L.CONTROL_DIR)
        self._done = os.path.join(self.path, L.DONE_DIR)
        self._trash = os.path.join(self.path, L.TRASH_DIR)
        self._trash_slash = self._trash + os.sep
        self._wip_cut = len(self._wip) + 1  # wip path -> its base name, by slicing
        self._root_slash = self.path + os.sep
        _fs.makedirs(self.path, dir_mode, what="queue folder")
        for sub in L.SUBDIRS:
            _fs.makedirs(os.path.join(self.path, sub), dir_mode, what="queue sub-folder")
        if self.task_done_directory:
            _fs.makedirs(self.task_done_directory, dir_mode, what="task_done_directory")
        self._rid = _fs.random_id()
        # The file server's clock (leases are compared on it, never on this host's own).
        self._clock = _fs.ServerClock(self._tmp)
        self._warned: Set[str] = set()
        self._tmp_prefix: Optional[Tuple[int, str, List[int]]] = None

    # ------------------------------------------------------------------ names
    @property
    def _durable(self) -> bool:
        return self.durability == _fs.FSYNC

    def _owner(self, rid: Optional[str] = None) -> L.Owner:
        """(host, pid, start time, rid) of the *calling* process (fork/spawn safe)."""
        return L.new_owner(rid or self._rid)

    def is_message_name(self, name: str) -> bool:
        """True when ``name`` (a bare file name) would be treated as a message."""
        return name.endswith(self.message_extension) and L.valid_message_name(name)

    def sorting_function(self, filename: str) -> str:
        """The sort key of ``filename`` (pympx: the user's function, ``""`` on error)."""
        fn = self._sorting_function
        if fn is None:
            return filename
        try:
            key = fn(filename)
        except Exception:
            return ""
        return "" if key is None else (key if isinstance(key, str) else str(key))

    def wip_filename(self, msg: PathLike) -> str:
        """The work-in-progress path this process would claim message ``msg`` under."""
        name = os.path.basename(os.fspath(msg))
        return os.path.join(self._wip, L.format_owned(self._owner(), name))

    def original_filename_from_wip(self, msg: PathLike) -> str:
        """The ready-folder path a claimed (``wip/``) file had before it was claimed."""
        parsed = L.parse_owned(os.path.basename(os.fspath(msg)))
        if parsed is None:
            raise ValueError(f"{os.fspath(msg)!r} is not a work-in-progress name of this queue")
        return os.path.join(self.path, parsed.name)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            return
        if len(self._warned) < 100_000:
            self._warned.add(key)
        log.warning(msg, *args)

    def _tmp_path(self, name: str) -> str:
        """A fresh ``tmp/`` name: this process's owner tag (with the boot id) with a rid
        of this object's random id plus a counter (unique without a random draw per file), then ``name``."""
        pid = os.getpid()
        cached = self._tmp_prefix
        if cached is None or cached[0] != pid:
            host, _, start = _fs.owner_tag()
            boot = _fs.boot_id()  # a reboot never revives a dead writer (same pid, start)
            owner = L.Owner(host, pid, start, _fs.random_id(), boot)
            cached = self._tmp_prefix = (pid, f"{self._tmp}{os.sep}{owner.format()}", [0])
        counter = cached[2]
        counter[0] += 1
        return "%s%x%s%s" % (cached[1], counter[0], L.SEP, name)

    def _free_name(self, directory: str, name: str) -> str:
        """``name`` if free in ``directory`` else a unique variant (same extension)."""
        if _fs.lstat(os.path.join(directory, name)) is None:
            return name
        return L.unique_variant(name, self.message_extension)

    def _move_noclobber(self, src: str, directory: str, name: str) -> str:
        """Move ``src`` into ``directory`` as ``name`` or a unique variant; never overwrite."""
        for _ in range(20):
            target = os.path.join(directory, self._free_name(directory, name))
            try:
                _fs.rename_noreplace(src, target)  # G2: no-clobber move
                return target
            except FileExistsError:
                name = L.unique_variant(name, self.message_extension)
        raise FileExistsError(f"could not find a free name for {name!r} in {directory}")

    # ------------------------------------------------------------------ control files
    def _scan_control(self) -> Tuple[Dict[str, Dict[str, Set[str]]], Set[str]]:
        """``({run: {producer: {kinds}}}, ended_runs)`` from ``control/``."""
        runs: Dict[str, Dict[str, Set[str]]] = {}
        ended: Set[str] = set()
        for entry in _fs.scandir(self._control):
            name = entry.name
            if _fs.is_litter(name):
                continue
            parsed = L.parse_control(name)
            if parsed is not None and _fs.entry_is_regular(entry):
                runs.setdefault(parsed.run, {}).setdefault(
                    parsed.producer.format(), set()).add(parsed.kind)
                continue
            run = L.parse_ended(name)
            if run is not None and _fs.entry_is_regular(entry):
                ended.add(run)
                continue
            self._warn_once("control:" + name, "ignoring unexpected entry %r in %s",
                            name, self._control)
        return runs, ended

    def _write_control(self, name: str, payload: dict) -> bool:
        """Publish a control file without clobbering; False if it already exists."""
        final = os.path.join(self._control, name)
        try:
            _fs.publish_bytes(self._tmp_path(name), final, _json(payload),
                              durable=self._durable, mode=self.file_mode)  # G1/G6
        except FileExistsError:
            return False
        return True

    def _mark_ended(self, runs: Iterable[str], reason: str) -> None:
        for run in runs:
            name = L.format_ended(run)
            if _fs.lstat(os.path.join(self._control, name)) is not None:
                continue
            self._write_control(name, {"type": "ended", "run": run, "reason": reason,
                                       "time": _now(), "by": self._owner().format()})

    # ------------------------------------------------------------------ maintenance
    def _clean_tmp(self) -> List[str]:
        """Clear crashed producers' partial writes; never touch a live writer's.

        A temp file names its owner (host, pid, process start time).  On the owner's
        host, a file whose process is gone is removed (G2: a crashed put is never
        published).  A file of another host is left alone unless it has been unchanged
        for ``TMP_ABANDON_AGE`` seconds on the file server's clock (a fresh ``stat``, not
        this mount's cached one); then it is moved aside into ``tmp/abandoned/``, never
        deleted.  Returns the paths removed or moved.
        """
        removed: List[str] = []
        moved = 0
        now = None
        for entry in _fs.scandir(self._tmp):
            name = entry.name
            if not _fs.entry_is_regular(entry):
                continue
            parsed = L.parse_owned(name)
            if parsed is None:
                if name.startswith(_fs.PROBE_PREFIX):
                    now = self._clock.now() if now is None else now
                    st = _fs.lstat(entry.path)
                    if st is not None and now - st.st_mtime > self.PROBE_MAX_AGE:
                        _fs.unlink_quiet(entry.path)  # our own probe or extra link
                elif not _fs.is_litter(name):
                    self._warn_once("tmp:" + name, "leaving unexpected file %s in %s",
                                    name, self._tmp)
                continue
            alive = parsed.owner.alive()
            if alive is None:  # another host's: only after a long, server-clock age
                now = self._clock.now() if now is None else now
                st = _fs.lstat(entry.path)
                if st is None or now - max(st.st_mtime, st.st_ctime) <= self.TMP_ABANDON_AGE:
                    continue
                fresh = _fs.fresh_lstat(entry.path, self._tmp)  # not the cached attributes
                if fresh is None or now - _fs.last_change(fresh, st) <= self.TMP_ABANDON_AGE:
                    continue
                target = _fs.move_aside(entry.path, os.path.join(self._tmp, L.ABANDONED_DIR),
                                        self.dir_mode)
                if target is not None:
                    log.warning("moved %s aside to %s: a temp file of host %s unchanged for "
                                "more than %.0f s", entry.path, target, parsed.owner.host,
                                self.TMP_ABANDON_AGE)
                    removed.append(entry.path)
                    moved += 1
                continue
            if alive:
                continue
            if _fs.unlink_quiet(entry.path):  # G2: a crashed put is never published
                removed.append(entry.path)
        if len(removed) > moved:
            log.info("removed %d partial write(s) of crashed producers in %s",
                     len(removed) - moved, self._tmp)
        return removed

    def _lock(self):
        from filelock import FileLock

        path = os.path.join(self._control, L.LOCK_NAME)
        try:
            return FileLock(path, mode=self.file_mode)
        except TypeError:  # filelock < 3.10 has no mode argument
            return FileLock(path)

    # ------------------------------------------------------------------ pickling
    _RUNTIME_ATTRS: Tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for attr in self._RUNTIME_ATTRS:
            state.pop(attr, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _init_runtime(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, message_extension={self.message_extension!r})"


class _ReaderState(_FolderQueue):
    """The state the parts of a consumer share (annotations only: ``ReadableFolderQueue``
    sets it in ``__init__`` and ``_init_runtime``).

    A consumer is built in layers, each in its own module and each using the ones below:
    :mod:`.leases` (heartbeats), :mod:`.claims` (listing, claiming, the claims held),
    :mod:`.retries` (nack, retry sidecars, dead letters), :mod:`.ack` (task_done and the
    trash deleter), :mod:`.recovery` (abandoned claims) and :mod:`.reader` (the stream).
    """

    expected_producers: Optional[int]
    run_id: Optional[str]
    max_retries: Optional[int]
    heartbeat_interval: Optional[float]
    poll_interval: float
    rescan_interval: float
    recover_interval: float
    _wakeups: Wakeups
    _network: bool
    _claims: Dict[str, str]  # wip path -> original message name
    _claims_lock: threading.Lock
    _runtime_pid: int
    _wip_prefix: str
    # listing (claims)
    _listing: List[Tuple[str, str]]
    _cursor: int
    _hints: List[Tuple[str, str]]
    _contention: int
    _lost_races: int
    _retry_hint: Set[str]
    _last_scan: float
    _next_rescan: float
    _scan_watched: bool
    _skipped: bool
    # leases
    _hb_thread: Optional[threading.Thread]
    _hb_stop: threading.Event
    # acknowledgement
    _trash_thread: Optional[threading.Thread]
    _trash_wake: threading.Event
    _trash_halt: threading.Event
    _trash_stop: bool
    _trash_backlog: int
    _trash_run: int
    _slow_unlinks: int
    _fast_ack: bool
    # recovery and the stream
    _next_recover: float
    _next_control: float
    _control_state: Optional[Tuple[bool, bool, List[str]]]
