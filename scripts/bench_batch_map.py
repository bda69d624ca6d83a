#!/usr/bin/env python3
"""Benchmark batch_map (issue 12) against concurrent.futures, in the same process.

Prints, for ``--size N`` trivial calls: seconds and per-call microseconds of
ThreadPoolExecutor.map / ProcessPoolExecutor.map and of batch_map in memory and durable
(flush), the ratios against the executor baseline, and the time from the tripping
failure to the map raising (halt="now", and halt="soon" with running calls of
``--soon-call`` seconds).  ``--json`` prints one JSON object instead.

    python scripts/bench_batch_map.py --size 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pympx_queues.pipeline.batch_map import batch_map  # noqa: E402
from pympx_queues.pipeline.switches import AnyFailed, KillSwitchError, Rate  # noqa: E402


def ident(x):
    return x


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


def trip_latency(n, halt, soon_call, workers):
    k = max(n // 2, 1)
    _fail_at.clear()
    try:
        batch_map(failing_at(k, soon_call if halt == "soon" else 0.0), range(n),
                  size=workers, kill_switch=AnyFailed(), halt=halt)
    except KillSwitchError:
        return time.perf_counter() - _fail_at["t"]
    raise RuntimeError("the switch did not trip")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="calls per measurement")
    ap.add_argument("--workers", type=int, default=8, help="threads (processes: 2)")
    ap.add_argument("--soon-call", type=float, default=0.05,
                    help="seconds each running call takes in the halt=soon latency run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    n, w = a.size, a.workers
    res = {"size": n, "workers": w, "python": sys.version.split()[0],
           "cpus": os.cpu_count()}
    items = list(range(n))

    def thread_pool():
        with ThreadPoolExecutor(w) as ex:
            return list(ex.map(ident, items))

    res["threadpool_s"], base = timed(thread_pool)
    res["batch_map_thread_s"], out = timed(lambda: batch_map(ident, items, size=w))
    assert out == base
    d = tempfile.mkdtemp(prefix="bench-bm-")
    try:
        res["batch_map_durable_s"], out = timed(
            lambda: batch_map(ident, items, size=w, journal_dir=d))
        assert out == base
        res["batch_map_durable_rerun_s"], out = timed(
            lambda: batch_map(ident, items, size=w, journal_dir=d))
        assert out == base
        res["batch_map_durable_switch_s"], out = timed(
            lambda: batch_map(ident, items, size=w, journal_dir=d, run_id="switch",
                              kill_switch=Rate(100, 0.5)))
        assert out == base
    finally:
        shutil.rmtree(d, ignore_errors=True)
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
    res["ratio_durable"] = res["batch_map_durable_s"] / res["threadpool_s"]
    res["ratio_durable_switch"] = res["batch_map_durable_switch_s"] / res["threadpool_s"]
    res["ratio_process"] = res["batch_map_process_s"] / res["processpool_s"]
    for k in ("threadpool", "batch_map_thread", "batch_map_durable",
              "batch_map_durable_switch"):
        res[k + "_us_per_call"] = res[k + "_s"] / n * 1e6
    for k in ("processpool", "batch_map_process"):
        res[k + "_us_per_call"] = res[k + "_s"] / pn * 1e6
    tn = min(n, 2000)
    res["trip_to_raise_now_ms"] = trip_latency(tn, "now", 0, w) * 1e3
    res["trip_to_raise_soon_ms"] = trip_latency(tn, "soon", a.soon_call, w) * 1e3
    res["soon_call_ms"] = a.soon_call * 1e3
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"batch_map benchmark: {n} trivial calls, {w} threads (processes: 2 workers, "
          f"{pn} calls), Python {res['python']}, {res['cpus']} CPUs")
    rows = [("ThreadPoolExecutor.map", "threadpool", None),
            ("batch_map threads, in memory", "batch_map_thread", "ratio_thread"),
            ("batch_map threads, durable flush", "batch_map_durable", "ratio_durable"),
            ("  + Rate switch (state journaled)", "batch_map_durable_switch",
             "ratio_durable_switch"),
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
          f"{res['soon_call_ms']:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
