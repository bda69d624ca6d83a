"""Administration of PersistentQueue pickup dirs: inspect, verify, repair, requeue.

The ``pympx-queues`` CLI wraps these functions; each returns a dataclass with a
``to_dict()`` made of JSON types only.  All of them are safe while queues are running:
reads never change anything, and changes (cutting a dead writer's torn tail, quarantining
a corrupt journal, compacting dead runs) take the prefix's filelock and never touch a
journal whose writer is still alive.  Nothing is ever deleted without a copy: torn tails
and corrupt records are saved to side files next to their journal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .. import _fs
from .. import journal as jr

log = logging.getLogger("pympx_queues.pickup")

__all__ = [
    "JournalIssue", "RunReport", "PrefixReport", "PickupReport", "RepairReport",
    "RequeueReport", "OutstandingMessage", "is_pickup_dir", "list_prefixes", "inspect",
    "verify", "repair", "requeue", "outstanding", "mark_done",
]


# --------------------------------------------------------------------------- reports
@dataclass
class JournalIssue:
    """A torn tail (``kind="torn"``, recoverable) or corrupt record (``"corrupt"``)."""

    kind: str
    path: str
    offset: int
    length: int
    detail: str
    writer_alive: bool = False

    @property
    def severity(self) -> str:
        return "error" if self.kind == "corrupt" else "warning"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity
        return d


@dataclass
class RunReport:
    """One run of one queue prefix."""

    prefix: str
    run: str
    files: List[str]
    requested: int  # messages first requested by this run
    requeued: int  # messages of earlier runs put again by this run
    completed: int  # acknowledgements journaled by this run
    outstanding: int  # messages first requested by this run and not completed anywhere
    closed: bool
    failed: bool
    live: bool  # a writer of this run is still running
    snapshot: bool  # a compacted snapshot of earlier runs

    @property
    def state(self) -> str:
        if self.live:
            return "running"
        if self.failed:
            return "failed"
        if self.outstanding:
            return "unfinished"
        return "finished" if self.closed else "not closed"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state
        return d


@dataclass
class PrefixReport:
    """Every run of one queue prefix, and the work left across all of them."""

    prefix: str
    runs: List[RunReport]
    requested: int
    completed: int
    outstanding: int
    outstanding_ids: List[str]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["runs"] = [r.to_dict() for r in self.runs]
        return d


@dataclass
class PickupReport:
    """What :func:`inspect` / :func:`verify` found in a pickup dir."""

    path: str
    prefixes: List[PrefixReport]
    issues: List[JournalIssue]
    leftovers: List[str] = field(default_factory=list)  # temp files of dead writers

    @property
    def ok(self) -> bool:
        """No corrupt record (torn tails are recovered automatically)."""
        return not any(i.kind == "corrupt" for i in self.issues)

    @property
    def outstanding(self) -> int:
        return sum(p.outstanding for p in self.prefixes)

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "outstanding": self.outstanding,
                "prefixes": [p.to_dict() for p in self.prefixes],
                "issues": [i.to_dict() for i in self.issues],
                "leftovers": list(self.leftovers)}


@dataclass
class RepairReport:
    """What :func:`repair` did (or would do with ``dry_run``)."""

    path: str
    dry_run: bool
    actions: List[str]
    quarantined: List[str]  # side files holding corrupt bytes / quarantined journals
    cut: List[str]  # side files holding torn tails cut from journals
    removed: List[str]  # temp files of dead writers (header only, never data)
    remaining: List[JournalIssue]

    @property
    def ok(self) -> bool:
        return not any(i.kind == "corrupt" for i in self.remaining)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["remaining"] = [i.to_dict() for i in self.remaining]
        d["ok"] = self.ok
        return d


@dataclass
class OutstandingMessage:
    """One unfinished message: its id, idempotency key, first run and journaled body."""

    prefix: str
    id: str
    key: Optional[str]
    run: str
    body: Any  # the JSON form stored in the journal (see journal.encode_value)

    def decoded(self) -> Any:
        """The body as Python data (without the queue's converter_list hooks)."""
        return jr.decode_value(self.body)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RequeueReport:
    """What :func:`requeue` consolidated for the next run."""

    path: str
    dry_run: bool
    outstanding: List[OutstandingMessage]
    merged: List[str]  # journals merged into a snapshot (and removed)
    snapshots: List[str]  # snapshot journals written
    deleted: List[str]  # journals of finished histories removed
    cut: List[str]
    skipped: List[str]  # prefixes left alone (a writer is alive)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["outstanding"] = [m.to_dict() for m in self.outstanding]
        return d


# --------------------------------------------------------------------------- reading
def _abs(path: "str | os.PathLike[str]") -> str:
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(2, "no such directory", path)
        raise NotADirectoryError(20, "not a directory", path)
    return path


def is_pickup_dir(path: "str | os.PathLike[str]") -> bool:
    """True when ``path`` is a directory holding PersistentQueue journals (or their lock)."""
    try:
        entries = list(_fs.scandir(path))
    except OSError:
        return False
    for entry in entries:
        name = entry.name
        if jr.parse_journal_name(name) is not None:
            return True
        head, sep, _ = name.partition(jr.JOURNAL_SUFFIX + ".")
        if sep and jr.parse_journal_name(head + jr.JOURNAL_SUFFIX) is not None:
            return True  # only quarantined journals or side files are left
    return False


def list_prefixes(path: "str | os.PathLike[str]") -> List[str]:
    """The queue prefixes with journals in ``path``, sorted."""
    return sorted({name.prefix for _, name in jr.list_journals(_abs(path))})


def _prefixes(path: str, prefix: Optional[str]) -> List[str]:
    if prefix is not None:
        return [jr.check_prefix(prefix)]
    return list_prefixes(path)


def _issue(problem: jr.Problem, alive: bool) -> JournalIssue:
    return JournalIssue(problem.kind, problem.path, problem.offset,
                        problem.end - problem.offset, problem.reason, alive)


def _leftovers(path: str) -> List[str]:
    """Hidden temp files of journals, snapshots or repairs whose creator died before
    publishing them (``.<journal name>.tmp`` / ``.repair-*``): copies or headers only."""
    out = []
    for entry in _fs.scandir(path):
        name = entry.name
        if not name.startswith("."):
            continue
        head, sep, _ = name[1:].partition(jr.JOURNAL_SUFFIX + ".")
        if sep and jr.parse_journal_name(head + jr.JOURNAL_SUFFIX) is not None \
                and _fs.entry_is_regular(entry) and _fs.is_flocked(entry.path) is False:
            out.append(entry.path)
    return sorted(out)


def _prefix_report(prefix: str, history: jr.History) -> PrefixReport:
    outstanding = history.outstanding()
    per_run: Dict[str, int] = {}
    for req in outstanding:
        per_run[req.run] = per_run.get(req.run, 0) + 1
    runs = []
    for run_id in sorted(history.runs):
        rs = history.runs[run_id]
        runs.append(RunReport(prefix, run_id, sorted(rs.paths), len(rs.requested), rs.requeued,
                              rs.completed, per_run.get(run_id, 0), rs.closed, rs.failed,
                              rs.live, rs.snapshot))
    requested = len([r for r in history.requested if r not in history.cancelled])
    return PrefixReport(prefix, runs, requested,
                        len(history.completed & set(history.requested)), len(outstanding),
                        [r.id for r in outstanding])


def inspect(path: "str | os.PathLike[str]", prefix: Optional[str] = None) -> PickupReport:
    """Runs, requested/completed/outstanding per run and per prefix, torn or corrupt records.

    Read-only; never raises for corruption (it is reported in ``issues`` with file and
    byte offset).  Raises ``FileNotFoundError``/``NotADirectoryError``/``PermissionError``.
    """
    path = _abs(path)
    reports: List[PrefixReport] = []
    issues: List[JournalIssue] = []
    for pfx in _prefixes(path, prefix):
        history = jr.scan_dirs([path], pfx, strict=False)
        for scan in history.scans:
            alive = scan.writer_alive()
            for problem in scan.problems:
                if problem.kind == "torn" and alive:
                    continue  # a record being written right now
                issues.append(_issue(problem, alive))
        reports.append(_prefix_report(pfx, history))
    return PickupReport(path, reports, issues, _leftovers(path))


def verify(path: "str | os.PathLike[str]", prefix: Optional[str] = None) -> PickupReport:
    """Check every record's checksum and sequence; ``report.ok`` is False on corruption.

    Same report as :func:`inspect` (read-only).  Torn tails of dead writers are listed as
    warnings: the next run (or :func:`repair`) cuts them off.
    """
    report = inspect(path, prefix)
    for issue in report.issues:
        log.log(logging.ERROR if issue.kind == "corrupt" else logging.WARNING,
                "%s record in %s at byte %d: %s", issue.kind, issue.path, issue.offset,
                issue.detail)
    return report


def outstanding(path: "str | os.PathLike[str]", prefix: Optional[str] = None
                ) -> List[OutstandingMessage]:
    """Every unfinished message across all runs (strict: raises on corruption)."""
    path = _abs(path)
    out = []
    for pfx in _prefixes(path, prefix):
        history = jr.scan_dirs([path], pfx)
        out += [OutstandingMessage(pfx, r.id, r.key, r.run, r.body)
                for r in history.outstanding()]
    return out


# --------------------------------------------------------------------------- changing
def _quarantine_journal(scan: jr.JournalScan, actions: List[str],
                        quarantined: List[str]) -> None:
    """Save each corrupt region, publish a re-sequenced copy of the good records, then
    rename the original out of the way.  Idempotent and crash-safe (G5)."""
    data = _fs.read_bytes(scan.path)
    directory = os.path.dirname(scan.path)
    for problem in scan.corrupt:
        side = scan.path + jr.CORRUPT_SUFFIX_FORMAT.format(offset=problem.offset)
        chunk = data[problem.offset:problem.end]
        if not chunk:
            actions.append(f"{scan.path} at offset {problem.offset}: {problem.reason} "
                           "(no bytes to save)")
            continue
        try:
            _fs.write_new(side, chunk, durable=True)
        except FileExistsError:
            if _fs.read_bytes(side) != chunk:
                side = f"{side}-{_fs.random_id(3)}"
                _fs.write_new(side, chunk, durable=True)
        quarantined.append(side)
        actions.append(f"saved {len(chunk)} corrupt byte(s) of {scan.path} at offset "
                       f"{problem.offset} to {side}")
    _fs.fsync_dir(directory)  # G5: the corrupt bytes are safe before anything moves
    name = scan.name
    repaired_name = jr.JournalName(name.prefix, name.run, name.pid,
                                   name.rand if name.rand.endswith("r") else name.rand + "r")
    repaired = os.path.join(directory, repaired_name.format())
    header = dict(scan.header) or {"v": jr.FORMAT_VERSION, "prefix": name.prefix,
                                   "run": name.run}
    header["repaired_from"] = os.path.basename(scan.path)
    lines = [jr.format_record(0, jr.KIND_HEADER, jr.dumps(header))]
    for n, (_, kind, payload) in enumerate(scan.records, start=1):
        lines.append(jr.format_record(n, kind, jr.dumps(payload)))
    tmp = os.path.join(directory, f".{repaired_name.format()}.repair-{_fs.random_id(3)}")
    try:
        _fs.publish_bytes(tmp, repaired, b"".join(lines), durable=True)  # G1, G2
        actions.append(f"wrote {len(scan.records)} good record(s) to {repaired}")
    except FileExistsError:
        jr.scan_journal(repaired)  # an earlier, interrupted repair: it must be sound
        actions.append(f"kept {repaired} from an earlier repair")
    target = scan.path + jr.QUARANTINE_SUFFIX
    if os.path.lexists(target):
        target = f"{target}-{_fs.random_id(3)}"
    _fs.rename_noreplace(scan.path, target)  # G5: the original is kept, never deleted
    _fs.fsync_dir(directory)
    quarantined.append(target)
    actions.append(f"quarantined {scan.path} as {target}")


def repair(path: "str | os.PathLike[str]", prefix: Optional[str] = None, *,
           dry_run: bool = False, lock_timeout: float = 60.0) -> RepairReport:
    """Make every journal readable again without losing a byte.

    For each journal of a dead writer: a torn tail is cut (its bytes saved to
    ``<journal>.torn-<offset>``); a journal with corrupt records gets its corrupt byte
    ranges saved to ``<journal>.corrupt-<offset>``, its good records republished as a new
    journal of the same run, and the original renamed ``<journal>.quarantined``.  A
    corrupt ``P`` record's message is then missing from the queue's view: the side file
    holds it for a person to look at.  A corrupt ``D`` record makes its message
    outstanding again (at-least-once).  Hidden temp journals of dead writers (header
    only) are removed.  Journals whose writer is alive are left alone (reported in
    ``remaining``).  Idempotent; takes each prefix's filelock.
    """
    path = _abs(path)
    actions: List[str] = []
    quarantined: List[str] = []
    cut: List[str] = []
    removed: List[str] = []
    remaining: List[JournalIssue] = []
    for pfx in _prefixes(path, prefix):
        with jr.directory_lock(path, pfx, lock_timeout):
            history = jr.scan_dirs([path], pfx, strict=False)
            for scan in history.scans:
                if not scan.problems:
                    if scan.reserved and not dry_run:
                        jr.cut_torn_tail(scan)  # a crashed mapped writer's NUL tail only
                    continue
                alive = scan.writer_alive()
                if alive:
                    remaining += [_issue(p, True) for p in scan.problems if p.kind == "corrupt"]
                    continue
                if dry_run:
                    for p in scan.problems:
                        verb = "cut torn tail" if p.kind == "torn" else "quarantine corrupt record"
                        actions.append(f"would {verb} of {scan.path} at offset {p.offset}")
                    continue
                if scan.torn is not None:
                    side = jr.cut_torn_tail(scan)
                    if side:
                        cut.append(side)
                        actions.append(f"cut torn tail of {scan.path}; bytes saved in {side}")
                if scan.corrupt:
                    _quarantine_journal(scan, actions, quarantined)
    for leftover in _leftovers(path):
        if dry_run:
            actions.append(f"would remove unpublished temp journal {leftover}")
            continue
        if _fs.is_flocked(leftover) is False:
            _fs.unlink_regular(leftover)
            removed.append(leftover)
            actions.append(f"removed unpublished temp journal {leftover} (header only)")
    return RepairReport(path, dry_run, actions, quarantined, cut, removed, remaining)


def requeue(path: "str | os.PathLike[str]", prefix: Optional[str] = None, *,
            dry_run: bool = False, lock_timeout: float = 60.0) -> RequeueReport:
    """Make the unfinished work of earlier runs ready for the next run, and list it.

    A pickup dir's outstanding work is requeued by the next run's
    ``PersistentQueue.requeue_unprocessed_work()``; this consolidates it first: torn
    tails of dead writers are cut, a finished history is compacted away, and the
    journals of dead runs are merged into one snapshot journal (crash-safe, idempotent).
    Prefixes with a live writer are skipped.  ``dry_run`` only lists.  Raises
    :class:`~pympx_queues.errors.JournalCorruptError` when a journal is corrupt (run
    :func:`repair` first).
    """
    path = _abs(path)
    report = RequeueReport(path, dry_run, [], [], [], [], [], [])
    for pfx in _prefixes(path, prefix):
        if dry_run:
            history = jr.scan_dirs([path], pfx)
        else:
            history, actions = jr.compact(path, pfx, lock_timeout=lock_timeout)
            report.cut += actions["cut"]
            if actions["snapshot"]:
                report.snapshots.append(actions["snapshot"])
                report.merged += actions["deleted"]
            else:
                report.deleted += actions["deleted"]
        if any(r.live for r in history.runs.values()):
            report.skipped.append(pfx)
        report.outstanding += [OutstandingMessage(pfx, r.id, r.key, r.run, r.body)
                               for r in history.outstanding()]
    return report


def mark_done(path: "str | os.PathLike[str]", prefix: str, ids: Sequence[str], *,
              durability: str = _fs.FSYNC) -> List[str]:
    """Give up on messages: journal them as completed so no run requeues them again.

    Writes one new journal (its own run) with a ``D`` record per id that is outstanding;
    returns those ids.  Unknown or already completed ids are ignored.
    """
    path = _abs(path)
    prefix = jr.check_prefix(prefix)
    history = jr.scan_dirs([path], prefix)
    todo = [i for i in dict.fromkeys(ids) if i in {r.id for r in history.outstanding()}]
    if not todo:
        return []
    writer = jr.JournalWriter(path, prefix, jr.new_run_id(), durability=durability,
                              header={"admin": "mark_done"})
    try:
        writer.append([(jr.KIND_DONE, jr.dumps({"i": i})) for i in todo])
    finally:
        writer.close()
    log.warning("pickup %s/%s: %d message(s) marked done by hand", path, prefix, len(todo))
    return todo
