"""The producer side of a folder queue: :class:`WritableFolderQueue`."""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
from typing import Any, Deque, Iterable, List, Optional, Tuple, Union

from .. import _fs
from ..errors import QueueClosed
from . import admin
from . import layout as L
from .base import DEFAULT_LEASE_TIMEOUT, PathLike, _FolderQueue, _format_error, _now

log = logging.getLogger("pympx_queues.folder")


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
    :param producer_key: a name for this producer's *part* of the run (``"loader-eu"``),
        stable across restarts.  A producer started with a key takes over the
        registration of a predecessor with the same key and run that died without
        closing (killed, crashed: its HELO has no DONE or FAILED): it registers itself,
        then writes the predecessor's DONE with ``superseded_by`` naming itself, so
        consumers wait for the successor instead of for ever, and count the pair as one
        producer for ``expected_producers``.  The successor resumes the predecessor's
        work; which messages to put again is the caller's (a ``put`` in flight at the
        kill may or may not have been published: ``if_exists="rename"`` puts it again
        without a name clash).  Raises ``RuntimeError`` if a predecessor with the key is
        still running on this host, or was registered on another host (this host cannot
        tell it is gone: close it with ``pympx-queues close`` once sure, then start
        again).  See docs/several-hosts.md "A producer that died".
    :param writeback: flush mode only: start writing each message's data to disk before
        publishing it (``sync_file_range``), so that after a power cut a message published
        just before is not found empty (zero-filled remains possible: only
        ``durability="fsync"`` promises anything across power loss).  Off by default: it
        gives every file its disk blocks at once, which makes consuming it much dearer
        (deleting a written file costs 0.3-1.5 ms instead of ~7 us on ext4 with
        ``discard``; README "Benchmarks").

    Raises ``QueueClosed`` for puts after ``close()``/``fail()``.
    """

    #: How many of the last published names the DONE file lists (see ``close``).
    DONE_RECENT = 32

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
        producer_key: Optional[str] = None,
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
        # Counted for DONE: how many messages this producer published, and the names of
        # the last few (a consumer checks those by name before it concludes DONE: a
        # listing on a network file system may not show them yet; G6).
        self._published = 0
        self._recent: Deque[str] = collections.deque(maxlen=self.DONE_RECENT)
        if producer_key is not None and not L.valid_producer_key(producer_key):
            raise ValueError(f"producer_key must match [A-Za-z0-9][A-Za-z0-9._-]* (at most "
                             f"64 characters), got {producer_key!r}")
        self.producer_key = producer_key
        #: producer ids whose registrations this producer took over (``producer_key``)
        self.superseded: List[str] = []
        self._clean_tmp()
        if self.register:
            self._supersede_failed_runs()
            predecessors = self._dead_predecessors() if producer_key is not None else []
            self._put_helo()  # G6: registered before any predecessor counts as closed
            for owner in predecessors:
                self._close_predecessor(owner)

    @property
    def producer_id(self) -> str:
        return self.producer.format()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # ------------------------------------------------------------------ registry
    def _control_payload(self, kind: str, **extra: Any) -> dict:
        payload = {"type": kind.lower(), "run": self.run_id, "producer": self.producer_id,
                   "host": self.producer.host, "pid": self.producer.pid,
                   "start_time": self.producer.start, "time": _now(),
                   "written_by_pid": os.getpid(), **extra}
        if self.producer_key is not None:
            payload["key"] = self.producer_key
        return payload

    def _dead_predecessors(self) -> List[L.Owner]:
        """Open registrations of this run with this producer's key, all of dead
        processes of this host (else ``RuntimeError``: see ``producer_key``)."""
        if _fs.network_fs_kind(self.path) is not None:
            _fs.refresh_listing(self._control)  # a HELO missing from a stale listing
        runs, _ = self._scan_control()
        found = []
        for prod, kinds in sorted(runs.get(self.run_id, {}).items()):
            if L.DONE in kinds or L.FAILED in kinds:
                continue
            owner = L.parse_owner(prod)
            if owner is None:
                continue
            try:
                data = json.loads(_fs.read_bytes(os.path.join(
                    self._control, L.format_control(L.HELO, self.run_id, owner))))
            except (OSError, ValueError):
                continue  # closed or removed meanwhile, or not ours
            if not isinstance(data, dict) or data.get("key") != self.producer_key:
                continue
            alive = owner.alive()
            if alive is None:
                raise RuntimeError(
                    f"producer {prod} of run {self.run_id} with producer_key "
                    f"{self.producer_key!r} registered on host {owner.host}, which this host "
                    "cannot see; start the successor on that host, or, once sure it is "
                    "gone, close it (pympx-queues close, "
                    "pympx_queues.folder.admin.close_producer) and start again")
            if alive:
                raise RuntimeError(
                    f"producer {prod} with producer_key {self.producer_key!r} is still "
                    f"running (pid {owner.pid}); two live producers cannot share a key")
            found.append(owner)
        return found

    def _close_predecessor(self, owner: L.Owner) -> None:
        """Write a dead predecessor's DONE, naming this producer as its successor."""
        pred = owner.format()
        payload = {"type": "done", "run": self.run_id, "producer": pred,
                   "host": owner.host, "pid": owner.pid, "start_time": owner.start,
                   "key": self.producer_key, "superseded_by": self.producer_id,
                   "published": None, "last": [], "time": _now(),
                   "written_by_pid": os.getpid()}
        if self._write_control(L.format_control(L.DONE, self.run_id, owner), payload):
            self.superseded.append(pred)
            log.warning("producer %s took over run %s from %s, which died without "
                        "closing (producer_key %r)", self.producer_id, self.run_id, pred,
                        self.producer_key)

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
        return self._publish_tmp(tmp, name)

    def _count(self, final: str) -> str:
        self._published += 1
        self._recent.append(os.path.basename(final))
        return final

    def _vanished(self, tmp: str) -> FileNotFoundError:
        return FileNotFoundError(
            errno.ENOENT, "this producer's temp file vanished before it was published "
            f"(moved aside into {L.TMP_DIR}/{L.ABANDONED_DIR}/ by a recovery pass, or "
            "removed by hand?); the message was NOT published: put it again", tmp)

    def _publish_tmp(self, tmp: str, name: str) -> str:
        final = self._root_slash + name
        try:
            _fs.rename_noreplace(tmp, final)  # G2: atomic, no-clobber publish
            return final
        except FileNotFoundError:
            if _fs.lstat(tmp) is None:
                raise self._vanished(tmp) from None
            raise
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
        except FileNotFoundError:
            if _fs.lstat(tmp) is None:
                raise self._vanished(tmp) from None
            raise
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
        final = self._count(self._put_one(msg, copy, self._durable))
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
        final = self._count(self._put_one((name, data), False, self._durable))
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
                        published.append(self._count(self._publish(path, name)))
                    else:
                        published.append(self._count(self._put_one(path, False, durable)))
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
            # G6 across hosts: the DONE file says how many messages this producer
            # published and names the last ones, which consumers check by name (a
            # listing may lag on a network file system; a stat by name does not).
            self._write_control(L.format_control(L.DONE, self.run_id, self.producer),
                                self._control_payload(L.DONE, published=self._published,
                                                      last=list(self._recent)))
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
        return admin._purge_control(self, keep={self.producer_id}, force=force)

    def reset_processing_files(self, force: bool = False) -> List[str]:
        """Return claims to the ready folder (pympx name): only stale ones unless ``force``."""
        return admin._requeue_claims(self, include_live=force)

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
        n = admin.purge(self.path, message_extension=self.message_extension, force=force)
        if self._closed is None:
            self._put_helo()
        return n
