#!/usr/bin/env python3
"""Torture the queues with the failures they promise to survive (DESIGN.md G1..G6).

One script, five modes, each run by real tools that really produce the failure::

    python scripts/torture.py --mode kill        --queue both --size 200 --seed 1
    python scripts/torture.py --mode powercut    --queue both --size 20  --seed 1   # root, Linux
    python scripts/torture.py --mode enospc      --queue both --size 200 --seed 1   # root, Linux
    python scripts/torture.py --mode crashstates --queue both --size 12  --seed 1

* ``kill``: producer and consumer processes, SIGKILL at random moments, many iterations,
  then recovery and a full check against what every process had been told.  Workers log
  each acknowledged put / get / task_done to their own side file *after* the call returned
  (flushed), so the checker knows exactly what was acknowledged.
* ``powercut``: a loop-mounted ext4 image, workers in fsync mode (then in flush mode),
  ``EXT4_IOC_SHUTDOWN`` with ``EXT4_GOING_FLAGS_NOLOGFLUSH`` mid-write (the file system
  stops as if the power went: the journal is not flushed), umount, remount, recover,
  check.  Acknowledgements travel through a pipe to the parent, outside the image.
* ``enospc``: a tiny tmpfs fills up mid-run; every failed put must raise, nothing
  half-written may be visible, and once space is freed the queue goes on and loses
  nothing acknowledged.
* ``crashstates``: record every durable file-system operation of a short workload through
  the ``pympx_queues._fs`` tracer, enumerate the states a crash could leave, materialise
  each in a fresh directory, run recovery (twice, and crashed in the middle), and check
  the guarantees in every state.  Persistence models: ``fsync`` mode is checked against a
  weak power-loss model (un-synced file data lost or torn, un-synced directory operations
  lost or reordered; ``fsync(file)`` and ``fsync(dir)`` are the only barriers; a rename is
  atomic); ``flush`` mode against a process crash after every single operation.

* ``pipeline``: a durable 3-stage pipeline (thread -> process -> async sink) whose
  coordinator is killed with SIGKILL ``--size`` times at random points of its work, then
  run to the end on the same journal (DESIGN.md P1..P3); the rounds and checks are the
  engine's ``pympx_queues.pipeline._torture.kill_rounds``: lost (not done in the
  journal), not_stored (never reached the sink), finished_stage_rerun, done_rerun,
  sink_dup (figure) and sink_dup_beyond_inflight (beyond the sink's workers per kill),
  orphan_workers (worker processes alive after their coordinator was killed).
* ``map``: a durable ``batch_map`` (4 threads, 400 calls, some failing, a journaled
  switch that does not trip) killed with SIGKILL ``--size`` times at random points,
  then run to the end over the same input (issue 12); the rounds and checks are
  ``pympx_queues.pipeline._torture_map.kill_rounds``: lost (a position without its
  result or failure), wrong (a result unlike an uninterrupted run's), done_rerun (a call
  whose position the journal had ended), rerun_beyond_inflight (calls run twice beyond
  the 4 in flight per kill).

Every run ends with one summary line per queue kind::

    mode=kill queue=folder iterations=200 acked=... lost=0 corrupt=0 redelivered_done=0 dup_beyond_inflight=0

Exit status: 0 all counts (other than acked / iterations / states / figures) are zero;
1 a guarantee was violated; 2 usage error; 0 with ``skipped=<reason>`` in the summary
when the mode cannot run here (not root, no loop devices, mount refused).

Counts that must be zero: lost, corrupt, redelivered_done, dup_beyond_inflight,
unrecoverable, not_idempotent, half_written_visible, failed_after_free, errors,
worker_errors, and for pipelines not_stored, finished_stage_rerun, done_rerun,
sink_dup_beyond_inflight, orphan_workers.  Figures: acked, delivered, acked_done, iterations, states,
recovery_states, processes_killed, puts_refused, acks_during_cut, and in flush mode after
a power cut lost_unsynced / redelivered_unsynced / dup_unsynced (allowed: flush mode does
not promise to survive power loss) and, for folder queues only, corrupt_unsynced (a
message published just before the power went may come back empty or zero-filled: a
folder queue cannot checksum user files; only fsync mode keeps G2 across power loss).  Mount points and images live under a temp dir and
are always unmounted.  Debugging: ``-v`` prints example violations, ``TORTURE_DEBUG=1``
lost ids and unreadable messages, ``TORTURE_KEEP=<dir>`` keeps the pre-recovery tree of a
bad power-cut iteration.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import hashlib
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from pympx_queues import _fs  # noqa: E402

import logging  # noqa: E402


def _quiet_library_logs() -> None:
    """Recovery logs every torn tail it cuts: thousands of crash states would flood
    stderr.  Called by the script and its worker processes only, never on import (tests
    import this module and must keep the library's logging as it is)."""
    lib = logging.getLogger("pympx_queues")
    lib.addHandler(logging.NullHandler())
    lib.propagate = False

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = 0, 1, 2

#: Counts that must stay zero (anything else in a summary is a figure).
VIOLATION_KEYS = (
    "lost", "corrupt", "redelivered_done", "dup_beyond_inflight", "unrecoverable",
    "not_idempotent", "put_error_silent", "half_written_visible", "errors", "worker_errors",
    "failed_after_free", "finished_stage_rerun", "done_rerun", "sink_dup_beyond_inflight",
    "orphan_workers", "not_stored", "wrong", "rerun_beyond_inflight",
)


# =========================================================================== messages
def make_payload(mid: str, size: int = 0) -> bytes:
    """Message bytes that carry their own id and checksum (a torn copy never validates)."""
    body = mid.encode()
    pad = b"x" * max(0, size - len(body) - 20)
    core = body + b"\t" + pad
    return core + b"\t" + format(zlib.crc32(core), "08x").encode() + b"\n"


def parse_payload(data: bytes) -> Optional[str]:
    """The message id in ``data``, or None when it is torn, empty or not ours."""
    if not data.endswith(b"\n"):
        return None
    try:
        core, crc = data[:-1].rsplit(b"\t", 1)
        if format(zlib.crc32(core), "08x").encode() != crc:
            return None
        return core.split(b"\t", 1)[0].decode()
    except (ValueError, UnicodeDecodeError):
        return None


class Summary(collections.OrderedDict):
    """Ordered counters printed as ``key=value`` on one line."""

    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n

    def violations(self) -> int:
        return sum(int(self.get(k, 0)) for k in VIOLATION_KEYS)

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.items())


def new_summary(mode: str, queue: str, **figures: Any) -> Summary:
    s = Summary()
    s["mode"] = mode
    s["queue"] = queue
    for k, v in figures.items():
        s[k] = v
    return s


# =========================================================================== checking
class Ledger:
    """What the queue told its users: begun and acknowledged puts and task_dones."""

    def __init__(self) -> None:
        self.begun_put: set = set()
        self.acked_put: set = set()
        self.begun_done: set = set()
        self.acked_done: set = set()

    def apply(self, kind: str, mid: str) -> None:
        getattr(self, kind).add(mid)

    def copy(self) -> "Ledger":
        c = Ledger()
        for k in ("begun_put", "acked_put", "begun_done", "acked_done"):
            setattr(c, k, set(getattr(self, k)))
        return c


def check_outstanding(ledger: Ledger, outstanding: "collections.Counter[str]", corrupt: int,
                      summary: Summary, *, may_lose: bool = False) -> Dict[str, int]:
    """Compare recovered outstanding work with the ledger; add violations to ``summary``.

    * lost: acknowledged put, never task_done (not even begun), not outstanding (G1).
    * redelivered_done: acknowledged task_done but outstanding again (G4).
    * dup_beyond_inflight: a message outstanding twice (G3).
    * corrupt: unreadable message, or one that was never put (G2).
    """
    found: Dict[str, int] = {}
    lost = [m for m in ledger.acked_put
            if m not in ledger.begun_done and outstanding.get(m, 0) == 0]
    found["lost_unsynced" if may_lose else "lost"] = len(lost)
    found["redelivered_done"] = sum(1 for m in ledger.acked_done if outstanding.get(m, 0))
    found["dup_beyond_inflight"] = sum(c - 1 for c in outstanding.values() if c > 1)
    found["corrupt"] = corrupt + sum(1 for m in outstanding if m not in ledger.begun_put)
    for k, v in found.items():
        summary.add(k, v)
    return found


# =========================================================================== crash states
DIR = "D"  # directory entries are stored as this marker instead of a file id


class FsRecorder:
    """A ``_fs`` tracer that snapshots the tree under ``root`` after every durable op.

    Each event keeps the directory-entry changes and file-content changes since the
    previous event, and the barrier it represents (``fsync`` of a file, ``fsync_dir``).
    Files are identified by inode (a virtual id, retired when the inode disappears), so
    hard links and renames are followed exactly.  Writes that bypass ``_fs`` are still
    captured: their bytes show up in the next snapshot.
    """

    def __init__(self, root: str) -> None:
        import threading

        self.root = os.path.abspath(root)
        # Queues have background threads that touch the file system (a folder consumer's
        # trash deleter): trace calls from several threads are serialised, so every event
        # is one consistent snapshot taken after its operation.
        self._lock = threading.RLock()
        self.events: List[dict] = []
        self._ino2vid: Dict[int, int] = {}
        self._next_vid = 0
        self._meta: Dict[int, tuple] = {}
        self.content: Dict[int, bytes] = {}
        self.dirs, _ = self._walk()
        self.initial_dirs = {d: dict(e) for d, e in self.dirs.items()}
        self.initial_content = dict(self.content)

    # -- snapshot ----------------------------------------------------------------------
    def _vid(self, ino: int) -> int:
        vid = self._ino2vid.get(ino)
        if vid is None:
            vid = self._ino2vid[ino] = self._next_vid
            self._next_vid += 1
        return vid

    def _walk(self) -> Tuple[Dict[str, Dict[str, Any]], Dict[int, bytes]]:
        dirs: Dict[str, Dict[str, Any]] = {}
        seen: Dict[int, int] = {}
        changed: Dict[int, bytes] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            entries: Dict[str, Any] = {}
            dirs[rel] = entries
            try:
                it = list(os.scandir(os.path.join(self.root, rel)))
            except FileNotFoundError:
                continue
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                child = os.path.join(rel, e.name) if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    entries[e.name] = DIR
                    stack.append(child)
                elif e.is_file(follow_symlinks=False):
                    vid = self._vid(st.st_ino)
                    seen[st.st_ino] = vid
                    entries[e.name] = vid
                    meta = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if self._meta.get(vid) != meta:
                        try:
                            with open(e.path, "rb") as f:
                                data = f.read()
                        except OSError:
                            data = b""
                        self._meta[vid] = meta
                        if self.content.get(vid) != data:
                            self.content[vid] = data
                            changed[vid] = data
        for ino in list(self._ino2vid):
            if ino not in seen:  # unlinked: a reused inode number is a new file
                del self._ino2vid[ino]
        return dirs, changed

    # -- tracer ------------------------------------------------------------------------
    def _inside(self, path: object) -> bool:
        if not isinstance(path, str) or not path:
            return False
        p = os.path.abspath(path)
        return p == self.root or p.startswith(self.root + os.sep)

    def __call__(self, op: str, *args: Any) -> None:
        with self._lock:
            self._record(op, *args)

    def _record(self, op: str, *args: Any) -> None:
        paths = [a for a in args if isinstance(a, str)]
        if not any(self._inside(p) for p in paths) and op != "fsync":
            return
        barrier_vid = None
        if op == "fsync":
            fd = args[1] if len(args) > 1 and isinstance(args[1], int) else None
            if fd is None:
                if not self._inside(args[0] if args else ""):
                    return
                try:
                    ino = os.lstat(args[0]).st_ino
                except OSError:
                    return
            else:
                ino = os.fstat(fd).st_ino
        old_dirs = self.dirs
        self.dirs, changed = self._walk()
        if op == "fsync":
            if ino not in self._ino2vid:
                return  # not a file of ours
            barrier_vid = self._ino2vid[ino]
        changes = []
        for d in set(old_dirs) | set(self.dirs):
            a, b = old_dirs.get(d, {}), self.dirs.get(d, {})
            for name in set(a) | set(b):
                if a.get(name) != b.get(name):
                    changes.append((d, name, b.get(name)))
        barrier_dir = None
        if op == "fsync_dir":
            barrier_dir = os.path.relpath(os.path.abspath(args[0]), self.root)
            barrier_dir = "" if barrier_dir == "." else barrier_dir
        self.events.append({"op": op, "args": [a for a in args if isinstance(a, (str, int))],
                            "changes": changes, "content": changed,
                            "barrier_vid": barrier_vid, "barrier_dir": barrier_dir})

    def mark(self, kind: str, mid: str) -> None:
        """Record that the workload began / was acknowledged an operation on ``mid``."""
        with self._lock:
            self.events.append({"op": "mark", "kind": kind, "mid": mid})

    def dump(self) -> dict:
        with self._lock:
            return {"initial_dirs": self.initial_dirs,
                    "initial_content": self.initial_content, "events": list(self.events)}

    def __getstate__(self) -> dict:  # pickled between workload phases
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        import threading

        self.__dict__.update(state)
        self._lock = threading.RLock()


def _apply_changes(dirs: Dict[str, Dict[str, Any]], changes: Iterable[tuple]) -> None:
    for d, name, new in changes:
        entries = dirs.setdefault(d, {})
        if new is None:
            entries.pop(name, None)
        else:
            entries[name] = new


def _touches(ev: dict) -> set:
    return {d for d, _n, _v in ev["changes"]}


class CrashState:
    __slots__ = ("dirs", "content", "label")

    def __init__(self, dirs: Dict[str, Dict[str, Any]], content: Dict[int, bytes],
                 label: str) -> None:
        self.dirs = dirs
        self.content = content
        self.label = label

    def reachable(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        stack = [""]
        while stack:
            d = stack.pop()
            entries = self.dirs.get(d, {})
            out[d] = entries
            for name, v in entries.items():
                if v == DIR:
                    stack.append(os.path.join(d, name) if d else name)
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for d, entries in sorted(self.reachable().items()):
            for name, v in sorted(entries.items(), key=lambda kv: kv[0]):
                h.update(f"{d}/{name}=".encode())
                if v == DIR:
                    h.update(b"<dir>")
                else:
                    h.update(str(v).encode() + b":" + hashlib.sha1(self.content.get(v, b"")).digest())
                h.update(b"\0")
        return h.hexdigest()

    def materialise(self, dest: str) -> None:
        """Write this state as a real tree at ``dest`` (hard links kept as links)."""
        first: Dict[int, str] = {}
        for d, entries in sorted(self.reachable().items(), key=lambda kv: kv[0].count(os.sep)):
            base = os.path.join(dest, d) if d else dest
            os.makedirs(base, mode=0o700, exist_ok=True)
            for name, v in sorted(entries.items()):
                p = os.path.join(base, name)
                if v == DIR:
                    os.makedirs(p, mode=0o700, exist_ok=True)
                elif v in first:
                    os.link(first[v], p)
                else:
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.write(fd, self.content.get(v, b""))
                    finally:
                        os.close(fd)
                    first[v] = p


def enumerate_crash_states(trace: dict, *, weak: bool, rng: random.Random,
                           max_full: int = 5, samples: int = 8
                           ) -> Iterable[Tuple[int, Ledger, CrashState]]:
    """Yield ``(crash_point, ledger_at_that_point, state)`` for every crash point.

    ``weak=False`` (process crash): everything done before the crash point persisted.
    ``weak=True`` (power loss): durable = initial tree + directory operations synced by a
    later ``fsync_dir`` of a directory they touch (and, with them, every earlier pending
    operation on the same directories) + file data synced by ``fsync``.  On top of that,
    subsets of the pending directory operations (all subsets when at most ``max_full``
    are pending; otherwise every in-order prefix, every single drop, and ``samples``
    random subsets) and per-file data variants: all un-synced data persisted, all lost,
    and for each file with un-synced data a torn tail (half the new bytes) or a zero-filled
    tail (size updated, data not).
    """
    base = {d: dict(e) for d, e in trace["initial_dirs"].items()}
    live = {d: dict(e) for d, e in trace["initial_dirs"].items()}
    synced: Dict[int, bytes] = dict(trace["initial_content"])
    current: Dict[int, bytes] = dict(trace["initial_content"])
    pending: List[dict] = []
    ledger = Ledger()
    events = trace["events"]
    for k, ev in enumerate(events):
        if ev["op"] == "mark":
            ledger.apply(ev["kind"], ev["mid"])
            if k + 1 < len(events) and events[k + 1]["op"] == "mark":
                continue  # same file-system state: check once, with the most marks
        else:
            _apply_changes(live, ev["changes"])
            current.update(ev["content"])
            if ev["changes"]:
                pending.append(ev)
            if ev["barrier_vid"] is not None:
                synced[ev["barrier_vid"]] = current.get(ev["barrier_vid"], b"")
            if ev["barrier_dir"] is not None:
                touched = {ev["barrier_dir"]}
                flushed = []
                # Closure: an op is flushed with its directory; earlier pending ops on the
                # same directories go with it (a journal commits in order).
                for p in reversed(pending):
                    if _touches(p) & touched:
                        flushed.append(p)
                        touched |= _touches(p)
                flushed_ids = {id(p) for p in flushed}
                for p in pending:
                    if id(p) in flushed_ids:
                        _apply_changes(base, p["changes"])
                pending = [p for p in pending if id(p) not in flushed_ids]
        snap = ledger.copy()
        if not weak:
            yield k, snap, CrashState({d: dict(e) for d, e in live.items()}, dict(current),
                                      f"after op {k} ({ev['op']})")
            continue
        for subset_label, subset in _pending_subsets(pending, rng, max_full, samples):
            dirs = {d: dict(e) for d, e in base.items()}
            for p in subset:
                _apply_changes(dirs, p["changes"])
            vids = {v for e in dirs.values() for v in e.values() if v != DIR}
            unsynced = sorted(v for v in vids if current.get(v, b"") != synced.get(v, b""))
            all_cur = {v: current.get(v, b"") for v in vids}
            all_syn = {v: synced.get(v, b"") for v in vids}
            yield k, snap, CrashState(dirs, all_cur, f"op {k} {subset_label} data=all")
            if not unsynced:
                continue
            yield k, snap, CrashState(dirs, all_syn, f"op {k} {subset_label} data=synced")
            if subset_label not in ("none", "all"):
                continue
            for v in unsynced:
                old, new = synced.get(v, b""), current.get(v, b"")
                if new.startswith(old) and len(new) > len(old):
                    delta = new[len(old):]
                    for tag, tail in (("torn", delta[: max(1, len(delta) // 2)]),
                                      ("zeros", b"\0" * len(delta))):
                        c = dict(all_cur)
                        c[v] = old + tail
                        yield k, snap, CrashState(dirs, c, f"op {k} {subset_label} {tag}={v}")
                else:  # truncated or rewritten: either version may have survived
                    c = dict(all_cur)
                    c[v] = old
                    yield k, snap, CrashState(dirs, c, f"op {k} {subset_label} old={v}")


def _pending_subsets(pending: List[dict], rng: random.Random, max_full: int, samples: int):
    n = len(pending)
    yield "none", []
    if n == 0:
        return
    yield "all", list(pending)
    if n <= max_full:
        for mask in range(1, (1 << n) - 1):
            yield f"mask={mask}", [p for i, p in enumerate(pending) if mask >> i & 1]
        return
    for j in range(1, n):
        yield f"prefix={j}", pending[:j]
    for i in range(n):
        yield f"drop={i}", pending[:i] + pending[i + 1:]
    for s in range(samples):
        mask = rng.getrandbits(n)
        yield f"sample={s}", [p for i, p in enumerate(pending) if mask >> i & 1]


# =========================================================================== acknowledgement logs
class AckLog:
    """Where a worker records what the queue acknowledged, *after* the call returned.

    ``path``: a side file opened ``O_APPEND``; each record is one ``write(2)``, so it is
    in the kernel (and survives SIGKILL of the worker) before the next queue call.
    ``conn``: a one-way pipe to the parent (powercut mode: the acks must live outside the
    file system that loses power); one small write per record, atomic under PIPE_BUF.
    Records: ``<monotonic_ns> <pid> <kind> <mid>``; kinds P (put acknowledged), G (got),
    N (nack acknowledged), D (task_done acknowledged), C (corrupt message received),
    E (a put raised, as it must when it failed).
    """

    def __init__(self, path: Optional[str] = None, conn: Any = None) -> None:
        self.conn = conn
        self.fd = (os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                   if path else None)
        self.pid = os.getpid()

    def log(self, kind: str, mid: str) -> None:
        line = f"{time.monotonic_ns()} {self.pid} {kind} {mid}\n".encode()
        if self.fd is not None:
            os.write(self.fd, line)
        if self.conn is not None:
            self.conn.send_bytes(line)


class AckEvent(tuple):
    __slots__ = ()

    t = property(lambda self: self[0])
    pid = property(lambda self: self[1])
    kind = property(lambda self: self[2])
    mid = property(lambda self: self[3])


def parse_ack_lines(data: bytes) -> List[AckEvent]:
    out = []
    for line in data.split(b"\n"):
        parts = line.decode("utf-8", "replace").split(" ", 3)
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            out.append(AckEvent((int(parts[0]), int(parts[1]), parts[2], parts[3])))
    return out


def read_ack_dir(directory: str) -> List[AckEvent]:
    events: List[AckEvent] = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".err"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            events.extend(parse_ack_lines(f.read()))
    events.sort()
    return events


def check_deliveries(events: List[AckEvent], killed: set, completed_evidence: set,
                     final: List[Optional[str]], summary: Summary, *,
                     may_lose_unsynced: bool = False) -> None:
    """The full check of a kill / powercut / enospc run against what workers were told.

    ``events``: every acknowledgement, time-ordered.  ``killed``: pids that were SIGKILLed
    (their in-flight messages may legitimately come back).  ``completed_evidence``: ids the
    queue's own durable state shows as completed (done folder, journal D records): a
    task_done that returned just before a kill, so its D line was never written.
    ``final``: ids delivered by the final recovery + drain (None for an unreadable one).

    * lost: acknowledged put that is neither completed nor delivered at the end (G1).
    * redelivered_done: delivered after its task_done was acknowledged (G4).
    * dup_beyond_inflight: delivered again while an earlier delivery was not in flight
      at a crash (its consumer was not killed, or had acked it) (G3).
    * corrupt: a consumer received bytes that are not a whole message (G2).
    """
    acked = {e.mid for e in events if e.kind == "P"}
    done_t: Dict[str, int] = {}
    deliveries: Dict[str, List[AckEvent]] = collections.defaultdict(list)
    closed: Dict[Tuple[int, str], int] = {}  # (pid, mid) -> how many D/N acks
    corrupt = 0
    end = max((e.t for e in events), default=0) + 1
    for e in events:
        if e.kind == "D":
            done_t.setdefault(e.mid, e.t)
            closed[(e.pid, e.mid)] = closed.get((e.pid, e.mid), 0) + 1
        elif e.kind == "N":
            closed[(e.pid, e.mid)] = closed.get((e.pid, e.mid), 0) + 1
        elif e.kind == "G":
            deliveries[e.mid].append(e)
        elif e.kind == "C":
            corrupt += 1
    for mid in final:
        if mid is None:
            corrupt += 1
        else:
            deliveries[mid].append(AckEvent((end, 0, "G", mid)))
    redelivered = 0
    dups = 0
    for mid, ds in deliveries.items():
        t_done = done_t.get(mid)
        if t_done is not None:
            redelivered += sum(1 for d in ds if d.t > t_done)
        if mid in completed_evidence:
            redelivered += sum(1 for d in ds if d.t == end)
        # every delivery but the last must have ended in a crash or a nack
        used: Dict[Tuple[int, str], int] = {}
        for d in ds[:-1]:
            k = (d.pid, mid)
            if closed.get(k, 0) > used.get(k, 0):
                used[k] = used.get(k, 0) + 1  # nacked (or acked: counted above)
                continue
            if d.pid in killed:
                continue  # in flight when its consumer was killed
            dups += 1
    delivered_final = {m for m in final if m is not None}
    lost_ids = [m for m in acked if m not in done_t and m not in completed_evidence
                and m not in delivered_final]
    summary.add("acked", len(acked))
    summary.add("delivered", sum(len(ds) for ds in deliveries.values()))
    summary.add("acked_done", len(done_t))
    summary.add("lost_unsynced" if may_lose_unsynced else "lost", len(lost_ids))
    summary.add("corrupt", corrupt)
    summary.add("redelivered_done", redelivered)
    summary.add("dup_beyond_inflight", dups)
    if lost_ids and os.environ.get("TORTURE_DEBUG"):
        print(f"  lost ids: {sorted(lost_ids)[:20]}", file=sys.stderr)


# =========================================================================== mounts
class Skip(Exception):
    """The mode cannot run on this machine (reported as ``skipped=<reason>``)."""


def _run(cmd: List[str]) -> None:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")


def _need_root(what: str) -> None:
    if not sys.platform.startswith("linux"):
        raise Skip(f"{what}-needs-linux")
    if os.geteuid() != 0:
        raise Skip(f"{what}-needs-root")


@contextlib.contextmanager
def tmpfs_mount(size_bytes: int):
    """Mount a tmpfs of ``size_bytes`` under a temp dir; always unmounted afterwards."""
    _need_root("tmpfs")
    base = tempfile.mkdtemp(prefix="pqt-tmpfs-")
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    try:
        try:
            _run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", mnt])
        except OSError as exc:
            raise Skip(f"tmpfs-mount-refused({str(exc).split(':')[-1].strip()[:60]})")
        try:
            yield mnt
        finally:
            _umount(mnt)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _umount(mnt: str) -> None:
    for _attempt in range(40):  # a killed worker's open files close a moment later
        res = subprocess.run(["umount", mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if res.returncode == 0 or not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Ext4Image:
    """A loop-mounted ext4 image: mount, power-cut (EXT4_IOC_SHUTDOWN), umount, remount."""

    EXT4_IOC_SHUTDOWN = 0x8004587D
    EXT4_GOING_FLAGS_NOLOGFLUSH = 2  # stop now: do not even flush the journal

    def __init__(self, base: str, size_mb: int = 128) -> None:
        self.img = os.path.join(base, "disk.img")
        self.mnt = os.path.join(base, "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.img, "wb") as f:
            f.truncate(size_mb << 20)
        try:
            _run(["mkfs.ext4", "-q", "-F", self.img])
        except OSError as exc:
            raise Skip(f"mkfs.ext4-failed({str(exc)[-60:]})")
        self.mounted = False

    def mount(self) -> None:
        try:
            _run(["mount", "-o", "loop", self.img, self.mnt])
        except OSError as exc:
            raise Skip(f"loop-mount-refused({str(exc).split(':')[-1].strip()[:60]})")
        self.mounted = True

    def power_cut(self) -> None:
        import fcntl
        import struct

        fd = os.open(self.mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, self.EXT4_IOC_SHUTDOWN,
                        struct.pack("I", self.EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def umount(self) -> None:
        if self.mounted:
            _umount(self.mnt)
            self.mounted = False


@contextlib.contextmanager
def ext4_image(size_mb: int = 128):
    _need_root("loop")
    base = tempfile.mkdtemp(prefix="pqt-ext4-")
    image = None
    try:
        image = Ext4Image(base, size_mb)
        image.mount()
        yield image
    finally:
        if image is not None:
            image.umount()
        shutil.rmtree(base, ignore_errors=True)


# =========================================================================== processes
def _spawn(target: Callable[..., None], *args: Any):
    import multiprocessing

    p = multiprocessing.get_context(START_METHOD).Process(target=target, args=args)
    p.start()
    return p


START_METHOD = "spawn"


def _sigkill(p: Any) -> None:
    if p.is_alive():
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.join(10)


# =========================================================================== adapters
class Outcome:
    """What recovery found: outstanding message ids (with counts) and corrupt ones."""

    def __init__(self, outstanding: "collections.Counter[str]", corrupt: int = 0,
                 error: Optional[str] = None) -> None:
        self.outstanding = outstanding
        self.corrupt = corrupt
        self.error = error


class Adapter:
    """How torture.py drives one queue kind.  Subclasses fill in the queue calls."""

    name = "?"
    #: crash-state workload phases, each in its own process (a crash between phases)
    phases = 1

    def available(self) -> Optional[str]:
        """None if the queue kind can be imported, else the reason it cannot."""
        return None

    # crash-state workload (runs in a child process, tracer installed by the caller)
    def crash_workload(self, root: str, durability: str, rec: FsRecorder, n: int,
                       rng: random.Random, phase: int) -> None:
        raise NotImplementedError

    def prepare(self, root: str, durability: str) -> None:
        """Create the empty queue at ``root`` before tracing starts."""
        raise NotImplementedError

    def recover_and_list(self, root: str, durability: str) -> Outcome:
        """Run recovery on the tree at ``root`` and list outstanding work."""
        raise NotImplementedError


# -- a toy folder queue built straight on _fs: proves the simulator has teeth ---------
class ToyAdapter(Adapter):
    """A 40-line folder queue on ``_fs`` primitives; ``buggy=True`` skips the dir fsyncs.

    The correct toy must pass every crash state; the buggy one must be caught (the
    self-test of the simulator, ``--queue toy`` / ``--queue toy-buggy``).
    """

    def __init__(self, buggy: bool = False) -> None:
        self.buggy = buggy
        self.name = "toy-buggy" if buggy else "toy"

    def prepare(self, root: str, durability: str) -> None:
        for sub in ("", "tmp", "wip"):
            _fs.makedirs(os.path.join(root, sub))

    def _sync_dir(self, path: str, durability: str) -> None:
        if durability == _fs.FSYNC and not self.buggy:
            _fs.fsync_dir(path)

    def crash_workload(self, root, durability, rec, n, rng, phase):
        durable = durability == _fs.FSYNC
        ready: List[str] = []
        claimed: List[Tuple[str, str]] = []
        for i in range(n):
            mid = f"m{i:04d}"
            rec.mark("begun_put", mid)
            tmp = os.path.join(root, "tmp", mid)
            _fs.write_new(tmp, make_payload(mid), durable=durable and not self.buggy)
            _fs.rename_noreplace(tmp, os.path.join(root, mid + ".msg"))
            self._sync_dir(root, durability)
            rec.mark("acked_put", mid)
            ready.append(mid)
            while ready and rng.random() < 0.5:
                m = ready.pop(0)
                wip = os.path.join(root, "wip", f"{m}.msg.{os.getpid()}")
                _fs.claim(os.path.join(root, m + ".msg"), wip)
                self._sync_dir(os.path.join(root, "wip"), durability)
                claimed.append((m, wip))
            while claimed and rng.random() < 0.5:
                m, wip = claimed.pop(0)
                rec.mark("begun_done", m)
                _fs.unlink_regular(wip)
                self._sync_dir(os.path.join(root, "wip"), durability)
                rec.mark("acked_done", m)

    def recover_and_list(self, root, durability):
        wip = os.path.join(root, "wip")
        for e in _fs.scandir(wip):
            name, _dot, pid = e.name.rpartition(".")
            if pid.isdigit() and not _fs.pid_exists(int(pid)):
                try:
                    _fs.rename_noreplace(e.path, os.path.join(root, name))
                except FileExistsError:
                    _fs.unlink_regular(e.path)
        self._sync_dir(root, durability)
        for e in _fs.scandir(os.path.join(root, "tmp")):
            _fs.unlink_regular(e.path)
        out: collections.Counter = collections.Counter()
        corrupt = 0
        for e in _fs.scandir(root):
            if e.name.endswith(".msg"):
                mid = parse_payload(_fs.read_bytes(e.path))
                if mid is None:
                    corrupt += 1
                else:
                    out[mid] += 1
        return Outcome(out, corrupt)


# -- PersistentQueue ---------------------------------------------------------------
PQ_PREFIX = "torture"


def _pq(pickup: str, durability: str, workers: int = 1):
    from pympx_queues.persistent import PersistentQueue

    return PersistentQueue(PQ_PREFIX, current_pickup_dir=pickup, durability=durability,
                           number_of_workers=workers, context="spawn")


def _body_mid(body: Any) -> Optional[str]:
    if isinstance(body, str):
        return parse_payload(body.encode())
    return None


class PersistentAdapter(Adapter):
    """PersistentQueue: recovery = constructing a new queue on the same pickup dir."""

    name = "persistent"
    phases = 4

    def available(self) -> Optional[str]:
        try:
            import pympx_queues.persistent  # noqa: F401
        except ImportError as exc:
            return f"persistent-queue-missing({exc})"
        return None

    def prepare(self, root: str, durability: str) -> None:
        _fs.makedirs(root)
        if os.environ.get("TORTURE_PRECREATE"):
            _fs.makedirs(os.path.join(root, "pickup"))

    @staticmethod
    def _put(q: Any, rec: FsRecorder, mid: str) -> None:
        rec.mark("begun_put", mid)
        q.put(make_payload(mid).decode())
        rec.mark("acked_put", mid)

    @staticmethod
    def _take_and_ack(q: Any, rec: FsRecorder, rng: random.Random, count: int) -> None:
        from queue import Empty

        from pympx_queues.sentinels import is_sentinel

        got = []
        for _ in range(count):
            try:
                body = q.get(timeout=2)
            except Empty:
                break
            if is_sentinel(body):
                break
            got.append(body)
        rng.shuffle(got)
        for i, body in enumerate(got):
            if i % 3 == 2:
                continue  # left in flight at the crash
            mid = _body_mid(body) or "?"
            rec.mark("begun_done", mid)
            q.task_done(body)
            rec.mark("acked_done", mid)

    def crash_workload(self, root, durability, rec, n, rng, phase):
        pickup = os.path.join(root, "pickup")
        q = _pq(pickup, durability)  # phases 1..3: recovery of the earlier phases
        if phase == 0:
            for i in range(n):
                self._put(q, rec, f"a{i:03d}")
                if rng.random() < 0.4:
                    self._take_and_ack(q, rec, rng, 1)
            batch = [f"b{i:03d}" for i in range(2)]
            for mid in batch:
                rec.mark("begun_put", mid)
            q.put_many([make_payload(m).decode() for m in batch])
            for mid in batch:
                rec.mark("acked_put", mid)
            self._take_and_ack(q, rec, rng, 3)
        elif phase == 1:
            q.requeue_unprocessed_work()
            self._take_and_ack(q, rec, rng, n // 2 + 1)
            for i in range(max(1, n // 3)):
                self._put(q, rec, f"c{i:03d}")
            q.close()
        elif phase == 2:
            q.requeue_unprocessed_work()
            q.close()
            from pympx_queues.sentinels import is_sentinel

            while True:
                body = q.get(timeout=5)
                if is_sentinel(body):
                    break
                mid = _body_mid(body) or "?"
                rec.mark("begun_done", mid)
                q.task_done(body)
                rec.mark("acked_done", mid)
        # phase 3: the constructor above found a finished history and compacted it away

    def kill(self, args: argparse.Namespace, durability: str) -> Summary:
        return kill_persistent(self, args, durability)

    def recover_and_list(self, root, durability):
        q = _pq(os.path.join(root, "pickup"), durability)
        try:
            out: collections.Counter = collections.Counter()
            corrupt = 0
            for m in q.get_outstanding_messages():
                mid = _body_mid(m.body)
                if mid is None:
                    corrupt += 1
                else:
                    out[mid] += 1
            return Outcome(out, corrupt)
        finally:
            q.joinable_queue.close()
            q.joinable_queue.join_thread()


# -- PersistentQueue under SIGKILL: one run = a leader (producer) + consumer processes --
def _ack_from(target: Any) -> AckLog:
    return AckLog(path=target) if isinstance(target, str) else AckLog(conn=target)


def _pq_consumer(q: Any, ack_target: Any) -> None:
    log = _ack_from(ack_target)
    for body in q:
        mid = _body_mid(body)
        if mid is None:
            log.log("C", "unreadable")
            q.task_done(body)
            continue
        log.log("G", mid)
        q.task_done(body)
        log.log("D", mid)
    q.dispose()


def _pq_leader(pickup: str, durability: str, workers: int, n_new: int, run_no: int,
               ack_dir: str, seed: int, conns: Optional[list] = None) -> None:
    """One run: requeue earlier work, start consumers, produce ``n_new`` messages, close.

    Acks go to files in ``ack_dir`` or, when ``conns`` is given (powercut), to those
    pipes: ``conns[0]`` for the leader, one more per consumer.
    """
    import multiprocessing

    os.setpgid(0, 0)  # the parent kills the whole run with one killpg
    _quiet_stderr(os.path.join(ack_dir, os.pardir, f"stderr-{run_no}.txt"))
    log = (AckLog(os.path.join(ack_dir, f"leader-{os.getpid()}")) if conns is None
           else AckLog(conn=conns[0]))
    rng = random.Random(seed)
    q = _pq(pickup, durability, workers)
    q.requeue_unprocessed_work()
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for c in range(workers):
        target = (os.path.join(ack_dir, f"consumer-{c}-{rng.random():.9f}") if conns is None
                  else conns[c + 1])
        p = ctx.Process(target=_pq_consumer, args=(q, target))
        p.start()
        procs.append(p)
    for i in range(n_new):
        mid = f"r{run_no}-{i}"
        if rng.random() < 0.2:
            batch = [f"{mid}-{j}" for j in range(3)]
            q.put_many([make_payload(m).decode() for m in batch])
            for m in batch:
                log.log("P", m)
        else:
            q.put(make_payload(mid).decode())
            log.log("P", mid)
        if rng.random() < 0.1:
            time.sleep(rng.random() * 0.01)
    q.close()
    for p in procs:
        p.join()
    q.dispose()
    log.log("X", "run-complete")


def _quiet_stderr(path: str) -> None:
    """Send this process's (and its children's) stderr to a file: killed children's
    tracebacks are expected noise, kept for a person who wants to read them."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with stderr to /dev/null: SIGKILLed
    workers leave semaphores behind on purpose, and it would warn about each."""
    from multiprocessing import resource_tracker

    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _pids_in(ack_dir: str) -> set:
    return {e.pid for e in read_ack_dir(ack_dir)}


def _pq_completed_evidence(pickup: str) -> set:
    """Message ids the journals show as completed (read-only, never repairs)."""
    from pympx_queues import journal as jr

    try:
        history = jr.scan_dirs([pickup], PQ_PREFIX, strict=False)
    except Exception:
        return set()
    out = set()
    for mid in history.completed:
        req = history.requested.get(mid)
        if req is not None and isinstance(req.body, str):
            m = parse_payload(req.body.encode())
            if m:
                out.add(m)
    return out


def kill_persistent(adapter: Adapter, args: argparse.Namespace, durability: str) -> Summary:
    iterations = args.size or 20
    rng = random.Random(args.seed)
    summary = new_summary("kill", adapter.name, durability=durability, iterations=iterations)
    workers = 2
    per_run = 30
    killed: set = set()
    evidence: set = set()
    runs_killed = hung = 0
    expected = 1.5  # seconds a run takes; learnt from runs that were not killed
    with tempfile.TemporaryDirectory(prefix="pqt-kill-") as work:
        pickup = os.path.join(work, "pickup")
        acks = os.path.join(work, "acks")
        os.makedirs(acks)
        for it in range(iterations + 1):
            final = it == iterations
            run_acks = os.path.join(acks, f"run{it:04d}")
            os.makedirs(run_acks)
            t0 = time.monotonic()
            leader = _spawn(_pq_leader, pickup, durability, workers,
                            0 if final else per_run, it, run_acks, rng.getrandbits(32))
            calibrate = it == 0
            kill_at = (None if final or calibrate or rng.random() < 0.1
                       else rng.uniform(0, 0.8 * expected))
            if it == iterations - 1 and not runs_killed:
                kill_at = 0.05  # at least one killed run, however fast the machine is
            if kill_at is not None:
                leader.join(kill_at)
            if kill_at is not None and leader.is_alive():
                runs_killed += 1
                # One victim first (the others run on for a moment), then the whole run.
                pids = sorted(_pids_in(run_acks) | {leader.pid})
                victim = rng.choice(pids)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
                time.sleep(rng.uniform(0, 0.2))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(leader.pid, signal.SIGKILL)
                leader.join(10)
                killed |= _pids_in(run_acks) | {leader.pid}
            else:
                leader.join(120)
                if leader.is_alive():
                    hung += 1
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(leader.pid, signal.SIGKILL)
                    leader.join(10)
                    killed |= _pids_in(run_acks) | {leader.pid}
                elif calibrate:
                    expected = time.monotonic() - t0
                elif not final:
                    expected = 0.7 * expected + 0.3 * (time.monotonic() - t0)
            # Orphaned consumers of a killed leader share its process group: gone above.
            evidence |= _pq_completed_evidence(pickup)
        events = read_ack_dir_recursive(acks)
        leftovers: List[Optional[str]] = []
        try:
            outcome = adapter.recover_and_list(work, durability)
            for mid, c in outcome.outstanding.items():
                leftovers += [mid] * c
            leftovers += [None] * outcome.corrupt
        except Exception as exc:
            summary.add("unrecoverable")
            print(f"  recovery failed: {exc!r}", file=sys.stderr)
        summary["runs_killed"] = runs_killed
        summary["processes_killed"] = len(killed)
        check_deliveries(events, killed, evidence, leftovers, summary)
        summary["leftover"] = len(leftovers)
        final_done = any(e.kind == "X" for e in read_ack_dir(run_acks))
        summary["errors"] = hung + (0 if final_done else 1)
    return summary


def read_ack_dir_recursive(directory: str) -> List[AckEvent]:
    events: List[AckEvent] = []
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            if name.endswith(".err"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                events.extend(parse_ack_lines(f.read()))
    events.sort()
    return events


# -- folder queues ---------------------------------------------------------------------
FOLDER_EXT = ".msg"


def _fw(root: str, durability: str, run_id: str = "torture"):
    from pympx_queues.folder import WritableFolderQueue

    # --writeback: flush-mode producers start each file's writeback before publishing
    # (the opt-in power-cut mitigation); the environment carries it into child processes.
    return WritableFolderQueue(root, FOLDER_EXT, durability=durability, run_id=run_id,
                               writeback=os.environ.get("PYMPX_TORTURE_WRITEBACK") == "1")


def _fr(root: str, durability: str, done_dir: Optional[str] = None, **kw: Any):
    from pympx_queues.folder import ReadableFolderQueue

    kw.setdefault("wakeups", "poll")
    return ReadableFolderQueue(root, FOLDER_EXT, done_dir, durability=durability, **kw)


def _folder_contents(directory: str) -> List[Optional[str]]:
    """Message ids of every message file in ``directory`` (None for an unreadable one)."""
    out: List[Optional[str]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return out
    for e in entries:
        if e.name.endswith(FOLDER_EXT) and e.is_file(follow_symlinks=False):
            try:
                out.append(parse_payload(_fs.read_bytes(e.path)))
            except OSError:
                out.append(None)
    return out


class FolderAdapter(Adapter):
    """Writable/ReadableFolderQueue: recovery = a new consumer (``recover()`` at start)."""

    name = "folder"
    phases = 3

    def available(self) -> Optional[str]:
        try:
            import pympx_queues.folder  # noqa: F401
        except ImportError as exc:
            return f"folder-queue-missing({exc})"
        return None

    def prepare(self, root: str, durability: str) -> None:
        _fs.makedirs(root)

    @staticmethod
    def _settle_some(r: Any, rec: FsRecorder, rng: random.Random, count: int,
                     keep_last: bool = True) -> None:
        from queue import Empty

        from pympx_queues.sentinels import is_sentinel

        got = []
        for _ in range(count):
            try:
                path = r.get(block=False)
            except Empty:
                break
            if is_sentinel(path):
                break
            got.append(path)
        for i, path in enumerate(got):
            mid = parse_payload(_fs.read_bytes(path)) or "?"
            if keep_last and i == len(got) - 1 and len(got) > 1:
                continue  # left in flight at the crash
            if rng.random() < 0.25:
                r.nack(path, "torture nack")
                continue
            rec.mark("begun_done", mid)
            r.task_done(path)
            rec.mark("acked_done", mid)

    def crash_workload(self, root, durability, rec, n, rng, phase):
        r = _fr(root, durability)  # phases 1, 2: recovery of the crashed consumer's claims
        if phase == 0:
            w = _fw(root, durability)
            for i in range(n):
                mid = f"a{i:03d}"
                rec.mark("begun_put", mid)
                w.put_data(mid + FOLDER_EXT, make_payload(mid))
                rec.mark("acked_put", mid)
                if rng.random() < 0.4:
                    self._settle_some(r, rec, rng, 2)
            batch = [f"b{i:03d}" for i in range(2)]
            for mid in batch:
                rec.mark("begun_put", mid)
            w.put_many([(m + FOLDER_EXT, make_payload(m)) for m in batch])
            for mid in batch:
                rec.mark("acked_put", mid)
            self._settle_some(r, rec, rng, 3)
        elif phase == 1:
            w = _fw(root, durability)
            self._settle_some(r, rec, rng, n // 2 + 1)
            for i in range(max(1, n // 3)):
                mid = f"c{i:03d}"
                rec.mark("begun_put", mid)
                w.put_data(mid + FOLDER_EXT, make_payload(mid))
                rec.mark("acked_put", mid)
            w.close()
        else:
            self._settle_some(r, rec, rng, 10 * n, keep_last=False)

    def kill(self, args: argparse.Namespace, durability: str) -> Summary:
        return kill_folder(self, args, durability)

    def recover_and_list(self, root, durability):
        r = _fr(root, durability)
        try:
            r.recover(wait=True)
        finally:
            r.close()
        found = (_folder_contents(root) + _folder_contents(os.path.join(root, "failed"))
                 + _folder_contents(os.path.join(root, "wip")))
        out = collections.Counter(m for m in found if m is not None)
        return Outcome(out, sum(1 for m in found if m is None))


# -- folder queues under SIGKILL: independent producer and consumer processes ---------
def _worker_stderr(ack_target: Any) -> None:
    """Workers write tracebacks beside their ack file (``.err``), or nowhere in powercut
    mode (every worker dies of EIO there, on purpose)."""
    if isinstance(ack_target, str):
        _quiet_stderr(ack_target + ".err")
    else:
        _quiet_stderr(os.devnull)


def _folder_producer(root: str, durability: str, ack_target: Any, seed: int,
                     limit: int) -> None:
    _worker_stderr(ack_target)
    log = _ack_from(ack_target)
    rng = random.Random(seed)
    tag = f"p{os.getpid()}x{rng.getrandbits(24):06x}"
    w = _fw(root, durability)
    i = 0
    while limit <= 0 or i < limit:
        if rng.random() < 0.15:
            batch = [f"{tag}-{i:06d}-{j}" for j in range(3)]
            w.put_many([(m + FOLDER_EXT, make_payload(m, rng.choice((0, 600, 5000))))
                        for m in batch])
            for m in batch:
                log.log("P", m)
        else:
            mid = f"{tag}-{i:06d}"
            w.put_data(mid + FOLDER_EXT, make_payload(mid, rng.choice((0, 600, 5000))))
            log.log("P", mid)
        i += 1
        if rng.random() < 0.05:
            time.sleep(rng.random() * 0.01)
    w.close()


def _folder_consumer(root: str, durability: str, done_dir: str, ack_target: Any,
                     seed: int) -> None:
    from queue import Empty

    from pympx_queues.sentinels import is_sentinel

    _worker_stderr(ack_target)
    log = _ack_from(ack_target)
    rng = random.Random(seed)
    r = _fr(root, durability, done_dir, recover_interval=0.5, poll_interval=0.05,
            max_retries=None)
    while True:
        try:
            path = r.get(timeout=0.5)
        except Empty:
            continue
        if is_sentinel(path):
            break
        mid = parse_payload(_fs.read_bytes(path))
        if mid is None:
            log.log("C", os.path.basename(path))
            r.task_done(path)
            continue
        log.log("G", mid)
        if rng.random() < 0.1:
            r.nack(path, "torture nack")
            log.log("N", mid)
        else:
            r.task_done(path)
            log.log("D", mid)


def _describe_bad(path: str) -> None:
    if os.environ.get("TORTURE_DEBUG"):
        try:
            data = _fs.read_bytes(path)
        except OSError as exc:
            data = repr(exc).encode()
        print(f"  unreadable message {os.path.basename(path)}: {len(data)} bytes, "
              f"{data[:16]!r}...{data[-16:]!r} zeros={data.count(0)}", file=sys.stderr)


def folder_final_drain(root: str, durability: str, done_dir: str) -> List[Optional[str]]:
    """Recover, then take every message left (ready, dead letters): what came back."""
    from queue import Empty

    from pympx_queues.sentinels import is_sentinel

    r = _fr(root, durability, done_dir, max_retries=None)
    out: List[Optional[str]] = []
    try:
        r.recover(wait=True)
        while True:
            try:
                path = r.get(block=False)
            except Empty:
                break
            if is_sentinel(path):
                break
            mid = parse_payload(_fs.read_bytes(path))
            if mid is None:
                _describe_bad(path)
            out.append(mid)
            r.task_done(path)
    finally:
        r.close()
    out += _folder_contents(os.path.join(root, "failed"))
    return out


def _wait_for_first_ack(ack_dir: str, role: str, timeout: float) -> bool:
    """Wait (with a deadline) until some ``role`` worker has logged an acknowledged call."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir(ack_dir):
            if name.startswith(role) and not name.endswith(".err"):
                try:
                    if os.path.getsize(os.path.join(ack_dir, name)) > 0:
                        return True
                except OSError:
                    pass
        time.sleep(0.02)
    return False


def kill_folder(adapter: Adapter, args: argparse.Namespace, durability: str) -> Summary:
    iterations = args.size or 50
    rng = random.Random(args.seed)
    summary = new_summary("kill", adapter.name, durability=durability, iterations=iterations)
    killed: set = set()
    with tempfile.TemporaryDirectory(prefix="pqt-kill-") as work:
        root = os.path.join(work, "q")
        done_dir = os.path.join(work, "done")
        acks = os.path.join(work, "acks")
        os.makedirs(acks)
        counter = [0]

        def start(role: str):
            counter[0] += 1
            ack = os.path.join(acks, f"{role}-{counter[0]:05d}")
            if role == "producer":
                return _spawn(_folder_producer, root, durability, ack, rng.getrandbits(32), 0)
            return _spawn(_folder_consumer, root, durability, done_dir, ack,
                          rng.getrandbits(32))

        _fw(root, durability)  # create the queue before anyone races on it
        workers = {"producer": [start("producer") for _ in range(2)],
                   "consumer": [start("consumer") for _ in range(3)]}
        died = 0
        # Kill only once work flows: on a loaded machine spawned workers can take seconds
        # to import, and killing them all before their first ack would test nothing.
        _wait_for_first_ack(acks, "consumer", timeout=60.0)
        for _ in range(iterations):
            time.sleep(rng.uniform(0.01, 0.25))
            role = rng.choice(["producer", "consumer", "consumer"])
            victim = workers[role].pop(rng.randrange(len(workers[role])))
            died += not victim.is_alive()  # a worker must only die when we kill it
            _sigkill(victim)
            killed.add(victim.pid)
            workers[role].append(start(role))
        for p in workers["producer"] + workers["consumer"]:
            died += not p.is_alive()
            _sigkill(p)  # the end of the run is a crash too
            killed.add(p.pid)
        summary["worker_errors"] = died
        if died:
            for name in os.listdir(acks):
                if name.endswith(".err") and os.path.getsize(os.path.join(acks, name)):
                    with open(os.path.join(acks, name)) as f:
                        print(f"  {name}: {f.read()[-1500:]}", file=sys.stderr)
        evidence = {m for m in _folder_contents(done_dir) if m}  # before the final drain
        final = folder_final_drain(root, durability, done_dir)
        summary["processes_killed"] = len(killed)
        check_deliveries(read_ack_dir(acks), killed, evidence, final, summary)
        summary["requeued_at_end"] = len(final)
    return summary


# -- power cut: loop-mounted ext4, EXT4_IOC_SHUTDOWN(NOLOGFLUSH) mid-write -----------
class PipeCollector:
    """Acks from workers through one pipe each; they live outside the "powered" disk."""

    def __init__(self) -> None:
        self.readers: List[Any] = []
        self.data: List[bytes] = []

    def new(self) -> Any:
        import multiprocessing

        r, w = multiprocessing.Pipe(duplex=False)
        self.readers.append(r)
        return w

    def collect(self, timeout: float = 10.0) -> List[AckEvent]:
        from multiprocessing.connection import wait

        deadline = time.monotonic() + timeout
        live = list(self.readers)
        while live and time.monotonic() < deadline:
            for r in wait(live, timeout=0.2):
                try:
                    self.data.append(r.recv_bytes())
                except (EOFError, OSError):
                    live.remove(r)
        events = parse_ack_lines(b"".join(self.data))
        events.sort()
        return events


def _drain_while_running(collector: PipeCollector, seconds: float) -> None:
    """Read acks while the workers run (a full pipe would block them)."""
    from multiprocessing.connection import wait

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for r in wait(collector.readers, timeout=min(0.05, max(0.0, end - time.monotonic()))):
            try:
                collector.data.append(r.recv_bytes())
            except (EOFError, OSError):
                pass


def powercut_check(events: List[AckEvent], evidence: set, final: List[Optional[str]],
                   summary: Summary, durability: str, cut_ns: int,
                   corrupt_allowed: bool = False) -> None:
    """Check one power cut.  ``cut_ns``: monotonic time just before the shutdown ioctl.

    The ioctl takes a few milliseconds, and an fsync that overlaps it can return 0 although
    its data is lost (measured here with a bare write+fsync loop: every such record had its
    fsync *return* after the ioctl started).  A real power cut kills the process before it
    can return, so only calls that returned before ``cut_ns`` count as acknowledged;
    later acks are counted in ``acks_during_cut`` and treated as in flight.
    """
    late = [e for e in events if e.t >= cut_ns and e.kind in ("P", "D", "N")]
    summary.add("acks_during_cut", len(late))
    events = [e for e in events if not (e.t >= cut_ns and e.kind in ("P", "D", "N"))]
    killed = {e.pid for e in events}  # every worker dies with the power
    if durability == _fs.FSYNC:
        check_deliveries(events, killed, evidence, final, summary)
        return
    # flush mode: un-synced puts and acks may be lost on power loss; never corruption.
    scratch = Summary()
    check_deliveries(events, killed, evidence, final, scratch)
    summary.add("acked", scratch.get("acked", 0))
    summary.add("lost_unsynced", scratch.get("lost", 0))
    summary.add("redelivered_unsynced", scratch.get("redelivered_done", 0))
    summary.add("dup_unsynced", scratch.get("dup_beyond_inflight", 0))
    # Folder queues cannot checksum user files: in flush mode a message published just
    # before the power went may come back empty or zero-filled (README "durability", the
    # lead's decision).  Reported as a figure there; the PersistentQueue must stay at 0.
    summary.add("corrupt_unsynced" if corrupt_allowed else "corrupt", scratch.get("corrupt", 0))


def powercut_folder(img: "Ext4Image", durability: str, rng: random.Random, it: int,
                    summary: Summary) -> None:
    root = os.path.join(img.mnt, f"it{it}", "q")
    done_dir = os.path.join(img.mnt, f"it{it}", "done")
    _fw(root, durability)
    if durability == _fs.FSYNC:
        _fs.fsync_dir(img.mnt)  # our own set-up dirs: durable before the workers start
        _fs.fsync_dir(os.path.dirname(root))
    col = PipeCollector()
    procs = [_spawn(_folder_producer, root, durability, col.new(), rng.getrandbits(32), 0)
             for _ in range(2)]
    procs += [_spawn(_folder_consumer, root, durability, done_dir, col.new(),
                     rng.getrandbits(32)) for _ in range(2)]
    _drain_while_running(col, rng.uniform(0.8, 2.0))
    cut_ns = time.monotonic_ns()
    img.power_cut()
    for p in procs:
        _sigkill(p)
    events = col.collect()
    img.umount()
    img.mount()
    raw = _snapshot_tree(os.path.dirname(root))
    evidence = {m for m in _folder_contents(done_dir) if m}
    final = folder_final_drain(root, durability, done_dir)
    before = summary.violations()
    powercut_check(events, evidence, final, summary, durability, cut_ns, corrupt_allowed=True)
    _keep_evidence(raw, events, summary.violations() > before)
    shutil.rmtree(os.path.dirname(root), ignore_errors=True)


def powercut_persistent(img: "Ext4Image", durability: str, rng: random.Random, it: int,
                        summary: Summary) -> None:
    base = os.path.join(img.mnt, f"it{it}")
    pickup = os.path.join(base, "pickup")
    os.makedirs(pickup, mode=0o700)
    if durability == _fs.FSYNC:
        _fs.fsync_dir(img.mnt)
        _fs.fsync_dir(base)
    col = PipeCollector()
    workers = 2
    conns = [col.new() for _ in range(workers + 1)]
    scratch = tempfile.mkdtemp(prefix="pqt-pc-")
    ack_dir = os.path.join(scratch, "acks")
    os.mkdir(ack_dir)
    leader = _spawn(_pq_leader, pickup, durability, workers, 10 ** 9, it, ack_dir,
                    rng.getrandbits(32), conns)
    _drain_while_running(col, rng.uniform(1.0, 2.5))
    cut_ns = time.monotonic_ns()
    img.power_cut()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.join(10)
    del conns
    events = col.collect()
    shutil.rmtree(scratch, ignore_errors=True)
    img.umount()
    img.mount()
    raw = _snapshot_tree(base)
    evidence = _pq_completed_evidence(pickup)
    final: List[Optional[str]] = []
    try:
        outcome = PersistentAdapter().recover_and_list(base, durability)
        for mid, c in outcome.outstanding.items():
            final += [mid] * c
        final += [None] * outcome.corrupt
    except Exception as exc:
        summary.add("unrecoverable")
        print(f"  recovery after power cut failed: {exc!r}", file=sys.stderr)
    before = summary.violations()
    powercut_check(events, evidence, final, summary, durability, cut_ns)
    _keep_evidence(raw, events, summary.violations() > before)
    shutil.rmtree(base, ignore_errors=True)


def _snapshot_tree(tree: str) -> Optional[str]:
    """With TORTURE_KEEP set, a copy of ``tree`` as the power cut left it (pre-recovery)."""
    if not os.environ.get("TORTURE_KEEP"):
        return None
    dest = tempfile.mkdtemp(prefix="pqt-raw-")
    shutil.copytree(tree, os.path.join(dest, "tree"), symlinks=True)
    return dest


def _keep_evidence(raw: Optional[str], events: List[AckEvent], bad: bool) -> None:
    """With TORTURE_KEEP=<dir>, keep the pre-recovery tree and the acks of a bad iteration."""
    keep = os.environ.get("TORTURE_KEEP")
    if raw is None or not keep:
        return
    if not bad:
        shutil.rmtree(raw, ignore_errors=True)
        return
    dest = tempfile.mkdtemp(prefix="powercut-", dir=keep)
    shutil.move(os.path.join(raw, "tree"), os.path.join(dest, "tree"))
    shutil.rmtree(raw, ignore_errors=True)
    with open(os.path.join(dest, "acks.txt"), "w") as f:
        for e in events:
            f.write(f"{e.t} {e.pid} {e.kind} {e.mid}\n")
    print(f"  evidence kept in {dest}", file=sys.stderr)


def mode_powercut(adapter: Adapter, args: argparse.Namespace) -> List[Summary]:
    out = []
    for durability in _durabilities(args, "both"):
        iterations = args.size or 10
        summary = new_summary("powercut", adapter.name, durability=durability,
                              iterations=iterations)
        rng = random.Random(args.seed)
        try:
            with ext4_image(256) as img:
                for it in range(iterations):
                    if adapter.name == "folder":
                        powercut_folder(img, durability, rng, it, summary)
                    else:
                        powercut_persistent(img, durability, rng, it, summary)
        except Skip as exc:
            summary = new_summary("powercut", adapter.name, durability=durability,
                                  skipped=str(exc))
        for key in ("lost", "corrupt", "redelivered_done", "dup_beyond_inflight"):
            if "skipped" not in summary and (durability == _fs.FSYNC or (
                    key == "corrupt" and adapter.name != "folder")):
                summary.setdefault(key, 0)
        out.append(summary)
    return out


# -- disk full: a tiny tmpfs ---------------------------------------------------------
def _fill(mnt: str, headroom: int) -> str:
    """Fill the file system with a ballast file, then give ``headroom`` bytes back."""
    ballast = os.path.join(mnt, "ballast")
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - headroom))
    finally:
        os.close(fd)
    return ballast


def _is_enospc(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def enospc_folder(args: argparse.Namespace, durability: str, summary: Summary) -> None:
    from queue import Empty

    from pympx_queues.sentinels import is_sentinel

    n = args.size or 200
    rng = random.Random(args.seed)
    with tmpfs_mount(4 << 20) as mnt:
        root = os.path.join(mnt, "q")
        w = _fw(root, durability)
        r = _fr(root, durability, max_retries=None)
        ballast = _fill(mnt, 48 << 10)
        acked: List[str] = []
        settled: List[Optional[str]] = []
        refused = after_free_failed = other = half = 0
        freed = False
        for i in range(n):
            if i == n // 2:
                os.unlink(ballast)  # space comes back mid-run
                freed = True
            mid = f"e{i:05d}"
            payload = make_payload(mid, rng.choice((200, 6000, 30000)))
            try:
                if rng.random() < 0.2:
                    names = [f"{mid}-{j}" for j in range(3)]
                    try:
                        w.put_many([(m + FOLDER_EXT, make_payload(m, 6000)) for m in names])
                        acked += names
                    except OSError:
                        # put_many keeps the items before the failing one published
                        acked += [m for m in names
                                  if os.path.exists(os.path.join(root, m + FOLDER_EXT))]
                        raise
                else:
                    w.put_data(mid + FOLDER_EXT, payload)
                    acked.append(mid)
            except OSError as exc:
                if not _is_enospc(exc):
                    other += 1
                    print(f"  unexpected error: {exc!r}", file=sys.stderr)
                refused += 1
                after_free_failed += freed
                # G2: nothing half-written is visible under a message name
                half += sum(1 for m in _folder_contents(root) if m is None)
            # consumers keep working on the full disk: claim, nack (writes a sidecar), ack
            for _ in range(1 if rng.random() < 0.3 else 0):
                try:
                    path = r.get(block=False)
                except Empty:
                    break
                except OSError as exc:
                    other += not _is_enospc(exc)
                    break
                if is_sentinel(path):
                    break
                try:
                    if rng.random() < 0.3:
                        r.nack(path, "disk full test")
                    else:
                        mid2 = parse_payload(_fs.read_bytes(path))
                        r.task_done(path)
                        settled.append(mid2)
                except OSError as exc:
                    other += not _is_enospc(exc)  # the claim stays; recovery returns it
        r.close()
        final: List[Optional[str]] = list(settled)
        r2 = _fr(root, durability, max_retries=None)
        try:
            r2.recover(wait=True, include_live=True)  # our own claims left by failed nacks
            while True:
                try:
                    path = r2.get(block=False)
                except Empty:
                    break
                if is_sentinel(path):
                    break
                final.append(parse_payload(_fs.read_bytes(path)))
                r2.task_done(path)
        finally:
            r2.close()
        final += _folder_contents(os.path.join(root, "failed"))
        got = collections.Counter(m for m in final if m is not None)
        summary.add("acked", len(acked))
        summary.add("puts_refused", refused)
        summary.add("lost", sum(1 for m in acked if not got.get(m)))
        summary.add("corrupt", sum(1 for m in final if m is None))
        summary.add("half_written_visible", half)
        summary.add("failed_after_free", after_free_failed)
        summary.add("errors", other + (0 if refused else 1))  # the disk must have filled


def enospc_persistent(args: argparse.Namespace, durability: str, summary: Summary) -> None:
    from queue import Empty

    n = args.size or 200
    rng = random.Random(args.seed)
    with tmpfs_mount(2 << 20) as mnt:
        pickup = os.path.join(mnt, "pickup")
        q = _pq(pickup, durability)
        ballast = _fill(mnt, 16 << 10)
        acked: List[str] = []
        refused = after_free_failed = other = 0
        freed = False
        for i in range(n):
            if i == n // 2:
                os.unlink(ballast)
                freed = True
            mid = f"e{i:05d}"
            try:
                q.put(make_payload(mid, rng.choice((200, 2000))).decode())
                acked.append(mid)
            except OSError as exc:  # JournalBroken is an OSError too
                refused += 1
                after_free_failed += freed
                if not _is_enospc(exc) and type(exc).__name__ != "JournalBroken":
                    other += 1
                    print(f"  unexpected error: {exc!r}", file=sys.stderr)
        done: List[str] = []
        while True:
            try:
                body = q.get(timeout=1)
            except Empty:
                break
            try:
                q.task_done(body)
                done.append(_body_mid(body) or "?")
            except OSError:
                after_free_failed += 1
                break
        q.dispose()
        q.joinable_queue.close()
        # A new run on the same pickup dir: recovery must find exactly acked - done.
        outcome = PersistentAdapter().recover_and_list(mnt, durability)
        outstanding = outcome.outstanding
        summary.add("acked", len(acked))
        summary.add("puts_refused", refused)
        summary.add("lost", sum(1 for m in acked if m not in done and not outstanding.get(m)))
        summary.add("redelivered_done", sum(1 for m in done if outstanding.get(m)))
        summary.add("corrupt", outcome.corrupt)
        summary.add("phantom_refused_puts", sum(1 for m in outstanding if m not in acked))
        summary.add("failed_after_free", after_free_failed)
        summary.add("errors", other + (0 if refused else 1))


def mode_enospc(adapter: Adapter, args: argparse.Namespace) -> List[Summary]:
    out = []
    for durability in _durabilities(args, "both"):
        summary = new_summary("enospc", adapter.name, durability=durability)
        try:
            if adapter.name == "folder":
                enospc_folder(args, durability, summary)
            else:
                enospc_persistent(args, durability, summary)
        except Skip as exc:
            summary = new_summary("enospc", adapter.name, durability=durability,
                                  skipped=str(exc))
        out.append(summary)
    return out


ADAPTERS: Dict[str, Callable[[], Adapter]] = {
    "toy": lambda: ToyAdapter(False),
    "toy-buggy": lambda: ToyAdapter(True),
    "persistent": PersistentAdapter,
    "folder": FolderAdapter,
}


def get_adapter(name: str) -> Adapter:
    return ADAPTERS[name]()


# =========================================================================== pipeline
def _kill_round_modes(args: argparse.Namespace, mode: str, queue: str, kill_rounds: Any,
                      size: int, fill: Any) -> List[Summary]:
    """``--size`` SIGKILL rounds then a run to the end, once per durability mode, by a
    ``kill_rounds(workdir, size=, rounds=, seed=, durability=)`` of the engine's; ``fill``
    copies its findings into the summary."""
    kills = args.size or 20
    out = []
    for durability in _durabilities(args, "flush"):
        base = tempfile.mkdtemp(prefix=f"torture-{mode}-", dir=os.getcwd())
        s = new_summary(mode, queue, durability=durability)
        try:
            r = kill_rounds(base, size=size, rounds=kills, seed=args.seed,
                            durability=durability)
        except RuntimeError as exc:  # a round hung or the final run failed
            s["errors"] = 1
            if args.verbose:
                print(f"{mode} torture: {exc}", file=sys.stderr)
            out.append(s)
            continue
        finally:
            shutil.rmtree(base, ignore_errors=True)
        fill(s, r)
        s["errors"] = 0
        s["seconds"] = r["seconds"]
        out.append(s)
    return out


def run_pipeline_torture(args: argparse.Namespace) -> List[Summary]:
    """``--size`` SIGKILLs of a durable pipeline's coordinator, then a run to the end, by
    the engine's own kill-round function (pympx_queues.pipeline._torture.kill_rounds: a
    thread -> process -> async-sink pipeline, kills at random points of the remaining
    work, checks against the journal's state before each round and the handlers' logs).
    """
    from pympx_queues.pipeline._torture import SINK_WORKERS, kill_rounds

    def fill(s: Summary, r: Dict[str, Any]) -> None:
        s["items"] = r["size"]
        s["rounds"] = r["rounds"] + 1
        s["kills"] = r["killed"]
        s["lost"] = r["lost"]
        s["not_stored"] = r["not_stored"]
        s["finished_stage_rerun"] = r["finished_stage_reruns"]
        s["done_rerun"] = r["done_key_reruns"]
        s["sink_dup"] = r["sink_duplicates"]
        s["sink_dup_beyond_inflight"] = max(0, r["sink_duplicates"] - r["killed"] * SINK_WORKERS)
        s["orphan_workers"] = r["orphans"]
        if args.verbose and r["lost_keys"]:
            print(f"pipeline torture: lost keys {r['lost_keys']}", file=sys.stderr)

    return _kill_round_modes(args, "pipeline", "pipeline", kill_rounds, PL_ITEMS, fill)


PL_ITEMS = 300  # items of the pipeline whose coordinator is killed


def run_map_torture(args: argparse.Namespace) -> List[Summary]:
    """``--size`` SIGKILLs of a durable batch_map, then a run to the end over the same
    input (pympx_queues.pipeline._torture_map.kill_rounds)."""
    from pympx_queues.pipeline._torture_map import kill_rounds

    def fill(s: Summary, r: Dict[str, Any]) -> None:
        s["calls"] = r["size"]
        s["rounds"] = r["rounds"] + 1
        s["kills"] = r["killed"]
        for k in ("lost", "wrong", "done_rerun", "reruns", "rerun_beyond_inflight"):
            s[k] = r[k]

    return _kill_round_modes(args, "map", "batch_map", kill_rounds, MAP_CALLS, fill)


MAP_CALLS = 400  # calls of the map that is killed


# =========================================================================== crashstates
def _crash_child(adapter_name: str, root: str, durability: str, n: int, seed: int,
                 phase: int, rec_path: str) -> None:
    """Child process: run one phase of the workload under the tracer, dump the recorder.

    Each phase runs in its own process and ends with ``os._exit`` (no close, no atexit):
    a process crash between phases, so the next phase's recovery really runs.
    """
    _quiet_library_logs()
    adapter = get_adapter(adapter_name)
    _apply_publish_mode()
    if phase == 0:
        adapter.prepare(root, durability)
        rec = FsRecorder(root)
    else:
        with open(rec_path, "rb") as f:
            rec = pickle.load(f)
    _fs.set_tracer(rec)
    try:
        adapter.crash_workload(root, durability, rec, n, random.Random(seed * 100 + phase),
                               phase)
    finally:
        _fs.set_tracer(None)
    with open(rec_path + ".new", "wb") as f:
        pickle.dump(rec, f)
    os.replace(rec_path + ".new", rec_path)
    os._exit(0)  # no atexit/close handlers: the process "dies" with its claims held


def _apply_publish_mode() -> None:
    """``--publish link``: use the link()+unlink() fallback (NFS, some FUSE) everywhere."""
    if os.environ.get("TORTURE_PUBLISH") == "link":
        _fs._renameat2_ok = False


def record_workload(adapter_name: str, workdir: str, durability: str, n: int,
                    seed: int) -> dict:
    import multiprocessing

    root = os.path.join(workdir, "q")
    rec_path = os.path.join(workdir, "trace.pkl")
    ctx = multiprocessing.get_context("spawn")
    for phase in range(get_adapter(adapter_name).phases):
        p = ctx.Process(target=_crash_child, args=(adapter_name, root, durability, n, seed,
                                                   phase, rec_path))
        p.start()
        p.join(300)
        if p.exitcode != 0 or not os.path.exists(rec_path):
            raise RuntimeError(f"crash-state workload phase {phase} failed "
                               f"(exit {p.exitcode})")
    with open(rec_path, "rb") as f:
        return pickle.load(f).dump()


def _inspect(adapter: Adapter, state_dir: str, durability: str) -> Outcome:
    try:
        return adapter.recover_and_list(state_dir, durability)
    except Exception as exc:  # recovery must not fail on a crash state: count it
        return Outcome(collections.Counter(), 0,
                       f"{type(exc).__name__}: {exc}".splitlines()[0][:300])


def run_crashstates(adapter: Adapter, durability: str, size: int, seed: int,
                    recovery_crash_every: int, verbose: bool, max_examples: int = 5,
                    model_name: Optional[str] = None) -> Summary:
    weak = durability == _fs.FSYNC if model_name is None else model_name == "weak"
    model = "power-loss(weak)" if weak else "process-crash"
    # flush mode promises nothing across power loss: its losses are figures, not violations
    unsynced_ok = weak and durability == _fs.FLUSH
    summary = new_summary("crashstates", adapter.name, durability=durability, model=model)
    if os.environ.get("TORTURE_PUBLISH") == "link":
        summary["publish"] = "link"
    _apply_publish_mode()
    rng = random.Random(seed)
    examples: List[str] = []
    # tmpfs when there is one: thousands of tiny trees, and fsync costs nothing there
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="pqt-crash-", dir=shm) as work:
        trace = record_workload(adapter.name, work, durability, size, seed)
        ops = sum(1 for e in trace["events"] if e["op"] != "mark")
        summary["ops"] = ops
        summary["states"] = 0
        summary["recovery_states"] = 0
        cache: Dict[str, Tuple[Outcome, Optional[dict]]] = {}
        counter = 0
        checked = set()
        for _k, ledger, state in enumerate_crash_states(trace, weak=weak, rng=rng):
            fp = state.fingerprint()
            key = (fp, len(ledger.acked_put), len(ledger.begun_done), len(ledger.acked_done),
                   len(ledger.begun_put))
            if key in checked:
                continue
            checked.add(key)
            counter += 1
            if fp not in cache:
                summary.add("states")
                d = os.path.join(work, f"s{counter}")
                state.materialise(d)
                rec = FsRecorder(d)
                _fs.set_tracer(rec)
                try:
                    outcome = _inspect(adapter, d, durability)
                finally:
                    _fs.set_tracer(None)
                again = _inspect(adapter, d, durability)  # G5: recovery twice
                idem = (again.outstanding == outcome.outstanding
                        and again.error == outcome.error)
                rtrace = rec.dump() if (recovery_crash_every and
                                        summary["states"] % recovery_crash_every == 0) else None
                cache[fp] = (outcome, rtrace)
                if not idem:
                    summary.add("not_idempotent")
                    _example(examples, max_examples, f"{state.label}: recovery twice differs "
                             f"{sorted(outcome.outstanding)} vs {sorted(again.outstanding)}")
                shutil.rmtree(d, ignore_errors=True)
            outcome, rtrace = cache[fp]
            before = summary.violations()
            _check_outcome(outcome, ledger, summary, unsynced_ok)
            if summary.violations() > before:
                summary.add("bad_states")
                _example(examples, max_examples,
                         f"{state.label}: outstanding={sorted(outcome.outstanding)} "
                         f"acked_put={sorted(ledger.acked_put)} "
                         f"acked_done={sorted(ledger.acked_done)} error={outcome.error}")
            if rtrace is not None and rtrace["events"]:
                # G5: crash in the middle of recovery, then recover again.
                for _rk, _l, rstate in enumerate_crash_states(rtrace, weak=weak, rng=rng):
                    rfp = rstate.fingerprint()
                    if rfp in cache:
                        routcome = cache[rfp][0]
                    else:
                        summary.add("recovery_states")
                        d = os.path.join(work, f"r{counter}")
                        rstate.materialise(d)
                        routcome = _inspect(adapter, d, durability)
                        cache[rfp] = (routcome, None)
                        shutil.rmtree(d, ignore_errors=True)
                    before = summary.violations()
                    _check_outcome(routcome, ledger, summary, unsynced_ok)
                    if summary.violations() > before:
                        summary.add("bad_recovery_states")
                        _example(examples, max_examples,
                                 f"{state.label} then crash in recovery {rstate.label}: "
                                 f"outstanding={sorted(routcome.outstanding)} "
                                 f"acked_done={sorted(ledger.acked_done)} "
                                 f"error={routcome.error}\n    recovery ops: "
                                 + _describe_ops(rtrace, work))
    for key in ("lost", "corrupt", "redelivered_done", "dup_beyond_inflight", "unrecoverable",
                "not_idempotent", "bad_states", "bad_recovery_states"):
        if not (unsynced_ok and key in ("lost", "redelivered_done", "dup_beyond_inflight")):
            summary.setdefault(key, 0)
    if verbose or summary.violations():
        for e in examples:
            print(f"  violation: {e}", file=sys.stderr)
    return summary


def _describe_ops(trace: dict, work: str) -> str:
    out = []
    for i, ev in enumerate(trace["events"]):
        if ev["op"] == "mark":
            continue
        args = " ".join(os.path.basename(str(a)) for a in ev["args"] if isinstance(a, str))
        out.append(f"{i}:{ev['op']}({args})")
    return " ".join(out)


def _example(examples: List[str], limit: int, text: str) -> None:
    if len(examples) < limit:
        examples.append(text)


def _check_outcome(outcome: Outcome, ledger: Ledger, summary: Summary,
                   unsynced_ok: bool = False) -> None:
    if outcome.error is not None:
        summary.add("unrecoverable")
        return
    if not unsynced_ok:
        check_outstanding(ledger, outcome.outstanding, outcome.corrupt, summary)
        return
    scratch = Summary()
    check_outstanding(ledger, outcome.outstanding, outcome.corrupt, scratch)
    summary.add("lost_unsynced", scratch.get("lost", 0))
    summary.add("redelivered_unsynced", scratch.get("redelivered_done", 0))
    summary.add("dup_unsynced", scratch.get("dup_beyond_inflight", 0))
    summary.add("corrupt", scratch.get("corrupt", 0))


# =========================================================================== main
def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", required=True,
                    choices=["kill", "powercut", "enospc", "crashstates", "pipeline", "map"])
    ap.add_argument("--queue", default="both",
                    help="persistent | folder | both (also toy, toy-buggy: simulator self-test)")
    ap.add_argument("--size", type=int, default=None,
                    help="kill: SIGKILL rounds (default 20 persistent / 50 folder); "
                         "pipeline: coordinator SIGKILLs (20); "
                         "map: SIGKILLs of a durable batch_map (20); "
                         "powercut: cuts (10); enospc: puts (200); crashstates: messages per "
                         "workload phase (8)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--durability", default=None, choices=["flush", "fsync", "both"],
                    help="durability mode(s) to run (default: flush for kill, both for "
                         "the other modes)")
    ap.add_argument("--publish", choices=["renameat2", "link"], default="renameat2",
                    help="crashstates: no-clobber publish primitive; 'link' forces the "
                         "link()+unlink() fallback used where renameat2 is missing (NFS)")
    ap.add_argument("--model", choices=["weak", "process"], default=None,
                    help="crashstates: persistence model (default: weak for fsync mode, "
                         "process crash for flush mode); '--durability flush --model weak' "
                         "shows what flush mode keeps across a power cut (losses are "
                         "figures, corruption still counts)")
    ap.add_argument("--recovery-crash-every", type=int, default=1,
                    help="crashstates: also crash recovery itself in every Nth state (0: never)")
    ap.add_argument("--writeback", action="store_true",
                    help="folder producers in flush mode use writeback=True (start each "
                         "file's writeback before publishing)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    _quiet_library_logs()
    if args.mode in ("pipeline", "map"):
        _quiet_resource_tracker()
        worst = EXIT_OK
        run = run_pipeline_torture if args.mode == "pipeline" else run_map_torture
        for s in run(args):
            print(s.line(), flush=True)
            if s.violations():
                worst = EXIT_VIOLATION
        return worst
    if args.writeback:
        os.environ["PYMPX_TORTURE_WRITEBACK"] = "1"
    if args.publish == "link":
        os.environ["TORTURE_PUBLISH"] = "link"  # inherited by the workload processes
    kinds = ["persistent", "folder"] if args.queue == "both" else [args.queue]
    for k in kinds:
        if k not in ADAPTERS:
            print(f"unknown --queue {k!r}; choose from {sorted(ADAPTERS)} or both",
                  file=sys.stderr)
            return EXIT_USAGE
    worst = EXIT_OK
    _quiet_resource_tracker()
    for kind in kinds:
        adapter = get_adapter(kind)
        reason = adapter.available()
        summaries: List[Summary]
        if reason is not None:
            summaries = [new_summary(args.mode, kind, skipped=reason)]
        else:
            summaries = MODES[args.mode](adapter, args)
        for s in summaries:
            print(s.line(), flush=True)
            if s.violations():
                worst = EXIT_VIOLATION
    return worst


def mode_crashstates(adapter: Adapter, args: argparse.Namespace) -> List[Summary]:
    size = args.size or 8
    durs = ["fsync", "flush"] if args.durability in (None, "both") else [args.durability]
    return [run_crashstates(adapter, d, size, args.seed, args.recovery_crash_every,
                            args.verbose, model_name=args.model) for d in durs]


def _durabilities(args: argparse.Namespace, default: str) -> List[str]:
    if args.durability is None:
        return ["fsync", "flush"] if default == "both" else [default]
    return ["fsync", "flush"] if args.durability == "both" else [args.durability]


def mode_kill(adapter: Adapter, args: argparse.Namespace) -> List[Summary]:
    return [adapter.kill(args, d) for d in _durabilities(args, "flush")]


MODES: Dict[str, Callable[[Adapter, argparse.Namespace], List[Summary]]] = {
    "crashstates": mode_crashstates,
    "kill": mode_kill,
    "powercut": mode_powercut,
    "enospc": mode_enospc,
}


if __name__ == "__main__":
    sys.exit(main())
