"""Thread stages hand groups to their threads ahead (kind_thread.AHEAD): a thread that
ends one item takes the next without sleeping.  What a hand-over must not change: a
queued item that the run abandons never starts, a timeout counts from the attempt's
start, schedulers that forbid waiting groups (a kill switch's, fail-fast partitions)
get a group started at once, and the memory bound stays workers + queue."""

from __future__ import annotations

import threading
import time

import pytest

from pympx_queues.pipeline import Pipeline, Stage
from pympx_queues.pipeline.batch_map import _MapScheduler
from pympx_queues.pipeline.kind_thread import AHEAD, ThreadRunner
from pympx_queues.pipeline.partitions import ClaimScheduler

from conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_stage_hands_ahead_and_abandoned_queued_items_never_start():
    release = threading.Event()
    started = []

    def slow(x):
        started.append(x)
        assert release.wait(30)
        return x

    p = Pipeline(range(50), [Stage("s", slow, kind="thread", workers=1, queue_size=10)],
                 progress=False, stop_signals=False)
    results = []
    t = threading.Thread(target=lambda: results.extend(p.run()))
    t.start()
    try:
        # one item runs; AHEAD - 1 more wait in the thread's queue, handed over (they
        # count against the stage's queue_size: 10 items wait in all)
        runner = wait_for(lambda: p._runs and p._runs[0].runner)
        wait_for(lambda: runner._in.qsize() == AHEAD - 1)
        st = p.stats().stages["s"]
        assert st.in_flight == 1 and st.queued == 10
        p.stop(drain=False)
        wait_for(lambda: not p.running)
    finally:
        release.set()
        t.join(30)
    # the stage's threads end (the released one returns: its run is over); none of
    # them started an item queued ahead
    wait_for(lambda: not any(th.name.startswith("pipeline-s-")
                             for th in threading.enumerate()))
    assert started == [0]
    assert p.report.state == "halted" and p.report.done == 0


def test_with_a_timeout_each_attempt_is_timed_from_its_own_start():
    # One thread, four items of 0.4 s, a 1 s timeout: timed from a hand-over ahead of
    # the thread, the third would run out at 1.2 s; timed from its start none does.
    def slow(x):
        time.sleep(0.4)
        return x

    rep = Pipeline(range(4), [Stage("s", slow, kind="thread", workers=1, timeout=1.0)],
                   progress=False, stop_signals=False).run_all()
    assert rep.done == 4 and rep.dead == 0


@pytest.mark.parametrize("sched", [_MapScheduler(2, False), ClaimScheduler()])
def test_schedulers_that_forbid_waiting_groups_get_them_started_at_once(sched):
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        runner = ThreadRunner(Stage("s", lambda x: x, kind="thread", workers=3,
                                    scheduler=sched), loop)
        assert runner.slots == 3
        runner.close()
        runner = ThreadRunner(Stage("s", lambda x: x, kind="thread", workers=3,
                                    queue_size=5), loop)
        assert runner.slots == 3 + 5  # ahead, at most the stage's queue
        runner.close()
        for stage in (Stage("s", lambda x: x, kind="thread", workers=3, sink=True),
                      Stage("s", lambda x: x, kind="thread", workers=3, timeout=5)):
            runner = ThreadRunner(stage, loop)
            assert runner.slots == 3  # a sink's pending record, a timeout: at the start
            runner.close()
    finally:
        loop.close()


def test_items_held_stay_within_workers_plus_queues():
    # (what a thread stage holds ahead counts against its queue_size)
    live = []
    peak = [0]
    lock = threading.Lock()

    def src():
        for i in range(3000):
            with lock:
                live.append(i)
                peak[0] = max(peak[0], len(live))
            yield i

    def sink(x):
        with lock:
            live.remove(x)
        return x

    stages = [Stage("a", lambda x: x, kind="thread", workers=2, queue_size=4),
              Stage("b", sink, kind="thread", workers=2, queue_size=4)]
    rep = Pipeline(src(), stages, progress=False, stop_signals=False,
                   prefetch=0).run_all()
    assert rep.done == 3000
    bound = sum(2 + 4 for _ in stages) + 2  # workers + queue per stage, + the source's
    #                                         next item and the one at the sink
    assert peak[0] <= bound, (peak[0], bound)
