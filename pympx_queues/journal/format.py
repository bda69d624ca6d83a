"""Pickup journals of :class:`~pympx_queues.persistent.PersistentQueue`: format, writer, reader.

On-disk layout (DESIGN.md section 3).  A pickup dir holds, per queue prefix, one
append-only journal per writer process and run::

    {prefix}.{run}.{pid}.{rand}.journal      a writer (producer and/or consumer process)
    {prefix}.{run}.snap.{rand}.journal       a compacted snapshot of earlier runs
    {prefix}.lock                            filelock: serialises recovery and compaction
    {prefix}.{...}.journal.torn-{offset}     bytes cut from a torn tail (kept, never lost)
    {prefix}.{...}.journal.quarantined       a corrupt journal after ``repair`` (kept)

``run`` is ``YYYYmmddTHHMMSSffffff-xxxxxx`` (sortable by start time), ``pid`` the writer's
process id and ``rand`` a random hex id: a reused pid never reopens an old journal, and a
journal is only ever created with ``O_EXCL`` (never ``'w'``).

Each record is one UTF-8 line::

    {crc32:08x} {seq} {kind} {json}\\n

``crc32`` covers ``{seq} {kind} {json}``; ``seq`` counts from 0 (the header) in each file
without gaps.  Kinds: ``H`` header, ``P`` put (work requested), ``D`` done (completed),
``X`` cancel (a put that never reached the queue), ``K`` key completed (snapshots only),
``C`` closed (DONE put), ``F`` failed (FAILED put).

A writer in ``flush`` mode maps its journal into memory and copies records into it (no
system call per record, see :class:`JournalWriter`); the space it has reserved but not
written yet reads as NUL bytes.  A run of NUL bytes up to the end of the file is that
reserved tail: readers stop there, it is neither a torn record nor corruption, and it is
cut when the writer closes the journal or, after a crash, at recovery.  Records never
contain a NUL byte (JSON escapes it).  Header ``v`` 2 marks journals that may carry such
a tail; version 1 journals never do and read the same way.

Recovery reads records until the first bad one.  A bad record with no good record after
it is a torn tail: it is ignored, and cut off (saved to a side file first) once its writer
is gone.  A bad record followed by good ones is corruption: reading fails closed with
:class:`~pympx_queues.errors.JournalCorruptError` naming the file and byte offset.

Payloads are JSON, never pickle.  Messages are encoded with :func:`encode_value` (tuples,
bytes, sets and dicts with any keys survive the round trip) unless the queue has
``formatter_list``/``converter_list`` hooks.
"""

from __future__ import annotations

import base64
import json
import logging
import mmap
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _fs
from .errors import JournalCorruptError

log = logging.getLogger("pympx_queues.journal")

_crc32 = zlib.crc32

# --------------------------------------------------------------------------- names
JOURNAL_SUFFIX = ".journal"
#: ``{prefix}.{run}.{pid}.{rand}.journal``; snapshots use ``snap`` instead of a pid.
JOURNAL_NAME_FORMAT = "{prefix}.{run}.{pid}.{rand}" + JOURNAL_SUFFIX
SNAPSHOT_PID = "snap"
LOCK_NAME_FORMAT = "{prefix}.lock"
#: A journal being created (hidden until it has its header and its writer's lock).
TEMP_NAME_FORMAT = ".{name}.tmp"
TORN_SUFFIX_FORMAT = ".torn-{offset}"
QUARANTINE_SUFFIX = ".quarantined"
CORRUPT_SUFFIX_FORMAT = ".corrupt-{offset}"
_RUN_RE = re.compile(r"^\d{8}T\d{12}-[0-9a-f]{6}$")
_RAND_RE = re.compile(r"^[0-9a-f]{8,16}r?$")


def new_run_id() -> str:
    """A run id sortable by start time: ``YYYYmmddTHHMMSSffffff-xxxxxx``."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int((now % 1) * 1e6):06d}-{_fs.random_id(3)}"


@dataclass(frozen=True)
class JournalName:
    """The parts of a journal file name."""

    prefix: str
    run: str
    pid: str  # decimal pid, or SNAPSHOT_PID
    rand: str

    def format(self) -> str:
        return format_journal_name(self.prefix, self.run, self.pid, self.rand)

    @property
    def is_snapshot(self) -> bool:
        return self.pid == SNAPSHOT_PID


def format_journal_name(prefix: str, run: str, pid: "int | str", rand: str) -> str:
    return JOURNAL_NAME_FORMAT.format(prefix=prefix, run=run, pid=pid, rand=rand)


def parse_journal_name(name: str) -> Optional[JournalName]:
    """The parts of a journal file name, or None if ``name`` is not one of ours."""
    if not name.endswith(JOURNAL_SUFFIX) or name.startswith("."):
        return None
    parts = name[: -len(JOURNAL_SUFFIX)].rsplit(".", 3)
    if len(parts) != 4:
        return None
    prefix, run, pid, rand = parts
    if not prefix or not _RUN_RE.match(run) or not _RAND_RE.match(rand):
        return None
    if pid != SNAPSHOT_PID and not pid.isdigit():
        return None
    return JournalName(prefix, run, pid, rand)


def check_prefix(prefix: str) -> str:
    """A pickup prefix is a file name part: no separators, no leading dot."""
    _fs.check_name(prefix, "pickup_file_prefix")
    return prefix


def list_journals(directory: str, prefix: Optional[str] = None) -> List[Tuple[str, JournalName]]:
    """(path, name) of every regular journal file in ``directory`` (for ``prefix``), sorted."""
    found = []
    try:
        entries = list(_fs.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        parsed = parse_journal_name(entry.name)
        if parsed is None or (prefix is not None and parsed.prefix != prefix):
            continue
        if not _fs.entry_is_regular(entry):
            log.warning("skipping %s: not a regular file", entry.path)
            continue
        found.append((entry.path, parsed))
    found.sort(key=lambda item: (item[1].run, item[1].pid != SNAPSHOT_PID, item[0]))
    return found


# --------------------------------------------------------------------------- records
KIND_HEADER = "H"
KIND_PUT = "P"
KIND_DONE = "D"
KIND_CANCEL = "X"
KIND_KEY = "K"
KIND_CLOSE = "C"
KIND_FAIL = "F"
#: Kinds of the PersistentQueue pickup journals.
QUEUE_KINDS = frozenset("HPDXKCF")
#: Kinds of pipeline journals (pympx_queues.pipeline defines their payloads):
#: A accepted, S stage finished, E attempt failed, L dead letter, Y item done,
#: W kill-switch state, B batch acknowledged, R pending sink side effect, Q reset.
PIPELINE_KINDS = frozenset("HASELYWBRQ")
KINDS = QUEUE_KINDS | PIPELINE_KINDS
#: 2: the journal may end in a reserved tail of NUL bytes (flush-mode writers map it);
#: 1: never does.  Both read the same way.
FORMAT_VERSION = 2
#: ``{crc32:08x} {seq} {kind} {json}\n``; the crc covers everything after the first space.
RECORD_FORMAT = "{crc:08x} {body}\n"
RECORD_BODY_FORMAT = "{seq} {kind} {payload}"
_CRC_LEN = 8


class RecordError(ValueError):
    """One journal line does not parse (bad checksum, bad field)."""


def format_record(seq: int, kind: str, payload: str) -> bytes:
    """One record line; ``payload`` is already JSON text without newlines."""
    body = f"{seq} {kind} {payload}".encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def parse_record(line: bytes) -> Tuple[int, str, Any]:
    """``(seq, kind, payload)`` of one record line (without its newline); RecordError."""
    if len(line) < _CRC_LEN + 6 or line[_CRC_LEN:_CRC_LEN + 1] != b" ":
        raise RecordError("record too short or malformed")
    body = line[_CRC_LEN + 1:]
    try:
        crc = int(line[:_CRC_LEN], 16)
    except ValueError:
        raise RecordError("checksum field is not hex")
    if zlib.crc32(body) != crc:
        raise RecordError("checksum mismatch")
    try:
        seq_text, kind, payload = body.decode("utf-8").split(" ", 2)
        seq = int(seq_text)
        if kind not in KINDS:
            raise RecordError(f"unknown record kind {kind!r}")
        return seq, kind, json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"bad record body: {exc}")


# --------------------------------------------------------------------------- values
# Tagged JSON: a one-key dict whose key is a tag stands for a non-JSON type.
TAG_TUPLE = "__tuple__"
TAG_BYTES = "__bytes__"
TAG_SET = "__set__"
TAG_FROZENSET = "__frozenset__"
TAG_DICT = "__dict__"  # a dict with non-str keys, or one that looks like a tag
TAG_FORMATTED = "__formatted__"  # formatter_list output (decoded by converter_list)
TAGS = frozenset((TAG_TUPLE, TAG_BYTES, TAG_SET, TAG_FROZENSET, TAG_DICT, TAG_FORMATTED))
_SCALARS = (str, int, float, bool, type(None))


def encode_value(obj: Any) -> Any:
    """A JSON-compatible structure for ``obj`` that :func:`decode_value` turns back.

    Supports None, bool, int, float, str, bytes/bytearray, list, tuple, set, frozenset
    and dicts (any encodable keys), nested.  Raises ``TypeError`` for anything else.
    """
    t = type(obj)
    if t in _SCALARS:
        return obj
    # Scalars inline (no call per item): the common messages are flat tuples/lists/dicts.
    if t is tuple:
        return {TAG_TUPLE: [x if type(x) in _SCALARS else encode_value(x) for x in obj]}
    if t is list:
        return [x if type(x) in _SCALARS else encode_value(x) for x in obj]
    if t is dict:
        if all(type(k) is str for k in obj) and not (len(obj) == 1 and next(iter(obj)) in TAGS):
            return {k: v if type(v) in _SCALARS else encode_value(v) for k, v in obj.items()}
        return {TAG_DICT: [[encode_value(k), encode_value(v)] for k, v in obj.items()]}
    if t is bytes or t is bytearray:
        return {TAG_BYTES: base64.b64encode(obj).decode("ascii")}
    if t is set or t is frozenset:
        tag = TAG_SET if t is set else TAG_FROZENSET
        return {tag: [encode_value(x) for x in obj]}
    # Subclasses (IntEnum, namedtuple, OrderedDict...) are journaled as their base type.
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    for base in (tuple, list, dict, bytes, set, frozenset):
        if isinstance(obj, base):
            return encode_value(base(obj))
    raise TypeError(
        f"cannot journal an object of type {t.__name__}: use JSON-like data (str, numbers, "
        "bytes, lists, tuples, dicts, sets) or formatter_list/converter_list hooks"
    )


def _decode_list(items: Any) -> list:
    if type(items) is not list:
        raise ValueError("tagged value is not a list")
    return [decode_value(x) for x in items]


def decode_value(data: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    t = type(data)
    if t is list:
        return [decode_value(x) for x in data]
    if t is dict:
        if len(data) == 1:
            (tag, inner), = data.items()
            if tag == TAG_TUPLE:
                return tuple(_decode_list(inner))
            if tag == TAG_BYTES:
                return base64.b64decode(inner)
            if tag == TAG_SET:
                return set(_decode_list(inner))
            if tag == TAG_FROZENSET:
                return frozenset(_decode_list(inner))
            if tag == TAG_DICT:
                return {decode_value(k): decode_value(v) for k, v in inner}
        return {k: decode_value(v) for k, v in data.items()}
    return data


def _not_json(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


from json.encoder import encode_basestring as _encode_str  # noqa: E402 (C when built)

try:  # the C encoder, built once (json.dumps builds an encoder per call)
    from json.encoder import c_make_encoder as _c_make_encoder

    _C_ENCODE = _c_make_encoder(None, _not_json, _encode_str, None, ":", ",", False, False,
                                True) if _c_make_encoder is not None else None
except ImportError:  # pragma: no cover
    _C_ENCODE = None


def dumps_value(obj: Any) -> str:
    """``dumps(encode_value(obj))``, with fast paths for the common flat messages (a str,
    an int, a tuple or list of scalars).  Raises TypeError for what :func:`encode_value`
    refuses."""
    t = type(obj)
    if t is str:
        return _encode_str(obj)
    if t is int:
        return int.__repr__(obj)
    if t is tuple or t is list:  # flat rows of scalars: no tagged copy to build
        for x in obj:
            if type(x) not in _SCALARS:
                break
        else:
            if t is list:
                return dumps(obj)
            return '{"' + TAG_TUPLE + '":' + dumps(list(obj)) + "}"
    return dumps(encode_value(obj))


def dumps(data: Any) -> str:
    """Compact JSON text (one line, UTF-8 kept as is).  ``data`` must be plain JSON data
    (the output of :func:`encode_value`); raises TypeError otherwise."""
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(data, 0))
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)  # pragma: no cover


# --------------------------------------------------------------------------- writer
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

    def append(self, records: Sequence[Tuple[str, str]]) -> None:
        """Append ``(kind, payload_json)`` records durably (see class doc); blocks on I/O."""
        if not records:
            return
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
        if self.durability == _fs.FSYNC:
            self._group_commit(ticket, fd)

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


# --------------------------------------------------------------------------- reader
@dataclass
class Problem:
    """A torn tail or a corrupt record found in a journal."""

    kind: str  # "torn" or "corrupt"
    path: str
    offset: int
    end: int  # first byte after the bad region
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "offset": self.offset,
                "length": self.end - self.offset, "detail": self.reason}


@dataclass
class JournalScan:
    """The parsed content of one journal file."""

    path: str
    name: JournalName
    header: Dict[str, Any]
    records: List[Tuple[int, str, Any]]  # (seq, kind, payload), header excluded
    size: int
    good_end: int  # offset after the last good record before any torn tail
    problems: List[Problem] = field(default_factory=list)
    #: bytes of reserved NUL tail after the records (a mapped writer's unused window)
    reserved: int = 0
    #: its writer held the lock when the file was read (checked *before* reading)
    locked_at_read: bool = False

    @property
    def torn(self) -> Optional[Problem]:
        return next((p for p in self.problems if p.kind == "torn"), None)

    @property
    def corrupt(self) -> List[Problem]:
        return [p for p in self.problems if p.kind == "corrupt"]

    def writer_alive(self) -> bool:
        """True when the process that writes this journal may still be running, or was
        running when the file was read (its content may then be a prefix of the final
        one: a writer that closes right after our read must not make that prefix look
        like the complete history of a dead run)."""
        return self.locked_at_read or writer_alive(self.path, self.header, self.name)


def writer_alive(path: str, header: Dict[str, Any], name: JournalName) -> bool:
    """True while the journal's writer holds it open (its ``flock``), or on another host."""
    if name.is_snapshot:
        return False
    if header.get("host", _fs.hostname()) != _fs.hostname():
        return True  # another host: we cannot tell, so never treat it as dead
    try:
        return bool(_fs.is_flocked(path))
    except OSError:
        return True  # cannot open it to test the lock: never treat it as dead


def _valid_line(line: bytes) -> Optional[Tuple[int, str, Any]]:
    try:
        return parse_record(line)
    except RecordError:
        return None


def _may_reserve(header: Dict[str, Any]) -> bool:
    """A version 2 journal may end in a reserved NUL tail; in a version 1 journal NUL
    bytes at the end are a torn tail (a power loss), as they always were."""
    v = header.get("v")
    return type(v) is int and v >= 2


def scan_journal(path: str, *, strict: bool = True) -> JournalScan:
    """Parse one journal.  Blocks on file I/O only.

    Stops at the first bad record.  If no good record follows it, that is a torn tail
    (reported in ``problems``, records before it kept).  If good records follow, it is
    corruption: ``strict`` raises :class:`JournalCorruptError` (file and byte offset);
    ``strict=False`` reports every bad region and keeps the good records around them
    (used by ``verify`` and ``repair``).
    """
    name = parse_journal_name(os.path.basename(path))
    if name is None:
        raise ValueError(f"{path} is not a journal file name")
    # The lock first, then the bytes: a writer seen dead here has written its last record.
    try:
        locked = bool(_fs.is_flocked(path)) and not name.is_snapshot
    except OSError:
        locked = not name.is_snapshot  # cannot test the lock: never take it for dead
    data = _fs.read_bytes(path)
    size = len(data)
    records: List[Tuple[int, str, Any]] = []
    problems: List[Problem] = []
    header: Dict[str, Any] = {}
    pos = 0
    expected = 0
    good_end = 0
    reserved = 0
    while pos < size:
        if data[pos] == 0 and _may_reserve(header) and data.count(b"\0", pos) == size - pos:
            reserved = size - pos  # a mapped writer's reserved, unwritten tail
            break
        nl = data.find(b"\n", pos)
        if nl < 0:
            problems.append(Problem("torn", path, pos, size, "incomplete last record"))
            break
        line = data[pos:nl]
        parsed = _valid_line(line)
        reason = None
        if parsed is None:
            try:
                parse_record(line)
            except RecordError as exc:
                reason = str(exc)
        elif parsed[0] != expected:
            reason = f"sequence number {parsed[0]}, expected {expected}"
        elif expected == 0 and parsed[1] != KIND_HEADER:
            reason = "first record is not a header"
        if reason is None:
            seq, kind, payload = parsed  # type: ignore[misc]
            if kind == KIND_HEADER:
                if seq == 0 and isinstance(payload, dict):
                    header = payload
            else:
                records.append((seq, kind, payload))
            expected = seq + 1
            pos = nl + 1
            good_end = pos
            continue
        # A bad record: torn tail or corruption?  Look for a good record after it.  A
        # whole line with a valid checksum but the wrong sequence number is never a torn
        # write: records are missing or repeated before it (zero-length bad region).
        nxt = nl + 1
        resume = None
        if parsed is not None and parsed[0] != expected:
            resume = (pos, parsed[0])
        while resume is None and nxt < size:
            nl2 = data.find(b"\n", nxt)
            if nl2 < 0:
                break
            again = _valid_line(data[nxt:nl2])
            if again is not None:
                resume = (nxt, again[0])
                break
            nxt = nl2 + 1
        if resume is None:
            problems.append(Problem("torn", path, pos, size, reason or "bad last record"))
            break
        problem = Problem("corrupt", path, pos, resume[0], reason or "bad record")
        if strict:
            raise JournalCorruptError(path, pos, problem.reason)
        problems.append(problem)
        pos = resume[0]
        expected = resume[1]
    return JournalScan(path, name, header, records, size, good_end, problems, reserved,
                       locked)


# --------------------------------------------------------------------------- history
@dataclass
class Requested:
    """One piece of work as the journals know it."""

    id: str
    body: Any  # the encoded JSON value (decode with the queue's codec)
    key: Optional[str]
    run: str
    seq: int = 0  # order of first request across the history


@dataclass
class RunState:
    """What the journals of one run say."""

    run: str
    paths: List[str] = field(default_factory=list)
    requested: List[str] = field(default_factory=list)  # ids, first request in this run
    requeued: int = 0  # P records of ids first requested by an earlier run
    completed: int = 0  # D records
    cancelled: int = 0
    closed: bool = False
    failed: bool = False
    live: bool = False
    snapshot: bool = False


@dataclass
class History:
    """Requested minus completed across every run found (DESIGN.md G3/G4)."""

    requested: Dict[str, Requested] = field(default_factory=dict)
    completed: set = field(default_factory=set)
    cancelled: set = field(default_factory=set)
    completed_keys: set = field(default_factory=set)
    runs: Dict[str, RunState] = field(default_factory=dict)
    scans: List[JournalScan] = field(default_factory=list)
    live_ids: set = field(default_factory=set)  # put by a writer that is still running

    def outstanding(self, *, exclude_live: bool = False) -> List[Requested]:
        """Requested, not cancelled and not completed, in order of first request.

        ``exclude_live`` leaves out messages that a still-running writer put (or
        requeued): they are that run's work in progress, not unfinished work (G3).
        """
        done = self.completed
        live = self.live_ids if exclude_live else ()
        return [r for r in self.requested.values()
                if r.id not in done and r.id not in self.cancelled and r.id not in live]

    def outstanding_keys(self) -> Dict[str, str]:
        return {r.key: r.id for r in self.outstanding() if r.key is not None}

    def keys_done(self) -> set:
        keys = set(self.completed_keys)
        for r in self.requested.values():
            if r.key is not None and r.id in self.completed:
                keys.add(r.key)
        return keys

    def latest_run(self) -> Optional[RunState]:
        """The latest run that put, requeued, closed or failed (acks-only runs, such as
        ``pickup.mark_done``, do not count)."""
        active = [r for r in self.runs.values()
                  if r.requested or r.requeued or r.closed or r.failed or r.snapshot]
        return max(active, key=lambda r: r.run) if active else None

    def is_complete(self) -> bool:
        """Nothing outstanding and the latest run closed its stream: a fresh start."""
        latest = self.latest_run()
        return not self.outstanding() and (latest is None or latest.closed)

    def add_scan(self, scan: JournalScan) -> None:
        self.scans.append(scan)
        run = self.runs.setdefault(scan.name.run, RunState(scan.name.run))
        run.paths.append(scan.path)
        run.snapshot = run.snapshot or scan.name.is_snapshot
        live = not scan.name.is_snapshot and scan.writer_alive()
        if live:
            run.live = True
        requested = self.requested
        for _seq, kind, payload in scan.records:
            if kind == KIND_PUT:
                mid = payload["i"]
                if live:
                    self.live_ids.add(mid)
                if mid not in requested:
                    requested[mid] = Requested(mid, payload.get("m"), payload.get("k"),
                                               scan.name.run, len(requested))
                    run.requested.append(mid)
                elif requested[mid].run != scan.name.run:
                    run.requeued += 1
            elif kind == KIND_DONE:
                self.completed.add(payload["i"])
                run.completed += 1
            elif kind == KIND_CANCEL:
                self.cancelled.add(payload["i"])
                run.cancelled += 1
            elif kind == KIND_KEY:
                self.completed_keys.add(payload["k"])
            elif kind == KIND_CLOSE:
                run.closed = True
            elif kind == KIND_FAIL:
                run.failed = True


def scan_dirs(dirs: Iterable[str], prefix: str, *, exclude_run: Optional[str] = None,
              strict: bool = True) -> History:
    """Load every journal of ``prefix`` in ``dirs`` (each dir once) into a History."""
    history = History()
    seen = set()
    for directory in dirs:
        if directory is None:
            continue
        real = os.path.realpath(directory)
        if real in seen:
            continue
        seen.add(real)
        for scan in _live_scans(directory, prefix, exclude_run, strict)[0]:
            history.add_scan(scan)
    return history


def _scan_directory(directory: str, prefix: str, exclude_run: Optional[str],
                    strict: bool) -> List[JournalScan]:
    scans = []
    for path, name in list_journals(directory, prefix):
        if name.run == exclude_run:
            continue
        try:
            scans.append(scan_journal(path, strict=strict))
        except FileNotFoundError:
            continue  # compacted away by another process meanwhile
    return scans


def _live_scans(directory: str, prefix: str, exclude_run: Optional[str], strict: bool
                ) -> "tuple[List[JournalScan], List[JournalScan]]":
    """(scans that count, scans superseded by a snapshot that merged them).

    A snapshot's header lists the journals it merged.  If a power cut kept some of their
    unlinks and lost others, the survivors are ignored: their records are in the
    snapshot, and a survivor's put must not come back without the ack that was in a
    journal already gone (G4).
    """
    scans = _scan_directory(directory, prefix, exclude_run, strict)
    merged = set()
    for scan in scans:
        if scan.name.is_snapshot:
            merged.update(scan.header.get("merged") or ())
    counted = [s for s in scans if os.path.basename(s.path) not in merged]
    superseded = [s for s in scans if os.path.basename(s.path) in merged]
    return counted, superseded


# --------------------------------------------------------------------------- recovery
def lock_path(directory: str, prefix: str) -> str:
    return os.path.join(directory, LOCK_NAME_FORMAT.format(prefix=prefix))


def directory_lock(directory: str, prefix: str, timeout: float = 60.0):
    """The filelock serialising recovery and compaction of ``prefix`` in ``directory``.

    Message puts and acks never take it (DESIGN.md section 6).
    """
    from filelock import FileLock

    return FileLock(lock_path(directory, prefix), timeout=timeout,
                    mode=_fs.DEFAULT_FILE_MODE)


def cut_torn_tail(scan: JournalScan, *, durable: bool = True) -> Optional[str]:
    """Save a dead writer's torn tail to a side file, then truncate the journal (G2, G5).

    Returns the side file's path, or None when there was nothing to cut or the writer
    may still be running.  Crash-safe: the side file is written before the cut, and a
    second run finds nothing more to do.
    """
    torn = scan.torn
    if torn is None:
        if scan.reserved and not scan.writer_alive():
            # A mapped writer died before cutting its reserved tail: NUL bytes only, no
            # record was ever in them, nothing to save.
            _fs.truncate(scan.path, scan.good_end, durable=durable)
            scan.size, scan.reserved = scan.good_end, 0
        return None
    if scan.writer_alive():
        return None
    data = _fs.read_bytes(scan.path)
    tail = data[torn.offset:]
    if _may_reserve(scan.header):
        tail = tail.rstrip(b"\0")  # the rest of a mapped writer's reserved window
    side = scan.path + TORN_SUFFIX_FORMAT.format(offset=torn.offset)
    if tail:
        try:
            _fs.write_new(side, tail, durable=durable)
        except FileExistsError:
            if _fs.read_bytes(side) != tail:  # an earlier cut of different bytes: keep both
                side = f"{side}-{_fs.random_id(3)}"
                _fs.write_new(side, tail, durable=durable)
        if durable:
            _fs.fsync_dir(os.path.dirname(scan.path))  # G5: side file before the cut
    _fs.truncate(scan.path, torn.offset, durable=durable)  # G2: never replay torn bytes
    log.warning("journal %s: torn last record at byte %d (%s) cut off; %d byte(s) saved "
                "in %s", scan.path, torn.offset, torn.reason, len(tail), side)
    scan.problems.remove(torn)
    scan.size = torn.offset
    return side


def write_snapshot(directory: str, prefix: str, run: str, history: History, *,
                   durability: str, file_mode: int = _fs.DEFAULT_FILE_MODE,
                   merged: Sequence[str] = (), empty: bool = False) -> str:
    """Publish one journal holding the outstanding work and completed keys of ``history``
    (``empty``: nothing but a closed marker, for a finished history being deleted).

    Written under a temp name, fsynced, then published without clobbering (G1, G2).  Its
    header lists the ``merged`` journal names, which readers ignore from then on.
    """
    outstanding = [] if empty else history.outstanding()
    latest = history.latest_run()
    records: List[Tuple[str, str]] = []
    for req in outstanding:
        payload: Dict[str, Any] = {"i": req.id, "m": req.body}
        if req.key is not None:
            payload["k"] = req.key
        records.append((KIND_PUT, dumps(payload)))
    if empty:
        records.append((KIND_CLOSE, dumps({})))
    else:
        for key in sorted(history.keys_done(), key=str):
            records.append((KIND_KEY, dumps({"k": key})))
        if latest is not None and latest.closed:
            records.append((KIND_CLOSE, dumps({})))
        if latest is not None and latest.failed:
            records.append((KIND_FAIL, dumps({})))
    rand = _fs.random_id(6)
    final_name = format_journal_name(prefix, run, SNAPSHOT_PID, rand)
    final = os.path.join(directory, final_name)
    tmp = os.path.join(directory, TEMP_NAME_FORMAT.format(name=final_name))
    host, pid, start = _fs.owner_tag()
    header = {"v": FORMAT_VERSION, "prefix": prefix, "run": run, "host": host, "pid": pid,
              "start": start, "created": time.time(), "snapshot": True,
              "merged": [os.path.basename(p) for p in merged]}
    lines = [format_record(0, KIND_HEADER, dumps(header))]
    lines += [format_record(i + 1, k, p) for i, (k, p) in enumerate(records)]
    # Always synced: compaction deletes the originals next, so the copy must be durable.
    _fs.publish_bytes(tmp, final, b"".join(lines), durable=True, mode=file_mode)
    return final


def compact(directory: str, prefix: str, *, extra_dirs: Sequence[str] = (),
            exclude_run: Optional[str] = None, durability: str = _fs.FSYNC,
            file_mode: int = _fs.DEFAULT_FILE_MODE, lock_timeout: float = 60.0,
            ) -> "tuple[History, Dict[str, Any]]":
    """Recover and compact the earlier runs of ``prefix``; return their History.

    Under the prefix's filelock: torn tails of dead writers are cut (saved to side files);
    when the history is complete (nothing outstanding, latest run closed) every journal of
    it in ``directory`` is deleted, so disk use stays bounded after many runs; otherwise
    the journals of dead writers in ``directory`` (and the history found in
    ``extra_dirs``, carried forward) are merged into one snapshot journal and the merged
    files deleted.  Runs with a live writer are never touched.  Crash-safe and idempotent
    (G5): the snapshot is durable before anything is deleted, and ids make a merged
    record and its original count once.

    Raises :class:`JournalCorruptError` on corruption (nothing is changed then) and
    ``filelock.Timeout`` when the lock is not free within ``lock_timeout`` seconds.
    """
    directory = os.path.abspath(directory)
    actions: Dict[str, Any] = {"cut": [], "deleted": [], "snapshot": None}
    with directory_lock(directory, prefix, lock_timeout):
        counted, superseded = _live_scans(directory, prefix, exclude_run, True)
        for scan in counted + superseded:
            side = cut_torn_tail(scan, durable=durability == _fs.FSYNC)
            if side:
                actions["cut"].append(side)
        extra = [os.path.abspath(d) for d in extra_dirs
                 if d and os.path.realpath(d) != os.path.realpath(directory)]
        history = History()
        for scan in counted:
            history.add_scan(scan)
        for d in extra:
            for scan in _live_scans(d, prefix, exclude_run, True)[0]:
                history.add_scan(scan)
        if any(run.live for run in history.runs.values()):
            live = sorted(r.run for r in history.runs.values() if r.live)
            log.warning("pickup %s/%s: run(s) %s still have a live writer; not compacting",
                        directory, prefix, ", ".join(live))
            return history, actions
        # Every local journal goes, superseded leftovers of a power cut included.
        dead_local = [s.path for s in counted + superseded]
        names = [os.path.basename(p) for p in dead_local]
        if history.is_complete():
            if dead_local:
                # A durable empty snapshot lists what is deleted: whichever unlinks a power
                # cut keeps, a surviving put never reappears without its ack (G4, G5).
                marker = write_snapshot(directory, prefix, min(history.runs or [new_run_id()]),
                                        history, durability=durability, file_mode=file_mode,
                                        merged=names, empty=True)
                for path in dead_local:
                    _fs.unlink_regular(path)
                    actions["deleted"].append(path)
                _fs.fsync_dir(directory)  # the unlinks are durable before the marker goes
                _fs.unlink_regular(marker)
                _fs.fsync_dir(directory)
                log.info("pickup %s/%s: %d journal(s) of finished runs compacted away",
                         directory, prefix, len(dead_local))
            return History(), actions
        carried = any(os.path.dirname(s.path) != directory for s in history.scans)
        if len(dead_local) > 1 or carried:
            # The snapshot takes the earliest merged run id: it sorts first, so the order
            # of first requests (requeue order) survives, also beside leftovers of an
            # interrupted compaction.
            snap = write_snapshot(directory, prefix, min(history.runs), history,
                                  durability=durability, file_mode=file_mode,
                                  merged=names)
            actions["snapshot"] = snap
            for path in dead_local:
                _fs.unlink_regular(path)  # G5: the snapshot above is already durable
                actions["deleted"].append(path)
            _fs.fsync_dir(directory)
            log.info("pickup %s/%s: %d journal(s) merged into %s (%d outstanding)",
                     directory, prefix, len(dead_local), os.path.basename(snap),
                     len(history.outstanding()))
    return history, actions
