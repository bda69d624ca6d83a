"""Folder queues: a directory is the queue, each message is a file.

* :class:`WritableFolderQueue` (producers) publishes files without ever overwriting one
  and registers itself in ``control/`` (HELO on start, DONE on ``close()``, FAILED on
  ``fail()``).
* :class:`ReadableFolderQueue` (consumers) claims the next file by one atomic rename into
  ``wip/`` and returns its path; ``task_done`` / ``nack`` settle the claim.
* :class:`ReadableGroupedFileFolderQueue` hands out only complete sets of files.

The layout on disk is described (and formatted/parsed) in :mod:`pympx_queues._layout`;
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

import errno
import fnmatch
import heapq
import json
import logging
import os
import random as _random
import threading
import time
import traceback
from os import getpid as _getpid
from time import monotonic as _monotonic
from time import perf_counter as _perf_counter
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from . import _fs
from . import _layout as L
from ._watch import EVENTS, Wakeups, check_mode
from .errors import Empty, IncompleteGroupsError, QueueClosed, QueueFailed
from .sentinels import DONE, FAILED

log = logging.getLogger("pympx_queues.folder")

__all__ = [
    "WritableFolderQueue", "ReadableFolderQueue", "ReadableGroupedFileFolderQueue",
    "RecoveryReport", "DONE", "FAILED",
]

PathLike = Union[str, "os.PathLike[str]"]
Message = Union[str, Any]

#: Default lease for claims held by consumers on *other* hosts (same-host claims are
#: judged by process liveness, never by age).
DEFAULT_LEASE_TIMEOUT = 600.0
DEFAULT_MAX_RETRIES = 5


class RecoveryReport(NamedTuple):
    """What one :meth:`ReadableFolderQueue.recover` pass did."""

    requeued: List[str]  # message paths put back in the ready folder
    live: int  # claims left alone because their owner is alive / lease fresh
    temp_removed: List[str]  # crashed producers' partial writes removed
    skipped: bool  # another process held the recovery lock (automatic passes only)
    dead_lettered: List[str] = []  # claims whose owners died max_retries times (poison)


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
    ) -> None:
        if path is None or os.fspath(path) == "":
            raise ValueError("path must name a folder")
        self.path = os.path.abspath(os.fspath(path))
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
        _fs.makedirs(self.path, dir_mode)
        for sub in L.SUBDIRS:
            _fs.makedirs(os.path.join(self.path, sub), dir_mode)
        if self.task_done_directory:
            _fs.makedirs(self.task_done_directory, dir_mode)
        self._rid = _fs.random_id()
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
        """A fresh ``tmp/`` name: this process's owner tag with a rid of this object's
        random id plus a counter (unique without a random draw per file), then ``name``."""
        pid = os.getpid()
        cached = self._tmp_prefix
        if cached is None or cached[0] != pid:
            host, _, start = _fs.owner_tag()
            cached = self._tmp_prefix = (
                pid, f"{self._tmp}{os.sep}{host}_{pid}_{start}_{_fs.random_id()}", [0])
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
        """Remove partial writes of crashed producers (never a live writer's)."""
        removed: List[str] = []
        now = _now()
        for entry in _fs.scandir(self._tmp):
            name = entry.name
            if not _fs.entry_is_regular(entry):
                continue
            parsed = L.parse_owned(name)
            if parsed is None:
                if not _fs.is_litter(name):
                    self._warn_once("tmp:" + name, "leaving unexpected file %s in %s",
                                    name, self._tmp)
                continue
            alive = parsed.owner.alive()
            if alive is None:  # another host: judge by age
                st = _fs.lstat(entry.path)
                if st is None or now - max(st.st_mtime, st.st_ctime) < self.lease_timeout:
                    continue
            elif alive:
                continue
            if _fs.unlink_quiet(entry.path):  # G2: a crashed put is never published
                removed.append(entry.path)
        if removed:
            log.info("removed %d partial write(s) of crashed producers in %s",
                     len(removed), self._tmp)
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


# =========================================================================== producers
class WritableFolderQueue(_FolderQueue):
    """The producer side: publishes message files into a queue folder.

    Registers itself at once (``control/HELO__<run>__<producer>.json``); ``close()``
    writes DONE, ``fail()`` writes FAILED.  Usable as a context manager: a clean exit
    closes, an exception fails the run.

    :param path: the queue folder (created with ``dir_mode`` if missing).
    :param message_extension: files ending with it are messages (``".tsv"``; ``"tsv"``
        is accepted too; ``""`` makes every file a message).
    :param task_done_directory: accepted for pympx compatibility; unused by producers.
    :param run_id: the run this producer belongs to (see the module docstring); default
        a fresh time-sortable id.  Producers of one batch may share an explicit id.
    :param durability: ``"flush"`` (survives a process crash) or ``"fsync"`` (also power
        loss: file data and the directory are fsynced before ``put`` returns).
    :param if_exists: what ``put`` does when a message of the same name is already
        waiting: ``"error"`` raises ``FileExistsError`` and writes nothing; ``"rename"``
        publishes under ``name~<8 hex digits>.ext``.  Never an overwrite.
    :param register: ``False`` publishes without joining a run: no HELO, and
        ``close()``/``fail()`` write no DONE/FAILED (what ``pympx-queues put`` does, like a
        person dropping files in by hand; consumers' end of stream is unaffected).
    :param writeback: flush mode only: start writing each message's data to disk before
        publishing it (``sync_file_range``), so that after a power cut a message published
        just before is not found empty (zero-filled remains possible: only
        ``durability="fsync"`` promises anything across power loss).  Off by default: it
        gives every file its disk blocks at once, which makes consuming it much dearer
        (deleting a written file costs 0.3-1.5 ms instead of ~7 us on ext4 with
        ``discard``; README "Benchmarks").

    Raises ``QueueClosed`` for puts after ``close()``/``fail()``.
    """

    def __init__(
        self,
        path: PathLike,
        message_extension: str = ".tsv",
        task_done_directory: Optional[PathLike] = None,
        *,
        run_id: Optional[str] = None,
        durability: str = _fs.FLUSH,
        if_exists: str = "error",
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        dir_mode: int = _fs.DEFAULT_DIR_MODE,
        file_mode: int = _fs.DEFAULT_FILE_MODE,
        register: bool = True,
        writeback: bool = False,
    ) -> None:
        super().__init__(path, message_extension, task_done_directory, None,
                         durability=durability, lease_timeout=lease_timeout,
                         dir_mode=dir_mode, file_mode=file_mode)
        self.register = bool(register)
        self.writeback = bool(writeback) and not self._durable
        if if_exists not in ("error", "rename"):
            raise ValueError(f"if_exists must be 'error' or 'rename', got {if_exists!r}")
        self.if_exists = if_exists
        self.run_id = L.check_run_id(run_id) if run_id is not None else L.new_run_id()
        self.producer = self._owner(_fs.random_id())
        self._closed: Optional[str] = None
        self._clean_tmp()
        if self.register:
            self._supersede_failed_runs()
            self._put_helo()

    @property
    def producer_id(self) -> str:
        return self.producer.format()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # ------------------------------------------------------------------ registry
    def _control_payload(self, kind: str, **extra: Any) -> dict:
        return {"type": kind.lower(), "run": self.run_id, "producer": self.producer_id,
                "host": self.producer.host, "pid": self.producer.pid,
                "start_time": self.producer.start, "time": _now(),
                "written_by_pid": os.getpid(), **extra}

    def _put_helo(self) -> None:
        self._write_control(L.format_control(L.HELO, self.run_id, self.producer),
                            self._control_payload(L.HELO))
        log.info("producer %s registered in %s (run %s)", self.producer_id, self.path,
                 self.run_id)

    def _supersede_failed_runs(self) -> None:
        """A new run starts: earlier runs that FAILED become history (G6)."""
        runs, ended = self._scan_control()
        stale = [run for run, producers in runs.items()
                 if run != self.run_id and run not in ended
                 and any(L.FAILED in kinds for kinds in producers.values())]
        if stale:
            log.info("runs %s failed earlier; marking them ended", stale)
            self._mark_ended(stale, f"superseded by run {self.run_id}")

    # ------------------------------------------------------------------ puts
    def _check_open(self) -> None:
        if self._closed is not None:
            raise QueueClosed(f"queue {self.path} was {self._closed}; no more puts")

    def _message_name(self, name: str) -> str:
        _fs.check_name(name)
        if not name.endswith(self.message_extension):
            raise ValueError(
                f"message name {name!r} does not end with the message extension "
                f"{self.message_extension!r}; it would never be seen as a message")
        if not L.valid_message_name(name):
            raise ValueError(f"message name {name!r} looks like editor/OS litter and would "
                             "be ignored by consumers")
        return name

    def _publish(self, tmp: str, name: str) -> str:
        """Publish a complete temp file as message ``name``; returns the final path."""
        final = self._root_slash + name
        try:
            _fs.rename_noreplace(tmp, final)  # G2: atomic, no-clobber publish
            return final
        except FileExistsError:
            if self.if_exists == "error":
                _fs.unlink_quiet(tmp)
                raise FileExistsError(
                    errno.EEXIST, f"a message named {name!r} is already waiting in the queue "
                    "(pass if_exists='rename' to publish under a unique name)", final)
        except BaseException:
            _fs.unlink_quiet(tmp)
            raise
        try:
            return self._move_noclobber(tmp, self.path, L.unique_variant(name, self.message_extension))
        except BaseException:
            _fs.unlink_quiet(tmp)
            raise

    def _message_item(self, msg: Tuple[str, Any]) -> Tuple[str, bytes]:
        """Check a ``(name, data)`` item: a valid message name and bytes (str as UTF-8)."""
        name, data = msg
        name = self._message_name(name)
        if isinstance(data, str):
            return name, data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"message data must be bytes or str, got {type(data).__name__}")
        return name, data if isinstance(data, bytes) else bytes(data)

    def _put_one(self, msg: Union[PathLike, Tuple[str, Union[bytes, str]]], copy: bool,
                 durable: bool) -> str:
        if isinstance(msg, tuple):
            name, data = self._message_item(msg)
            tmp = self._tmp_path(name)
            _fs.write_new(tmp, data, durable=durable, mode=self.file_mode,  # G1, G2
                          writeback=self.writeback)
            return self._publish(tmp, name)
        src = os.fspath(msg)
        name = self._message_name(os.path.basename(src))
        st = _fs.lstat(src)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such file to put", src)
        if not _fs.is_regular_nofollow(src):
            raise ValueError(f"{src!r} is not a regular file (symlinks, FIFOs and devices "
                             "are never queued)")
        if copy:
            tmp = self._tmp_path(name)
            _fs.copy_new(src, tmp, durable=durable, mode=self.file_mode,  # G1, G2
                         writeback=self.writeback)
            return self._publish(tmp, name)
        if durable:
            _fs.fsync_path(src)  # G1: the data is durable before its name is published
        final = os.path.join(self.path, name)
        try:
            _fs.rename_noreplace(src, final)  # G2: one atomic no-clobber move
            return final
        except FileExistsError:
            if self.if_exists == "error":
                raise FileExistsError(
                    errno.EEXIST, f"a message named {name!r} is already waiting in the queue "
                    "(pass if_exists='rename' to publish under a unique name)", final)
            return self._move_noclobber(src, self.path,
                                        L.unique_variant(name, self.message_extension))
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # Another file system: copy into tmp/, publish, then remove the source.
        tmp = self._tmp_path(name)
        _fs.copy_new(src, tmp, durable=durable, mode=self.file_mode, writeback=self.writeback)
        final = self._publish(tmp, name)
        if durable:
            _fs.fsync_dir(self.path)  # G1 before the only other copy goes
        _fs.unlink_quiet(src)
        return final

    def put(self, msg: PathLike, copy: bool = False) -> str:
        """Move (or with ``copy=True`` copy) the file ``msg`` into the queue.

        The file keeps its name, which must end with the message extension and be a
        plain file name.  Returns the published path.  Never blocks on other processes.
        With ``durability="fsync"`` the data and the directory entry are durable before it
        returns (G1).

        Raises ``FileExistsError`` when a message of that name is waiting (unless
        ``if_exists="rename"``), ``ValueError`` for a bad name or a non-regular file,
        ``QueueClosed`` after ``close()``/``fail()``, ``OSError`` (ENOSPC...) with nothing
        half-published.
        """
        self._check_open()
        final = self._put_one(msg, copy, self._durable)
        if self._durable:
            _fs.fsync_dir(self.path)  # G1: the published name survives power loss
        return final

    def put_data(self, name: str, data: Union[bytes, str]) -> str:
        """Write ``data`` (bytes, or str as UTF-8) as a new message called ``name``.

        The bytes go to ``tmp/`` first and are published by one no-clobber rename, so a
        consumer never sees a half-written message (G2).  Returns the published path.
        Raises like :meth:`put`.
        """
        self._check_open()
        final = self._put_one((name, data), False, self._durable)
        if self._durable:
            _fs.fsync_dir(self.path)  # G1
        return final

    def put_many(self, messages: Iterable[Union[PathLike, Tuple[str, Union[bytes, str]]]],
                 copy: bool = False) -> List[str]:
        """Put a batch: items are file paths (moved, or copied) or ``(name, data)`` pairs.

        Three phases: every item is written to ``tmp/`` (or checked, for files moved in),
        then in fsync mode every file is fsynced, then all are published, then the queue
        directory is fsynced once for the whole batch (G1 holds when this returns).  If
        writing or syncing any item fails, nothing of the batch is published (the temp
        files are removed).  If publishing fails midway (a name clash with
        ``if_exists="error"``), the items before it stay published and are made durable.
        Returns the published paths.
        """
        self._check_open()
        durable = self._durable
        staged: List[Tuple[str, str, bool]] = []  # (file to publish, name, is_temp)
        try:
            for msg in messages:
                if isinstance(msg, tuple) or copy:
                    if isinstance(msg, tuple):
                        name, data = self._message_item(msg)
                        tmp = self._tmp_path(name)
                        _fs.write_new(tmp, data, durable=False, mode=self.file_mode,
                                      writeback=self.writeback)
                    else:
                        src = os.fspath(msg)
                        name = self._message_name(os.path.basename(src))
                        tmp = self._tmp_path(name)
                        _fs.copy_new(src, tmp, durable=False, mode=self.file_mode,
                                     writeback=self.writeback)
                    staged.append((tmp, name, True))
                else:
                    src = os.fspath(msg)
                    name = self._message_name(os.path.basename(src))
                    if not _fs.is_regular_nofollow(src):
                        raise ValueError(f"{src!r} is not a regular file (or does not exist)")
                    staged.append((src, name, False))
            if durable:
                # G1: every file's data durable before any name is published; the files
                # are fsynced concurrently (one fsync each, merged into few journal
                # commits), and a failure of any raises before anything is published.
                _fs.fsync_files([path for path, _, _ in staged])
        except BaseException:
            for path, _, is_temp in staged:
                if is_temp:
                    _fs.unlink_quiet(path)
            raise
        published: List[str] = []
        try:
            for i, (path, name, is_temp) in enumerate(staged):
                try:
                    if is_temp:
                        published.append(self._publish(path, name))
                    else:
                        published.append(self._put_one(path, False, durable))
                except BaseException:
                    for rest, _, rest_temp in staged[i + 1:]:
                        if rest_temp:
                            _fs.unlink_quiet(rest)
                    raise
        finally:
            if durable and published:
                _fs.fsync_dir(self.path)  # G1: one directory fsync per batch
        return published

    # ------------------------------------------------------------------ end of run
    def close(self) -> None:
        """End this producer's stream: write DONE (idempotent; no-op after ``fail()``)."""
        if self._closed is not None:
            return
        if self.register:
            self._write_control(L.format_control(L.DONE, self.run_id, self.producer),
                                self._control_payload(L.DONE))
        self._closed = "closed"
        log.info("producer %s closed %s", self.producer_id, self.path)

    def fail(self, reason: Any = None) -> None:
        """Fail the run: write FAILED so consumers stop promptly (G6).  Idempotent."""
        if self._closed == "failed":
            return
        if self.register:
            self._write_control(L.format_control(L.FAILED, self.run_id, self.producer),
                                self._control_payload(L.FAILED, reason=_format_error(reason)))
        self._closed = "failed"
        log.error("producer %s failed the run on %s", self.producer_id, self.path)

    def __enter__(self) -> "WritableFolderQueue":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.fail(exc)

    def dispose(self) -> None:
        """pympx compatibility: nothing to release for a producer."""

    # ------------------------------------------------------------------ admin (pympx names)
    def purge_control_messages(self, force: bool = False) -> int:
        """Remove control files of earlier runs (pympx name).

        Without ``force`` only runs that are over (ENDED marker: a consumer saw them end,
        or a newer producer superseded their FAILED) are removed, so consumers still
        draining a closed run are never left waiting.  ``force`` removes every control
        file but this producer's own.  Returns how many files were removed.
        """
        from .folder_admin import _purge_control

        return _purge_control(self, keep={self.producer_id}, force=force)

    def reset_processing_files(self, force: bool = False) -> List[str]:
        """Return claims to the ready folder (pympx name): only stale ones unless ``force``."""
        from .folder_admin import _requeue_claims

        return _requeue_claims(self, include_live=force)

    def reset(self, force: bool = False) -> None:
        """pympx ``reset``: clear old control files and requeue abandoned claims.

        Safe: claims whose owner is alive (and their producers' registrations) are left
        alone unless ``force=True``.  This producer's registration is kept.
        """
        self.purge_control_messages(force=force)
        self.reset_processing_files(force=force)
        self._clean_tmp()
        if self._closed is None and _fs.lstat(os.path.join(
                self._control, L.format_control(L.HELO, self.run_id, self.producer))) is None:
            self._put_helo()
        log.info("reset queue %s", self.path)

    def purge(self, force: bool = False) -> int:
        """Delete every message and queue file (ready, wip, done, failed, retries, tmp, control).

        Files that are not ours in the root (anything without the message extension) and
        non-regular entries are left alone.  Refuses (``RuntimeError``) while a live
        consumer holds a claim unless ``force=True``.  Returns how many files were deleted.
        """
        from .folder_admin import purge

        n = purge(self.path, message_extension=self.message_extension, force=force)
        if self._closed is None:
            self._put_helo()
        return n


# =========================================================================== consumers
class ReadableFolderQueue(_FolderQueue):
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
    :param wakeups: ``"events"`` (default: inotify on Linux, else a watchdog observer,
        wakes a blocked ``get`` at once), ``"watchdog"`` (always the watchdog observer) or
        ``"poll"`` (NFS/SMB: no events, rescan every ``poll_interval`` seconds).
    :param poll_interval: seconds between rescans while the queue looks empty.
    :param rescan_interval: seconds between full rescans while messages are flowing (at
        least 20x the last scan's duration, so the cost of ``get()`` stays flat).
    :param recover_interval: seconds between automatic :meth:`recover` passes.

    One object serves one thread; give each thread (or process: the object pickles, its
    observer and claims stay behind) its own.  ``close()`` stops the wake-up observer
    and the heartbeat thread.
    """

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
        wakeups: str = EVENTS,
        poll_interval: float = 1.0,
        rescan_interval: float = 30.0,
        recover_interval: float = 10.0,
        recover_on_start: bool = True,
        durability: str = _fs.FLUSH,
        dir_mode: int = _fs.DEFAULT_DIR_MODE,
        file_mode: int = _fs.DEFAULT_FILE_MODE,
    ) -> None:
        super().__init__(path, message_extension, task_done_directory, sorting_function,
                         durability=durability, lease_timeout=lease_timeout,
                         dir_mode=dir_mode, file_mode=file_mode)
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
        self._wakeups = Wakeups(self.path, self._control, self.message_extension,
                                check_mode(wakeups), side_dir=self._retries)
        self._claims: Dict[str, str] = {}  # wip path -> original message name
        self._closed_reader = False
        self._saw_failed: Optional[List[str]] = None
        # (run, producer) -> HELO / DONE / FAILED / GONE, as this consumer has seen them
        self._seen_producers: Dict[Tuple[str, str], str] = {}
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
                if not entry.is_dir(follow_symlinks=False):
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
                if self._contention > 0 and n - c > 1:
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
            c = self._cursor
            jump = _random.randrange(min(n - c, 1 << min(fails + 3, 10)) + 1)
            if jump:
                self._skipped = True  # those names are found again by the next listing
            self._cursor = c + jump

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
                seen[key] = "GONE"
                log.warning("control files of producer %s (run %s) disappeared from %s "
                            "(reset or purge?); counting it as closed", key[1], key[0],
                            self._control)
        producers = len(seen)
        open_ = sum(1 for st in seen.values() if st == L.HELO)
        failed = any(st == L.FAILED for st in seen.values())
        need = self.expected_producers or 1
        closed = producers >= need and open_ == 0
        state = (failed, closed, sorted({run for run, _ in seen}))
        self._control_state = state
        self._wakeups.control_dirty = False
        self._next_control = time.monotonic() + self.poll_interval
        return state

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
            if closed:
                # Stale claims of dead consumers go back before we decide (G1, G6).
                self._auto_recover(wait=True)
                self._rescan()  # final rescan after seeing every DONE (G6)
                path = self._claim_next()
                if path is not None:
                    return path
                return self._end_of_stream(DONE, runs)
            if not block:
                raise Empty(f"no message in {self.path}")
            wait = self._wait_budget(deadline, timeout, "no message")
            if not self._wakeups.wait(wait):
                # A quiet poll interval: rescan (next round) and maybe recover.
                if time.monotonic() >= self._next_recover:
                    self._auto_recover()
                self._next_rescan = 0.0

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

    # ------------------------------------------------------------------ settling claims
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

    def task_done(self, path: PathLike) -> None:
        """Acknowledge a claimed message: delete it, or move it to ``task_done_directory``.

        Never blocks.  In fsync mode the change is durable on return (G4: a message
        acknowledged is never redelivered).  Raises ``FileNotFoundError`` when the claim
        is no longer held and ``ValueError`` for a path that ``get()`` did not return.
        """
        if self._fast_ack and self._trash_run <= 0 and path.__class__ is str:
            # The common case (flush mode, deleting, files without disk blocks): the exact
            # path get() returned, one unlink.  Everything else goes through _settle.
            claim = self._claims.pop(path, None)
            if claim is not None:
                self._unlink_claim(path)  # G4
                if self._retry_hint or self._wakeups.side:
                    self._drop_retry_sidecar(claim, known=False)
                return
        self._settle(path)
        if self._durable:
            if self.task_done_directory is not None:
                _fs.fsync_dir(self.task_done_directory)  # G4
            _fs.fsync_dir(self._wip)  # G4: the removal of the claim survives power loss
            # G4: so does the claim's removal from the ready folder (with the link()+unlink()
            # fallback that removal is a separate, possibly unsynced, unlink there).
            _fs.fsync_dir(self.path)

    def task_done_many(self, paths: Iterable[PathLike]) -> None:
        """Acknowledge several claims; in fsync mode with one directory fsync for all.

        If one path fails (``FileNotFoundError``: claim lost), the ones before it stay
        acknowledged (and are made durable) and the exception propagates.
        """
        if not self._durable:  # nothing to share: each one takes task_done's fast path
            for p in paths:
                # This class's task_done (a subclass's may call back into this method).
                ReadableFolderQueue.task_done(self, p)
            return
        settled = 0
        try:
            for p in paths:
                self._settle(p)
                settled += 1
        finally:
            if self._durable and settled:
                # G4, once per batch and concurrently: wip/ (the claims are gone), the
                # ready folder (their removal from it) and task_done_directory if kept.
                dirs = [self._wip, self.path]
                if self.task_done_directory is not None:
                    dirs.append(self.task_done_directory)
                _fs.fsync_dirs(dirs)

    #: Acknowledged claims this process may leave in ``trash/`` for its deleter thread;
    #: beyond that ``task_done`` unlinks itself (the trash never grows without bound).
    TRASH_BACKLOG = 10_000
    #: ``task_done`` unlinks the claim itself (~7 us for a file whose data was never
    #: written to disk: consumed soon after it was put).  SLOW_STREAK unlinks in a row
    #: slower than SLOW_UNLINK seconds say this folder's files have their disk blocks
    #: (they waited long enough to be written back, were fsynced, or were put with
    #: ``writeback=True``; then an unlink costs 0.3-1.5 ms on ext4 with ``discard``): the
    #: next TRASH_RUN acknowledgements are renamed into ``trash/`` and unlinked by the
    #: deleter thread, then direct unlinks are tried again.
    SLOW_UNLINK = 0.0003
    SLOW_STREAK = 3
    TRASH_RUN = 1000

    def _unlink_claim(self, p: str) -> None:
        """Delete an acknowledged claim here and now, timing it (see SLOW_UNLINK)."""
        t0 = _perf_counter()
        if not _fs.remove_claim(p):  # G4: the claim is removed, never redelivered
            raise self._lost(p)
        if _perf_counter() - t0 > self.SLOW_UNLINK:
            self._slow_unlinks += 1
            if self._slow_unlinks >= self.SLOW_STREAK:
                self._slow_unlinks = 0
                self._trash_run = self.TRASH_RUN  # the next acks go through trash/
        elif self._slow_unlinks:
            self._slow_unlinks = 0

    def _settle(self, path: PathLike) -> None:
        p, claim = self._resolve(path)
        if self.task_done_directory is None:
            if self._trash_run <= 0:
                self._unlink_claim(p)
            elif self._trash_backlog < self.TRASH_BACKLOG:
                self._trash_run -= 1
                try:
                    # G4: the claim leaves wip/ in one atomic rename (never redelivered:
                    # nothing in trash/ is ever requeued); the unlink, ~1 ms for a file
                    # whose blocks were written, happens in the deleter thread.
                    moved = _fs.discard_claim(p, self._trash_slash + p[self._wip_cut:])
                except OSError:  # no trash/ (removed by hand?): unlink here
                    moved = None
                if moved is False:
                    raise self._lost(p)
                if moved is None:
                    if not _fs.remove_claim(p):  # G4
                        raise self._lost(p)
                elif _fs.tracing():
                    # The crash-state recorder attributes each file-system change to the
                    # operation traced next: no deleter thread then, every operation in
                    # order in this thread.
                    self._remove_batch([self._trash_slash + p[self._wip_cut:]])
                else:
                    with self._claims_lock:
                        self._trash_backlog += 1
                        if self._trash_thread is None:
                            self._start_trash_deleter()
                        elif not self._trash_wake.is_set():
                            self._trash_wake.set()
            elif not _fs.remove_claim(p):  # G4: the claim is removed, never redelivered
                raise self._lost(p)
        else:
            try:
                self._move_out(p, self.task_done_directory, claim)
            except FileNotFoundError:
                raise self._lost(p) from None
        with self._claims_lock:
            self._claims.pop(p, None)
        if self._retry_hint or self._wakeups.side:
            self._drop_retry_sidecar(claim, known=False)

    def _start_trash_deleter(self) -> None:
        """Start the deleter thread (caller holds ``_claims_lock``)."""
        self._trash_stop = False
        self._trash_halt.clear()
        t = threading.Thread(target=self._trash_loop, name="pympx-folder-trash", daemon=True)
        self._trash_thread = t
        t.start()

    def _empty_trash(self) -> int:
        """Delete what ``trash/`` holds (acknowledged claims, any consumer's); count."""
        n = 0
        batch: List[str] = []
        for entry in _fs.scandir(self._trash):
            if _fs.entry_is_regular(entry):  # only what task_done put there: files
                batch.append(entry.path)
                if len(batch) >= 1000:
                    n += self._remove_batch(batch)
                    batch = []
        return n + self._remove_batch(batch)

    def _remove_batch(self, batch: List[str]) -> int:
        if not batch:
            return 0
        # In a child process (rm): unlinking written files costs ~1 ms of kernel time
        # each here, and doing it in this thread would make get()/task_done wait for the
        # GIL after every call.
        _fs.remove_files_batch(tuple(batch))
        with self._claims_lock:
            self._trash_backlog = max(0, self._trash_backlog - len(batch))
        return len(batch)

    def _kick_trash(self) -> None:
        """Have the deleter thread empty ``trash/`` (leftovers of exited consumers too)."""
        try:
            if _fs.tracing():  # crash-state recording: in order, in this thread
                self._empty_trash()
                return
            with self._claims_lock:
                if self._trash_thread is not None:
                    self._trash_wake.set()
                elif any(True for _ in _fs.scandir(self._trash)):
                    self._start_trash_deleter()
        except FileNotFoundError:  # a queue folder made before trash/ existed
            pass

    def _trash_loop(self) -> None:
        """Unlink acknowledged claims off the caller's clock; ends once idle or stopped."""
        wake = self._trash_wake
        while True:
            stop = self._trash_stop
            try:
                n = self._empty_trash()
            except FileNotFoundError:  # the queue folder was removed
                n = 0
                stop = True
            except Exception:  # pragma: no cover - the next recover() starts a new pass
                log.warning("could not empty %s", self._trash, exc_info=True)
                n = 0
                stop = True
            with self._claims_lock:
                if stop or (n == 0 and not wake.is_set()):  # stop: after a full pass
                    self._trash_thread = None
                    return
                wake.clear()
            # Let acknowledgements gather: one rm per ~50 ms of acks, not one per ack
            # (close() cuts the pause short through _trash_halt).
            halt = self._trash_halt
            if not halt.is_set():
                wake.wait(0.05)
                if n:
                    halt.wait(0.05)

    def _move_out(self, src: str, directory: str, name: str) -> str:
        try:
            return self._move_noclobber(src, directory, name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # task_done_directory on another file system: copy, publish, then remove.
        tmp = os.path.join(directory, "." + L.format_owned(self._owner(_fs.random_id()), name))
        _fs.copy_new(src, tmp, durable=self._durable, mode=self.file_mode)
        try:
            target = self._move_noclobber(tmp, directory, name)
        except BaseException:
            _fs.unlink_quiet(tmp)
            raise
        _fs.unlink_regular(src)
        return target

    def _drop_retry_sidecar(self, name: str, known: bool = True) -> None:
        """Remove ``retries/<name>.json``.  On the hot path (``known=False``) only when
        the last listing showed one; missed ones are harmless (each sidecar records the
        inode it belongs to) and :meth:`recover` sweeps orphans."""
        if name in self._retry_hint:
            self._retry_hint.discard(name)
        elif not known:
            if not self._wakeups.side:  # the common case: no sidecar was ever announced
                return
            side = self._wakeups.side
            entry = L.format_retry_sidecar(name)
            if entry not in side:  # written by another consumer after our last listing?
                return
            side.discard(entry)
        _fs.unlink_quiet(os.path.join(self._retries, L.format_retry_sidecar(name)))

    def _read_retry(self, name: str, dev: int, ino: int) -> dict:
        """Sidecar of a returned message, or {} when absent, unreadable or stale."""
        try:
            data = json.loads(_fs.read_bytes(
                os.path.join(self._retries, L.format_retry_sidecar(name))))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("ino") != ino or data.get("dev") != dev:
            return {}  # written for an earlier message of the same name
        return data

    def attempts(self, path: PathLike) -> int:
        """Which attempt the claim at ``path`` is (1 for a message never returned)."""
        p, claim = self._resolve(path)
        st = _fs.lstat(p)
        if st is None:
            raise self._lost(p)
        return int(self._read_retry(claim, st.st_dev, st.st_ino).get("attempts", 0)) + 1

    def nack(self, path: PathLike, error: Any = None) -> str:
        """Give a claimed message back for a retry; returns where it went.

        The attempt count and ``error`` (text or an exception, with its traceback) are
        kept in ``retries/<name>.json``.  After ``max_retries`` attempts the message goes
        to ``failed/`` with ``failed/<name>.error.json`` beside it (a dead letter;
        :meth:`retry_failed` brings it back).  Raises like :meth:`task_done`.
        """
        p, claim = self._resolve(path)
        st = _fs.lstat(p)
        if st is None:
            raise self._lost(p)
        prev = self._read_retry(claim, st.st_dev, st.st_ino)
        attempt = int(prev.get("attempts", 0)) + 1
        text = _format_error(error)
        if self.max_retries is not None and attempt >= self.max_retries:
            return self._dead_letter(p, claim, attempt, text)
        target = self._requeue(p, claim, st, attempt, text, "nack")
        self._forget(p)
        return target

    def _requeue(self, wip_path: str, name: str, st: os.stat_result, attempts: int,
                 error: str, why: str, claim_rid: str = "") -> str:
        """Return a claim to the ready folder, sidecar first (count survives a crash)."""
        target_name = self._free_name(self.path, name)
        payload = {"attempts": attempts, "last_error": error, "reason": why,
                   "time": _now(), "by": self._owner().format(), "dev": st.st_dev,
                   "ino": st.st_ino, "claim": claim_rid or os.path.basename(wip_path)}
        for _ in range(20):
            sidecar = os.path.join(self._retries, L.format_retry_sidecar(target_name))
            _fs.write_replace(sidecar, self._tmp_path(L.format_retry_sidecar(target_name)),
                              _json(payload), durable=self._durable, mode=self.file_mode)
            target = os.path.join(self.path, target_name)
            try:
                _fs.rename_noreplace(wip_path, target)  # G1/G3: back to ready, no clobber
            except FileExistsError:
                _fs.unlink_quiet(sidecar)
                target_name = L.unique_variant(name, self.message_extension)
                continue
            except FileNotFoundError:
                _fs.unlink_quiet(sidecar)
                raise self._lost(wip_path) from None
            if self._durable:
                _fs.fsync_dir(self.path)  # G1
            self._retry_hint.add(target_name)  # task_done of its next claim removes it
            self._wakeups.poke()
            return target
        raise FileExistsError(f"could not find a free name for {name!r} in {self.path}")

    def _dead_letter(self, wip_path: str, name: str, attempts: int, error: str) -> str:
        target_name = self._free_name(self._failed, name)
        payload = {"attempts": attempts, "error": error, "time": _now(),
                   "by": self._owner().format(), "claim": os.path.basename(wip_path),
                   "original_name": name}
        sidecar = os.path.join(self._failed, L.format_error_sidecar(target_name))
        _fs.write_replace(sidecar, self._tmp_path(L.format_error_sidecar(target_name)),
                          _json(payload), durable=self._durable, mode=self.file_mode)
        try:
            _fs.rename_noreplace(wip_path, os.path.join(self._failed, target_name))  # G1
        except FileNotFoundError:
            _fs.unlink_quiet(sidecar)
            raise self._lost(wip_path) from None
        except FileExistsError:
            _fs.unlink_quiet(sidecar)
            return self._dead_letter(wip_path, L.unique_variant(name, self.message_extension),
                                     attempts, error)
        if self._durable:
            _fs.fsync_dir(self._failed)  # G1
        self._forget(wip_path)
        self._drop_retry_sidecar(name)
        log.warning("message %s moved to dead letters after %d attempt(s)", name, attempts)
        return os.path.join(self._failed, target_name)

    def retry_failed(self, pattern: Optional[str] = None) -> List[str]:
        """Move dead letters (optionally only names matching the glob ``pattern``) back
        to the ready folder with a fresh attempt count; returns their new paths."""
        back: List[str] = []
        for entry in list(_fs.scandir(self._failed)):
            name = entry.name
            if not _fs.entry_is_regular(entry) or not self.is_message_name(name):
                continue
            if L.parse_error_sidecar(name, self.message_extension) is not None and \
                    _fs.lstat(os.path.join(self._failed, name[: -len(L.ERROR_SUFFIX)])):
                continue  # the sidecar of a dead letter whose extension is .json
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            _fs.unlink_quiet(os.path.join(self._retries, L.format_retry_sidecar(name)))
            try:
                target = self._move_noclobber(entry.path, self.path, name)  # G1
            except FileNotFoundError:
                continue
            _fs.unlink_quiet(os.path.join(self._failed, L.format_error_sidecar(name)))
            back.append(target)
        if back:
            if self._durable:
                _fs.fsync_dir(self.path)
            self._wakeups.poke()
        return back

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
            ok = _fs.touch(ap) and ok
        return ok

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
            for p in paths:
                _fs.touch(p)

    def mark_all_work_done(self) -> int:
        """pympx: claim and acknowledge every message until DONE (blocks until then).

        Returns how many messages were acknowledged; raises ``QueueFailed`` on FAILED.
        """
        n = 0
        for msg in self:
            self.task_done(msg)
            n += 1
        return n

    # ------------------------------------------------------------------ recovery
    def _auto_recover(self, wait: bool = False) -> None:
        self._next_recover = time.monotonic() + self.recover_interval
        try:
            self.recover(wait=wait)
        except OSError:
            log.warning("automatic recovery of %s failed", self.path, exc_info=True)

    def _stale(self, owner: L.Owner, st: os.stat_result, now: float) -> bool:
        alive = owner.alive()
        if alive is None:  # another host: only the lease can tell
            return now - max(st.st_mtime, st.st_ctime) > self.lease_timeout
        return not alive

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
                if not include_live and not self._stale(parsed.owner, st, now):
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
                why = ("forced requeue" if include_live and not self._stale(parsed.owner, st, now)
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

    # ------------------------------------------------------------------ misc
    def qsize(self) -> int:
        """Messages waiting in the ready folder (one directory listing: O(files))."""
        return len(self._scan_ready())

    def empty(self) -> bool:
        return self.qsize() == 0

    @property
    def claims(self) -> List[str]:
        """Paths of the claims this object holds (in this process)."""
        with self._claims_lock:
            return list(self._claims)

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


# =========================================================================== groups
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
            self._scan_watched = wake.active
            self._skipped = False
            done = time.monotonic()
            self._last_scan = done
            self._next_rescan = done + max(self.rescan_interval, 20 * (done - now))
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
                got = self._try_groups(self._group_listing(fresh=True))  # final (G6)
                if got is not None:
                    return got
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
        out = []
        text = _format_error(error)
        for p in items:
            ap, claim = self._resolve(p)
            st = _fs.lstat(ap)
            if st is None:
                raise self._lost(ap)
            if self.max_retries is not None and attempt >= self.max_retries:
                out.append(self._dead_letter(ap, claim, attempt, text))
            else:
                out.append(self._requeue(ap, claim, st, attempt, text, "nack"))
                self._forget(ap)
        return out
