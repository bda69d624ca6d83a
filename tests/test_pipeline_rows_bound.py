"""P4 counts rows: a running batch holds its rows, not one item.

The stated bound: items held by a run (admitted, result not yet delivered) never exceed
the sum over stages of ``queue_size + workers * group size`` plus ``prefetch``, where the
group size is the most items one handler call gets (``batch=N``, a partitioned stage's
``batch_size``, else 1).  A stage's scheduler buffer never exceeds its ``queue_size``.
"""

from __future__ import annotations

import threading

from conftest import wait_for
from pympx_queues.pipeline import Pipeline, Stage
from pympx_queues.pipeline.claims import dict_claims
from pympx_queues.pipeline.engine import group_size
from pympx_queues.pipeline.partitions import partitioned_stage


class Held:
    """Items yielded by the source minus results delivered, and its peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def source(self, n):
        for i in range(n):
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            yield i

    def delivered(self, _res) -> None:
        with self.lock:
            self.now -= 1


def test_items_held_with_batch_stages_never_exceed_queue_sizes_plus_workers_times_batch():
    held = Held()
    peaks = {"s": 0, "t": 0}
    stages = [Stage("s", lambda xs: [x + 1 for x in xs], batch=10, workers=2, queue_size=5),
              Stage("t", lambda xs: xs, batch=7, workers=3, queue_size=4)]
    p = Pipeline(held.source(500), stages, on_complete=held.delivered, progress=False,
                 stop_signals=False, prefetch=3)

    def watch(res):
        for sr in p._runs:
            peaks[sr.stage.name] = max(peaks[sr.stage.name], sr.sched.buffered())
        held.delivered(res)

    p.on_complete = watch
    rep = p.run_all()
    assert rep.done == 500
    bound = sum(s.queue_size + s.workers * group_size(s) for s in stages) + 3
    assert bound == 5 + 2 * 10 + 4 + 3 * 7 + 3
    assert held.peak <= bound
    assert peaks["s"] <= 5 and peaks["t"] <= 4


def test_a_partitioned_stage_fills_its_buffer_to_max_buffered_while_a_batch_runs():
    # Counting the running batch as one item took its rows out of the buffer's room: the
    # buffer could not reach max_buffered while a batch ran, so the early flush never
    # triggered then.  Now it can: the first batch waits until the buffer is full.
    rows = [{"start": i, "end": i * 7 + 1} for i in range(2000)]
    stage = partitioned_stage("load", lambda rows: None, dict_claims(10), batch_size=50,
                              workers=2, max_buffered=200, min_fill=1.0)
    sched = stage.scheduler
    reached = []

    def handler(batch):
        if not reached:
            try:
                wait_for(lambda: sched.buffered() >= 200, timeout=10,
                         message="the buffer to reach max_buffered while a batch runs")
                reached.append(True)
            except AssertionError:
                reached.append(False)
        return None

    stage.handler.fn = handler
    rep = Pipeline(rows, [stage], progress=False, stop_signals=False).run_all()
    assert rep.done == 2000
    assert reached and all(reached)
    assert sched.snapshot().peak_buffered <= 200
    assert sched.snapshot().reasons.get("pressure", 0) > 0
