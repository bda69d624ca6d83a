"""Failed claims per message with many consumers on one folder (local disk).

Fills a folder queue with ``--size`` messages, then ``--consumers`` real processes drain
it with ``get_nowait``/``task_done``; each reports the claim races it lost.  Runs the old
policy (``window``) and the new one (``spread``) in the same run and prints one line each:

    python scripts/bench_claims.py --consumers 16 --size 4000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue  # noqa: E402


def _consume(path: str, policy: str, start, out) -> None:
    q = ReadableFolderQueue(path, recover_on_start=False)
    q.claim_policy = policy
    start.wait(60)
    got = 0
    while True:
        try:
            m = q.get_nowait()
        except queue.Empty:
            break
        q.task_done(m)
        got += 1
    out.put((got, q._lost_races))


def run(policy: str, consumers: int, size: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q")
        os.makedirs(path)
        w = WritableFolderQueue(path)
        w.put_many([(f"m{i:08d}.tsv", b"x") for i in range(size)])
        ctx = mp.get_context("fork")
        start = ctx.Event()
        out = ctx.Queue()
        procs = [ctx.Process(target=_consume, args=(path, policy, start, out))
                 for _ in range(consumers)]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        start.set()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        secs = time.monotonic() - t0
    got = sum(r[0] for r in results)
    lost = sum(r[1] for r in results)
    return {"policy": policy, "consumers": consumers, "messages": got,
            "failed_claims": lost, "failed_per_message": lost / max(got, 1), "secs": secs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", type=int, default=16)
    ap.add_argument("--size", type=int, default=4000)
    a = ap.parse_args(argv)
    bad = 0
    for policy in ("window", "spread"):
        r = run(policy, a.consumers, a.size)
        print("mode=claims policy={policy} consumers={consumers} messages={messages} "
              "failed_claims={failed_claims} failed_per_message={failed_per_message:.3f} "
              "secs={secs:.2f}".format(**r), flush=True)
        if r["messages"] != a.size:
            bad = 1
    return bad


if __name__ == "__main__":
    sys.exit(main())
