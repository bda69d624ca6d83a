"""The one writer of one journal file: :class:`JournalWriter`."""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import zlib
from typing import Any, Dict, Optional, Sequence, Tuple

from .. import _fs
from .format import FORMAT_VERSION, KIND_HEADER, dumps, format_record
from .names import SNAPSHOT_PID, TEMP_NAME_FORMAT, JournalName

log = logging.getLogger("pympx_queues.journal")

_crc32 = zlib.crc32


class JournalBroken(OSError):
    """A previous write or fsync on this journal failed: it accepts nothing more."""


class JournalWriter:
    """The one writer of one journal file (one per process and run).

    Records are appended whole, in order, by one writer, so a crash leaves at most one
    torn record at the end.  A failed write or fsync is never retried: the writer refuses
    further appends (:class:`JournalBroken`).

    ``flush`` mode: the records are in the OS page cache before ``append`` returns
    (survives the crash of any process, G1).  The writer maps a reserved window of the
    file (``MAP_SHARED``, space reserved with ``posix_fallocate``) and copies each record
    into it: a store into a shared file mapping is in the page cache at once, exactly as
    a ``write(2)`` would put it there, but costs no system call and does not release the
    GIL (a ``write(2)`` per put hands the GIL to ``multiprocessing``'s feeder thread and
    back, which tripled the cost of a put).  Windows start at ``MAP_FIRST`` bytes and
    double up to ``MAP_MAX``; the unwritten rest of the last window is NUL bytes, cut at
    :meth:`close` (or by recovery after a crash).  Where mapping is not possible (no
    ``posix_fallocate``, a file system without shared writable mappings, a disk too full
    for a window) and while a tracer is installed (crash-state tests) the writer uses one
    ``write(2)`` per append on its ``O_APPEND`` fd instead.

    ``fsync`` mode: one ``write(2)`` per append, and ``append`` returns after an
    ``fsync`` that covers the records (G1 across power loss); threads appending at the
    same time share one fsync (group commit).

    Thread-safe.  Not fork-safe by itself: the owner opens a new writer in a child.
    """

    #: Size of the first mapped window and the largest one (bytes; multiples of the
    #: mmap granularity).  Each full window costs one ``posix_fallocate`` and ``mmap``.
    MAP_FIRST = 64 * 1024
    MAP_MAX = 4 * 1024 * 1024

    def __init__(self, directory: str, prefix: str, run: str, *, durability: str,
                 file_mode: int = _fs.DEFAULT_FILE_MODE, pid: Optional[int] = None,
                 rand: Optional[str] = None, header: Optional[Dict[str, Any]] = None,
                 snapshot: bool = False, mapped: Optional[bool] = None) -> None:
        self.directory = directory
        self.durability = _fs.check_durability(durability)
        self.pid = os.getpid() if pid is None else pid
        self._fsync = self.durability == _fs.FSYNC
        self.rand = rand or _fs.random_id(6)
        self.name = JournalName(prefix, run, SNAPSHOT_PID if snapshot else str(self.pid),
                                self.rand)
        self.path = os.path.join(directory, self.name.format())
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._seq = 0
        self._written = 0  # number of append() batches written
        self._synced = 0  # batches covered by a completed fsync
        self._broken: Optional[BaseException] = None
        self._fd: Optional[int] = None
        # Mapped appends (flush mode): the window [_map_base, _map_end) of the file is
        # mapped as _map; _pos is the end of the records written so far.
        self._mapped = not self._fsync and (mapped is None or bool(mapped))
        self._map: Optional[mmap.mmap] = None
        self._map_base = 0
        self._map_end = 0
        self._window = self.MAP_FIRST
        self._pos = 0
        host, mypid, start = _fs.owner_tag()
        meta = {"v": FORMAT_VERSION, "prefix": prefix, "run": run, "host": host,
                "pid": mypid, "start": start, "created": time.time(),
                "snapshot": snapshot}
        if header:
            meta.update(header)
        # Created under a hidden temp name, locked, given its header, then published:
        # a journal is never visible without its writer's lock (compaction would take
        # it for a dead run) nor without a header.
        tmp = os.path.join(directory, TEMP_NAME_FORMAT.format(name=self.name.format()))
        # O_EXCL: a reused pid (or a random id collision) never truncates a journal.
        self._fd = _fs.open_append_exclusive(tmp, file_mode)
        try:
            _fs.flock_exclusive_nb(self._fd)  # "alive" marker, dropped by the kernel at exit
            head = format_record(0, KIND_HEADER, dumps(meta))
            _fs.append(self._fd, head, tmp)  # never mapped: the window maps self.path
            self._pos = len(head)
            self._seq = 1
            if self.durability == _fs.FSYNC:
                _fs.fsync_fd(self._fd, tmp)  # G1: the header is durable before the name
            _fs.rename_noreplace(tmp, self.path)  # G2: never clobbers another journal
            if self.durability == _fs.FSYNC:
                _fs.fsync_dir(directory)  # G1: the journal's name survives power loss
        except BaseException:
            self.close()
            try:
                _fs.unlink_regular(tmp)
            except OSError:
                pass
            raise

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def mapped(self) -> bool:
        """True while appends are copied into a mapped window (flush mode)."""
        return self._map is not None

    def _write(self, data: bytes) -> None:
        """Append whole records under ``self._lock``; a failure closes the journal for good."""
        assert self._fd is not None
        try:
            if self._mapped:
                end = self._pos + len(data)
                if end > self._map_end or _fs.tracing():
                    self._remap(end)
                m = self._map
                if m is not None:
                    base = self._map_base
                    m[self._pos - base:end - base] = data  # G1: in the page cache now
                    self._pos = end
                    return
            _fs.append(self._fd, data, self.path)  # G1: one write(2) to the OS
            self._pos += len(data)
        except BaseException as exc:
            self._break(exc)
            raise

    def _remap(self, end: int) -> None:
        """Map a window holding bytes up to ``end``, or stop mapping for good."""
        assert self._fd is not None
        if _fs.tracing():  # the crash-state recorder must see every record as a write
            self._stop_mapping()
            return
        pos = self._pos
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        size = max(self._window, end - base)
        size += -size % mmap.ALLOCATIONGRANULARITY
        try:
            window = _fs.map_append_window(self.path, self._fd, base, size)
        except (OSError, ValueError) as exc:
            log.debug("journal %s: appending with write(2) from byte %d (cannot map: %r)",
                      self.path, pos, exc)
            self._stop_mapping()
            return
        old, self._map = self._map, window  # type: ignore[assignment]
        self._map_base, self._map_end = base, base + size
        self._window = min(self._window * 2, self.MAP_MAX)
        if old is not None:
            old.close()

    def _unmap(self) -> None:
        """Drop the mapping and cut the reserved tail (the file ends at its last record)."""
        m, self._map = self._map, None
        self._map_end = 0
        if m is not None:
            m.close()
        if self._fd is not None and self._mapped:
            _fs.trim_fd(self._fd, self._pos)

    def _stop_mapping(self) -> None:
        self._unmap()
        self._mapped = False

    def _break(self, exc: BaseException) -> None:
        """Called with ``self._lock`` held: refuse further records and close the fd.

        Closing releases the flock, so the file (with a possibly torn tail) is a finished
        journal for recovery; the owner opens a new journal for its next record
        (:attr:`closed` is True).  The failed records are never retried.
        """
        self._broken = exc
        try:
            self._unmap()
        except (OSError, ValueError):
            pass  # a NUL tail left behind is cut by recovery
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        log.error("journal %s: write failed (%r); it takes no more records", self.path, exc)

    def append(self, records: Sequence[Tuple[str, str]], sync: bool = True) -> int:
        """Append ``(kind, payload_json)`` records durably (see class doc); blocks on I/O.

        ``sync=False`` in fsync mode writes them (one ``write(2)``: in the page cache,
        not yet durable) and returns a ticket for :meth:`sync`, which another thread may
        call: the caller keeps the GIL-bound formatting, the syncing thread only waits
        for the disk.  Returns the ticket either way (0 when ``records`` is empty)."""
        if not records:
            return 0
        with self._lock:
            if self._broken is not None:
                raise JournalBroken(f"journal {self.path} failed earlier: {self._broken!r}")
            if self._fd is None:
                raise ValueError(f"journal {self.path} is closed")
            seq = self._seq
            chunks = []
            for kind, payload in records:
                chunks.append(format_record(seq, kind, payload))
                seq += 1
            self._write(b"".join(chunks))
            self._seq = seq
            self._written += 1
            ticket = self._written
            fd = self._fd
        if sync and self.durability == _fs.FSYNC:
            self._group_commit(ticket, fd)
        return ticket

    def sync(self, ticket: Optional[int] = None) -> None:
        """Make the appends up to ``ticket`` (default: all so far) durable: one fsync,
        shared with callers syncing at the same time (group commit).  A failure is never
        retried: the journal takes nothing more (:class:`JournalBroken`)."""
        with self._lock:
            if ticket is None:
                ticket = self._written
            fd = self._fd
            if fd is None:
                self._refuse()
        self._group_commit(ticket, fd)  # type: ignore[arg-type]

    def append_one(self, kind: str, payload: str) -> None:
        """:meth:`append` of a single record (the hot path of put and task_done)."""
        with self._lock:
            fd = self._fd
            if fd is None or self._broken is not None:
                self._refuse()
            seq = self._seq
            body = f"{seq} {kind} {payload}".encode("utf-8")
            data = b"%08x %s\n" % (_crc32(body), body)
            pos = self._pos
            end = pos + len(data)
            # (``_fs._tracer`` read directly: a call per record costs more than the test.)
            if end <= self._map_end and _fs._tracer is None:
                base = self._map_base
                # G1/G4: a store into the shared mapping: in the page cache on return.
                self._map[pos - base:end - base] = data  # type: ignore[index]
                self._pos = end
            else:
                self._write(data)  # maps the next window, or one write(2)
            self._seq = seq + 1
            self._written = ticket = self._written + 1
        if self._fsync:
            self._group_commit(ticket, fd)  # type: ignore[arg-type]

    def _refuse(self) -> None:
        if self._broken is not None:
            raise JournalBroken(f"journal {self.path} failed earlier: {self._broken!r}")
        raise ValueError(f"journal {self.path} is closed")

    def _group_commit(self, ticket: int, fd: int) -> None:
        # Leader/follower: whoever holds the sync lock fsyncs everything written so far;
        # appenders that queued behind it find their batch already covered.
        with self._sync_lock:
            if self._synced >= ticket:
                return
            if self._broken is not None:
                raise JournalBroken(f"journal {self.path} failed earlier: {self._broken!r}")
            with self._lock:
                target = self._written
            try:
                _fs.fsync_fd(fd, self.path)  # G1: records durable before put/task_done return
            except BaseException as exc:
                with self._lock:  # never retried: a later fsync could lie (fsyncgate)
                    self._break(exc)
                raise
            self._synced = target

    def forget(self) -> None:
        """In a forked child: close this process's copy of the fd, never write to it.

        The flock belongs to the open file description shared with the parent; closing
        our copy (and unmapping our copy of the window, without cutting anything) leaves
        the parent's lock and file untouched.
        """
        with self._lock:
            fd, self._fd = self._fd, None
            m, self._map = self._map, None
            self._map_end = 0
            self._mapped = False
            self._broken = JournalBroken("journal inherited across fork")
        if m is not None:
            m.close()
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Cut the reserved tail and close the file (records are already written;
        idempotent)."""
        with self._lock:
            if self._fd is not None:
                try:
                    self._unmap()
                except (OSError, ValueError) as exc:  # the NUL tail is cut at recovery
                    log.debug("journal %s: reserved tail not cut: %r", self.path, exc)
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
