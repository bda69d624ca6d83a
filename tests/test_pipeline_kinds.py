"""The kinds' own machinery: abandoned threads, chunked process dispatch (which item of a
chunk a death or a timeout is charged to), subinterpreters on Python 3.14, and the
compact key set."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from pympx_queues.pipeline import Pipeline, Retry, Scheduler, Stage
from pympx_queues.pipeline._keys import KeySet

ROOT = Path(__file__).resolve().parent.parent
PY314 = os.environ.get("PYMPX_PY314", "/opt/py314/venv/bin/python")


def die_on_17(x):
    if x == 17:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def hang_on_11(x):
    if x == 11:
        time.sleep(600)
    return x


def test_a_hung_thread_is_abandoned_at_its_timeout_and_a_new_thread_takes_its_slot():
    release = threading.Event()
    entered = []

    def stuck_on_one(x, ctx):
        if x == 1:
            entered.append(threading.current_thread().name)
            release.wait(60)  # ignores ctx.cancelled: a thread that cannot be stopped
            return "late"
        return x

    # One worker: without a replacement thread the run would wait for the stuck one.
    p = Pipeline(range(6), [Stage("s", stuck_on_one, workers=1, timeout=0.3,
                                  retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    try:
        res = {r.key: r for r in p.run()}
        assert res["1"].error.type == "StageTimeout" and res["1"].error.attempt == 2
        assert all(res[str(i)].ok and res[str(i)].value == i for i in (0, 2, 3, 4, 5))
        assert p.report.state == "finished"
        # Both attempts hung a thread of their own, and both threads still run.
        assert len(entered) == 2 and len(set(entered)) == 2
        alive = {t.name for t in threading.enumerate()}
        assert set(entered) <= alive
    finally:
        release.set()
    wait_for(lambda: not {t.name for t in threading.enumerate()} & set(entered),
             message="the abandoned threads end once their handler returns")


def test_a_worker_death_inside_a_chunk_is_charged_to_the_item_that_ran():
    # A deep queue: items go to the workers in chunks of many.
    p = Pipeline(range(60), [Stage("p", die_on_17, kind="process", workers=2,
                                   queue_size=64,
                                   retry=Retry(max_attempts=2, backoff=0.01))],
                 progress=False)
    res = {r.key: r for r in p.run()}
    assert len(res) == 60
    assert res["17"].error.type == "WorkerDied" and "'17'" in res["17"].error.message
    assert all(res[str(i)].ok and res[str(i)].value == i * 10 for i in range(60) if i != 17)
    st = p.report.stages["p"]
    assert st.failed_attempts == 2 and st.dead == 1  # nobody else was charged


def test_a_timeout_inside_a_chunk_kills_only_for_the_item_that_ran_past_it():
    p = Pipeline(range(30), [Stage("p", hang_on_11, kind="process", workers=2,
                                   queue_size=32, timeout=1.0)], progress=False)
    res = {r.key: r for r in p.run()}
    assert res["11"].error.type == "StageTimeout"
    assert all(res[str(i)].ok for i in range(30) if i != 11)
    assert p.report.stages["p"].failed_attempts == 1


def test_every_item_of_many_chunks_comes_back_with_its_own_result():
    p = Pipeline(range(2000), [Stage("p", abs, kind="process",
                                     workers=2, queue_size=256)], progress=False)
    res = {r.key: r.value for r in p.run()}
    assert res == {str(i): i for i in range(2000)}


INTERPRETER_PROGRAM = textwrap.dedent("""
    from pympx_queues.pipeline import Pipeline, Retry, Stage

    def double(x):
        return x * 2

    def keyed(x, ctx):
        if x == 6:
            raise ValueError("six")
        return [x, ctx.key, ctx.attempt]

    if __name__ == "__main__":
        p = Pipeline(range(5), [Stage("sub", double, kind="interpreter", workers=2),
                                Stage("ctx", keyed, kind="interpreter",
                                      retry=Retry(max_attempts=2, backoff=0.01))],
                     progress=False)
        for r in sorted(p.run(), key=lambda r: int(r.key)):
            print(r.key, r.ok, r.value, r.error.type if r.error else "-",
                  r.error.attempt if r.error else "-")
        print(p.report.state)
""")


@pytest.mark.skipif(not os.path.exists(PY314),
                    reason=f"no Python 3.14 at {PY314} (scripts/install_bench_peers_pipeline"
                           ".sh makes one; CI has none)")
@pytest.mark.timeout(120)
def test_an_interpreter_stage_runs_under_python_314(tmp_path):
    prog = tmp_path / "interp.py"
    prog.write_text(INTERPRETER_PROGRAM)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([PY314, str(prog)], env=env, capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "finished"
    assert lines[:5] == ["0 True [0, '0', 1] - -", "1 True [2, '1', 1] - -",
                         "2 True [4, '2', 1] - -", "3 False None ValueError 2",
                         "4 True [8, '4', 1] - -"]


def test_the_key_set_is_exact_for_many_keys_and_grows():
    s = KeySet()
    keys = [f"item-{i}" for i in range(50_000)]
    assert all(s.add(k) for k in keys)
    assert len(s) == 50_000 and not any(s.add(k) for k in keys[::7])
    assert all(k in s for k in keys[::13])
    assert "item-50000" not in s and 12 not in s
    assert s["item-3"] is None and s.get("nope", 5) == 5
    with pytest.raises(KeyError):
        s["nope"]
    assert s.nbytes <= 50_000 * 12 * 4


def note_start(x, ctx):
    with open(ctx.metadata["log"], "a") as f:
        f.write(f"{x}\n")
    time.sleep(0.02)
    return x


class Gate(Scheduler):
    """FIFO that starts nothing once closed (a kill switch's scheduler)."""

    closed = False

    def take(self, free_workers):
        return [] if self.closed else super().take(free_workers)


def test_items_queued_in_a_process_chunk_do_not_start_after_a_stop(tmp_path):
    log = tmp_path / "starts"
    gate = Gate()

    def end_when_idle():
        # What never started stays for the next run.  (Waiting for a second completion
        # instead hung when nothing was running at the trip: the drain then waits for
        # items this gate never releases.)
        wait_for(lambda: p.stats().stages["p"].in_flight == 0, timeout=60,
                 message="the item running at the trip ended and the chunk came back")
        p.stop(drain=False)

    def on_complete(r):
        if not gate.closed:
            gate.closed = True  # a trip: nothing new may start, the running one ends
            p.stop(drain=True)
            threading.Thread(target=end_when_idle, daemon=True).start()

    src = list(range(80))
    p = Pipeline(src, [Stage("p", note_start, kind="process", workers=1, queue_size=64,
                             scheduler=gate)], progress=False, on_complete=on_complete)
    # ctx.metadata travels to the worker with the context
    orig = p._admit

    def admit(ctx, journal):
        ctx.metadata["log"] = str(log)
        orig(ctx, journal)
    p._admit = admit
    p.run_all()
    starts = log.read_text().split()
    # One item ended and tripped it; the one running then finishes; the rest of the
    # chunk (up to 32 items handed over) comes back unstarted.
    assert p.report.done <= 3 and len(starts) == p.report.done
