"""Library functions behind the folder-queue CLI commands (the CLI only parses and prints).

Every read function returns dataclasses with ``to_dict()`` (JSON-ready).  Nothing here
ever deletes a message: :func:`purge` is the one explicit exception and says so.

    status(path)                       -> FolderStatus
    list_messages(path, state)         -> [MessageInfo]
    show_message(path, name)           -> MessageInfo
    requeue_stale(path, dry_run=False, include_live=False, force=False) -> [str]
    retry_dead_letters(path, pattern=None, dry_run=False) -> [str]
    close_producer(path, producer_id, failed=False, reason=None, force=False) -> str
    reset(path, force=False)           -> ResetReport
    purge(path, force=False)           -> int
    verify(path, repair=False)         -> VerifyReport
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional

from .. import _fs
from ..errors import NotAQueueError
from . import layout as L
from .reader import ReadableFolderQueue

log = logging.getLogger("pympx_queues.folder_admin")

__all__ = [
    "FolderStatus", "ClaimInfo", "ProducerInfo", "MessageInfo", "VerifyReport", "Problem",
    "ResetReport", "status", "list_messages", "show_message", "requeue_stale",
    "retry_dead_letters", "close_producer", "reset", "purge", "verify", "is_folder_queue",
]

STATES = ("ready", "wip", "done", "failed")


class _Dict:
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclasses.dataclass
class ClaimInfo(_Dict):
    name: str  # original message name
    path: str
    host: str
    pid: int
    start_time: int
    age_seconds: float  # since the last heartbeat / claim
    live: Optional[bool]  # None: owner on another host and lease still running
    stale: bool


@dataclasses.dataclass
class ProducerInfo(_Dict):
    run: str
    producer: str
    host: str
    pid: int
    state: str  # "open", "closed" or "failed"
    alive: Optional[bool]  # None when it runs on another host
    run_ended: bool


@dataclasses.dataclass
class FolderStatus(_Dict):
    path: str
    kind: str
    message_extension: str
    ready: int
    wip_live: int
    wip_stale: int
    done: int
    dead_letters: int
    retries_pending: int
    temp_files: int
    claims: List[ClaimInfo]
    producers: List[ProducerInfo]
    ended_runs: List[str]
    #: acknowledged claims in trash/ that a consumer's deleter has not removed yet
    trash: int = 0


@dataclasses.dataclass
class MessageInfo(_Dict):
    name: str
    state: str  # ready, wip, done, failed
    path: str
    size: int
    attempts: int  # attempts already made (0: never returned)
    last_error: str
    owner: Optional[str] = None
    lease_age_seconds: Optional[float] = None
    live: Optional[bool] = None


@dataclasses.dataclass
class Problem(_Dict):
    kind: str
    path: str
    detail: str
    repaired: bool = False


@dataclasses.dataclass
class VerifyReport(_Dict):
    path: str
    problems: List[Problem]

    @property
    def ok(self) -> bool:
        return not [p for p in self.problems if not p.repaired]


@dataclasses.dataclass
class ResetReport(_Dict):
    requeued: List[str]
    control_removed: int
    temp_removed: List[str]


# --------------------------------------------------------------------------- helpers
def is_folder_queue(path: str) -> bool:
    """True when ``path`` looks like a folder queue (has ``wip/`` and ``control/``)."""
    return all(os.path.isdir(os.path.join(path, d)) for d in (L.WIP_DIR, L.CONTROL_DIR))


def _check(path: Any) -> str:
    p = os.path.abspath(os.fspath(path))
    if not os.path.isdir(p) or not is_folder_queue(p):
        raise NotAQueueError(f"{p} is not a folder queue (no wip/ and control/ inside)")
    return p


def _reader(path: str, message_extension: str, lease_timeout: float,
            **kwargs: Any) -> ReadableFolderQueue:
    """A consumer for administration: no wake-up watch, no recovery pass of its own."""
    return ReadableFolderQueue(path, message_extension, wakeups="poll",
                               recover_on_start=False, lease_timeout=lease_timeout, **kwargs)


def _regular(directory: str):
    if not os.path.isdir(directory):
        return
    for entry in _fs.scandir(directory):
        if _fs.entry_is_regular(entry):
            yield entry


def _read_json(path: str) -> Dict[str, Any]:
    try:
        data = json.loads(_fs.read_bytes(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _claims(p: str, lease_timeout: float) -> List[ClaimInfo]:
    out = []
    now = time.time()
    for entry in _regular(os.path.join(p, L.WIP_DIR)):
        parsed = L.parse_owned(entry.name)
        if parsed is None:
            continue
        st = _fs.lstat(entry.path)
        if st is None:
            continue
        age = now - max(st.st_mtime, st.st_ctime)
        alive = parsed.owner.alive()
        stale = parsed.owner.abandoned(entry.path, lease_timeout, now, st)
        out.append(ClaimInfo(parsed.name, entry.path, parsed.owner.host, parsed.owner.pid,
                             parsed.owner.start, round(age, 3), alive, stale))
    return sorted(out, key=lambda c: c.name)


def _ready_names(p: str, ext: str) -> List[str]:
    return sorted(e.name for e in _regular(p)
                  if e.name.endswith(ext) and L.valid_message_name(e.name))


def _dead_letter_names(p: str, ext: str) -> List[str]:
    d = os.path.join(p, L.FAILED_DIR)
    names = {e.name for e in _regular(d)}
    out = []
    for n in names:
        if not n.endswith(ext) or not L.valid_message_name(n):
            continue
        owner = L.parse_error_sidecar(n, ext)
        if owner is not None and owner in names:
            continue  # a sidecar (possible when the extension itself is .json)
        out.append(n)
    return sorted(out)


# --------------------------------------------------------------------------- read
def status(path: Any, message_extension: str = ".tsv",
           lease_timeout: float = 600.0) -> FolderStatus:
    """Counts by state, claims with owner and age, producers and how their runs ended."""
    p = _check(path)
    ext = L.normalise_extension(message_extension)
    claims = _claims(p, lease_timeout)
    producers: List[ProducerInfo] = []
    runs: Dict[str, Dict[str, set]] = {}
    ended = set()
    owners: Dict[str, L.Owner] = {}
    for entry in _regular(os.path.join(p, L.CONTROL_DIR)):
        c = L.parse_control(entry.name)
        if c is not None:
            runs.setdefault(c.run, {}).setdefault(c.producer.format(), set()).add(c.kind)
            owners[c.producer.format()] = c.producer
            continue
        r = L.parse_ended(entry.name)
        if r is not None:
            ended.add(r)
    for run in sorted(runs):
        for prod, kinds in sorted(runs[run].items()):
            state = "failed" if L.FAILED in kinds else "closed" if L.DONE in kinds else "open"
            o = owners[prod]
            producers.append(ProducerInfo(run, prod, o.host, o.pid, state, o.alive(),
                                          run in ended))
    done_dir = os.path.join(p, L.DONE_DIR)
    return FolderStatus(
        path=p, kind="folder-queue", message_extension=ext,
        ready=len(_ready_names(p, ext)),
        wip_live=sum(1 for c in claims if not c.stale),
        wip_stale=sum(1 for c in claims if c.stale),
        done=sum(1 for _ in _regular(done_dir)),
        dead_letters=len(_dead_letter_names(p, ext)),
        retries_pending=sum(1 for _ in _regular(os.path.join(p, L.RETRIES_DIR))),
        temp_files=sum(1 for _ in _regular(os.path.join(p, L.TMP_DIR))),
        trash=sum(1 for _ in _regular(os.path.join(p, L.TRASH_DIR))),
        claims=claims, producers=producers, ended_runs=sorted(ended),
    )


def _retry_info(p: str, name: str, st: Optional[os.stat_result]) -> Dict[str, Any]:
    data = _read_json(os.path.join(p, L.RETRIES_DIR, L.format_retry_sidecar(name)))
    if st is None or data.get("ino") != st.st_ino or data.get("dev") != st.st_dev:
        return {}
    return data


def list_messages(path: Any, state: str = "ready", message_extension: str = ".tsv",
                  lease_timeout: float = 600.0) -> List[MessageInfo]:
    """Messages in one state: ``ready``, ``wip``, ``done`` or ``failed`` (dead letters)."""
    return list(iter_messages(path, state, message_extension, lease_timeout))


def iter_messages(path: Any, state: str = "ready", message_extension: str = ".tsv",
                  lease_timeout: float = 600.0) -> Iterator[MessageInfo]:
    """:func:`list_messages` one at a time (the arguments and folder are checked first)."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    return _iter_messages(_check(path), state, L.normalise_extension(message_extension),
                          lease_timeout)


def _iter_messages(p: str, state: str, ext: str, lease_timeout: float
                   ) -> Iterator[MessageInfo]:
    if state == "ready":
        for n in _ready_names(p, ext):
            fp = os.path.join(p, n)
            st = _fs.lstat(fp)
            info = _retry_info(p, n, st)
            yield MessageInfo(n, "ready", fp, st.st_size if st else 0,
                              int(info.get("attempts", 0)), info.get("last_error", ""))
    elif state == "wip":
        for c in _claims(p, lease_timeout):
            st = _fs.lstat(c.path)
            info = _retry_info(p, c.name, st)
            yield MessageInfo(c.name, "wip", c.path, st.st_size if st else 0,
                              int(info.get("attempts", 0)), info.get("last_error", ""),
                              f"{c.host}:{c.pid}", c.age_seconds, c.live)
    elif state == "done":
        for e in sorted(_regular(os.path.join(p, L.DONE_DIR)), key=lambda e: e.name):
            st = _fs.lstat(e.path)
            yield MessageInfo(e.name, "done", e.path, st.st_size if st else 0, 0, "")
    else:
        d = os.path.join(p, L.FAILED_DIR)
        for n in _dead_letter_names(p, ext):
            fp = os.path.join(d, n)
            st = _fs.lstat(fp)
            err = _read_json(os.path.join(d, L.format_error_sidecar(n)))
            yield MessageInfo(n, "failed", fp, st.st_size if st else 0,
                              int(err.get("attempts", 0)), err.get("error", ""))


def show_message(path: Any, name: str, message_extension: str = ".tsv",
                 lease_timeout: float = 600.0) -> MessageInfo:
    """Find one message by name (or wip path) in any state; ``KeyError`` if absent."""
    base = os.path.basename(os.fspath(name))
    parsed = L.parse_owned(base)
    wanted = parsed.name if parsed else base
    for state in STATES:
        for m in list_messages(path, state, message_extension, lease_timeout):
            if m.name == wanted or os.path.basename(m.path) == base:
                return m
    raise KeyError(f"no message named {wanted!r} in {os.fspath(path)}")


# --------------------------------------------------------------------------- write
def requeue_stale(path: Any, dry_run: bool = False, include_live: bool = False,
                  force: bool = False, message_extension: str = ".tsv",
                  lease_timeout: float = 600.0) -> List[str]:
    """Return abandoned claims to the ready folder (what ``recover()`` does).

    ``include_live`` also takes claims whose owner is alive; it requires ``force=True``
    (that owner's ``task_done`` will then fail and the message is processed twice).
    With ``dry_run`` nothing moves: the names that would be requeued are returned.
    """
    if include_live and not force:
        raise ValueError("include_live requeues claims of running consumers: pass force=True")
    p = _check(path)
    if dry_run:
        return [c.name for c in _claims(p, lease_timeout) if c.stale or include_live]
    with _reader(p, message_extension, lease_timeout) as q:
        return q.recover(wait=True, include_live=include_live).requeued


def retry_dead_letters(path: Any, pattern: Optional[str] = None, dry_run: bool = False,
                       message_extension: str = ".tsv") -> List[str]:
    """Move dead letters (optionally only names matching a glob) back to ready."""
    p = _check(path)
    if dry_run:
        ext = L.normalise_extension(message_extension)
        return [n for n in _dead_letter_names(p, ext)
                if pattern is None or fnmatch.fnmatchcase(n, pattern)]
    with _reader(p, message_extension, 600.0) as q:
        return q.retry_failed(pattern)


def close_producer(path: Any, producer_id: str, failed: bool = False, reason: Any = None,
                   run_id: Optional[str] = None, force: bool = False) -> str:
    """Write DONE (or FAILED) for a producer that died without closing; returns the file.

    ``producer_id`` is the ``<host>_<pid>_<start>_<rid>`` part of its HELO file name
    (``status()`` lists them).  Refuses a producer still running on this host unless
    ``force``.  Raises ``KeyError`` if no such registered producer exists.
    """
    p = _check(path)
    ctrl = os.path.join(p, L.CONTROL_DIR)
    match = None
    for entry in _regular(ctrl):
        c = L.parse_control(entry.name)
        if c is not None and c.producer.format() == producer_id and c.kind == L.HELO \
                and (run_id is None or c.run == run_id):
            match = c
    if match is None:
        raise KeyError(f"no registered producer {producer_id!r} in {p}")
    if match.producer.alive() and not force:
        raise RuntimeError(f"producer {producer_id} is still running; pass force=True")
    kind = L.FAILED if failed else L.DONE
    name = L.format_control(kind, match.run, match.producer)
    payload = {"type": kind.lower(), "run": match.run, "producer": producer_id,
               "written_by": "pympx_queues.folder.admin.close_producer",
               "reason": "" if reason is None else str(reason), "time": time.time()}
    tmp = os.path.join(p, L.TMP_DIR,
                       L.format_owned(L.new_owner()._replace(boot=_fs.boot_id()), name))
    final = os.path.join(ctrl, name)
    try:
        _fs.publish_bytes(tmp, final, (json.dumps(payload, indent=2) + "\n").encode(),
                          durable=True)  # G1/G6: consumers can now end the stream
    except FileExistsError:
        pass
    return final


def _purge_control(q: Any, keep: set, force: bool = False) -> int:
    """Remove the control files of runs that are over; returns how many were removed.

    Without ``force`` only runs with an ENDED marker go (a consumer saw them end, or a
    newer producer superseded their FAILED): a run that is closed but still being drained
    keeps its HELO/DONE, or its consumers would never see DONE.  With ``force`` every
    control file goes except those of the producers in ``keep``.
    """
    entries = list(_regular(q._control))
    ended = {r for r in (L.parse_ended(e.name) for e in entries) if r}
    removed = 0
    for entry in entries:
        c = L.parse_control(entry.name)
        if c is not None:
            if c.producer.format() in keep:
                continue
            if not force and c.run not in ended:
                continue
        else:
            run = L.parse_ended(entry.name)
            if run is None:
                continue  # not ours (or the lock file): leave it
            if not force and any(
                    (pc := L.parse_control(e.name)) is not None and pc.run == run
                    and pc.producer.format() in keep for e in entries):
                continue  # keep the marker of a run we keep files of
        if _fs.unlink_quiet(entry.path):
            removed += 1
    return removed


def _requeue_claims(q: Any, include_live: bool = False) -> List[str]:
    with _reader(q.path, q.message_extension, q.lease_timeout, dir_mode=q.dir_mode,
                 file_mode=q.file_mode) as reader:
        return reader.recover(wait=True, include_live=include_live).requeued


def reset(path: Any, force: bool = False, message_extension: str = ".tsv",
          lease_timeout: float = 600.0) -> ResetReport:
    """pympx ``reset`` for an operator: requeue abandoned claims (live ones only with
    ``force``), remove the control files of runs that are over (runs with an ENDED
    marker; every control file with ``force``) and crashed producers' temp files.
    Safe while consumers drain a closed run.  Never deletes a message."""
    p = _check(path)
    with _reader(p, message_extension, lease_timeout) as q:
        rep = q.recover(wait=True, include_live=force)
        n = _purge_control(q, keep=set(), force=force)
        return ResetReport(rep.requeued, n, rep.temp_removed)


def purge(path: Any, force: bool = False, message_extension: str = ".tsv",
          lease_timeout: float = 600.0) -> int:
    """Delete every message and queue file: ready messages, ``wip/``, ``done/``,
    ``failed/``, ``retries/``, ``tmp/`` and ``control/`` (the one function that deletes
    messages, on purpose).  Folders stay; files without the message extension in the
    root and non-regular entries are left alone.  Raises ``RuntimeError`` while a live
    consumer holds a claim, unless ``force``.
    Returns the number of files deleted."""
    p = _check(path)
    ext = L.normalise_extension(message_extension)
    if not force:
        live = [c for c in _claims(p, lease_timeout) if not c.stale]
        if live:
            raise RuntimeError(f"{len(live)} live claim(s) in {p}; pass force=True to purge")
    n = 0
    for name in _ready_names(p, ext):
        n += _fs.unlink_quiet(os.path.join(p, name))
    for sub in L.SUBDIRS:
        for entry in list(_regular(os.path.join(p, sub))):
            if entry.name == L.LOCK_NAME:
                continue
            n += _fs.unlink_quiet(entry.path)
    log.info("purged %d file(s) from %s", n, p)
    return n


def _has_control_character(name: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 or 0xDC80 <= ord(c) <= 0xDCFF for c in name)


def _escaped(path: str) -> str:
    """``path`` with control characters (and undecodable bytes) shown as escapes."""
    return "".join(repr(c)[1:-1] if _has_control_character(c) else c for c in path)


def verify(path: Any, repair: bool = False, message_extension: str = ".tsv",
           lease_timeout: float = 600.0) -> VerifyReport:
    """Check a folder queue's consistency; with ``repair`` fix what is safe to fix.

    Finds: temp files of crashed producers (repair: removed; they were never published),
    retry sidecars with no message (repair: removed), error sidecars with no dead letter
    (repair: removed), unparseable names in ``wip/``/``tmp/``/``control/``, symlinks and
    FIFOs anywhere, stale claims (repair: requeued).  Never deletes a message.
    """
    p = _check(path)
    ext = L.normalise_extension(message_extension)
    problems: List[Problem] = []
    dirs = [p] + [os.path.join(p, s) for s in L.SUBDIRS]
    for d in dirs:
        if not os.path.isdir(d):
            problems.append(Problem("missing-folder", d, "queue sub-folder missing"))
            if repair:
                _fs.makedirs(d)
                problems[-1].repaired = True
            continue
        for entry in _fs.scandir(d):
            if _has_control_character(entry.name):  # no reader ever sees it: say so
                problems.append(Problem("bad-name", _escaped(entry.path), "name contains a "
                                        "control character: never seen as a message"))
                continue
            if entry.is_dir(follow_symlinks=False) or _fs.entry_is_regular(entry):
                continue
            if _fs.is_litter(entry.name):
                continue
            problems.append(Problem("non-regular", entry.path,
                                    "symlink, FIFO or device: never claimed, left alone"))
    # claims
    for c in _claims(p, lease_timeout):
        if c.stale:
            problems.append(Problem("stale-claim", c.path,
                                    f"owner {c.host}:{c.pid} gone or lease expired"))
    for entry in _regular(os.path.join(p, L.WIP_DIR)):
        if L.parse_owned(entry.name) is None and not _fs.is_litter(entry.name):
            problems.append(Problem("unparseable-claim", entry.path,
                                    "not a wip name of ours; left alone"))
    # temp files
    for entry in _regular(os.path.join(p, L.TMP_DIR)):
        parsed = L.parse_owned(entry.name)
        if parsed is None:
            if not _fs.is_litter(entry.name):
                problems.append(Problem("unknown-temp", entry.path, "not ours; left alone"))
            continue
        if not parsed.owner.abandoned(entry.path, lease_timeout, time.time()):
            continue
        problems.append(Problem("leftover-temp", entry.path,
                                "partial write of a crashed producer (never published)"))
        if repair:
            _fs.unlink_quiet(entry.path)
            problems[-1].repaired = True
    # orphaned sidecars
    wip_names = {c.name for c in _claims(p, lease_timeout)}
    rdir = os.path.join(p, L.RETRIES_DIR)
    for entry in _regular(rdir):
        n = L.parse_retry_sidecar(entry.name)
        if n is None:
            if not _fs.is_litter(entry.name):
                problems.append(Problem("unknown-file", entry.path, "not ours; left alone"))
            continue
        if _fs.lstat(os.path.join(p, n)) is not None or n in wip_names:
            continue
        if n in {c.name for c in _claims(p, lease_timeout)} or \
                _fs.lstat(os.path.join(p, n)) is not None:
            continue  # moved while we looked
        problems.append(Problem("orphaned-retry-sidecar", entry.path,
                                "retry count of a message that is no longer waiting"))
        if repair:
            _fs.unlink_quiet(entry.path)
            problems[-1].repaired = True
    fdir = os.path.join(p, L.FAILED_DIR)
    failed_names = {e.name for e in _regular(fdir)}
    for n in sorted(failed_names):
        owner = L.parse_error_sidecar(n, ext)
        if owner is None or owner in failed_names:
            continue
        if n.endswith(ext) and ext.endswith(".json"):
            continue  # could be a dead letter itself when the extension is .json
        problems.append(Problem("orphaned-error-sidecar", os.path.join(fdir, n),
                                "error text of a dead letter that is gone"))
        if repair:
            _fs.unlink_quiet(os.path.join(fdir, n))
            problems[-1].repaired = True
    for entry in _regular(os.path.join(p, L.CONTROL_DIR)):
        if entry.name == L.LOCK_NAME or _fs.is_litter(entry.name):
            continue
        if L.parse_control(entry.name) is None and L.parse_ended(entry.name) is None:
            problems.append(Problem("unknown-control-file", entry.path, "ignored by consumers"))
    if repair and any(pr.kind == "stale-claim" for pr in problems):
        requeue_stale(p, message_extension=message_extension, lease_timeout=lease_timeout)
        for pr in problems:
            if pr.kind == "stale-claim":
                pr.repaired = True
    return VerifyReport(p, problems)
