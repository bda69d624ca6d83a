"""A run that can never end fails with PipelineStalled instead of waiting for ever
(P5: a run never hangs); a scheduler that waits for something says so (waiting()) and
the built-in schedulers never trip the check (docs/pipelines.md, custom schedulers)."""

from __future__ import annotations

import threading

import pytest

from conftest import wait_for
from pympx_queues.pipeline import (Pipeline, PipelineStalled, Retry, Scheduler, Stage,
                                   run_partitioned)
from pympx_queues.pipeline.claims import dict_claims
from pympx_queues.pipeline.partitions import partitioned_stage

DEADLINE = 60.0  # a hung run is a failure at this deadline, not at pytest's timeout


def run_with_deadline(p, **kw):
    """p.run_all() in a thread; (report, exception); fails if the run outlives DEADLINE."""
    out = {}

    def target():
        try:
            out["report"] = p.run_all(**kw)
        except BaseException as exc:  # noqa: B902 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(DEADLINE)
    if t.is_alive():
        p.stop(drain=False)
        t.join(DEADLINE)
        pytest.fail(f"the run did not end within {DEADLINE} s (it hung)")
    return out.get("report"), out.get("error")


class HoldOdd(Scheduler):
    """Starts even keys, holds odd ones for ever (a buggy custom scheduler)."""

    def take(self, free):
        out = []
        for item in list(self._items):
            if len(out) >= free:
                break
            if int(item.key) % 2 == 0:
                self._items.remove(item)
                out.append([item])
        return out


def test_a_scheduler_that_holds_items_for_ever_fails_the_run_naming_stage_and_count():
    done = []
    p = Pipeline(range(10), [Stage("first", lambda x: x + 1, kind="thread", workers=2),
                             Stage("picky", lambda x: done.append(x) or x, workers=3,
                                   scheduler=HoldOdd())],
                 progress=False, stop_signals=False)
    rep, err = run_with_deadline(p)
    assert rep is None and isinstance(err, PipelineStalled)
    assert err.stage == "picky" and err.scheduler == "HoldOdd" and err.held == 5
    assert err.holds == {"picky": 5}
    msg = str(err)
    assert "'picky'" in msg and "HoldOdd" in msg and "holds 5 item(s)" in msg
    assert "source has ended" in msg
    assert sorted(done) == [1, 3, 5, 7, 9]  # the even keys ran: the rest was not stuck
    assert p.report.state == "failed" and p.report.done == 5


def test_a_stalled_durable_run_leaves_the_held_items_for_the_next_run(tmp_path):
    stages = [Stage("a", lambda x: x * 10, kind="thread"),
              Stage("b", lambda x: x + 1, scheduler=HoldOdd(), queue_size=8)]
    p = Pipeline(range(8), stages, journal_dir=str(tmp_path), durability="fsync",
                 progress=False, stop_signals=False, keep_results=True)
    rep, err = run_with_deadline(p)
    p.close()
    assert isinstance(err, PipelineStalled) and err.held == 4
    assert "the journal keeps them" in str(err)
    # The next run with a scheduler that starts everything resumes the held keys at
    # stage b (a's outputs come from the journal) and skips the done ones.
    ran_a = []
    stages = [Stage("a", lambda x: ran_a.append(x) or x * 10, kind="thread"),
              Stage("b", lambda x: x + 1)]
    with Pipeline(range(8), stages, journal_dir=str(tmp_path), durability="fsync",
                  progress=False, stop_signals=False, keep_results=True) as p2:
        results = {r.key: r.value for r in p2.run()}
    assert ran_a == []
    assert p2.report.resumed == 4 and p2.report.skipped_done == 4
    assert results == {str(i): i * 10 + 1 for i in range(8)}


def test_finished_items_waiting_for_room_in_a_refusing_stage_name_that_stage():
    class Nothing(Scheduler):
        def take(self, free):
            return []

    p = Pipeline(range(20), [Stage("up", lambda x: x, kind="thread", workers=2),
                             Stage("down", lambda x: x, scheduler=Nothing(), queue_size=3)],
                 progress=False, stop_signals=False)
    rep, err = run_with_deadline(p)
    assert isinstance(err, PipelineStalled)
    assert err.stage == "down" and err.scheduler == "Nothing" and err.held == 3
    assert "wait for room in stage 'down'" in str(err)


def test_a_draining_stop_with_held_items_ends_stopped_and_the_next_run_finishes_them(
        tmp_path, caplog):
    holder = {}

    def first(x):
        if x == 4:  # odd keys are held: some are buffered by now
            holder["p"].stop(drain=True)
        return x

    p = holder["p"] = Pipeline(
        iter(range(10 ** 9)), [Stage("s", first, scheduler=HoldOdd(), queue_size=50)],
        journal_dir=str(tmp_path), progress=False, stop_signals=False)
    rep, err = run_with_deadline(p)
    p.close()
    assert err is None and rep.state == "stopped"
    held = rep.accepted - rep.done
    assert held > 0 and rep.stages["s"].queued == held
    assert "stop(drain=True) cannot finish the items held: stage 's': its scheduler " \
           f"HoldOdd holds {held} item(s)" in caplog.text
    with Pipeline(iter(()), [Stage("s", lambda x: x)], journal_dir=str(tmp_path),
                  progress=False, stop_signals=False) as p2:
        rep2 = p2.run_all()
    assert rep2.resumed == held and rep2.done == held and rep2.state == "finished"


class Later(HoldOdd):
    """Holds odd keys until waiting() has been asked three times (a timer's stand-in)."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.asked = 0

    def waiting(self):
        self.asked += 1
        return self.answer(self)

    def take(self, free):
        if self.asked >= 3:
            out = [[self._items.popleft()] for _ in range(min(free, len(self._items)))]
            return out
        return super().take(free)


def test_a_scheduler_waiting_for_a_timer_is_asked_again_and_the_run_finishes():
    sched = Later(lambda s: 0.01)
    p = Pipeline(range(6), [Stage("s", lambda x: x, scheduler=sched)], progress=False,
                 stop_signals=False)
    rep, err = run_with_deadline(p)
    assert err is None and rep.state == "finished" and rep.done == 6
    assert sched.asked >= 3


def test_a_scheduler_waiting_for_an_event_runs_once_woken():
    gate = threading.Event()

    class Gate(HoldOdd):
        asked = 0

        def waiting(self):
            self.asked += 1
            return None if gate.is_set() else "the gate"

        def take(self, free):
            if gate.is_set():
                return [[self._items.popleft()] for _ in range(min(free, len(self._items)))]
            return super().take(free)

    sched = Gate()
    p = Pipeline(range(6), [Stage("s", lambda x: x, scheduler=sched)], progress=False,
                 stop_signals=False)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("rep", p.run_all()), daemon=True)
    t.start()
    wait_for(lambda: sched.asked, message="the engine to ask what the scheduler waits for")
    assert t.is_alive()  # it says it waits: no PipelineStalled
    gate.set()
    p.wake()
    t.join(DEADLINE)
    assert not t.is_alive() and out["rep"].state == "finished" and out["rep"].done == 6


def test_a_scheduler_waiting_for_items_of_an_earlier_stage_is_not_a_stall():
    release = threading.Event()

    class AllAtOnce(Scheduler):
        """Starts nothing before it holds all six items (they come from a slow stage)."""

        go = False

        def take(self, free):
            self.go = self.go or len(self._items) == 6
            if not self.go:
                return []
            return [[self._items.popleft()] for _ in range(min(free, len(self._items)))]

    def slow(x):
        if x == 5:
            release.wait(DEADLINE)
        return x

    p = Pipeline(range(6), [Stage("slow", slow, kind="thread", workers=1),
                            Stage("all", lambda x: x, scheduler=AllAtOnce(), queue_size=6)],
                 progress=False, stop_signals=False)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("rep", p.run_all()), daemon=True)
    t.start()
    wait_for(lambda: p.stats().stages["all"].queued == 5, message="five items held")
    release.set()
    t.join(DEADLINE)
    assert not t.is_alive() and out["rep"].done == 6


def test_retries_with_backoff_are_not_a_stall():
    tries = {}

    def flaky(x):
        tries[x] = tries.get(x, 0) + 1
        if tries[x] < 3:
            raise ValueError("not yet")
        return x

    p = Pipeline(range(4), [Stage("s", flaky, kind="thread",
                                  retry=Retry(max_attempts=3, backoff=0.05, jitter=0))],
                 progress=False, stop_signals=False)
    rep, err = run_with_deadline(p)
    assert err is None and rep.done == 4 and rep.state == "finished"


def test_partitions_over_a_skewed_row_set_never_trip_the_stall_check(tmp_path):
    # most rows share one hot node: its batches run one at a time while the other
    # workers idle and the rest of the buffer waits on its claims
    hot = [{"start": 1, "end": i % 7, "i": i} for i in range(1500)]
    rows = hot + [{"start": 2 + i % 5, "end": 100 + i, "i": 1500 + i} for i in range(300)]
    seen = []
    rep = run_partitioned(rows, lambda batch: seen.extend(r["i"] for r in batch),
                          dict_claims(4), batch_size=40, workers=4, max_buffered=200,
                          journal_dir=str(tmp_path), durability="fsync", stop_signals=False)
    assert sorted(seen) == list(range(1800))
    assert rep.run.state == "finished" and rep.rows_committed == 1800


def test_a_draining_stop_of_a_partitioned_stage_with_a_hot_claim_ends():
    rows = [{"start": 1, "end": i % 3, "i": i} for i in range(3000)]
    holder = {}

    def handler(batch):
        if batch[0]["i"] > 200 and "stopped" not in holder:
            holder["stopped"] = True
            holder["p"].stop(drain=True)

    stage = partitioned_stage("load", handler, dict_claims(4), batch_size=30, workers=3,
                              max_buffered=300)
    p = holder["p"] = Pipeline(rows, [stage], stop_signals=False, progress=False)
    rep, err = run_with_deadline(p)
    assert err is None and rep.state == "stopped" and rep.done == rep.accepted
