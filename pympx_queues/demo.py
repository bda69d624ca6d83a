"""``pympx-queues demo``: a crash and a recovery, end to end, in a few seconds.

The demo runs the same story on the queues and on a durable pipeline, in one temp dir
(``--queue persistent|folder|pipeline|both|all``; ``both`` = the two queues, default
``all``).

PersistentQueue (``<dir>/pickup``)
    Run 1: a producer process puts ``messages`` keyed messages on a journaled
    :class:`~pympx_queues.persistent.PersistentQueue` and closes the stream; ``consumers``
    consumer processes take them in small batches and acknowledge each one after its
    (simulated) work.  One consumer is killed with SIGKILL while it holds messages it has
    not acknowledged yet; the others finish the run.
    Run 2 (recovery): a new queue on the same pickup dir finds the unfinished work of
    run 1, ``requeue_unprocessed_work()`` puts it back under its original ids, and the
    producer starts again from the beginning: its keyed puts of work already finished are
    skipped.  Fresh consumers finish the work.
    Check: every message put in run 1 must have been completed exactly once by the
    journals (``lost`` = 0), no acknowledged message may come back (``duplicates`` = 0),
    and a third queue must find nothing outstanding.

Folder queue (``<dir>/folder``)
    A producer process publishes ``messages`` files with ``put_data`` and closes (DONE).
    One consumer process acknowledges a few files, then claims ``batch`` more and reports
    that it holds them; the other consumers start, process everything else and return
    DONE (the held claims are live, so their automatic recovery leaves them alone).  The
    holder is then killed with SIGKILL, its claims still in ``wip/``.
    ``folder_admin.status`` (what ``pympx-queues status`` prints) shows them as stale,
    ``folder_admin.requeue_stale`` (what ``pympx-queues requeue`` runs) puts them back,
    and a new consumer finishes them.
    Check: consumers acknowledge into ``done/`` (``task_done_directory``), which never
    overwrites, so a file completed twice would be there twice; every file put must be
    there exactly once (``lost`` = 0, ``duplicates`` = 0) and nothing may be left ready or
    claimed.

Durable pipeline (``<dir>/pipeline``)
    Run 1: a coordinator process runs ``messages`` rows through extract (threads) ->
    transform (2 worker processes) -> load (a sink that stores one file per key in
    ``<dir>/pipeline/warehouse``), journaled in ``<dir>/pipeline/journal``.  Once a third
    of the rows are stored the coordinator is killed with SIGKILL; its worker processes
    die with it.
    Run 2: a new coordinator on the same journal and the same source skips the keys that
    are done, resumes the items that were in flight at the stage they were in, and
    finishes.  The sink uses the pending mark (``ctx.pending``) to skip a key it stored
    just before the kill.
    Check: every row stored (``lost`` = 0), none stored twice (``done twice`` = 0), and
    the re-runs per stage (at most the items in flight at the kill; a finished stage is
    never re-run), counted from the handlers' own log.

Everything the report says is read back from disk (journals, ``done/``, the folder
status), not from the demo's own bookkeeping.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from . import journal as jr
from .folder import ReadableFolderQueue, WritableFolderQueue
from .folder import admin as folder_admin
from .folder import layout as L
from .persistent import PersistentQueue
from .sentinels import DONE, is_sentinel

__all__ = ["DemoReport", "PersistentDemoReport", "FolderDemoReport", "PipelineDemoReport",
           "QUEUES", "run_demo", "format_report", "AFTER_A_CRASH"]

PREFIX = "demo"
FOLDER_EXT = ".tsv"
QUEUES = ("persistent", "folder", "pipeline", "both", "all")
_PARTS = {"persistent": ("persistent",), "folder": ("folder",), "pipeline": ("pipeline",),
          "both": ("persistent", "folder"), "all": ("persistent", "folder", "pipeline")}
PIPELINE_STAGES = ("extract", "transform", "load")
_HOLDER_FIRST = 3  # files the folder victim acknowledges before it holds claims

#: The one-line hint printed at the end: what a person runs after a real crash.
AFTER_A_CRASH = ("after a real crash: `pympx-queues status DIR` shows stale claims and "
                 "outstanding work, `pympx-queues requeue DIR` puts it back "
                 "(DIR: the queue folder or pickup dir); for a pipeline journal dir, "
                 "`status DIR` shows each stage and its dead letters and rerunning the "
                 "pipeline resumes it")


class _PartReport:
    """``ok`` and ``to_dict`` shared by the two parts' reports."""

    put: int
    messages: int
    lost: int
    duplicates: int
    outstanding_at_end: int

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicates == 0 and self.outstanding_at_end == 0
                and self.put == self.messages)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class PersistentDemoReport(_PartReport):
    """What the PersistentQueue part did and found; ``ok``: nothing lost or redone."""

    directory: str
    messages: int
    consumers: int
    put: int = 0  # messages put (and journaled) in run 1
    completed_run1: int = 0
    killed_pid: int = 0
    killed_holding: List[str] = field(default_factory=list)  # ids it had not acked
    outstanding_after_crash: int = 0
    requeued: int = 0
    skipped_on_restart: int = 0  # keyed puts of the restarted producer that were skipped
    completed_run2: int = 0
    lost: int = 0  # put in run 1, never completed
    duplicates: int = 0  # acknowledged more than once
    outstanding_at_end: int = 0
    seconds: float = 0.0


@dataclass
class FolderDemoReport(_PartReport):
    """What the folder-queue part did and found; ``ok``: nothing lost or redone."""

    directory: str  # the queue folder
    messages: int
    consumers: int
    run_id: str = ""
    put: int = 0  # files the producer published (put_data returned)
    killed_pid: int = 0
    killed_holding: List[str] = field(default_factory=list)  # names it held claims on
    # what folder_admin.status showed after the kill
    stale_claims: List[str] = field(default_factory=list)
    live_claims: int = 0
    ready_after_crash: int = 0
    completed_before_recovery: int = 0  # files in done/ at that moment
    requeued: int = 0  # claims folder_admin.requeue_stale returned to the queue
    completed_after_recovery: int = 0  # files the new consumer acknowledged
    completed: int = 0  # files in done/ at the end
    lost: int = 0  # put, never in done/
    duplicates: int = 0  # in done/ more than once
    outstanding_at_end: int = 0  # ready + claimed, per folder_admin.status
    seconds: float = 0.0


@dataclass
class PipelineDemoReport:
    """What the pipeline part did and found; ``ok``: nothing lost, nothing stored twice,
    and no stage re-ran more items than were in flight at the kill."""

    directory: str  # <dir>/pipeline (journal/ and warehouse/ inside)
    messages: int  # rows in the source
    killed_pid: int = 0
    stored_run1: int = 0  # files in the warehouse when the coordinator was killed
    workers_killed: List[int] = field(default_factory=list)  # its transform workers
    workers_left: int = 0  # of those, still running after the kill
    skipped_done: int = 0  # run 2: source rows skipped as done (read from its report)
    resumed: int = 0  # run 2: items resumed from the journal (in flight at the kill)
    done_run2: int = 0  # run 2: items that ended done
    dead: int = 0  # items dead-lettered (run 2 report)
    reruns: Dict[str, int] = field(default_factory=dict)  # per stage: starts beyond one per key
    in_flight_bound: int = 0  # queue sizes + workers of all stages
    stored: int = 0  # files in the warehouse at the end
    lost: int = 0  # rows never stored
    done_twice: int = 0  # rows the sink stored twice
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.done_twice == 0 and self.dead == 0
                and self.workers_left == 0 and self.stored == self.messages
                and sum(self.reruns.values()) <= self.in_flight_bound)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class DemoReport:
    """All parts; ``ok`` is True when no part that ran lost or redid anything."""

    directory: str
    queue: str = "all"
    temporary: bool = False  # the directory was a temp dir, removed afterwards
    persistent: Optional[PersistentDemoReport] = None
    folder: Optional[FolderDemoReport] = None
    pipeline: Optional[PipelineDemoReport] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        parts = [p for p in (self.persistent, self.folder, self.pipeline) if p is not None]
        return bool(parts) and all(p.ok for p in parts)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "ok": self.ok, "directory": self.directory, "queue": self.queue,
            "temporary": self.temporary, "seconds": self.seconds,
            "persistent": None if self.persistent is None else self.persistent.to_dict(),
            "folder": None if self.folder is None else self.folder.to_dict(),
            "pipeline": None if self.pipeline is None else self.pipeline.to_dict(),
            "after_a_crash": AFTER_A_CRASH,
        }


# ------------------------------------------------------------------ child processes
def _item(i: int) -> Dict[str, Any]:
    return {"row": i, "file": f"sales_{i:04d}.csv", "amount": round(i * 1.25, 2)}


def _producer(q: PersistentQueue, n: int, report: Any) -> None:
    skipped = 0
    for i in range(n):
        if q.put(_item(i), key=f"sales_{i:04d}") is None:
            skipped += 1
    q.close()
    report.put(("producer", os.getpid(), skipped))


def _consumer(q: PersistentQueue, work: float, report: Any, holding: Any, victim: bool,
              batch: int) -> None:
    """Take up to ``batch`` messages at a time, work on each, acknowledge each.

    The victim announces (``holding``) when it holds unacknowledged messages and keeps
    working slowly, so that the parent's SIGKILL lands in the middle of its batch.
    """
    acked = 0
    while True:
        msgs = []
        first = q.get_message(timeout=60)
        if not is_sentinel(first):
            msgs.append(first)
            while len(msgs) < batch:
                try:
                    more = q.get_message(block=False)
                except Exception:
                    break
                msgs.append(more)
                if is_sentinel(more):
                    break
        else:
            msgs.append(first)
        for msg in msgs:
            if is_sentinel(msg):
                report.put(("end", os.getpid(), acked))
                q.dispose()
                return
            if victim and acked >= 3:
                report.put(("holding", os.getpid(), [m.id for m in msgs[msgs.index(msg):]]))
                holding.set()
                time.sleep(3600)  # "working" until the SIGKILL arrives
            time.sleep(work)  # the work itself
            q.task_done(msg)
            acked += 1
            report.put(("acked", os.getpid(), msg.id))


# ------------------------------------------------------------------ folder queue children
def _folder_name(i: int) -> str:
    return f"sales_{i:04d}{FOLDER_EXT}"


def _row_text(i: int) -> str:
    """A message file; its first column names the message (the check reads it back)."""
    item = _item(i)
    return (f"message\trow\tfile\tamount\n"
            f"{_folder_name(i)}\t{item['row']}\t{item['file']}\t{item['amount']}\n")


def _folder_producer(qdir: str, run_id: str, n: int, report: Any) -> None:
    with WritableFolderQueue(qdir, FOLDER_EXT, run_id=run_id) as q:  # HELO
        names = [os.path.basename(q.put_data(_folder_name(i), _row_text(i)))
                 for i in range(n)]
    # leaving the block wrote DONE
    report.put(("producer", os.getpid(), names))


def _folder_reader(qdir: str, run_id: str) -> ReadableFolderQueue:
    return ReadableFolderQueue(qdir, FOLDER_EXT,
                               task_done_directory=os.path.join(qdir, L.DONE_DIR),
                               run_id=run_id, expected_producers=1, poll_interval=0.1,
                               create=True)  # consumers may start before the producer


def _folder_consumer(qdir: str, run_id: str, work: float, report: Any) -> None:
    """Claim, work, acknowledge (into done/) until DONE."""
    q = _folder_reader(qdir, run_id)
    acked = 0
    for path in q:
        with open(path, encoding="utf-8") as f:  # the work: read the file ...
            f.read()
        time.sleep(work)  # ... and take a little time over it
        q.task_done(path)
        acked += 1
    q.close()
    report.put(("end", os.getpid(), acked))


def _folder_holder(qdir: str, run_id: str, work: float, report: Any, first: int,
                   hold: int) -> None:
    """Acknowledge ``first`` files, then claim ``hold`` more and keep them (the victim)."""
    q = _folder_reader(qdir, run_id)
    for _ in range(first):
        path = q.get(timeout=60)
        time.sleep(work)
        q.task_done(path)
    held = []
    for _ in range(hold):
        path = q.get(timeout=60)
        if path is DONE:
            break
        held.append(os.path.basename(q.original_filename_from_wip(path)))
    report.put(("holding", os.getpid(), held))
    time.sleep(3600)  # "working" on them until the SIGKILL arrives


# ------------------------------------------------------------------ the demo
def _collect(report: Any, out: List[tuple], until: Any, timeout: float) -> None:
    """Read a SimpleQueue (synchronous puts: nothing is in flight when a child is killed)
    until ``until(out)`` holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        while not report.empty():
            out.append(report.get())
        if until(out):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("demo: processes did not report in time")
        time.sleep(0.01)  # polling pace of the demo's own progress reports


def _journal_state(directory: str) -> jr.History:
    return jr.scan_dirs([directory], PREFIX)


class _Children:
    """A start-method context that remembers the processes it starts, so that the ones
    still running after an error (a victim sleeping until its SIGKILL) can be killed."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.procs: List[Any] = []

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - mirrors the context
        p = self.ctx.Process(*args, **kwargs)
        self.procs.append(p)
        return p

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)

    def kill_leftovers(self) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                p.kill()  # only the demo's own children, by their process object
                p.join(5)


def _fresh(path: str) -> None:
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"{path} is not empty: give the demo a new directory")


def run_demo(directory: Optional[str] = None, *, messages: int = 200, consumers: int = 3,
             queue: str = "all", work_seconds: float = 0.003, batch: int = 5,
             timeout: float = 50.0, context: Any = None) -> DemoReport:
    """Run the demo in ``directory`` (a new temp dir, removed afterwards, by default).

    ``queue`` picks the parts: ``"persistent"`` (``<dir>/pickup``), ``"folder"``
    (``<dir>/folder``), ``"pipeline"`` (``<dir>/pipeline``), ``"both"`` (the two queues)
    or ``"all"`` (the three, in that order).  Blocks until done (a few seconds; at
    most about ``timeout`` seconds per phase).  Starts processes with ``context`` (default
    ``spawn``).  Raises ``TimeoutError`` if processes stop reporting, ``FileExistsError``
    if a part's folder in ``directory`` is not empty; returns the report otherwise (check
    ``report.ok``).
    """
    if messages < 10 or consumers < 2:
        raise ValueError("the demo needs at least 10 messages and 2 consumers")
    if queue not in QUEUES:
        raise ValueError(f"queue must be one of {QUEUES}, got {queue!r}")
    ctx = _Children(multiprocessing.get_context(context or "spawn"))
    own = directory is None
    base = tempfile.mkdtemp(prefix="pympx-queues-demo-") if own else os.path.abspath(directory)
    pickup = os.path.join(base, "pickup")
    qdir = os.path.join(base, "folder")
    pdir = os.path.join(base, "pipeline")
    parts = _PARTS[queue]
    if "persistent" in parts:
        _fresh(pickup)
    if "folder" in parts:
        _fresh(qdir)
    if "pipeline" in parts:
        _fresh(pdir)
    started = time.monotonic()
    report = DemoReport(base, queue, own)
    try:
        if "persistent" in parts:
            t0 = time.monotonic()
            report.persistent = PersistentDemoReport(pickup, messages, consumers)
            try:
                _run_persistent(ctx, pickup, report.persistent, work_seconds, batch, timeout)
            finally:
                report.persistent.seconds = round(time.monotonic() - t0, 2)
        if "folder" in parts:
            t0 = time.monotonic()
            report.folder = FolderDemoReport(qdir, messages, consumers)
            try:
                _run_folder(ctx, qdir, report.folder, work_seconds, batch, timeout)
            finally:
                report.folder.seconds = round(time.monotonic() - t0, 2)
        if "pipeline" in parts:
            t0 = time.monotonic()
            report.pipeline = PipelineDemoReport(pdir, messages)
            try:
                _run_pipeline(ctx, pdir, report.pipeline, work_seconds, timeout)
            finally:
                report.pipeline.seconds = round(time.monotonic() - t0, 2)
    finally:
        ctx.kill_leftovers()
        report.seconds = round(time.monotonic() - started, 2)
        if own:
            shutil.rmtree(base, ignore_errors=True)
    return report


def _run_persistent(ctx: Any, pickup: str, report: PersistentDemoReport, work: float,
                    batch: int, timeout: float) -> None:
    n, k = report.messages, report.consumers
    # ---------------------------------------------------------------- run 1: the crash
    q1 = PersistentQueue(PREFIX, pickup, number_of_workers=k, context=ctx.ctx)
    events = ctx.SimpleQueue()
    holding = ctx.Event()
    victim = ctx.Process(target=_consumer, args=(q1, work * 4, events, holding, True, batch),
                         name="victim")
    others = [ctx.Process(target=_consumer, args=(q1, work, events, holding, False, batch),
                          name=f"consumer-{i}") for i in range(1, k)]
    producer = ctx.Process(target=_producer, args=(q1, n, events), name="producer")
    log: List[tuple] = []
    victim.start()
    producer.start()
    if not holding.wait(timeout):
        raise TimeoutError("demo: the victim consumer never got its messages")
    # The victim now holds unacknowledged messages; the other consumers start working
    # and, once they are busy, the victim is killed: a crash in the middle of the run.
    for p in others:
        p.start()
    _collect(events, log, lambda out: any(e[0] == "acked" and e[1] != victim.pid
                                          for e in out), timeout)
    os.kill(victim.pid, signal.SIGKILL)  # mid-run, with messages not yet acknowledged
    victim.join(timeout)
    report.killed_pid = victim.pid or 0
    _collect(events, log, lambda out: sum(e[0] == "end" for e in out) == k - 1
             and any(e[0] == "producer" for e in out)
             and any(e[0] == "holding" for e in out), timeout)
    for p in (producer, *others):
        p.join(timeout)
    report.killed_holding = next(e[2] for e in log if e[0] == "holding")
    q1.dispose()

    state = _journal_state(pickup)
    report.put = len(state.requested)
    report.completed_run1 = len(state.completed)
    run1_ids = set(state.requested)
    completed: Dict[str, int] = {}
    for scan in state.scans:
        for _, kind, payload in scan.records:
            if kind == jr.KIND_DONE:
                completed[payload["i"]] = completed.get(payload["i"], 0) + 1

    # ---------------------------------------------------------------- run 2: recovery
    q2 = PersistentQueue(PREFIX, pickup, number_of_workers=k - 1, context=ctx.ctx)
    report.outstanding_after_crash = len(q2.get_outstanding_messages())
    report.requeued = q2.requeue_unprocessed_work()
    events2 = ctx.SimpleQueue()
    log2: List[tuple] = []
    producer = ctx.Process(target=_producer, args=(q2, n, events2), name="producer-restart")
    consumers = [ctx.Process(target=_consumer, args=(q2, work, events2, holding, False, batch),
                             name=f"consumer-r{i}") for i in range(1, k)]
    for p in (producer, *consumers):
        p.start()
    _collect(events2, log2, lambda out: sum(e[0] == "end" for e in out) == k - 1
             and any(e[0] == "producer" for e in out), timeout)
    for p in (producer, *consumers):
        p.join(timeout)
    report.skipped_on_restart = next(e[2] for e in log2 if e[0] == "producer")
    q2.dispose()
    state2 = _journal_state(pickup)
    run2 = [s for s in state2.scans if s.name.run == q2.run_id]
    done2 = [payload["i"] for s in run2 for _, kind, payload in s.records
             if kind == jr.KIND_DONE]
    report.completed_run2 = len(done2)
    for mid in done2:
        completed[mid] = completed.get(mid, 0) + 1

    # ---------------------------------------------------------------- check
    report.lost = len(run1_ids - set(completed))
    report.duplicates = sum(1 for c in completed.values() if c > 1)
    q3 = PersistentQueue(PREFIX, pickup, context=ctx.ctx)
    report.outstanding_at_end = len(q3.get_outstanding_messages())


def _done_counts(qdir: str) -> Dict[str, int]:
    """Message name -> how many times it is in ``done/`` (read from each file's content:
    a second completion would sit there under a ``name~xxxxxxxx`` variant)."""
    counts: Dict[str, int] = {}
    for m in folder_admin.list_messages(qdir, "done", FOLDER_EXT):
        with open(m.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        name = lines[1].split("\t")[0] if len(lines) > 1 else m.name
        counts[name] = counts.get(name, 0) + 1
    return counts


def _run_folder(ctx: Any, qdir: str, report: FolderDemoReport, work: float, hold: int,
                timeout: float) -> None:
    n, k = report.messages, report.consumers
    # An explicit run id on both sides: the consumer started after recovery must follow
    # this run, which the first consumers have already seen end (README: run ids).
    report.run_id = run_id = L.new_run_id()
    events = ctx.SimpleQueue()
    log: List[tuple] = []
    producer = ctx.Process(target=_folder_producer, args=(qdir, run_id, n, events),
                           name="folder-producer")
    victim = ctx.Process(target=_folder_holder,
                         args=(qdir, run_id, work, events, _HOLDER_FIRST, hold),
                         name="folder-victim")
    producer.start()
    victim.start()
    _collect(events, log, lambda out: any(e[0] == "holding" for e in out), timeout)
    # The victim holds its claims; the others process everything else and return DONE
    # (the victim is alive, so their recovery before DONE leaves its claims alone).
    others = [ctx.Process(target=_folder_consumer, args=(qdir, run_id, work, events),
                          name=f"folder-consumer-{i}") for i in range(1, k)]
    for p in others:
        p.start()
    _collect(events, log, lambda out: sum(e[0] == "end" for e in out) == k - 1
             and any(e[0] == "producer" for e in out), timeout)
    for p in (producer, *others):
        p.join(timeout)
    put_names = next(e[2] for e in log if e[0] == "producer")
    report.put = len(put_names)
    report.killed_holding = next(e[2] for e in log if e[0] == "holding")
    os.kill(victim.pid, signal.SIGKILL)  # while it holds claims
    victim.join(timeout)
    report.killed_pid = victim.pid or 0

    # ---------------------------------------------------------------- what an operator sees
    st = folder_admin.status(qdir, FOLDER_EXT)  # as `pympx-queues status` shows it
    report.stale_claims = sorted(c.name for c in st.claims if c.stale)
    report.live_claims = st.wip_live
    report.ready_after_crash = st.ready
    report.completed_before_recovery = st.done

    # ---------------------------------------------------------------- recovery
    # what `pympx-queues requeue` runs: stale claims back to the ready folder
    report.requeued = len(folder_admin.requeue_stale(qdir, message_extension=FOLDER_EXT))
    events2 = ctx.SimpleQueue()
    log2: List[tuple] = []
    fresh = ctx.Process(target=_folder_consumer, args=(qdir, run_id, work, events2),
                        name="folder-consumer-new")
    fresh.start()
    _collect(events2, log2, lambda out: any(e[0] == "end" for e in out), timeout)
    fresh.join(timeout)

    # ---------------------------------------------------------------- check (from disk)
    done = _done_counts(qdir)
    report.completed = sum(done.values())
    report.completed_after_recovery = report.completed - report.completed_before_recovery
    report.lost = len(set(put_names) - set(done))
    report.duplicates = sum(1 for c in done.values() if c > 1)
    end = folder_admin.status(qdir, FOLDER_EXT)
    report.outstanding_at_end = end.ready + end.wip_live + end.wip_stale


# --------------------------------------------------------------------------- pipeline part
# Module level: the coordinator child and its transform workers (spawn) import them.
_PL_LOG = "PYMPX_DEMO_PIPELINE_LOG"
_PL_STORE = "PYMPX_DEMO_PIPELINE_STORE"
_PL_WORK = "PYMPX_DEMO_PIPELINE_WORK"


def _pl_note(what: str, key: str) -> None:
    line = f"{what} {key} {os.getpid()}\n".encode()
    fd = os.open(os.environ[_PL_LOG], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one O_APPEND write per line: lines of processes never mix
    finally:
        os.close(fd)


def _pl_extract(row: Dict[str, Any], ctx: Any) -> Dict[str, Any]:
    _pl_note("extract", ctx.key)
    return {"row": row["row"], "file": row["file"], "amount": row["amount"]}


def _pl_transform(rec: Dict[str, Any], ctx: Any) -> Dict[str, Any]:
    _pl_note("transform", ctx.key)
    time.sleep(float(os.environ.get(_PL_WORK, "0.003")) * 3)  # the CPU-heavy step
    return dict(rec, amount_cents=int(round(rec["amount"] * 100)))


def _pl_load(rec: Dict[str, Any], ctx: Any) -> str:
    """The sink: one file per key.  ``ctx.pending``: an attempt before a crash may have
    stored this key already (the journal has its pending mark but no done record)."""
    _pl_note("load", ctx.key)
    path = os.path.join(os.environ[_PL_STORE], ctx.key + ".json")
    if ctx.pending and os.path.exists(path):
        return path  # stored before the crash: exactly once by key
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(rec))
    os.replace(tmp, path)
    _pl_note("stored", ctx.key)
    return path


def _pl_stages() -> List[Any]:
    from .pipeline import Stage

    return [Stage("extract", _pl_extract, kind="thread", workers=2),
            Stage("transform", _pl_transform, kind="process", workers=2),
            Stage("load", _pl_load, kind="thread", workers=2, sink=True)]


def _pl_coordinator(pdir: str, n: int, work: float, report_path: str) -> None:
    """A coordinator process: the durable pipeline over the demo's rows, to the end."""
    import logging

    from .pipeline import Pipeline

    # The demo's report says what happened; the engine's per-item warnings (a replayed
    # source offering keys that were resumed from the journal) would bury it.
    logging.getLogger("pympx_queues.pipeline").setLevel(logging.ERROR)

    os.environ[_PL_LOG] = os.path.join(pdir, "handlers.log")
    os.environ[_PL_STORE] = os.path.join(pdir, "warehouse")
    os.environ[_PL_WORK] = str(work)
    rows = (_item(i) for i in range(n))
    p = Pipeline(rows, _pl_stages(), key=lambda row: f"row-{row['row']:04d}",
                 journal_dir=os.path.join(pdir, "journal"), name="demo", progress=False)
    report = p.run_all()
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict(), f)
    os.replace(tmp, report_path)


def _pl_log(pdir: str) -> List[List[str]]:
    path = os.path.join(pdir, "handlers.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split() for line in f if line.count(" ") == 2]


def _pl_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: gave up waiting for {what} after {timeout}s")
        time.sleep(0.01)


def _run_pipeline(ctx: Any, pdir: str, report: PipelineDemoReport, work: float,
                  timeout: float) -> None:
    store = os.path.join(pdir, "warehouse")
    os.makedirs(store, exist_ok=True)
    n = report.messages

    def stored() -> int:
        return sum(1 for name in os.listdir(store) if name.endswith(".json"))

    # Run 1: killed with SIGKILL once a third of the rows are stored.
    run1 = ctx.Process(target=_pl_coordinator, name="pipeline-run1",
                       args=(pdir, n, work, os.path.join(pdir, "report-run1.json")))
    run1.start()
    _wait(lambda: stored() >= n // 3 or not run1.is_alive(), timeout, "a third of the rows")
    if not run1.is_alive():
        raise RuntimeError("demo: the pipeline finished before it could be killed")
    os.kill(run1.pid, signal.SIGKILL)
    run1.join(10)
    report.killed_pid = run1.pid
    report.stored_run1 = stored()
    report.workers_killed = sorted({int(pid) for what, _key, pid in _pl_log(pdir)
                                    if what == "transform"})
    try:  # its workers die with it (PR_SET_PDEATHSIG); give the kernel a moment
        _wait(lambda: not any(_pl_alive(p) for p in report.workers_killed), 10,
              "the killed coordinator's workers to exit")
    except TimeoutError:
        pass
    report.workers_left = sum(_pl_alive(p) for p in report.workers_killed)

    # Run 2: the same source on the same journal, to the end.
    path2 = os.path.join(pdir, "report-run2.json")
    run2 = ctx.Process(target=_pl_coordinator, name="pipeline-run2",
                       args=(pdir, n, work, path2))
    run2.start()
    run2.join(timeout)
    if run2.is_alive() or run2.exitcode != 0 or not os.path.exists(path2):
        raise RuntimeError(f"demo: the resumed pipeline did not finish "
                           f"(exit code {run2.exitcode})")
    with open(path2) as f:
        r2 = json.load(f)
    report.skipped_done = int(r2.get("skipped_done", 0))
    report.resumed = int(r2.get("resumed", 0))
    report.done_run2 = int(r2.get("done", 0))
    report.dead = int(r2.get("dead", 0))

    # The check, from the handlers' own log and the warehouse.
    log = _pl_log(pdir)
    for stage in PIPELINE_STAGES:
        keys = [key for what, key, _pid in log if what == stage]
        report.reruns[stage] = len(keys) - len(set(keys))
    report.in_flight_bound = sum(s.queue_size + s.workers for s in _pl_stages())
    stores = [key for what, key, _pid in log if what == "stored"]
    report.done_twice = len(stores) - len(set(stores))
    report.stored = stored()
    report.lost = n - len(set(stores) & {f"row-{i:04d}" for i in range(n)})


def _where(path: str, temporary: bool) -> str:
    return path + (" (temp, removed)" if temporary else "")


def _format_persistent(report: PersistentDemoReport, temporary: bool) -> List[str]:
    held = len(report.killed_holding)
    return [
        f"pympx-queues demo: PersistentQueue, 1 producer + {report.consumers} consumer "
        f"processes, journals in {_where(report.directory, temporary)}",
        f"  run 1  put {report.put} messages; consumer pid {report.killed_pid} was killed "
        f"with SIGKILL holding {held} unacknowledged message(s)",
        f"         completed {report.completed_run1}; outstanding after the crash: "
        f"{report.outstanding_after_crash}",
        f"  run 2  requeued {report.requeued} (under their original ids); the restarted "
        f"producer's {report.skipped_on_restart} keyed puts of finished or requeued work "
        f"were skipped",
        f"         completed {report.completed_run2}",
        f"  check  lost {report.lost}, completed twice {report.duplicates}, outstanding now "
        f"{report.outstanding_at_end}  ({report.seconds:.1f}s)",
        "  OK: nothing lost, nothing finished was done again" if report.ok else
        "  FAILED: the journals do not add up (see above)",
    ]


def _format_folder(report: FolderDemoReport, temporary: bool) -> List[str]:
    held = len(report.killed_holding)
    return [
        f"pympx-queues demo: folder queue, 1 producer + {report.consumers} consumer "
        f"processes, queue in {_where(report.directory, temporary)}",
        f"  run      put {report.put} files (put_data), producer closed (DONE); consumer pid "
        f"{report.killed_pid} was killed",
        f"           with SIGKILL holding {held} claim(s), after the other "
        f"{report.consumers - 1} had finished the rest",
        f"  status   ready {report.ready_after_crash}, done {report.completed_before_recovery}, "
        f"stale claims {len(report.stale_claims)} (owner gone), live claims "
        f"{report.live_claims}   [= pympx-queues status]",
        f"  recover  requeued {report.requeued} stale claim(s) [= pympx-queues requeue]; "
        f"a new consumer completed {report.completed_after_recovery}",
        f"  check    put {report.put}, completed {report.completed} (files in done/), "
        f"requeued {report.requeued}, lost {report.lost}, completed twice "
        f"{report.duplicates}, outstanding now {report.outstanding_at_end}  "
        f"({report.seconds:.1f}s)",
        "  OK: nothing lost, nothing finished was done again" if report.ok else
        "  FAILED: done/ does not add up (see above)",
    ]


def _format_pipeline(report: PipelineDemoReport, temporary: bool) -> List[str]:
    reruns = ", ".join(f"{k} {v}" for k, v in report.reruns.items()) or "-"
    return [
        f"pympx-queues demo: durable pipeline extract (threads) -> transform (2 processes) "
        f"-> load (sink), in {_where(report.directory, temporary)}",
        f"  run 1  {report.messages} rows; coordinator pid {report.killed_pid} killed with "
        f"SIGKILL after {report.stored_run1} were stored; its "
        f"{len(report.workers_killed)} worker process(es) exited with it "
        f"({report.workers_left} left running)",
        f"  run 2  same source, same journal: {report.skipped_done} done rows skipped, "
        f"{report.resumed} resumed at the stage they were in, {report.done_run2} finished",
        f"  re-runs per stage  {reruns}  (items in flight at the kill, at most "
        f"{report.in_flight_bound}; finished stages are not re-run)",
        f"  check  rows {report.messages}, stored {report.stored}, lost {report.lost}, "
        f"done twice {report.done_twice}, dead {report.dead}  ({report.seconds:.1f}s)",
        "  OK: nothing lost, nothing finished was done again" if report.ok else
        "  FAILED: the warehouse and the handlers' log do not add up (see above)",
    ]


def format_report(report: DemoReport) -> str:
    """The human-readable report printed by ``pympx-queues demo``."""
    lines: List[str] = []
    if report.persistent is not None:
        lines += _format_persistent(report.persistent, report.temporary)
    if report.folder is not None:
        lines += _format_folder(report.folder, report.temporary)
    if report.pipeline is not None:
        lines += _format_pipeline(report.pipeline, report.temporary)
    lines.append(AFTER_A_CRASH)
    return "\n".join(lines)
