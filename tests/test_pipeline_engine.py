"""The in-memory pipeline engine: kinds, checks, retries, dead letters, stop, order,
schedulers, state and statistics (DESIGN.md section 7, docs/dev/pipeline-api.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import signal
import sys
import threading
import time

import pytest

from conftest import wait_for
from pympx_queues.pipeline import (ItemResult, Pipeline, PipelineError, Refill, Retry,
                                   Scheduler, Stage, StageSignatureError)


# Module-level handlers: process workers import them.
def double(x):
    return x * 2


def add_key(x, ctx):
    return [x, ctx.key, ctx.stage, ctx.attempt]


async def inc(x):
    await asyncio.sleep(0)
    return x + 1


def die_on_three(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_on_three(x):
    if x == 3:
        os._exit(7)
    return x


def hang_on_two(x):
    if x == 2:
        time.sleep(600)
    return x


def crash_then_work(x, ctx):
    if ctx.attempt == 1 and x % 4 == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _run(p):
    return {r.key: r for r in p.run()}


def test_async_thread_and_process_stages_pass_items_through_in_order_of_stages():
    p = Pipeline(range(20), [Stage("inc", inc, kind="async", workers=3),
                             Stage("double", double, kind="thread", workers=2),
                             Stage("proc", add_key, kind="process", workers=2)],
                 progress=False)
    res = _run(p)
    assert len(res) == 20
    for i in range(20):
        assert res[str(i)].ok
        assert res[str(i)].value == [(i + 1) * 2, str(i), "proc", 1]
        assert set(res[str(i)].stage_timings) == {"inc", "double", "proc"}
    rep = p.report
    assert rep.state == "finished" and rep.done == 20 and rep.dead == 0
    assert {n: s.done for n, s in rep.stages.items()} == {"inc": 20, "double": 20, "proc": 20}


def test_executor_stage_takes_any_concurrent_futures_executor():
    with cf.ThreadPoolExecutor(2) as ex:
        p = Pipeline([1, 2, 3], [Stage("x", double, executor=ex)], progress=False)
        assert sorted(r.value for r in p.run()) == [2, 4, 6]
    with cf.ProcessPoolExecutor(2) as ex:
        p = Pipeline([1, 2, 3], [Stage("x", add_key, executor=ex)], progress=False)
        assert sorted(r.value[0] for r in p.run()) == [1, 2, 3]


def test_handler_signatures_are_checked_when_the_pipeline_is_built_naming_the_stage():
    def three(a, b, c):
        return a

    with pytest.raises(StageSignatureError, match="'parse'"):
        Pipeline([], [Stage("parse", three)])
    with pytest.raises(StageSignatureError, match="'fetch'.*coroutine"):
        Pipeline([], [Stage("fetch", double, kind="async")])
    with pytest.raises(StageSignatureError, match="'store'.*kind='async'"):
        Pipeline([], [Stage("store", inc, kind="thread")])
    with pytest.raises(StageSignatureError, match="'cpu'.*module level"):
        Pipeline([], [Stage("cpu", lambda x: x, kind="process", start_method="spawn")])
    with pytest.raises(PipelineError, match="unique"):
        Pipeline([], [Stage("a", double), Stage("a", double)])
    with pytest.raises(PipelineError, match="kind must be one of"):
        Stage("a", double, kind="fibre")


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 has interpreters")
def test_interpreter_kind_below_python_3_14_is_a_clear_error_not_a_fallback():
    with pytest.raises(PipelineError, match="'sub'.*3.14"):
        Pipeline([1], [Stage("sub", double, kind="interpreter")])


@pytest.mark.skipif(sys.version_info < (3, 14), reason="needs InterpreterPoolExecutor")
def test_interpreter_kind_runs_on_python_3_14():  # pragma: no cover - 3.14 only
    p = Pipeline([1, 2], [Stage("sub", double, kind="interpreter")], progress=False)
    assert sorted(r.value for r in p.run()) == [2, 4]


def test_failed_attempts_are_retried_with_exponential_backoff_then_succeed():
    seen = {}
    lock = threading.Lock()

    def flaky(x, ctx):
        with lock:
            seen.setdefault(x, []).append(time.monotonic())
        if ctx.attempt < 3:
            raise ConnectionError(f"try {ctx.attempt}")
        return x

    retry = Retry(max_attempts=3, backoff=0.05, multiplier=2.0, jitter=0.1)
    p = Pipeline(range(4), [Stage("net", flaky, workers=2, retry=retry)], progress=False)
    res = _run(p)
    assert all(r.ok for r in res.values())
    for times in seen.values():
        assert len(times) == 3
        # the waits are at least backoff * multiplier**(n-1) minus the jitter
        assert times[1] - times[0] >= 0.05 * 0.9
        assert times[2] - times[1] >= 0.10 * 0.9
    st = p.report.stages["net"]
    assert st.failed_attempts == 8 and st.retried == 8 and st.dead == 0


def test_an_exception_dead_letters_one_item_with_traceback_and_the_rest_goes_on():
    def parse(x):
        if x == 5:
            raise ValueError("bad row 5")
        return x

    p = Pipeline(range(10), [Stage("parse", parse, retry=Retry(max_attempts=2,
                                                                backoff=0.01))],
                 progress=False)
    res = _run(p)
    assert sum(r.ok for r in res.values()) == 9
    dead = res["5"]
    assert not dead.ok and dead.error.type == "ValueError"
    assert dead.error.message == "bad row 5" and dead.error.stage == "parse"
    assert dead.error.attempt == 2
    assert "Traceback" in dead.error.traceback and "in parse" in dead.error.traceback
    assert p.report.dead == 1 and p.report.stages["parse"].dead == 1


def test_give_up_on_skips_retries():
    def parse(x):
        raise KeyError("fatal")

    p = Pipeline([1], [Stage("p", parse, retry=Retry(max_attempts=5, backoff=0.01,
                                                    give_up_on=(KeyError,)))],
                 progress=False)
    (r,) = list(p.run())
    assert r.error.attempt == 1 and p.report.stages["p"].retried == 0


def test_ordered_results_come_in_source_order():
    def slow_evens(x):
        if x % 2 == 0:
            time.sleep(0.01)
        return x

    p = Pipeline(range(30), [Stage("s", slow_evens, workers=4)], ordered=True,
                 progress=False)
    assert [r.value for r in p.run()] == list(range(30))


def test_on_complete_sees_every_item_and_can_stop_at_once_like_a_kill_switch():
    ended = []

    def hold(x, ctx):
        ctx.cancelled.wait(0.02 if x < 5 else 5)
        return x

    def switch(result: ItemResult):
        ended.append(result.key)
        if len(ended) == 3:
            p.stop(drain=False)

    p = Pipeline(range(1000), [Stage("s", hold, workers=2)], on_complete=switch,
                 progress=False)
    rep = p.run_all()
    assert rep.state == "halted"
    assert 3 <= len(ended) < 10 and rep.accepted < 1000


def test_stop_with_drain_finishes_admitted_items_and_takes_no_new_ones():
    started = threading.Event()

    def work(x):
        started.set()
        time.sleep(0.005)
        return x

    p = Pipeline(iter(range(100000)), [Stage("w", work, workers=2, queue_size=4)],
                 progress=False)
    got = []
    for r in p.run():
        got.append(r)
        if len(got) == 5:
            p.stop(drain=True)
    rep = p.report
    assert rep.state == "stopped"
    assert rep.dead == 0 and rep.done == rep.accepted == len(got) < 100
    assert all(r.ok for r in got)


def test_a_callback_that_raises_halts_the_run_and_the_error_reaches_the_caller():
    def bad(result):
        raise RuntimeError("callback bug")

    p = Pipeline(range(100), [Stage("s", double)], on_complete=bad, progress=False)
    with pytest.raises(RuntimeError, match="callback bug"):
        p.run_all()


def test_state_set_get_clear_in_memory():
    p = Pipeline([], [Stage("s", double)], progress=False)
    assert p.get_state("switch") is None
    p.set_state("switch", {"tripped": True, "errors": 3})
    assert p.get_state("switch") == {"tripped": True, "errors": 3}
    p.clear_state("switch")
    assert p.get_state("switch") is None


class Triples(Scheduler):
    """Groups of three; leftovers only when the source ends (a batch scheduler)."""

    batch = True

    def __init__(self):
        super().__init__()
        self.groups = []

    def take(self, free):
        out = []
        while free and len(self._items) >= 3:
            out.append([self._items.popleft() for _ in range(3)])
            free -= 1
        return out

    def flush(self):
        self.flushed = True

    def finished(self, group):
        self.groups.append([g.key for g in group])

    def buffered(self):
        return len(self._items)


class TriplesFlushed(Triples):
    def take(self, free):
        out = super().take(free)
        if getattr(self, "flushed", False) and self._items and free > len(out):
            out.append(list(self._items))
            self._items.clear()
        return out


def test_a_scheduler_groups_items_and_a_batch_handler_gets_lists():
    calls = []

    def batch(xs):
        calls.append(list(xs))
        return [x * 10 for x in xs]

    sched = TriplesFlushed()
    p = Pipeline(range(8), [Stage("b", batch, workers=2, queue_size=6, scheduler=sched)],
                 progress=False)
    res = _run(p)
    assert sorted(r.value for r in res.values()) == [x * 10 for x in range(8)]
    assert sorted(len(c) for c in calls) == [2, 3, 3]
    assert sorted(len(g) for g in sched.groups) == [2, 3, 3]


def test_a_batch_handler_returning_the_wrong_number_of_outputs_fails_the_group():
    def wrong(xs):
        return xs[:1]

    p = Pipeline(range(3), [Stage("b", wrong, queue_size=6, scheduler=TriplesFlushed())], progress=False)
    res = _run(p)
    assert not any(r.ok for r in res.values())
    assert "list of 1 outputs" in res["0"].error.message or "batch handler" in \
        res["0"].error.message


def test_stats_can_be_read_from_another_thread_during_the_run():
    gate = threading.Event()

    def work(x):
        gate.wait(10)
        return x

    p = Pipeline(range(50), [Stage("w", work, workers=3, queue_size=2)], progress=False)
    t = threading.Thread(target=p.run_all)
    t.start()
    try:
        st = wait_for(lambda: p.stats().stages["w"].in_flight == 3 and p.stats(),
                      message="three items in flight")
        assert st.state == "running" and st.stages["w"].done == 0
        assert st.stages["w"].queued == 2
    finally:
        gate.set()
        t.join(30)
    assert p.report.done == 50


def test_an_empty_refill_is_not_the_end_of_the_source():
    calls = {"n": 0}

    def refill(count):
        calls["n"] += 1
        n = calls["n"]
        if n < 4:
            return []  # nothing now
        if n == 4:
            return [1, 2, 3]
        if n < 7:
            return []
        if n == 7:
            return [4]
        return Refill.END

    p = Pipeline(Refill(refill, idle=0.01), [Stage("s", double)], progress=False)
    assert sorted(r.value for r in p.run()) == [2, 4, 6, 8]


def test_an_async_refill_and_an_async_iterable_source():
    state = {"n": 0}

    async def refill(count):
        state["n"] += 1
        if state["n"] == 1:
            return []
        if state["n"] == 2:
            return list(range(count))
        raise StopAsyncIteration

    p = Pipeline(Refill(refill, count=5), [Stage("s", double)], progress=False)
    assert sorted(r.value for r in p.run()) == [0, 2, 4, 6, 8]

    async def agen():
        for i in range(3):
            await asyncio.sleep(0)
            yield i

    p = Pipeline(agen(), [Stage("s", inc, kind="async")], progress=False)

    async def main():
        return [r.value async for r in p.arun()]

    assert sorted(asyncio.run(main())) == [1, 2, 3]


def test_duplicate_keys_from_the_source_are_counted_and_skipped_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="pympx_queues.pipeline")
    rows = [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": "c"}, {"id": "b"}]
    p = Pipeline(rows, [Stage("s", lambda r: r["id"])], key=lambda r: r["id"],
                 progress=False)
    assert sorted(r.value for r in p.run()) == ["a", "b", "c"]
    assert p.report.duplicate_keys == 2
    assert "duplicate key 'a'" in caplog.text


def test_a_thread_handler_past_its_timeout_fails_the_attempt_and_sees_cancelled():
    saw = []

    def slow(x, ctx):
        if x == 1 and ctx.attempt == 1:
            saw.append(ctx.cancelled.wait(30))
            return "late"
        return x

    p = Pipeline([0, 1, 2], [Stage("s", slow, workers=2, timeout=0.2,
                                   retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    res = _run(p)
    assert res["1"].ok and res["1"].value == 1
    assert p.report.stages["s"].failed_attempts == 1
    wait_for(lambda: saw == [True], message="the abandoned thread saw cancelled")


def test_a_killed_process_worker_is_replaced_and_the_item_retried_then_dead_lettered():
    p = Pipeline(range(8), [Stage("p", die_on_three, kind="process", workers=2,
                                  retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    res = _run(p)
    assert sorted(k for k, r in res.items() if r.ok) == ["0", "1", "2", "4", "5", "6", "7"]
    err = res["3"].error
    assert err.type == "WorkerDied" and "SIGKILL" in err.message and err.attempt == 2
    assert p.report.stages["p"].failed_attempts == 2

    p = Pipeline(range(6), [Stage("p", exit_on_three, kind="process", workers=1)],
                 progress=False)
    res = _run(p)
    assert "exited with status 7" in res["3"].error.message
    assert sum(r.ok for r in res.values()) == 5


def test_items_that_killed_a_worker_once_succeed_on_retry():
    p = Pipeline(range(12), [Stage("p", crash_then_work, kind="process", workers=2,
                                   retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    res = _run(p)
    assert all(r.ok for r in res.values()) and len(res) == 12
    assert p.report.stages["p"].failed_attempts == 3


def test_a_hung_process_handler_is_killed_at_its_timeout_and_the_run_goes_on():
    p = Pipeline(range(5), [Stage("p", hang_on_two, kind="process", workers=2,
                                  timeout=1.0)], progress=False)
    t0 = time.monotonic()
    res = _run(p)
    assert time.monotonic() - t0 < 60
    assert res["2"].error.type == "StageTimeout"
    assert sum(r.ok for r in res.values()) == 4


def test_per_item_stage_timings_go_to_a_callback_and_the_display_is_quiet_off_a_terminal(
        capsys):
    timings = []
    p = Pipeline(range(5), [Stage("a", double), Stage("b", inc, kind="async")],
                 on_stage_complete=lambda key, stage, secs, ok: timings.append(
                     (key, stage, ok, secs >= 0)))
    p.run_all()  # progress=None: stderr is not a terminal under pytest
    assert sorted(timings) == sorted((str(i), s, True, True) for i in range(5)
                                     for s in ("a", "b"))
    assert capsys.readouterr().err == ""


def test_a_forced_progress_display_renders_per_stage_counts(capsys):
    p = Pipeline(range(5), [Stage("parse", double)], progress=True)
    p.run_all()
    err = capsys.readouterr().err
    assert "parse" in err and "done" in err


def test_a_stop_from_on_complete_starts_nothing_more_and_the_same_pipeline_runs_again():
    started = []
    at_stop = []

    def work(x):
        started.append(x)
        return x

    def switch(result):
        if result.key == "3":
            p.stop(drain=False)
            at_stop.append(p.stats())

    p = Pipeline(range(50), [Stage("w", work, workers=2)], on_complete=switch,
                 progress=False)
    assert p.run_all().state == "halted"
    st = at_stop[0]
    # nothing was admitted or handed to a worker after the switch tripped
    assert p.report.accepted == st.accepted
    assert len(started) <= st.stages["w"].done + st.stages["w"].in_flight
    p.on_complete = None
    assert p.run_all().state == "finished" and p.report.done == 50


def test_backpressure_a_slow_last_stage_bounds_every_stage_and_the_source():
    pulled = []

    def source():
        for i in range(300):
            pulled.append(i)
            yield i

    samples = []

    def slow(x):
        samples.append((len(pulled), p.stats()))
        time.sleep(0.001)
        return x

    p = Pipeline(source(), [Stage("fast", double, workers=2, queue_size=4),
                            Stage("slow", slow, workers=1, queue_size=2)], progress=False)
    assert p.run_all().done == 300
    cap = (4 + 2) + (2 + 1)
    for n_pulled, st in samples:
        ended = st.done + st.dead
        assert n_pulled - ended <= cap + 1  # the source runs at most the bound ahead
        assert st.stages["fast"].queued <= 4 + 2 and st.stages["slow"].queued <= 2


def test_a_scheduler_with_an_ended_hook_hears_every_per_item_group_on_every_kind():
    from pympx_queues.pipeline._model import Scheduler

    class Listening(Scheduler):
        def __init__(self):
            super().__init__()
            self.heard = []

        def ended(self, group, ok, outputs, err, seconds, retrying):
            self.heard.append((group[0].key, ok, outputs))

    async def twice_async(x):
        return x * 2

    for kind, fn in (("thread", lambda x: x * 2), ("async", twice_async)):
        sched = Listening()
        p = Pipeline(range(6), [Stage("s", fn, kind=kind, workers=2, scheduler=sched)],
                     progress=False)
        _run(p)
        assert sorted(sched.heard) == [(str(i), True, [i * 2]) for i in range(6)], kind
