"""prefecto's BatchTask and switches, moved over by changing an import (issue 12)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from pympx_queues.compat.prefecto import (AnyFailedSwitch, BatchTask, CountSwitch,
                                          KillSwitch, KillSwitchError, RateSwitch, unmapped)

pytestmark = pytest.mark.timeout(60)


def add(a, b):
    return a + b


def test_map_returns_one_finished_future_per_element_in_input_order():
    futs = BatchTask(add, 2).map([1, 2, 3, 4], [2, 3, 4, 5])
    assert [f.result() for f in futs] == [3, 5, 7, 9]
    futs = BatchTask(add, 3).map(a=[1, 2, 3, 4, 5], b=unmapped(10))
    assert [f.result() for f in futs] == [11, 12, 13, 14, 15]
    assert BatchTask(add, 3).map([], []) == []


def test_failed_calls_hold_their_error_when_no_switch_trips():
    def f(x):
        if x == 2:
            raise ValueError("two")
        return x

    futs = BatchTask(f, 2).map([0, 1, 2, 3])
    assert futs[1].result() == 1
    with pytest.raises(Exception, match="ValueError: two"):
        futs[2].result()


def test_a_non_switch_is_refused_like_prefecto():
    with pytest.raises(TypeError, match="KillSwitch"):
        BatchTask(add, 2, kill_switch=object())


def failing(bad):
    def f(x):
        if x in bad:
            raise RuntimeError(f"boom {x}")
        return x
    return f


@pytest.mark.parametrize("switch,bad", [
    (AnyFailedSwitch(), {9}),          # failure only in the last partial batch
    (CountSwitch(2), {1, 8}),
    (RateSwitch(4, 0.5), {0, 1, 2}),
])
def test_switches_trip_including_on_the_last_batch(switch, bad):
    with pytest.raises(KillSwitchError) as ei:
        BatchTask(failing(bad), 4, kill_switch=switch).map(list(range(10)))
    assert ei.value.ks is switch
    assert ei.value.failures


def test_a_single_batch_map_trips():
    with pytest.raises(KillSwitchError):
        BatchTask(failing({1}), 8, kill_switch=AnyFailedSwitch()).map([0, 1, 2])


def test_a_custom_prefecto_style_switch_works():
    class EveryThird(KillSwitch):
        def __init__(self):
            super().__init__()
            self.n = 0

        def should_flip_switch(self, state):
            self.n += 1
            return state.is_failed() and self.n % 3 == 0

        def raise_if_triggered(self, state):
            if self.should_flip_switch(state):
                raise KillSwitchError("third", self)

    with pytest.raises(KillSwitchError):
        BatchTask(failing({2}), 1, kill_switch=EveryThird()).map(list(range(6)))


def test_journal_dir_makes_the_map_durable(tmp_path):
    calls = []

    def f(x):
        calls.append(x)
        return x * 2

    bt = BatchTask(f, 2, journal_dir=str(tmp_path))
    assert [x.result() for x in bt.map([1, 2, 3])] == [2, 4, 6]
    assert [x.result() for x in bt.map([1, 2, 3])] == [2, 4, 6]
    assert calls == [1, 2, 3] or sorted(calls) == [1, 2, 3]


PREFECT_CHILD = """
import prefect
from pympx_queues.compat.prefecto import AnyFailedSwitch, BatchTask, KillSwitchError

@prefect.task
def double(x):
    if x == 7:
        raise ValueError("seven")
    return 2 * x

@prefect.flow
def flow(n, switch):
    return [f.result() for f in BatchTask(double, 3, kill_switch=switch).map(range(n))]

assert flow(6, None) == [0, 2, 4, 6, 8, 10], "six elements in two batches"
try:
    flow(9, AnyFailedSwitch())
except KillSwitchError as exc:
    print("tripped:", exc)
else:
    raise SystemExit("the switch did not trip")
print("PREFECT-OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("prefect") is None,
                    reason="Prefect is not installed (optional extra: pip install -e '.[prefect]')")
def test_a_prefect_task_maps_through_prefect_in_more_than_one_batch(tmp_path):
    # prefecto raises AttributeError (get_state) here on Prefect 3.  The flow runs in a
    # child with its own PREFECT_HOME: Prefect's temporary API server then starts and
    # stops inside that child (in this process its exit-time log lines would go to a
    # stream pytest has already closed), and nothing is written to ~/.prefect.
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out = subprocess.run([sys.executable, "-c", PREFECT_CHILD], capture_output=True,
                         text=True, env=env, timeout=50)
    assert out.returncode == 0 and "PREFECT-OK" in out.stdout, out.stdout + out.stderr
    assert "tripped:" in out.stdout
