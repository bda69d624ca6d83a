"""Process stages fed in lots (a process stage first in line, default scheduler, handler
without ctx): items go to the workers many to a message and come back as one list, yet
each item keeps its own attempts, dead letter, blame, stop and journal (P1-P5, P7)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import wait_for
from pympx_queues.pipeline import Pipeline, Retry, Stage
from pympx_queues.pipeline.journal import PipelineJournal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _note(x):
    """Append "pid x" to the runs log (one write: lines from several processes do not
    mix)."""
    fd = os.open(os.path.join(os.environ["LOTS_DIR"], "runs"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {x}\n".encode())
    finally:
        os.close(fd)


def _runs(d):
    path = os.path.join(d, "runs")
    if not os.path.exists(path):
        return collections.Counter()
    with open(path) as f:
        return collections.Counter(int(line.split()[1]) for line in f if line.strip())


def fail_3_kill_5_once(x):
    _note(x)
    if x in (3, 5):
        mark = os.path.join(os.environ["LOTS_DIR"], f"once-{x}")
        if not os.path.exists(mark):
            open(mark, "w").close()
            if x == 3:
                raise ValueError("three fails on its first attempt")
            os._exit(7)  # five kills its worker on its first attempt
    return x * 10


def fail_3_kill_5_always(x):
    _note(x)
    if x == 3:
        raise ValueError("three always fails")
    if x == 5:
        os._exit(7)
    return x * 10


def times_ten(x):
    return x * 10


def unsendable_on_4(x):
    if x == 4:
        return threading.Lock()  # an output that cannot go back to the coordinator
    return x


def _lot_run(p):
    results = list(p.run())
    assert p._lots is not None, "the process stage was not fed in lots"
    return results


def test_a_lot_whose_3rd_item_fails_and_5th_kills_the_worker_retries_exactly_those(
        tmp_path, monkeypatch):
    monkeypatch.setenv("LOTS_DIR", str(tmp_path))
    p = Pipeline(range(40), [Stage("p", fail_3_kill_5_once, kind="process", workers=2,
                                   queue_size=64,
                                   retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    results = _lot_run(p)
    assert sorted(r.key for r in results) == sorted(str(i) for i in range(40))
    assert all(r.ok for r in results)
    assert {int(r.key): r.value for r in results} == {i: i * 10 for i in range(40)}
    st = p.report.stages["p"]
    # the failure and the death are each one attempt of their own item, nothing more
    assert st.failed_attempts == 2 and st.retried == 2 and st.dead == 0
    assert p.report.done == 40 and p.report.dead == 0
    runs = _runs(str(tmp_path))
    assert runs[3] == 2 and runs[5] == 2
    # 4 finished between the failure (reported at once) and the death: its output was
    # lost with the worker, so it may run again (at-least-once); every other item ran
    # exactly once (those after 5 in its message had not started).
    assert runs[4] in (1, 2)
    assert all(runs[i] == 1 for i in range(40) if i not in (3, 4, 5)), runs


def test_a_lot_item_that_always_fails_or_kills_is_dead_lettered_and_the_rest_is_done_once(
        tmp_path, monkeypatch):
    monkeypatch.setenv("LOTS_DIR", str(tmp_path))
    p = Pipeline(range(40), [Stage("p", fail_3_kill_5_always, kind="process", workers=2,
                                   queue_size=64,
                                   retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    results = _lot_run(p)
    by_key = {r.key: r for r in results}
    assert len(results) == 40 and len(by_key) == 40
    assert not by_key["3"].ok and by_key["3"].error.type == "ValueError"
    assert not by_key["5"].ok and by_key["5"].error.type == "WorkerDied"
    assert "key(s) ['5']" in by_key["5"].error.message
    assert all(by_key[str(i)].ok and by_key[str(i)].value == i * 10
               for i in range(40) if i not in (3, 5))
    st = p.report.stages["p"]
    assert st.failed_attempts == 4 and st.dead == 2
    assert p.report.done == 38 and p.report.dead == 2


def test_lots_with_keys_duplicates_order_and_a_next_stage(caplog):
    src = [i % 300 for i in range(320)]  # 20 duplicate keys
    outs = []
    p = Pipeline(src, [Stage("p", times_ten, kind="process", workers=2, queue_size=128),
                       Stage("t", times_ten, kind="thread", workers=2)],
                 key=lambda x: f"k{x}", ordered=True, progress=False,
                 on_complete=outs.append)
    p.run_all()
    assert p._lots is not None
    assert p.report.duplicate_keys == 20 and p.report.done == 300
    assert [r.key for r in outs] == [f"k{i}" for i in range(300)]  # source order
    assert [r.value for r in outs] == [i * 100 for i in range(300)]
    assert all(set(r.stage_timings) == {"p", "t"} for r in outs)
    assert p.report.stages["p"].done == 300 and p.report.stages["t"].done == 300


def test_lots_without_a_listener_count_every_item_and_bound_the_items_held():
    seen = []
    p = Pipeline(range(5000), [Stage("p", times_ten, kind="process", workers=2,
                                     queue_size=100)], progress=False)
    orig = p._offer_lot

    def offer_lot(sr, items, index0):
        orig(sr, items, index0)
        seen.append(p._live)  # P4: never more than the stage's queue and workers
    p._offer_lot = offer_lot
    rep = p.run_all()
    assert rep.done == 5000 and rep.accepted == 5000 and rep.in_flight == 0
    assert rep.stages["p"].done == 5000
    assert seen and max(seen) <= 100 + 2


def test_an_item_of_a_lot_that_does_not_pickle_fails_alone():
    src = [1, 2, threading.Lock(), 4, 5] + list(range(6, 50))
    p = Pipeline(src, [Stage("p", times_ten, kind="process", workers=2)], progress=False)
    results = _lot_run(p)
    by_key = {r.key: r for r in results}
    assert len(by_key) == len(src) == 49
    assert not by_key["2"].ok and "pickle" in by_key["2"].error.message
    assert all(r.ok for k, r in by_key.items() if k != "2")


def test_an_output_of_a_lot_that_cannot_be_sent_back_fails_alone():
    p = Pipeline(range(30), [Stage("p", unsendable_on_4, kind="process", workers=2)],
                 progress=False)
    results = _lot_run(p)
    by_key = {r.key: r for r in results}
    assert not by_key["4"].ok and "cannot be sent back" in by_key["4"].error.message
    assert all(by_key[str(i)].ok and by_key[str(i)].value == i for i in range(30) if i != 4)


class Opaque:
    """Picklable, but not data a journal can hold."""


def first_or_self(x):
    return x[0] if isinstance(x, list) else x


def test_a_durable_lot_journals_in_one_append_and_an_item_it_cannot_journal_is_a_dead_letter(
        tmp_path):
    src = list(range(20)) + [Opaque()] + list(range(21, 40))  # not JSON-like data
    outs = []
    p = Pipeline(src, [Stage("p", first_or_self, kind="process", workers=2)],
                 journal_dir=str(tmp_path / "j"), ordered=True, progress=False,
                 on_complete=outs.append)
    p.run_all()
    assert p._lots is not None
    assert [r.key for r in outs] == [str(i) for i in range(40)]  # source order kept
    bad = outs[20]
    assert not bad.ok and bad.error.type == "EncodeError" and "'20'" in bad.error.message
    assert all(r.ok and r.value == i for i, r in enumerate(outs) if i != 20)
    assert p.report.done == 39 and p.report.dead == 1
    again = Pipeline(src, [Stage("p", first_or_self, kind="process", workers=2)],
                     journal_dir=str(tmp_path / "j"), progress=False)
    rep = again.run_all()  # P3: the done keys are skipped; the dead one stays dead
    assert rep.done == 0 and rep.skipped_done == 39


def fail_on_7(x):
    if x == 7:
        raise KeyError("seven")
    return x


def test_per_item_stage_timings_of_lot_items_go_to_the_callback_without_a_listener():
    heard = []
    p = Pipeline(range(30), [Stage("p", fail_on_7, kind="process", workers=2)],
                 progress=False,
                 on_stage_complete=lambda key, stage, secs, ok: heard.append((key, ok)))
    rep = p.run_all()
    assert p._lots is not None and rep.done == 29 and rep.dead == 1
    assert sorted(heard) == sorted((str(i), i != 7) for i in range(30))


def test_a_slow_source_is_taken_in_steps_so_results_come_before_it_ends():
    import time
    made = []
    first_seen_at = []

    def slow_source():
        for i in range(300):
            time.sleep(0.001)
            made.append(i)
            yield i

    def on_complete(r):
        if not first_seen_at:
            first_seen_at.append(len(made))

    p = Pipeline(slow_source(), [Stage("p", times_ten, kind="process", workers=2,
                                       queue_size=4096)],
                 progress=False, on_complete=on_complete)
    rep = p.run_all()
    assert p._lots is not None and rep.done == 300
    # a lot stops taking from a slow source after a step (64 items) past 5 ms: the
    # first results come back while the source is still being read
    assert first_seen_at[0] < 300


def big_output(x):
    return bytes([x % 256]) * (100_000 + x)  # each reply larger than a pipe's 64 KiB


def test_replies_larger_than_a_pipe_come_back_whole_over_several_reads():
    for src, kind in ((range(12), "lots"), ([(i,) for i in range(6)], "chunks")):
        fn = big_output if kind == "lots" else big_output_ctx
        p = Pipeline(src, [Stage("p", fn, kind="process", workers=2)], progress=False)
        results = {r.key: r for r in p.run()}
        n = len(src)
        assert len(results) == n and all(r.ok for r in results.values())
        for i in range(n):
            assert results[str(i)].value == bytes([i % 256]) * (100_000 + i)


def big_output_ctx(x, ctx):  # a handler taking ctx: the chunked per-item path
    return big_output(x[0])


def slow_note(x):
    _note(x)
    import time
    time.sleep(0.02)
    return x


def test_a_stop_without_drain_takes_back_the_unstarted_items_of_a_lot(
        tmp_path, monkeypatch):
    monkeypatch.setenv("LOTS_DIR", str(tmp_path))
    jdir = str(tmp_path / "j")
    ended = []

    def on_complete(r):
        ended.append(r)
        if len(ended) == 3:
            p.stop(drain=False)

    p = Pipeline(range(80), [Stage("p", slow_note, kind="process", workers=2,
                                    queue_size=128)],
                 journal_dir=jdir, progress=False, on_complete=on_complete)
    p.run_all()
    assert p._lots is not None and p.report.state == "halted"
    started = sum(_runs(str(tmp_path)).values())
    # What ran: the items done, plus at most the one running in each worker at the
    # stop; the rest of the lots handed over never started (P7).
    assert p.report.done <= started <= p.report.done + 2 + 2, (started, p.report.done)
    assert started < 20
    p2 = Pipeline(range(80), [Stage("p", slow_note, kind="process", workers=2,
                                     queue_size=128)],
                  journal_dir=jdir, progress=False)
    rep = p2.run_all()
    assert rep.state == "finished"
    assert p.report.done + rep.done == 80 and rep.skipped_done == p.report.done


def test_a_draining_stop_finishes_every_admitted_lot_item_and_the_next_run_the_rest(
        tmp_path, monkeypatch):
    monkeypatch.setenv("LOTS_DIR", str(tmp_path))
    jdir = str(tmp_path / "j")
    ended = []

    def on_complete(r):
        ended.append(r)
        if len(ended) == 3:
            p.stop(drain=True)

    p = Pipeline(range(80), [Stage("p", slow_note, kind="process", workers=2,
                                   queue_size=16)],
                 journal_dir=jdir, progress=False, on_complete=on_complete)
    rep = p.run_all()
    assert p._lots is not None and rep.state == "stopped"
    assert rep.dead == 0 and rep.done == rep.accepted and 3 <= rep.done < 80
    assert sum(_runs(str(tmp_path)).values()) == rep.done  # each ran once
    rep2 = Pipeline(range(80), [Stage("p", slow_note, kind="process", workers=2)],
                    journal_dir=jdir, progress=False).run_all()
    assert rep2.state == "finished" and rep.done + rep2.done == 80
    assert sum(_runs(str(tmp_path)).values()) == 80


# -- kill -9 of a durable run in the middle of lots -------------------------------------

KILL_CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from pympx_queues.pipeline import Pipeline, Stage
    from test_pipeline_process_lots import lot_compute, lot_store

    p = Pipeline(range({n}), [
        Stage("compute", lot_compute, kind="process", workers=2, queue_size=48),
        Stage("store", lot_store, kind="thread", workers=2),
    ], journal_dir={j!r}, durability=sys.argv[1], progress=False)
    rep = p.run_all()
    print(json.dumps({{"lots": p._lots is not None, "done": rep.done,
                      "skipped": rep.skipped_done, "state": rep.state}}))
""")


def _log_line(name, text):
    fd = os.open(os.path.join(os.environ["LOTS_DIR"], name),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def lot_compute(x):
    import time
    time.sleep(0.002)
    _log_line("compute", f"{os.environ['LOTS_RUN']} {x}\n")
    return x * 3


def lot_store(v):
    _log_line("store", f"{os.environ['LOTS_RUN']} {v // 3}\n")
    return v


def _logged(d, name, run):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(b) for a, b in (line.split() for line in f if line.strip()) if a == run]


@pytest.mark.parametrize("durability", ["flush", "fsync"])
def test_a_durable_lot_run_killed_with_kill_9_resumes_with_nothing_lost_or_done_twice(
        tmp_path, durability):
    n = 600
    jdir = str(tmp_path / "j")
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD.format(tests=os.path.join(ROOT, "tests"), n=n, j=jdir))
    env = dict(os.environ, PYTHONPATH=ROOT, LOTS_DIR=str(tmp_path), LOTS_RUN="1")
    proc = subprocess.Popen([sys.executable, str(script), durability], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(_logged(str(tmp_path), "store", "1")) >= n // 4, timeout=120,
                 message="a quarter of the items stored")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    # What the journal says after the crash: finished stages and done keys.
    j = PipelineJournal(jdir, "pipeline", durability=durability,
                        stages=["compute", "store"])
    j.open()
    done_before = {str(i) for i in range(n) if str(i) in j.replay.done}
    computed_before = done_before | {k for k, s in j.replay.unfinished.items()
                                     if s.stage >= 1}
    j.close()
    assert 0 < len(done_before) < n
    env["LOTS_RUN"] = "2"
    out = subprocess.run([sys.executable, str(script), durability], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    second = json.loads(out.stdout.strip().splitlines()[-1])
    assert second["lots"] and second["state"] == "finished"
    assert second["skipped"] == len(done_before)
    assert len(done_before) + second["done"] == n  # P1: nothing lost
    j.open()
    assert all(str(i) in j.replay.done for i in range(n)) and not j.replay.unfinished
    j.close()
    rerun_compute = set(map(str, _logged(str(tmp_path), "compute", "2")))
    rerun_store = set(map(str, _logged(str(tmp_path), "store", "2")))
    assert not rerun_compute & computed_before  # P2: finished stages not run again
    assert not rerun_store & done_before  # P3: done keys not run again
    # every key stored at least once over both runs, and twice only if in flight at the
    # kill (in the second run after the first stored it without its done record)
    stored = collections.Counter(_logged(str(tmp_path), "store", "1") +
                                 _logged(str(tmp_path), "store", "2"))
    assert set(stored) == set(range(n))


def slow_times_ten(x):
    import time

    time.sleep(0.005)  # work: the source ends long before the lots' replies come back
    return x * 10


def test_lots_in_flight_after_the_source_ended_are_not_taken_for_a_stall():
    # Found when the stall check met lots: items sent in lots are neither in a stage's
    # scheduler nor "running" groups; the check took them for items no one holds and
    # failed the run with PipelineStalled.
    p = Pipeline(range(120), [Stage("p", slow_times_ten, kind="process", workers=2,
                                    queue_size=256)], progress=False)
    results = _lot_run(p)
    assert sorted(int(r.key) for r in results) == list(range(120))
    assert all(r.ok and r.value == int(r.key) * 10 for r in results)
    assert p.report.state == "finished" and p.report.done == 120
