"""Durable batch_map: kill -9 and rerun, journaled switch state, reset, changed input
(issue 12, DESIGN.md P1..P3 and P7)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from pympx_queues.cli import main
from pympx_queues.pipeline.batch_map import (CallFailed, InputChangedError, batch_map,
                                             reset_kill_switch)
from pympx_queues.pipeline.switches import AnyFailed, Count, KillSwitchError

pytestmark = pytest.mark.timeout(120)

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pympx_queues.pipeline.batch_map import batch_map

    journal, log, out, n, delay = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \\
        float(sys.argv[5])

    def note(line):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, line.encode())
        os.close(fd)

    def fn(i, k):
        note(f"s {i}\\n")
        time.sleep(delay)
        note(f"e {i}\\n")
        return {"i": i, "v": i * k}

    res = batch_map(fn, range(n), k=[3] * n, size=4, journal_dir=journal)
    with open(out, "w") as f:
        json.dump(res, f)
""")


def _lines(log, tag):
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [int(x.split()[1]) for x in f.read().splitlines() if x.startswith(tag + " ")]


def test_kill_9_mid_map_then_rerun_computes_each_element_once_except_those_in_flight(
        tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    journal, log, out = tmp_path / "j", tmp_path / "log", tmp_path / "out.json"
    n = 120
    args = [sys.executable, str(script), str(journal), str(log), str(out), str(n), "0.01"]
    child = subprocess.Popen(args)
    deadline = time.monotonic() + 60
    while len(_lines(str(log), "e")) < 40:
        assert time.monotonic() < deadline and child.poll() is None, "child never got going"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    first_started = set(_lines(str(log), "s"))
    assert len(first_started) < n and not out.exists()

    subprocess.run(args, check=True, timeout=90)
    with open(out) as f:
        got = json.load(f)
    assert got == [{"i": i, "v": 3 * i} for i in range(n)]  # as an uninterrupted run
    ends = _lines(str(log), "e")
    counts = {i: ends.count(i) for i in range(n)}
    twice = {i for i, c in counts.items() if c > 1}
    assert all(c >= 1 for c in counts.values()) and max(counts.values()) <= 2
    assert twice <= first_started  # only calls that were running at the kill re-ran
    assert len(twice) <= 4 + 1  # size in flight (+1: finished, result not yet written)

    # a third run computes nothing and returns the stored results
    before = len(_lines(str(log), "s"))
    subprocess.run(args, check=True, timeout=60)
    assert len(_lines(str(log), "s")) == before
    with open(out) as f:
        assert json.load(f) == got


def flaky(bad):
    calls = []

    def fn(i):
        calls.append(i)
        if i in bad:
            raise ValueError(f"bad {i}")
        return i * 10
    return fn, calls


def test_a_tripped_switch_survives_a_restart_until_reset(tmp_path):
    fn, calls = flaky({5})
    with pytest.raises(KillSwitchError) as first:
        batch_map(fn, range(20), size=1, kill_switch=AnyFailed(), journal_dir=str(tmp_path))
    assert calls == list(range(6))
    # the next run raises at once, saying when and why, and calls nothing
    fn2, calls2 = flaky(set())
    with pytest.raises(KillSwitchError) as again:
        batch_map(fn2, range(20), size=1, kill_switch=AnyFailed(),
                  journal_dir=str(tmp_path))
    assert calls2 == []
    assert again.value.tripped_at == first.value.tripped_at
    assert "a call failed" in str(again.value) and "UTC" in str(again.value)
    assert again.value.failures[0]["index"] == 5
    assert again.value.failures[0]["type"] == "ValueError"

    r = reset_kill_switch(str(tmp_path))
    assert r == {"cleared": True, "retried": [5]}
    # after the reset: finished calls come from the journal, the rest (and the failed
    # one) run
    out = batch_map(fn2, range(20), size=1, kill_switch=AnyFailed(),
                    journal_dir=str(tmp_path))
    assert out == [i * 10 for i in range(20)]
    assert sorted(calls2) == [5] + list(range(6, 20))


def test_reset_switch_cli(tmp_path):
    fn, _calls = flaky({0})
    with pytest.raises(KillSwitchError):
        batch_map(fn, range(3), kill_switch=AnyFailed(), journal_dir=str(tmp_path),
                  run_id="load")
    res = CliRunner().invoke(main, ["reset-switch", str(tmp_path), "--run-id", "load",
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"cleared": True, "retried": [0]}
    res = CliRunner().invoke(main, ["reset-switch", str(tmp_path), "--run-id", "nope"])
    assert res.exit_code != 0


def test_switch_counters_continue_across_runs(tmp_path):
    fn, calls = flaky({1, 3, 7})
    out = batch_map(fn, range(5), size=1, kill_switch=Count(3), journal_dir=str(tmp_path),
                    errors="return")
    assert [isinstance(x, CallFailed) for x in out] == [False, True, False, True, False]
    # the same input, extended: two failures are journaled, the third trips
    with pytest.raises(KillSwitchError) as ei:
        batch_map(fn, range(10), size=1, kill_switch=Count(3), journal_dir=str(tmp_path),
                  errors="return")
    assert ei.value.failures[-1]["index"] == 7
    assert ei.value.counts["failed"] == 3
    assert calls == list(range(5)) + [5, 6, 7]


def test_changed_input_under_the_same_run_id_is_refused(tmp_path):
    assert batch_map(lambda a, b: a + b, range(4), range(4),
                     journal_dir=str(tmp_path)) == [0, 2, 4, 6]
    with pytest.raises(InputChangedError, match="position 0 differs"):
        batch_map(lambda a, b: a + b, range(4), range(1, 5), journal_dir=str(tmp_path))
    # another run id is another map
    assert batch_map(lambda a, b: a + b, range(4), range(1, 5), journal_dir=str(tmp_path),
                     run_id="other") == [1, 3, 5, 7]


def test_torture_several_kill_rounds_then_a_clean_finish(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    journal, log, out = tmp_path / "j", tmp_path / "log", tmp_path / "out.json"
    n = 150
    args = [sys.executable, str(script), str(journal), str(log), str(out), str(n), "0.005"]
    rounds = 0
    for target in (25, 60, 100):
        child = subprocess.Popen(args)
        deadline = time.monotonic() + 60
        while len(_lines(str(log), "e")) < target and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            rounds += 1
        child.wait(30)
    assert rounds >= 1, "no round was killed mid-map"
    print("kill rounds:", rounds)
    subprocess.run(args, check=True, timeout=90)
    with open(out) as f:
        assert json.load(f) == [{"i": i, "v": 3 * i} for i in range(n)]
    ends = _lines(str(log), "e")
    extra = len(ends) - n
    assert set(ends) == set(range(n))
    assert extra <= rounds * (4 + 1)  # re-runs only of calls in flight at each kill


def test_fsync_durability_maps_and_trips(tmp_path):
    fn, calls = flaky({30})
    with pytest.raises(KillSwitchError) as ei:
        batch_map(fn, range(100), size=4, journal_dir=str(tmp_path), durability="fsync",
                  kill_switch=AnyFailed())
    assert ei.value.counts["started"] == ei.value.counts["started_at_trip"]
    assert ei.value.failures[0]["index"] == 30


TRIP_CHILD = textwrap.dedent("""
    import sys
    from pympx_queues.pipeline.batch_map import batch_map
    from pympx_queues.pipeline.switches import Count, KillSwitchError

    def fn(i):
        if i in (3, 4):
            raise ValueError(f"bad {i}")
        return i

    try:
        batch_map(fn, range(10), size=1, kill_switch=Count(2), journal_dir=sys.argv[1])
    except KillSwitchError as exc:
        print(exc)
        sys.exit(3)
""")


def test_a_switch_tripped_in_another_process_is_honoured_here(tmp_path):
    script = tmp_path / "trip.py"
    script.write_text(TRIP_CHILD)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "j")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    calls = []
    with pytest.raises(KillSwitchError) as ei:
        batch_map(calls.append, range(10), size=1, kill_switch=Count(2),
                  journal_dir=str(tmp_path / "j"))
    assert calls == []
    assert [f["index"] for f in ei.value.failures] == [3, 4]
    assert str(ei.value) == r.stdout.strip()


def test_a_journal_written_with_the_older_argument_fingerprint_still_resumes(
        tmp_path, monkeypatch):
    import hashlib
    import importlib

    from pympx_queues.pipeline.batch_map import _digest, _legacy_digest
    from pympx_queues.pipeline.journal import JsonCodec

    codec = JsonCodec()
    row = [3, "x" * 40]
    assert _digest(codec, row) != _legacy_digest(codec, row)
    raw = '[3,"' + "x" * 40 + '"]'
    assert _legacy_digest(codec, row) == hashlib.sha256(raw.encode()).hexdigest()[:16]
    # a journal whose fingerprints are the older ones
    mod = importlib.import_module("pympx_queues.pipeline.batch_map")
    with monkeypatch.context() as m:
        m.setattr(mod, "_digest", _legacy_digest)
        assert batch_map(lambda i, s: i, range(4), ["x" * 40] * 4,
                         journal_dir=str(tmp_path)) == [0, 1, 2, 3]
    calls = []

    def fn(i, s):
        calls.append(i)
        return i

    assert batch_map(fn, range(6), ["x" * 40] * 6, journal_dir=str(tmp_path)) == list(range(6))
    assert sorted(calls) == [4, 5]  # the four journaled results came back, not refused
    with pytest.raises(InputChangedError):
        batch_map(fn, range(6), ["y" * 40] * 6, journal_dir=str(tmp_path))
