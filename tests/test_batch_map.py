"""batch_map in memory: results, input checks, switch trip points, halt now/soon (issue 12)."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pympx_queues.pipeline.batch_map import (BatchMapError, CallFailed, batch_map,
                                             cancelled, unmapped)
from pympx_queues.pipeline.switches import (AnyFailed, Consecutive, Count, KillSwitch,
                                            KillSwitchError, Rate, Windowed)

pytestmark = pytest.mark.timeout(60)


def add(x, y, z=0):
    return x + y + z


def test_results_in_input_order_with_unmapped_and_keyword_arguments():
    out = batch_map(add, range(20), [1] * 20, z=unmapped(100), size=3)
    assert out == [x + 101 for x in range(20)]
    assert batch_map(add, range(5), y=range(5), size=2) == [0, 2, 4, 6, 8]


def test_unordered_streams_index_result_pairs_as_they_complete():
    pairs = list(batch_map(add, range(10), range(10), size=4, ordered=False))
    assert sorted(pairs) == [(i, 2 * i) for i in range(10)]


def test_empty_input_is_an_empty_result():
    assert batch_map(add, [], []) == []
    assert batch_map(add, iter(()), unmapped(1)) == []


@pytest.mark.parametrize("args,kw,match", [
    (([1, 2], [1]), {}, "unequal lengths"),
    ((unmapped(1),), {"y": unmapped(2)}, "no mapped argument"),
    ((5, [1]), {}, "not iterable"),
    (("abc", [1, 2, 3]), {}, "is a str"),
])
def test_bad_input_is_refused_before_anything_runs(args, kw, match):
    calls = []

    def fn(*a, **k):
        calls.append(a)

    with pytest.raises((TypeError, ValueError), match=match):
        batch_map(fn, *args, **kw)
    assert calls == []


def test_generators_of_unequal_length_are_refused():
    with pytest.raises(ValueError, match="unequal lengths"):
        batch_map(add, (i for i in range(5)), (i for i in range(4)))
    with pytest.raises(ValueError, match="unequal lengths"):
        batch_map(add, (i for i in range(4)), (i for i in range(5)))


def test_generators_are_consumed_lazily():
    taken = []
    in_flight_max = []

    def gen():
        for i in range(200):
            taken.append(i)
            yield i

    done = []

    def fn(x):
        in_flight_max.append(len(taken) - len(done))
        done.append(x)
        return x

    assert batch_map(fn, gen(), size=2) == list(range(200))
    # the source is read only a few items ahead of the calls (P4), never all at once
    assert max(in_flight_max) <= 10
    # in memory on threads an element is read when its call starts, never ahead
    assert max(in_flight_max) <= 2


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_input_that_raises_midway_makes_the_map_raise_it(kind):
    def gen():
        yield from range(5)
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        batch_map(square, gen(), size=2, kind=kind)


def test_uneven_calls_never_exceed_size_at_once_and_come_back_in_order():
    live, peak = [0], [0]
    lock = threading.Lock()

    def fn(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02 if i % 7 == 0 else 0)
        with lock:
            live[0] -= 1
        return i

    assert batch_map(fn, range(300), size=4) == list(range(300))
    assert peak[0] <= 4  # never more than size calls at once


def test_failures_without_a_switch_raise_after_every_call_ended_or_are_returned():
    def fn(x):
        if x % 5 == 0:
            raise ValueError(f"bad {x}")
        return x

    with pytest.raises(BatchMapError) as ei:
        batch_map(fn, range(12), size=3)
    assert [f.index for f in ei.value.failures] == [0, 5, 10]
    out = batch_map(fn, range(12), size=3, errors="return")
    assert isinstance(out[5], CallFailed) and out[5].type == "ValueError"
    assert out[6] == 6


class Spy(KillSwitch):
    """Wraps a switch; records how many calls had started when it tripped."""

    def __init__(self, inner, started):
        super().__init__()
        self.inner = inner
        self.started = started
        self.at = None
        self.index = None

    def counts_as_failure(self, o):
        return self.inner.counts_as_failure(o)

    def should_flip_switch(self, o):
        flip = self.inner.should_flip_switch(o)
        if flip and self.at is None:
            self.at = len(self.started)
            self.index = o.index
        return flip

    def describe(self):
        return self.inner.describe()


def run_pattern(pattern, switch, size=1, halt="now", waves=False, delay=0.0):
    started, finished = [], []
    lock = threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        time.sleep(delay)
        with lock:
            finished.append(i)
        if pattern[i] == "x":
            raise ValueError(f"fail {i}")
        return i

    spy = Spy(switch, started)
    try:
        batch_map(fn, range(len(pattern)), size=size, kill_switch=spy, halt=halt,
                  waves=waves, errors="return")
        err = None
    except KillSwitchError as exc:
        err = exc
    return spy, err, started, finished


@pytest.mark.parametrize("switch,pattern,where", [
    (AnyFailed(), "....x.......", 4),
    (Count(3), "x..x....x...x", 8),
    (Rate(4, 0.5), "x..x.x......", 3),
    (Consecutive(2), "x.x.xx......", 5),
    (Windowed(0.5, last=4, min_sample=4), "x...x...x.x..", 10),
])
def test_each_switch_trips_at_the_exact_completion_and_nothing_starts_after(
        switch, pattern, where):
    spy, err, started, _ = run_pattern(pattern, switch, size=1)
    assert err is not None and spy.index == where
    assert err.failures[-1]["index"] == where
    assert err.ks is spy and err.tripped_at is not None
    assert len(started) == spy.at == where + 1  # zero calls started after the trip
    assert err.counts["started"] == err.counts["started_at_trip"] == where + 1


def test_halt_now_starts_nothing_after_the_trip_with_many_workers():
    pattern = "." * 10 + "x" + "." * 40
    spy, err, started, _ = run_pattern(pattern, AnyFailed(), size=4, delay=0.01)
    assert err is not None
    # calls started when it tripped, and in all: equal (none started after)
    assert err.counts["started"] == err.counts["started_at_trip"]
    # at the trip: the calls that had ended (the failure included; under load calls of
    # one round may end out of order) plus at most size - 1 running
    assert err.counts["started_at_trip"] <= err.counts["completed"] + 3


def test_halt_soon_lets_at_most_size_minus_one_calls_finish_and_starts_none():
    pattern = "." * 10 + "x" + "." * 40
    spy, err, started, finished = run_pattern(pattern, AnyFailed(), size=4, halt="soon",
                                              delay=0.01)
    assert err is not None
    assert err.counts["started"] == err.counts["started_at_trip"]  # none after the trip
    after = len(finished) - (finished.index(spy.index) + 1)
    assert after <= 3  # at most size - 1 running calls finished after the trip
    assert err.counts["failed"] == 1


@pytest.mark.parametrize("waves", [False, True])
def test_a_failure_only_in_the_last_partial_batch_trips(waves):
    spy, err, started, _ = run_pattern("." * 9 + "x", AnyFailed(), size=4, waves=waves)
    assert err is not None and spy.index == 9


def test_a_single_batch_map_trips():
    spy, err, started, _ = run_pattern(".x.", AnyFailed(), size=8)
    assert err is not None and spy.index == 1


def test_waves_start_a_batch_only_after_the_previous_one_ended():
    live = [0]
    lock = threading.Lock()
    order = []

    def fn(i):
        with lock:
            live[0] += 1
            order.append(("s", i))
        time.sleep(0.005)
        with lock:
            live[0] -= 1
            order.append(("e", i))
        return i

    assert batch_map(fn, range(10), size=4, waves=True) == list(range(10))
    # every start of batch k comes after every end of batch k-1
    for k in (1, 2):
        first_start = min(n for n, (t, i) in enumerate(order) if t == "s" and i // 4 == k)
        last_end = max(n for n, (t, i) in enumerate(order) if t == "e" and i // 4 == k - 1)
        assert last_end < first_start


def test_halt_now_tells_running_thread_calls_through_the_cancellation_token():
    seen = []
    gate = threading.Event()

    def fn(i):
        if i == 0:
            gate.wait(10)
            raise ValueError("first")
        gate.set()
        deadline = time.monotonic() + 10
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(cancelled())
        return i

    with pytest.raises(KillSwitchError):
        batch_map(fn, range(2), size=2, kill_switch=AnyFailed())
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [True]


def test_the_error_carries_each_failures_cause():
    def fn(i, tag):
        if i in (2, 3):
            raise KeyError(f"missing {i}")
        return i

    with pytest.raises(KillSwitchError) as ei:
        batch_map(fn, range(8), tag=unmapped("t"), size=1, kill_switch=Count(2))
    f = ei.value.failures
    assert [x["index"] for x in f] == [2, 3]
    assert f[0]["type"] == "KeyError" and "missing 2" in f[0]["message"]
    assert "KeyError" in f[0]["traceback"] and f[0]["args"] == "(2,)"
    assert ei.value.counts == {"completed": 4, "failed": 2, "counted": 2, "started": 4,
                               "started_at_trip": 4}
    assert "2 calls failed" in str(ei.value)


def test_ignored_exceptions_do_not_trip():
    def fn(i):
        if i % 2:
            raise TimeoutError("slow")
        return i

    out = batch_map(fn, range(6), kill_switch=AnyFailed(ignore=TimeoutError),
                    errors="return")
    assert [isinstance(x, CallFailed) for x in out] == [False, True] * 3


def square(x):
    if x == 13:
        raise ValueError("thirteen")
    return x * x


def test_process_kind_maps_and_trips():
    assert batch_map(square, range(10), size=2, kind="process") == [x * x for x in range(10)]
    with pytest.raises(KillSwitchError) as ei:
        batch_map(square, range(20), size=2, kind="process", kill_switch=AnyFailed())
    assert ei.value.failures[0]["index"] == 13


def test_async_kind_and_a_passed_in_executor():
    async def afn(x):
        await asyncio.sleep(0)
        return -x

    assert batch_map(afn, range(5), size=3, kind="async") == [0, -1, -2, -3, -4]
    with ThreadPoolExecutor(2) as ex:
        assert batch_map(add, range(5), range(5), executor=ex, size=2) == [0, 2, 4, 6, 8]


def test_each_map_counts_from_zero_even_with_a_reused_switch_object():
    ks = Count(2)

    def fn(i):
        if i == 0:
            raise ValueError("zero")
        return i

    assert len(batch_map(fn, range(3), kill_switch=ks, errors="return")) == 3
    assert len(batch_map(fn, range(3), kill_switch=ks, errors="return")) == 3


def test_a_signal_stops_the_map_with_an_error_never_a_short_result():
    import os
    import signal

    from pympx_queues.pipeline.batch_map import MapStopped

    def fn(i):
        if i == 5:
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.002)
        return i

    with pytest.raises(MapStopped, match="signal"):
        batch_map(fn, range(500), size=2)


def scale(x, factor, offset=0):
    return x * factor + offset


def test_process_kind_with_unmapped_arguments():
    out = batch_map(scale, range(6), unmapped(3), offset=unmapped(1), size=2, kind="process")
    assert out == [x * 3 + 1 for x in range(6)]
