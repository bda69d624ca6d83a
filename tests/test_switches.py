"""Kill switches alone: exact trip points, classification, JSON state (issue 12)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pympx_queues.pipeline.switches import (AnyFailed, AnyOf, Consecutive, Count,
                                            KillSwitchError, Outcome, Rate, Windowed)


def outcomes(pattern, error_type="ValueError"):
    """'..x.x' -> outcomes (x = failed)."""
    return [Outcome(i, c != "x", None if c != "x" else error_type, "boom")
            for i, c in enumerate(pattern)]


def first_trip(switch, pattern, **kw):
    for o in outcomes(pattern, **kw):
        if switch.should_flip_switch(o):
            return o.index
    return None


def test_any_failed_trips_on_the_first_failure():
    assert first_trip(AnyFailed(), "...x..x") == 3
    assert first_trip(AnyFailed(), "......") is None


def test_count_trips_at_the_max_count_th_failure():
    assert first_trip(Count(3), "x.x..x.x") == 5
    assert first_trip(Count(3), "x.x....") is None


def test_rate_needs_the_minimum_sample_then_compares_with_ge():
    # prefecto's rule: completed >= min_sample and failed/completed >= rate
    assert first_trip(Rate(4, 0.5), "xx..") == 3
    assert first_trip(Rate(4, 0.5), "x...x.xx") == 7
    assert first_trip(Rate(2, 1.0), "x") is None


def test_consecutive_counts_runs_and_a_success_breaks_the_run():
    assert first_trip(Consecutive(3), "xx.xx.xxx") == 8
    assert first_trip(Consecutive(2), "x.x.x.") is None


def test_windowed_over_the_last_n_completions():
    assert first_trip(Windowed(0.5, last=4, min_sample=4), "x...x...x.x") == 10
    assert first_trip(Windowed(0.5, last=4, min_sample=4), "x...x...x...") is None


def test_windowed_over_seconds_forgets_old_failures():
    w = Windowed(0.5, seconds=10, min_sample=2)
    assert not w.should_flip_switch(Outcome(0, False, "E", time_=100.0))
    assert not w.should_flip_switch(Outcome(1, True, time_=200.0))
    assert not w.should_flip_switch(Outcome(2, True, time_=201.0))  # 100 left the window
    assert not w.should_flip_switch(Outcome(3, False, "E", time_=202.0))  # 1 of 3
    assert w.should_flip_switch(Outcome(4, False, "E", time_=203.0))  # 2 of 4
    assert w.window[0][0] == 200.0


def test_ignored_exceptions_do_not_count():
    assert first_trip(AnyFailed(ignore=TimeoutError), "x..", error_type="TimeoutError") is None
    assert first_trip(AnyFailed(ignore="TimeoutError"), "x..") == 0
    assert first_trip(Count(1, counts=lambda o: o.error_type == "KeyError"), "xx") is None
    # ignored failures are neutral for Consecutive
    c = Consecutive(2, ignore=["TimeoutError"])
    seq = [Outcome(0, False, "ValueError"), Outcome(1, False, "TimeoutError"),
           Outcome(2, False, "ValueError")]
    assert [c.should_flip_switch(o) for o in seq] == [False, False, True]


def test_any_of_and_the_pipe_compose_and_every_switch_sees_everything():
    s = Count(3) | Consecutive(2)
    assert isinstance(s, AnyOf)
    assert first_trip(s, "x.x.xx") == 4  # Count(3) at index 4 before Consecutive at 5
    assert "3 calls failed" in s.describe()
    assert s.switches[1].streak == 1


def test_raise_if_triggered_raises_kill_switch_error_with_the_switch():
    ks = AnyFailed()
    ks.raise_if_triggered(Outcome(0, True))
    with pytest.raises(KillSwitchError) as ei:
        ks.raise_if_triggered(Outcome(1, False, "ValueError", "bad"))
    assert ei.value.ks is ks and ei.value.tripped_at is not None


def test_a_tripped_switch_stays_tripped_until_reset():
    ks = Count(1)
    assert ks.should_flip_switch(Outcome(0, False, "E"))
    assert ks.should_flip_switch(Outcome(1, True))
    ks.reset()
    assert not ks.tripped and not ks.should_flip_switch(Outcome(2, True))


def test_crashed_workers_count_as_failures():
    o = Outcome(0, False, "WorkerDied")
    assert o.is_crashed() and not o.is_failed()
    assert AnyFailed().should_flip_switch(o)


def test_bad_arguments_are_refused():
    for bad in (lambda: Count(0), lambda: Rate(0, 0.5), lambda: Rate(3, 1.5),
                lambda: Consecutive(0), lambda: Windowed(0.5),
                lambda: Windowed(0.5, last=3, seconds=3), lambda: AnyOf(),
                lambda: AnyFailed(ignore=[3])):
        with pytest.raises((ValueError, TypeError)):
            bad()


SWITCHES = [lambda: AnyFailed(), lambda: Count(3), lambda: Rate(3, 0.4),
            lambda: Consecutive(2), lambda: Windowed(0.5, last=3, min_sample=2),
            lambda: Windowed(0.6, seconds=1e9, min_sample=3),
            lambda: Count(4) | Rate(5, 0.5) | Consecutive(3)]


@given(st.sampled_from(range(len(SWITCHES))), st.text(alphabet=".x", max_size=30),
       st.integers(min_value=0, max_value=30))
def test_state_round_trips_through_json_and_counting_continues(which, pattern, cut):
    """Journaling the state after any prefix and restoring it into a fresh switch gives
    the same trip point as one uninterrupted switch (a restart continues counting)."""
    cut = min(cut, len(pattern))
    whole = SWITCHES[which]()
    expected = first_trip(whole, pattern)
    a = SWITCHES[which]()
    os_ = outcomes(pattern)
    got = None
    for o in os_[:cut]:
        if a.should_flip_switch(o) and got is None:
            got = o.index
    b = SWITCHES[which]().from_state(json.loads(json.dumps(a.to_state())))
    for o in os_[cut:]:
        if b.should_flip_switch(o) and got is None:
            got = o.index
    assert got == expected


def test_state_of_another_switch_type_is_refused():
    with pytest.raises(ValueError):
        Count(2).from_state(AnyFailed().to_state())
