#!/usr/bin/env python3
"""P4, bounded memory: a fast source, a slow last stage, many small items; peak RSS flat.

Runs one pipeline (async parse with 4 workers -> async store with 1 worker, the
bottleneck) over ``--size`` items from a generator and samples the peak RSS
(``ru_maxrss``) after 10 % of the items and at the end, and the most items the
coordinator ever held (admitted, not yet released).  Prints one JSON line::

    python scripts/pipeline_memory.py --size 1000000 [--journal DIR]

``growth_kb`` is the peak RSS growth from the 10 % mark to the end; with bounded memory
it does not grow with ``--size``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time


async def parse(x):
    return (x, x * 2)


async def store(t):
    await asyncio.sleep(0)
    return t[0]


def main(argv=None) -> int:
    from pympx_queues.pipeline import Pipeline, Stage

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--journal", default=None, help="journal dir (durable run)")
    ap.add_argument("--key", action="store_true",
                    help="items keyed by a key function (the run tracks the keys it saw, "
                         "to skip duplicates)")
    args = ap.parse_args(argv)
    marks = {}
    held = {"max": 0}
    mark_at = max(args.size // 10, 1)

    def on_complete(result):
        live = p._live
        if live > held["max"]:
            held["max"] = live
        done = p._report.done
        if done == mark_at:
            marks["early_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    p = Pipeline((i for i in range(args.size)), [
        Stage("parse", parse, kind="async", workers=4),
        Stage("store", store, kind="async", workers=1),
    ], on_complete=on_complete, journal_dir=args.journal, progress=False,
        key=(lambda x: f"item-{x}") if args.key else None)
    t0 = time.perf_counter()
    rep = p.run_all()
    end_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cap = sum(s.queue_size + s.workers for s in p.stages)
    out = {"size": args.size, "done": rep.done, "seconds": round(time.perf_counter() - t0, 2),
           "early_peak_kb": marks.get("early_kb"), "end_peak_kb": end_kb,
           "growth_kb": end_kb - marks.get("early_kb", end_kb),
           "max_items_held": held["max"], "bound": cap, "durable": bool(args.journal),
           "keyed": args.key}
    print(json.dumps(out))
    return 0 if rep.done == args.size and held["max"] <= cap else 1


if __name__ == "__main__":
    sys.exit(main())
