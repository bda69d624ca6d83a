"""``pympx-queues demo``: a crash and a recovery, end to end, in a few seconds.

Run 1
    A producer process puts ``messages`` keyed messages on a journaled
    :class:`~pympx_queues.persistent.PersistentQueue` and closes the stream; ``consumers``
    consumer processes take them in small batches and acknowledge each one after its
    (simulated) work.  One consumer is killed with SIGKILL while it holds messages it has
    not acknowledged yet; the others finish the run.
Run 2 (recovery)
    A new queue on the same pickup dir finds the unfinished work of run 1,
    ``requeue_unprocessed_work()`` puts it back under its original ids, and the producer
    starts again from the beginning: its keyed puts of work already finished are skipped.
    Fresh consumers finish the work.
Check
    Every message put in run 1 must have been completed exactly once by the journals
    (``lost`` = 0), no acknowledged message may come back (``duplicates`` = 0), and a
    third queue must find nothing outstanding.

Everything the report says is read back from the journals on disk, not from the demo's
own bookkeeping.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from . import _journal as jr
from .persistent import PersistentQueue
from .sentinels import is_sentinel

__all__ = ["DemoReport", "run_demo", "format_report"]

PREFIX = "demo"


@dataclass
class DemoReport:
    """What the demo did and found; ``ok`` is True when nothing was lost or redone."""

    directory: str
    messages: int
    consumers: int
    temporary: bool = False  # the directory was a temp dir, removed afterwards
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

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicates == 0 and self.outstanding_at_end == 0
                and self.put == self.messages)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


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


def run_demo(directory: Optional[str] = None, *, messages: int = 200, consumers: int = 3,
             work_seconds: float = 0.003, batch: int = 5, timeout: float = 50.0,
             context: Any = None) -> DemoReport:
    """Run the demo in ``directory`` (a new temp dir, removed afterwards, by default).

    Blocks until done (a few seconds; at most about ``timeout`` seconds per run).
    Starts processes with ``context`` (default ``spawn``).  Raises ``TimeoutError`` if
    processes stop reporting; returns the report otherwise (check ``report.ok``).
    """
    if messages < 10 or consumers < 2:
        raise ValueError("the demo needs at least 10 messages and 2 consumers")
    ctx = multiprocessing.get_context(context or "spawn")
    own = directory is None
    base = tempfile.mkdtemp(prefix="pympx-queues-demo-") if own else os.path.abspath(directory)
    pickup = os.path.join(base, "pickup")
    if os.path.exists(pickup) and os.listdir(pickup):
        raise FileExistsError(f"{pickup} is not empty: give the demo a new directory")
    started = time.monotonic()
    report = DemoReport(pickup, messages, consumers, own)
    try:
        _run(ctx, pickup, report, work_seconds, batch, timeout)
    finally:
        report.seconds = round(time.monotonic() - started, 2)
        if own:
            shutil.rmtree(base, ignore_errors=True)
    return report


def _run(ctx: Any, pickup: str, report: DemoReport, work: float, batch: int,
         timeout: float) -> None:
    n, k = report.messages, report.consumers
    # ---------------------------------------------------------------- run 1: the crash
    q1 = PersistentQueue(PREFIX, pickup, number_of_workers=k, context=ctx)
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
    q2 = PersistentQueue(PREFIX, pickup, number_of_workers=k - 1, context=ctx)
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
    q3 = PersistentQueue(PREFIX, pickup, context=ctx)
    report.outstanding_at_end = len(q3.get_outstanding_messages())


def format_report(report: DemoReport) -> str:
    """The human-readable report printed by ``pympx-queues demo``."""
    held = len(report.killed_holding)
    lines = [
        f"pympx-queues demo: PersistentQueue, 1 producer + {report.consumers} consumer "
        f"processes, journals in {report.directory}"
        + (" (temp, removed)" if report.temporary else ""),
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
    return "\n".join(lines)
