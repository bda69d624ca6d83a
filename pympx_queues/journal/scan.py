"""Reading one journal: records, torn tails and corruption (:func:`scan_journal`), and
cutting a dead writer's torn tail (:func:`cut_torn_tail`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .. import _fs
from ..errors import JournalCorruptError
from .format import KIND_HEADER, RecordError, parse_record
from .names import TORN_SUFFIX_FORMAT, JournalName, parse_journal_name

log = logging.getLogger("pympx_queues.journal")


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


#: Environment variable: comma-separated host names an operator declares dead, so that
#: journals their writers left on a shared folder can be requeued from another host.
DEAD_HOSTS_ENV = "PYMPX_QUEUES_DEAD_HOSTS"


def dead_hosts() -> FrozenSet[str]:
    """The host names declared dead in ``PYMPX_QUEUES_DEAD_HOSTS`` (never this host)."""
    raw = os.environ.get(DEAD_HOSTS_ENV, "")
    return frozenset(h.strip() for h in raw.split(",") if h.strip()) - {_fs.hostname()}


def writer_alive(path: str, header: Dict[str, Any], name: JournalName) -> bool:
    """True while the journal's writer holds it open (its ``flock``), or on another host."""
    if name.is_snapshot:
        return False
    host = header.get("host", _fs.hostname())
    if host != _fs.hostname():
        # Another host: we cannot tell, so never treat it as dead, unless an operator
        # declared that host dead (PYMPX_QUEUES_DEAD_HOSTS, `requeue --dead-host`).
        return host not in dead_hosts()
    try:
        return bool(_fs.is_flocked(path))
    except OSError:
        return True  # cannot open it to test the lock: never treat it as dead


def valid_line(line: bytes) -> Optional[Tuple[int, str, Any]]:
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
        parsed = valid_line(line)
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
            again = valid_line(data[nxt:nl2])
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
