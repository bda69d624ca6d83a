#!/usr/bin/env python3
"""Benchmark batch_map (issue 12) against concurrent.futures, in the same process.

Prints, for ``--size N`` trivial calls: seconds and per-call microseconds of
ThreadPoolExecutor.map / ProcessPoolExecutor.map and of batch_map in memory and durable
(flush), the ratios against the executor baseline, and the time from the tripping
failure to the map raising (halt="now", and halt="soon" with running calls of
``--soon-call`` seconds).  With Prefect 3 installed it also maps ``--prefect N`` trivial
Prefect tasks inside a flow, in a child process with its own ``PREFECT_HOME``: Prefect's
own ``task.map``, prefecto's ``BatchTask`` (if ``pip install prefecto`` was done; on
Prefect 3 a map of more than one batch fails, and the row says how) and
``pympx_queues.compat.prefecto.BatchTask`` on the same task.  ``--json`` prints one JSON
object instead.

    python scripts/bench_batch_map.py --size 20000 [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pympx_queues.pipeline.batch_map import batch_map  # noqa: E402
from pympx_queues.pipeline.switches import AnyFailed, KillSwitchError, Rate  # noqa: E402


def ident(x):
    return x


def sleeper(x):
    time.sleep(_work[0])
    return x


_work = [0.001]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


_fail_at = {}


def failing_at(k, soon_call):
    def fn(i):
        if i == k:
            _fail_at["t"] = time.perf_counter()
            raise ValueError("trip")
        if soon_call and i > k - 4:
            time.sleep(soon_call)
        return i
    return fn


def trip_latency(n, halt, soon_call, workers, **kw):
    k = max(n // 2, 1)
    _fail_at.clear()
    try:
        batch_map(failing_at(k, soon_call if halt == "soon" else 0.0), range(n),
                  size=workers, kill_switch=AnyFailed(), halt=halt, **kw)
    except KillSwitchError:
        return time.perf_counter() - _fail_at["t"]
    raise RuntimeError("the switch did not trip")


def prefect_child(n, w):
    """Runs in a child process (its own PREFECT_HOME): one flow per row, the map timed
    inside the flow (Prefect's start-up is not counted)."""
    import logging

    from prefect import flow, task

    from pympx_queues.compat.prefecto import BatchTask

    logging.disable(logging.ERROR)  # prefecto's failure is a row, not a traceback

    @task
    def ptask(x):
        return x

    try:
        from prefecto.concurrency import BatchTask as PrefectoBatchTask
    except ImportError:
        PrefectoBatchTask = None

    rows = {
        "prefect_task_map": (n, lambda k: ptask.map(range(k))),
        "prefecto_one_batch": (w, lambda k: PrefectoBatchTask(ptask, k).map(range(k))),
        "prefecto": (n, lambda k: PrefectoBatchTask(ptask, w).map(range(k))),
        "compat_prefect_task": (n, lambda k: BatchTask(ptask, w).map(range(k))),
        "compat_prefect_task_window": (n, lambda k: BatchTask(ptask, w, waves=False)
                                       .map(range(k))),
    }

    @flow
    def timed_map(name):
        k, make = rows[name]
        t = time.perf_counter()
        out = [f.result() for f in make(k)]
        return time.perf_counter() - t, out

    import prefect

    res = {"prefect": prefect.__version__, "prefect_n": n}
    try:
        import prefecto  # noqa: F401
        from importlib.metadata import version
        res["prefecto_version"] = version("prefecto")
    except ImportError:
        res["prefecto_version"] = None
    for name, (k, _make) in rows.items():
        if name.startswith("prefecto") and PrefectoBatchTask is None:
            res[name] = {"fails": "prefecto is not installed (pip install prefecto)"}
            continue
        try:
            el, out = timed_map(name)
        except Exception as exc:
            res[name] = {"n": k, "fails": f"{type(exc).__name__}: {exc}"}
            continue
        assert out == list(range(k)), (name, out)
        res[name] = {"n": k, "s": el, "ms_per_task": el / k * 1e3}
    print("PREFECT-ROWS " + json.dumps(res))
    return 0


def prefect_rows(n, w):
    try:
        import prefect  # noqa: F401
    except ImportError:
        return {"skipped": "Prefect is not installed (pip install -e '.[prefect]')"}
    home = tempfile.mkdtemp(prefix="bench-bm-prefect-")
    env = dict(os.environ, PREFECT_HOME=home, DO_NOT_TRACK="1",
               PREFECT_LOGGING_LEVEL="ERROR", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--prefect-child",
                              str(n), "--workers", str(w)], env=env, capture_output=True,
                             text=True, timeout=900)
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(home, ignore_errors=True)
    for line in out.stdout.splitlines():
        if line.startswith("PREFECT-ROWS "):
            res = json.loads(line[len("PREFECT-ROWS "):])
            res["child_wall_s"] = wall
            return res
    return {"fails": f"the Prefect child exited {out.returncode}: {out.stderr[-2000:]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="calls per measurement")
    ap.add_argument("--workers", type=int, default=8, help="threads (processes: 2)")
    ap.add_argument("--soon-call", type=float, default=0.05,
                    help="seconds each running call takes in the halt=soon latency run")
    ap.add_argument("--work-ms", type=float, default=1.0,
                    help="milliseconds each call sleeps in the 'calls that wait' rows")
    ap.add_argument("--prefect", type=int, default=40, metavar="N",
                    help="Prefect tasks per Prefect row (0: no Prefect rows)")
    ap.add_argument("--prefect-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each trivial-call row and its baseline, in turn; the "
                         "best is kept")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    n, w = a.size, a.workers
    if a.prefect_child:
        return prefect_child(a.prefect_child, w)
    res = {"size": n, "workers": w, "python": sys.version.split()[0],
           "cpus": os.cpu_count()}
    items = list(range(n))

    def thread_pool():
        with ThreadPoolExecutor(w) as ex:
            return list(ex.map(ident, items))

    base = list(items)
    d = tempfile.mkdtemp(prefix="bench-bm-")
    try:
        # The trivial-call rows and their baseline in turn, --repeat times, the best of
        # each kept (eight threads on two cores now and then fall into a lock convoy:
        # one run of a row can take twice its usual time, baseline included).
        for k in range(a.repeat):
            for key, fn in (
                    ("threadpool_s", thread_pool),
                    ("batch_map_thread_s", lambda: batch_map(ident, items, size=w)),
                    ("batch_map_thread_switch_s", lambda: batch_map(
                        ident, items, size=w, kill_switch=Rate(100, 0.5))),
                    ("batch_map_durable_s", lambda k=k: batch_map(
                        ident, items, size=w, journal_dir=d, run_id=f"plain{k}")),
                    ("batch_map_durable_switch_s", lambda k=k: batch_map(
                        ident, items, size=w, journal_dir=d, run_id=f"switch{k}",
                        kill_switch=Rate(100, 0.5)))):
                t, out = timed(fn)
                assert out == base
                res[key] = min(res.get(key, t), t)
        res["batch_map_durable_rerun_s"], out = timed(
            lambda: batch_map(ident, items, size=w, journal_dir=d, run_id="plain0"))
        assert out == base
        tn = min(n, 2000)
        res["trip_to_raise_durable_now_ms"] = trip_latency(
            tn, "now", 0, w, journal_dir=d, run_id="trip") * 1e3
    finally:
        shutil.rmtree(d, ignore_errors=True)
    _work[0] = a.work_ms / 1e3
    wn = max(min(n // 10, 2000), 10)
    witems = items[:wn]

    def thread_pool_work():
        with ThreadPoolExecutor(w) as ex:
            return list(ex.map(sleeper, witems))

    res["work_size"] = wn
    res["threadpool_work_s"], wbase = timed(thread_pool_work)
    res["batch_map_work_s"], out = timed(lambda: batch_map(sleeper, witems, size=w))
    assert out == wbase
    res["ratio_work"] = res["batch_map_work_s"] / res["threadpool_work_s"]
    pn = max(n // 10, 10)
    pitems = items[:pn]

    def process_pool():
        with ProcessPoolExecutor(2) as ex:
            return list(ex.map(ident, pitems))

    res["process_size"] = pn
    res["processpool_s"], pbase = timed(process_pool)
    res["batch_map_process_s"], out = timed(
        lambda: batch_map(ident, pitems, size=2, kind="process"))
    assert out == pbase
    res["ratio_thread"] = res["batch_map_thread_s"] / res["threadpool_s"]
    res["ratio_thread_switch"] = res["batch_map_thread_switch_s"] / res["threadpool_s"]
    res["ratio_durable"] = res["batch_map_durable_s"] / res["threadpool_s"]
    res["ratio_durable_switch"] = res["batch_map_durable_switch_s"] / res["threadpool_s"]
    res["ratio_process"] = res["batch_map_process_s"] / res["processpool_s"]
    for k in ("threadpool", "batch_map_thread", "batch_map_thread_switch",
              "batch_map_durable",
              "batch_map_durable_switch"):
        res[k + "_us_per_call"] = res[k + "_s"] / n * 1e6
    for k in ("processpool", "batch_map_process"):
        res[k + "_us_per_call"] = res[k + "_s"] / pn * 1e6
    for k in ("threadpool_work", "batch_map_work"):
        res[k + "_us_per_call"] = res[k + "_s"] / wn * 1e6
    tn = min(n, 2000)
    res["trip_to_raise_now_ms"] = trip_latency(tn, "now", 0, w) * 1e3
    res["trip_to_raise_soon_ms"] = trip_latency(tn, "soon", a.soon_call, w) * 1e3
    res["soon_call_ms"] = a.soon_call * 1e3
    if a.prefect:
        res["prefect_rows"] = prefect_rows(a.prefect, w)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"batch_map benchmark: {n} trivial calls, {w} threads (processes: 2 workers, "
          f"{pn} calls; calls that sleep: {wn}), Python {res['python']}, "
          f"{res['cpus']} CPUs")
    rows = [("ThreadPoolExecutor.map", "threadpool", None),
            ("batch_map threads, in memory", "batch_map_thread", "ratio_thread"),
            ("  + Rate switch (every completion)", "batch_map_thread_switch",
             "ratio_thread_switch"),
            ("batch_map threads, durable flush", "batch_map_durable", "ratio_durable"),
            ("  + Rate switch (state journaled)", "batch_map_durable_switch",
             "ratio_durable_switch"),
            (f"ThreadPoolExecutor.map, {a.work_ms:g} ms calls", "threadpool_work", None),
            (f"batch_map threads, {a.work_ms:g} ms calls", "batch_map_work", "ratio_work"),
            ("ProcessPoolExecutor.map", "processpool", None),
            ("batch_map processes, in memory", "batch_map_process", "ratio_process")]
    for label, k, r in rows:
        ratio = f"  x{res[r]:.2f} of baseline" if r else ""
        print(f"  {label:36s} {res[k + '_s']:8.3f} s  {res[k + '_us_per_call']:8.1f} us/call"
              f"{ratio}")
    print(f"  durable rerun (all results from the journal): "
          f"{res['batch_map_durable_rerun_s']:.3f} s")
    print(f"  tripping failure -> map raises: now {res['trip_to_raise_now_ms']:.1f} ms; "
          f"soon {res['trip_to_raise_soon_ms']:.1f} ms (running calls take "
          f"{res['soon_call_ms']:.0f} ms); durable, now "
          f"{res['trip_to_raise_durable_now_ms']:.1f} ms")
    pr = res.get("prefect_rows")
    if pr:
        print_prefect(pr, w)
    return 0


def print_prefect(pr, w):
    if "skipped" in pr or "fails" in pr:
        print(f"  Prefect rows: {pr.get('skipped') or pr.get('fails')}")
        return
    print(f"Prefect {pr['prefect']} (prefecto {pr['prefecto_version']}), trivial tasks in a flow, "
          f"batch size {w}, map timed inside the flow (child process "
          f"{pr['child_wall_s']:.1f} s with Prefect's start-up):")
    labels = [("prefect_task_map", "Prefect task.map (reference)"),
              ("prefecto_one_batch", "prefecto BatchTask, one batch"),
              ("prefecto", "prefecto BatchTask, several batches"),
              ("compat_prefect_task", "compat.prefecto BatchTask (waves)"),
              ("compat_prefect_task_window", "  same, waves=False")]
    for k, label in labels:
        r = pr[k]
        if "fails" in r:
            print(f"  {label:36s} {r.get('n', '')!s:>5} tasks: fails: {r['fails']}")
        else:
            print(f"  {label:36s} {r['n']:5d} tasks: {r['s']:8.3f} s "
                  f"{r['ms_per_task']:8.2f} ms/task")


if __name__ == "__main__":
    sys.exit(main())
