"""Durable thread maps in leases (issue 12): the workers journal each call as it ends.

A durable ``kind="thread"`` map with a sliding window and ``durability="flush"`` runs its
calls in leases (no engine item per call) and its workers write the records; every other
durable map (``fsync``, ``waves=True``, processes) keeps one engine item per call.  Both
write the same records, so either resumes the other's journal.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from click.testing import CliRunner

from pympx_queues.cli import main
from pympx_queues.pipeline._model import EncodeError, PipelineError
from pympx_queues.pipeline.batch_map import CallFailed, batch_map, reset_kill_switch
from pympx_queues.pipeline.journal import KIND_ACCEPT, KIND_DONE, scan_pipeline
from pympx_queues.pipeline.switches import AnyFailed, KillSwitchError

pytestmark = pytest.mark.timeout(120)


def _kinds(journal_dir, name="batch_map"):
    """Records of the journal's files, by kind."""
    counted, _sup = scan_pipeline(str(journal_dir), name, strict=False)
    out = {}
    for scan in counted:
        for _seq, kind, _payload in scan.records:
            out[kind] = out.get(kind, 0) + 1
    return out


def recorder(bad=()):
    calls = []
    lock = threading.Lock()

    def fn(i):
        with lock:
            calls.append(i)
        if i in bad:
            raise ValueError(f"bad {i}")
        return {"i": i, "sq": i * i}
    return fn, calls


def test_a_finished_call_is_one_record_and_a_rerun_calls_nothing(tmp_path):
    fn, calls = recorder()
    first = batch_map(fn, range(300), size=8, journal_dir=str(tmp_path))
    assert first == [{"i": i, "sq": i * i} for i in range(300)]
    kinds = _kinds(tmp_path)
    assert kinds.get(KIND_DONE) == 300  # one record per call ...
    assert KIND_ACCEPT not in kinds  # ... and no accept record for a success
    calls.clear()
    assert batch_map(fn, range(300), size=8, journal_dir=str(tmp_path)) == first
    assert calls == []


def test_failures_are_dead_letters_returned_by_the_rerun_until_redriven(tmp_path):
    fn, calls = recorder(bad={3, 11})
    out = batch_map(fn, range(20), size=4, journal_dir=str(tmp_path), errors="return")
    failed = {i: x for i, x in enumerate(out) if isinstance(x, CallFailed)}
    assert sorted(failed) == [3, 11] and failed[3].type == "ValueError"
    assert "bad 3" in failed[3].message and "ValueError: bad 3" in failed[3].traceback

    res = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)["pipelines"][0]
    assert st["counts"] == {"done": 18, "unfinished": 0, "dead": 2}
    assert sorted(d["key"] for d in st["dead_letters"]) == ["11", "3"]

    # the rerun reports the journaled failures without calling anything
    calls.clear()
    again = batch_map(fn, range(20), size=4, journal_dir=str(tmp_path), errors="return")
    assert calls == []
    assert [isinstance(x, CallFailed) for x in again] == \
        [isinstance(x, CallFailed) for x in out]
    assert again[11].message == failed[11].message

    # re-driven (reset_kill_switch(retry_failed=True)): exactly those run again
    assert reset_kill_switch(str(tmp_path))["retried"] == [3, 11]
    good, calls2 = recorder()
    final = batch_map(good, range(20), size=4, journal_dir=str(tmp_path))
    assert sorted(calls2) == [3, 11]
    assert final == [{"i": i, "sq": i * i} for i in range(20)]


def test_a_result_the_codec_cannot_journal_fails_that_call_and_runs_again_next_time(
        tmp_path):
    calls = []

    def fn(i):
        calls.append(i)
        return object() if i == 2 else i

    out = batch_map(fn, range(5), size=2, journal_dir=str(tmp_path), errors="return")
    assert isinstance(out[2], CallFailed) and out[2].type == "EncodeError"
    assert "call #2" in out[2].message and "cannot be journaled" in out[2].message
    assert [out[i] for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    # journaled as a dead letter (its input is plain): a reset re-runs it
    calls.clear()
    assert isinstance(batch_map(fn, range(5), size=2, journal_dir=str(tmp_path),
                                errors="return")[2], CallFailed)
    assert calls == []


@pytest.mark.parametrize("durability", ["flush", "fsync"])
def test_arguments_the_codec_cannot_journal_fail_the_map_naming_the_call(tmp_path,
                                                                        durability):
    class Odd:  # the default codec cannot encode it
        pass

    calls = []

    def fn(i, x):
        calls.append(i)
        return i

    with pytest.raises(EncodeError, match=r"arguments of call #1 cannot be journaled"):
        batch_map(fn, [0, 1, 2], [None, Odd(), None], size=1, journal_dir=str(tmp_path),
                  durability=durability)
    assert 1 not in calls
    # the calls journaled before it come back; nothing was journaled for it
    calls.clear()
    assert batch_map(fn, [0, 1, 2], [None, "ok", None], size=1,
                     journal_dir=str(tmp_path), durability=durability) == [0, 1, 2]
    assert 1 in calls and 0 not in calls


def test_halt_now_writes_nothing_after_the_map_raised(tmp_path):
    started = threading.Event()
    release = threading.Event()
    errors = []
    old_hook = threading.excepthook
    threading.excepthook = lambda a: errors.append(a.exc_value)

    def fn(i):
        if i == 0:
            started.set()
            assert release.wait(30)
            return "late"
        if i == 1:
            assert started.wait(30)
            raise ValueError("trip")
        return i

    try:
        with pytest.raises(KillSwitchError):
            batch_map(fn, range(10), size=2, kill_switch=AnyFailed(),
                      journal_dir=str(tmp_path))
        release.set()  # the abandoned call ends after the map has closed its journal
        deadline = time.monotonic() + 30
        while threading.active_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        release.set()
        threading.excepthook = old_hook
    assert errors == []  # no worker wrote into the closed journal
    assert _kinds(tmp_path).get(KIND_DONE, 0) == 0  # the late result is not journaled
    reset_kill_switch(str(tmp_path))
    calls = []
    assert batch_map(lambda i: calls.append(i) or i, range(10), size=2,
                     journal_dir=str(tmp_path)) == list(range(10))
    assert sorted(calls) == list(range(10))


CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pympx_queues.pipeline.batch_map import batch_map

    journal, log, out, n, durability = sys.argv[1:6]
    n = int(n)

    def note(line):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, line.encode())
        os.close(fd)

    def fn(i):
        note(f"s {i}\\n")
        time.sleep(0.01)
        note(f"e {i}\\n")
        return [i, "x" * (i % 7)]

    res = batch_map(fn, range(n), size=4, journal_dir=journal, durability=durability)
    with open(out, "w") as f:
        json.dump(res, f)
""")


def _ends(log):
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [int(x.split()[1]) for x in f.read().splitlines() if x.startswith("e ")]


@pytest.mark.parametrize("first,second", [("fsync", "flush"), ("flush", "fsync")])
def test_either_shape_resumes_the_others_journal_after_kill_9(tmp_path, first, second):
    """fsync maps run one engine item per call, flush maps in leases: a map killed in
    one shape and resumed in the other loses nothing and re-runs only calls in flight."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    journal, log, out = tmp_path / "j", tmp_path / "log", tmp_path / "out.json"
    n = 80

    def args(durability):
        return [sys.executable, str(script), str(journal), str(log), str(out), str(n),
                durability]

    child = subprocess.Popen(args(first))
    deadline = time.monotonic() + 60
    while len(_ends(str(log))) < 30:
        assert time.monotonic() < deadline and child.poll() is None, "child never got going"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    assert not out.exists()
    subprocess.run(args(second), check=True, timeout=90)
    with open(out) as f:
        assert json.load(f) == [[i, "x" * (i % 7)] for i in range(n)]
    ends = _ends(str(log))
    assert set(ends) == set(range(n))
    assert len(ends) - n <= 4 + 1  # only calls in flight at the kill ran twice


def test_journal_files_stay_bounded_across_runs_and_many_threads(tmp_path):
    from pympx_queues.pipeline.batch_map import MAX_STREAMS

    for k in range(1, 5):
        out = batch_map(lambda i: i, range(k * 300), size=40, journal_dir=str(tmp_path))
        assert out == list(range(k * 300))
        files = [f for f in os.listdir(str(tmp_path)) if f.endswith(".journal")]
        # the snapshot of the earlier runs, this run's main file and its workers' files
        assert len(files) <= 1 + 1 + MAX_STREAMS, files
    res = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
    st = json.loads(res.output)["pipelines"][0]
    assert st["counts"]["done"] == 1200 and st["live"] is False


def test_status_sees_a_running_map_as_live_and_refuses_a_second_run(tmp_path):
    inside = threading.Event()
    release = threading.Event()

    def fn(i):
        if i == 3:
            inside.set()
            assert release.wait(30)
        return i

    t = threading.Thread(target=lambda: batch_map(fn, range(8), size=2,
                                                  journal_dir=str(tmp_path)))
    t.start()
    try:
        assert inside.wait(30)
        res = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
        assert json.loads(res.output)["pipelines"][0]["live"] is True
        with pytest.raises(PipelineError, match="a run is live"):
            reset_kill_switch(str(tmp_path))
    finally:
        release.set()
        t.join(30)
    res = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
    assert json.loads(res.output)["pipelines"][0]["live"] is False


def test_a_long_run_writing_much_state_keeps_its_journal_bounded(tmp_path, monkeypatch):
    """Every failure journals the switch's state (with the failures kept): the run's
    main file rotates past compact_bytes, the closed part compacted, while the workers'
    own files are live and left alone; a rerun finds every result and the counters."""
    from pympx_queues.pipeline.journal import PipelineJournal
    from pympx_queues.pipeline.switches import Count

    orig = PipelineJournal.__init__

    def small(self, *a, **kw):
        kw["compact_bytes"] = 20_000
        orig(self, *a, **kw)

    monkeypatch.setattr(PipelineJournal, "__init__", small)
    fn, calls = recorder(bad=set(range(0, 600, 3)))
    out = batch_map(fn, range(600), size=4, journal_dir=str(tmp_path), errors="return",
                    kill_switch=Count(10_000))
    assert sum(isinstance(x, CallFailed) for x in out) == 200
    files = sorted(f for f in os.listdir(str(tmp_path)) if f.endswith(".journal"))
    sizes = [os.path.getsize(os.path.join(str(tmp_path), f)) for f in files]
    snaps = [f for f in files if ".snap." in f]
    assert snaps, files  # it rotated: the closed main files were compacted
    # 200 writes of up to 100 failures with tracebacks: megabytes without rotation
    assert sum(sizes) < 2_000_000, list(zip(files, sizes))
    calls.clear()
    again = batch_map(fn, range(600), size=4, journal_dir=str(tmp_path), errors="return",
                      kill_switch=Count(10_000))
    assert calls == [] and [type(x) for x in again] == [type(x) for x in out]
    from pympx_queues.pipeline.batch_map import STATE

    p = PipelineJournal(str(tmp_path), "batch_map", stages=["call"], keep_results=True)
    p.open()
    try:
        assert p.replay.states[STATE]["counts"]["failed"] == 200
    finally:
        p.close()


@pytest.mark.parametrize("halt", ["now", "soon"])
def test_nothing_starts_after_the_switch_trips_in_a_durable_thread_map(tmp_path, halt):
    fn, calls = recorder(bad={30})
    with pytest.raises(KillSwitchError) as ei:
        batch_map(fn, range(200), size=4, journal_dir=str(tmp_path),
                  kill_switch=AnyFailed(), halt=halt)
    counts = ei.value.counts
    assert counts["started"] == counts["started_at_trip"]  # not one call after the trip
    assert len(calls) == counts["started"]
    assert ei.value.failures[0]["index"] == 30
    # journaled: the next run raises at once and calls nothing
    calls.clear()
    with pytest.raises(KillSwitchError):
        batch_map(fn, range(200), size=4, journal_dir=str(tmp_path),
                  kill_switch=AnyFailed(), halt=halt)
    assert calls == []


@pytest.mark.parametrize("durability", ["flush", "fsync"])
def test_failures_are_journaled_without_tracebacks_and_get_them_back_on_restart(
        tmp_path, durability):
    """The failures kept with the switch are written again at every failure: without
    their tracebacks, which each failure's dead letter holds; a restart puts them back."""
    from pympx_queues.pipeline.batch_map import FAILURES
    from pympx_queues.pipeline.journal import PipelineJournal
    from pympx_queues.pipeline.switches import Count

    fn, _calls = recorder(bad={2, 5, 9})
    with pytest.raises(KillSwitchError):
        batch_map(fn, range(20), size=1, journal_dir=str(tmp_path), durability=durability,
                  kill_switch=Count(3))
    j = PipelineJournal(str(tmp_path), "batch_map", stages=["call"], keep_results=True)
    j.open()
    try:
        kept = j.replay.states[FAILURES]
    finally:
        j.close()
    assert [f["index"] for f in kept] == [2, 5, 9]
    assert all("traceback" not in f for f in kept)
    with pytest.raises(KillSwitchError) as again:
        batch_map(fn, range(20), size=1, journal_dir=str(tmp_path), durability=durability,
                  kill_switch=Count(3))
    tbs = [f["traceback"] for f in again.value.failures]
    assert [f["index"] for f in again.value.failures] == [2, 5, 9]
    assert all("ValueError: bad" in tb for tb in tbs), tbs
