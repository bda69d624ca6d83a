#!/usr/bin/env python3
"""P4, bounded memory: a fast source, a slow last stage, many small items; peak RSS flat.

Runs one pipeline (async parse with 4 workers -> async store with 1 worker, the
bottleneck) over ``--size`` items from a generator and samples the peak RSS
(``VmHWM``, else ``ru_maxrss``) before the run, after the source gave 10 % of its items and at the end,
and the most items the coordinator ever held (admitted, not yet released).  Prints one
JSON line::

    python scripts/pipeline_memory.py --size 1000000 [--key] [--journal DIR [--rerun]]

``--key``: items keyed by a key function (the run keeps the keys it saw to skip
duplicates: a bounded key set, spilled to scratch files past its budget).  ``--journal``:
a durable run; ``--rerun``: run it twice and measure the second run, which skips every
key as done (P3) after loading the done keys from the journal (in this process only: the
first run is a child process, so its memory is not counted).  ``--budget BYTES``: the
key sets' memory budget (``PYMPX_QUEUES_KEYS_BUDGET``).

``growth_kb`` is the peak RSS growth from the 10 % mark to the end, ``run_growth_kb``
from before the run (the done keys of a rerun are loaded before the source starts);
with bounded memory neither grows with ``--size``: compare two sizes.  Exit code 0 when every item ended
done (or skipped as done) and the items held stayed within the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time


async def parse(x):
    return (x, x * 2)


async def store(t):
    await asyncio.sleep(0)
    return t[0]


def _peak_kb() -> int:
    """Peak RSS of this process in KB: VmHWM (``ru_maxrss`` survives an exec on Linux: a
    child started by a big process would report its parent's peak)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv=None) -> int:
    from pympx_queues.pipeline import Pipeline, Stage

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--journal", default=None, help="journal dir (durable run)")
    ap.add_argument("--key", action="store_true",
                    help="items keyed by a key function (the run tracks the keys it saw, "
                         "to skip duplicates)")
    ap.add_argument("--rerun", action="store_true",
                    help="with --journal: a first run in a child process, then measure a "
                         "rerun that skips every key as done")
    ap.add_argument("--budget", type=int, default=None,
                    help="key sets' memory budget in bytes (PYMPX_QUEUES_KEYS_BUDGET)")
    args = ap.parse_args(argv)
    if args.budget is not None:
        os.environ["PYMPX_QUEUES_KEYS_BUDGET"] = str(args.budget)
    if args.rerun:
        if not args.journal:
            ap.error("--rerun needs --journal")
        first = [sys.executable, os.path.abspath(__file__), "--size", str(args.size),
                 "--journal", args.journal] + (["--key"] if args.key else [])
        done = subprocess.run(first, stdout=subprocess.PIPE, check=True)
        first_run = json.loads(done.stdout.decode().strip().splitlines()[-1])
    marks = {}
    held = {"max": 0}
    mark_at = max(args.size // 10, 1)

    def source():
        for i in range(args.size):
            if i == mark_at:
                marks["early_kb"] = _peak_kb()
            yield i

    def on_complete(result):
        live = p._live
        if live > held["max"]:
            held["max"] = live

    p = Pipeline(source(), [
        Stage("parse", parse, kind="async", workers=4),
        Stage("store", store, kind="async", workers=1),
    ], on_complete=on_complete, journal_dir=args.journal, progress=False,
        key=(lambda x: f"item-{x}") if args.key else None)
    base_kb = _peak_kb()
    t0 = time.perf_counter()
    rep = p.run_all()
    seconds = time.perf_counter() - t0
    end_kb = _peak_kb()
    cap = sum(s.queue_size + s.workers for s in p.stages)
    out = {"size": args.size, "done": rep.done, "skipped_done": rep.skipped_done,
           "duplicate_keys": rep.duplicate_keys, "seconds": round(seconds, 2),
           "base_peak_kb": base_kb, "early_peak_kb": marks.get("early_kb"),
           "end_peak_kb": end_kb, "growth_kb": end_kb - marks.get("early_kb", end_kb),
           "run_growth_kb": end_kb - base_kb,
           "max_items_held": held["max"], "bound": cap, "durable": bool(args.journal),
           "keyed": args.key, "rerun": args.rerun}
    if args.rerun:
        out["first_run_seconds"] = first_run["seconds"]
        out["first_run_end_peak_kb"] = first_run["end_peak_kb"]
    print(json.dumps(out))
    ok = rep.done + rep.skipped_done == args.size and held["max"] <= cap
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
