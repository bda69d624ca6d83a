#!/usr/bin/env python3
"""Throughput of put -> get -> task_done: PersistentQueue vs multiprocessing.JoinableQueue.

One producer process and two consumer processes (spawn) move ``--n`` messages through:

* ``plain``        multiprocessing.JoinableQueue (no journal): the reference.
* ``flush``        PersistentQueue(durability="flush"): one put / get / task_done per
                   message, every put and ack journaled (survives a process crash).
* ``flush-batched`` the same batching in flush mode (for information).
* ``fsync``        PersistentQueue(durability="fsync") with batching: the producer calls
                   put_many(batch, together=True) (one journal write, one fsync, one queue
                   item per batch), consumers get_many(batch) + task_done_many(batch) (one
                   write and one fsync per batch of acks).
* ``fsync-single`` PersistentQueue(durability="fsync") without batching: one fsync per put
                   and per ack (on a smaller count, it is slow).
* ``naive-fsync``  the baseline of the fsync target: one process appending one journal-size
                   record per message with write() + fsync() each time (no queue at all).
* ``put-floor``    the cost of one put in one process (no consumer), microseconds per call,
                   best block of 500: ``JoinableQueue.put``; the same put plus one write(2)
                   of a preformatted journal record; plus one store of it into a mapped
                   file instead; and ``PersistentQueue.put`` (flush).  The first two bound
                   what any put that hands its record to the OS before returning can reach
                   against the plain put (G1), before any encoding or checksum.

Timing starts when all processes are ready and stops when the last consumer saw DONE.
Run on the disk you care about (``--dir``; default: a temp dir under the current
directory, because /tmp is often tmpfs where fsync costs nothing).

    python scripts/bench_persistent.py --n 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pympx_queues.persistent import PersistentQueue  # noqa: E402
from pympx_queues.sentinels import DONE, is_sentinel  # noqa: E402

CTX = mp.get_context("spawn")
CONSUMERS = 2


def message(i: int):
    return (i, f"row-{i:08d}", "2026-11-22")


# ------------------------------------------------------------------ plain queue
def plain_producer(q, n, start, ends):
    start.wait()
    c0 = time.process_time()
    for i in range(n):
        q.put(message(i))
    for _ in range(CONSUMERS):
        q.put(None)
    q.close()
    q.join_thread()  # the feeder thread's pickling and sending is part of the cost
    ends.put(("producer", time.process_time() - c0))


def plain_consumer(q, start, ends):
    start.wait()
    c0 = time.process_time()
    count = 0
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            break
        count += 1
        q.task_done()
    ends.put((time.monotonic(), count, time.process_time() - c0))


# ------------------------------------------------------------------ PersistentQueue
def pq_producer(q, n, start, batch, ends):
    start.wait()
    c0 = time.process_time()
    if batch > 1:
        for lo in range(0, n, batch):
            q.put_many([message(i) for i in range(lo, min(n, lo + batch))], together=True)
    else:
        for i in range(n):
            q.put(message(i))
    q.close()
    q.joinable_queue.close()
    q.joinable_queue.join_thread()
    q.dispose()
    ends.put(("producer", time.process_time() - c0))


def pq_consumer(q, start, ends, batch):
    start.wait()
    c0 = time.process_time()
    count = 0
    if batch > 1:
        while True:
            items = q.get_many(batch)
            q.task_done_many(items)
            count += sum(1 for x in items if not is_sentinel(x))
            if is_sentinel(items[-1]):
                break
    else:
        while True:
            item = q.get()
            if item is DONE:
                break
            count += 1
            q.task_done(item)
    q.dispose()
    ends.put((time.monotonic(), count, time.process_time() - c0))


def run_pipeline(kind, n, workdir, batch=1):
    start = CTX.Event()
    ends = CTX.Queue()
    if kind == "plain":
        q = CTX.JoinableQueue()
        prod = CTX.Process(target=plain_producer, args=(q, n, start, ends))
        cons = [CTX.Process(target=plain_consumer, args=(q, start, ends))
                for _ in range(CONSUMERS)]
    else:
        durability = "fsync" if kind.startswith("fsync") else "flush"
        pickup = tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=workdir)
        q = PersistentQueue("bench", pickup, number_of_workers=CONSUMERS,
                            durability=durability, context=CTX)
        prod = CTX.Process(target=pq_producer, args=(q, n, start, batch, ends))
        cons = [CTX.Process(target=pq_consumer, args=(q, start, ends, batch))
                for _ in range(CONSUMERS)]
    procs = [prod, *cons]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let the spawned interpreters finish importing before the clock starts
    t0 = time.monotonic()
    start.set()
    reports = [ends.get(timeout=600) for _ in procs]
    results = [r for r in reports if r[0] != "producer"]
    prod_cpu = sum(r[1] for r in reports if r[0] == "producer")
    cons_cpu = sum(r[2] for r in results)
    cpu = prod_cpu + cons_cpu
    t1 = max(r[0] for r in results)
    got = sum(r[1] for r in results)
    for p in procs:
        p.join(60)
    if got != n:
        raise SystemExit(f"{kind}: consumers got {got} of {n} messages")
    if kind != "plain":
        left = PersistentQueue("bench", pickup).get_list_of_outstanding_work()
        if left:
            raise SystemExit(f"{kind}: {len(left)} messages left outstanding")
        shutil.rmtree(pickup, ignore_errors=True)
    return n / (t1 - t0), cpu / n * 1e6, prod_cpu / n * 1e6, cons_cpu / n * 1e6


def naive_fsync(n, workdir):
    """Records/s of write()+fsync() per journal-size record, one process."""
    path = os.path.join(workdir, "naive.journal")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
    try:
        t0 = time.monotonic()
        for i in range(n):
            body = f'{i} P {{"i":"abcdef012345.{i:x}","m":{json.dumps(message(i))}}}'.encode()
            os.write(fd, b"%08x %s\n" % (zlib.crc32(body), body))
            os.fsync(fd)
        t1 = time.monotonic()
    finally:
        os.close(fd)
        os.unlink(path)
    return n / (t1 - t0), None, None, None


def put_floor(n, workdir, block=500):
    """Microseconds per put (best block of ``block`` calls) for the put-floor rows."""
    import mmap

    payloads = [message(i) for i in range(n)]
    records = []
    for i, m in enumerate(payloads):
        body = f'{i} P {{"i":"abcdef012345.{i:x}","m":{json.dumps(m)}}}'.encode()
        records.append(b"%08x %s\n" % (zlib.crc32(body), body))
    size = sum(map(len, records))
    out = {}
    for case in ("mp put", "mp put + write(2)", "mp put + mapped store",
                 "PersistentQueue.put"):
        q = CTX.JoinableQueue()
        path = os.path.join(workdir, "floor.journal")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        m = None
        pq = None
        if case == "mp put + mapped store":
            os.posix_fallocate(fd, 0, size + 4096)
            m = mmap.mmap(fd, size + 4096)
        if case == "PersistentQueue.put":
            pq = PersistentQueue("floor", tempfile.mkdtemp(prefix="floor-", dir=workdir),
                                 durability="flush", context=CTX)
            pq.put(payloads[0])  # opens the journal
        put, write, clock = q.put, os.write, time.perf_counter
        best = float("inf")
        pos = 0
        for lo in range(0, n - block + 1, block):
            chunk = payloads[lo:lo + block]
            recs = records[lo:lo + block]
            t0 = clock()
            if case == "mp put":
                for x in chunk:
                    put(x)
            elif case == "mp put + write(2)":
                for x, r in zip(chunk, recs):
                    write(fd, r)
                    put(x)
            elif m is not None:
                for x, r in zip(chunk, recs):
                    end = pos + len(r)
                    m[pos:end] = r
                    pos = end
                    put(x)
            else:
                pput = pq.put  # type: ignore[union-attr]
                for x in chunk:
                    pput(x)
            best = min(best, (clock() - t0) / block)
        out[case] = best * 1e6
        if m is not None:
            m.close()
        os.close(fd)
        os.unlink(path)
        if pq is not None:
            pq.joinable_queue.cancel_join_thread()  # nobody reads: do not wait at exit
            pq.dispose()
            shutil.rmtree(pq.current_pickup_dir, ignore_errors=True)
        q.cancel_join_thread()
    return out


def fs_type(path):
    best, kind = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="messages per pipeline run")
    ap.add_argument("--batch", type=int, default=100, help="batch size of the fsync run")
    ap.add_argument("--single-n", type=int, default=None,
                    help="messages for fsync-single and naive-fsync (default: min(n, 2000))")
    ap.add_argument("--dir", default=None, help="work directory (default: temp dir in cwd)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the best is kept")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--cases", default=None,
                    help="comma-separated subset of: plain,flush,flush-batched,fsync,"
                         "fsync-single,naive-fsync,put-floor")
    args = ap.parse_args(argv)
    n = args.n
    single = args.single_n or min(n, 2000)
    own = args.dir is None
    workdir = tempfile.mkdtemp(prefix="bench-persistent-", dir=".") if own else args.dir
    os.makedirs(workdir, exist_ok=True)
    fstype = fs_type(workdir)
    cases = {
        "plain": lambda: run_pipeline("plain", n, workdir),
        "flush": lambda: run_pipeline("flush", n, workdir),
        "flush-batched": lambda: run_pipeline("flush-batched", n, workdir, batch=args.batch),
        "fsync": lambda: run_pipeline("fsync", n, workdir, batch=args.batch),
        "fsync-single": lambda: run_pipeline("fsync-single", single, workdir),
        "naive-fsync": lambda: naive_fsync(single, workdir),
        "put-floor": lambda: put_floor(n, workdir),
    }
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - set(cases)
        if unknown:
            ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
        cases = {k: v for k, v in cases.items() if k in wanted}
    measured = {k: [] for k in cases}
    try:
        for _ in range(args.repeat):  # interleaved, so that noise hits every case alike
            for key, fn in cases.items():
                measured[key].append(fn())
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    floor = None
    if "put-floor" in measured:  # per-call costs: the best of the rounds, row by row
        rounds = measured.pop("put-floor")
        floor = {k: min(r[k] for r in rounds) for k in rounds[0]}
    best = {k: max(v, key=lambda r: r[0]) for k, v in measured.items()}
    rates = {k: v[0] for k, v in best.items()}
    cpu_us = {k: v[1] for k, v in best.items() if v[1] is not None}
    pairs = {
        "flush / plain": ("flush", "plain"),
        "flush-batched / plain": ("flush-batched", "plain"),
        "fsync (batched) / naive-fsync": ("fsync", "naive-fsync"),
        "fsync-single / naive-fsync": ("fsync-single", "naive-fsync"),
    }
    ratios = {k: rates[a] / rates[b] for k, (a, b) in pairs.items()
              if a in rates and b in rates}
    targets = {"flush / plain": 0.6, "fsync (batched) / naive-fsync": 10.0}
    info = {"n": n, "single_n": single, "batch": args.batch, "consumers": CONSUMERS,
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "filesystem": fstype, "rates": rates, "cpu_us_per_msg": cpu_us,
            "producer_cpu_us_per_msg": {k: v[2] for k, v in best.items() if v[2] is not None},
            "consumers_cpu_us_per_msg": {k: v[3] for k, v in best.items()
                                         if v[3] is not None},
            "ratios": ratios,
            "put_floor_us": floor,
            "targets": targets,
            "met": {k: ratios[k] >= v for k, v in targets.items() if k in ratios}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"put -> get -> task_done, 1 producer + {CONSUMERS} consumer processes (spawn), "
          f"python {info['python']}, {info['cpus']} cpus, {info['filesystem']}")
    print(f"  n={n}; fsync batched: put_many(together=True)/get_many/task_done_many of "
          f"{args.batch}; "
          f"fsync-single and naive-fsync: n={single}")
    labels = {
        "plain": "multiprocessing.JoinableQueue",
        "flush": "PersistentQueue flush (no batching)",
        "flush-batched": f"PersistentQueue flush (batches of {args.batch}, together)",
        "fsync": f"PersistentQueue fsync (batches of {args.batch}, together)",
        "fsync-single": "PersistentQueue fsync (one fsync per put and per ack)",
        "naive-fsync": "baseline: one write+fsync per record, 1 process",
    }
    for key, label in labels.items():
        if key not in rates:
            continue
        cpu = (f"   {cpu_us[key]:6.1f} us CPU/msg (producer {best[key][2]:.1f}, "
               f"consumers {best[key][3]:.1f})" if key in cpu_us else "")
        print(f"  {label:<56} {rates[key]:>10,.0f} msg/s{cpu}")
    if floor:
        print("  put in one process, no consumer (us per call, best block of 500; ratio = "
              "plain put / this):")
        plain = floor["mp put"]
        for key, us in floor.items():
            print(f"    {key:<54} {us:6.2f} us   {plain / us:5.2f}x")
    for key, value in ratios.items():
        target = targets.get(key)
        verdict = "" if target is None else (
            f"  (target >= {target:g}x: {'met' if value >= target else 'NOT met'})")
        print(f"  {key:<31} {value:6.2f}x{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
