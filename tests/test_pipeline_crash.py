"""Real crashes of real processes: kill -9 of the coordinator over several rounds (P1-P3),
no orphaned worker (P5), bounded memory with a fast source and a slow sink (P4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import wait_for
from pympx_queues.pipeline._torture import kill_rounds, summary_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kill_9_of_the_coordinator_at_random_moments_loses_nothing_and_reruns_nothing_finished(
        tmp_path):
    res = kill_rounds(str(tmp_path), size=300, rounds=5, seed=11)
    print(summary_line(res))
    assert res["killed"] >= 3
    assert res["lost"] == 0 and res["not_stored"] == 0
    assert res["finished_stage_reruns"] == 0 and res["done_key_reruns"] == 0
    assert res["sink_duplicates"] <= res["sink_duplicate_bound"]
    assert res["orphans"] == 0
    assert res["ok"]


def test_kill_9_rounds_in_fsync_mode(tmp_path):
    res = kill_rounds(str(tmp_path), size=150, rounds=3, seed=5, durability="fsync")
    print(summary_line(res))
    assert res["ok"], res


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from pympx_queues.pipeline import Pipeline, Stage
    from test_pipeline_crash import sleepy

    def report(result):
        pass

    p = Pipeline(range(4), [Stage("cpu", sleepy, kind="process", workers=2)],
                 progress=False)
    p.run_all()
""")


def sleepy(x):
    with open(os.path.join(os.environ["PIDS_DIR"], f"{os.getpid()}"), "w") as f:
        f.write(str(x))
    time.sleep(120)
    return x


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_process_workers_die_with_a_killed_coordinator(tmp_path):
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, PIDS_DIR=str(pids_dir), PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        pids = wait_for(lambda: len(os.listdir(pids_dir)) == 2 and
                        [int(n) for n in os.listdir(pids_dir)], timeout=60,
                        message="two workers running handlers")
        assert all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=10,
                 message="workers gone after their coordinator was killed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_memory_stays_flat_with_a_fast_source_and_a_slow_last_stage():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pipeline_memory.py"),
                          "--size", "200000"], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["done"] == 200000
    assert res["max_items_held"] <= res["bound"]  # P4: the items held never pass the bound
    assert res["growth_kb"] < 8 * 1024  # peak RSS flat from 10 % to 100 % of the items


SIGNAL_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pympx_queues.pipeline import Pipeline, Stage

    def slow(x):
        time.sleep(0.004)
        with open(os.path.join({d!r}, "started"), "a") as f:
            f.write(str(x) + "\\n")
        return x

    p = Pipeline(range(int(sys.argv[1])), [Stage("s", slow, workers=2)],
                 journal_dir={j!r}, progress=False)
    rep = p.run_all()
    print(json.dumps({{"state": rep.state, "done": rep.done, "skipped": rep.skipped_done,
                      "resumed": rep.resumed}}))
""")


def test_sigint_stops_taking_items_drains_and_the_next_run_resumes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_CHILD.format(d=str(tmp_path), j=str(tmp_path / "j")))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script), "600"], env=env,
                            stdout=subprocess.PIPE, text=True)
    started = tmp_path / "started"
    wait_for(lambda: started.exists() and len(started.read_text().split()) >= 10,
             timeout=60, message="items running")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    first = json.loads(out.strip().splitlines()[-1])
    assert first["state"] == "stopped" and 10 <= first["done"] < 600
    out = subprocess.run([sys.executable, str(script), "600"], env=env, capture_output=True,
                         text=True, timeout=120).stdout
    second = json.loads(out.strip().splitlines()[-1])
    assert second["state"] == "finished"
    assert second["skipped"] == first["done"]
    assert first["done"] + second["done"] == 600
