#!/usr/bin/env python3
"""Parallel relationship loading into PostgreSQL: naive batches vs waves vs claims.

Workload: a ``nodes`` table and relationship rows ``(start, end)``; a batch is one
transaction that, row by row, inserts the relationship and updates both endpoint nodes
(``degree + 1``): each write locks both endpoints, as a graph database's relationship
write does.  Two concurrent batches that touch a common node wait for each other, and
deadlock when they lock in opposite orders (SQLSTATE 40P01; the batch is rolled back and
retried).

Both run on this machine: ``--tx-latency-ms`` (default 5) adds a ``pg_sleep`` inside each
batch transaction, with its locks held, for the round trips to a server on another host;
``--tx-latency-ms 0`` measures a client and server sharing the same CPUs.

Modes (same rows, same workers, same batch size):

* ``naive``: batches in source order, ``--workers`` at a time (deadlocks retried);
* ``waves``: neo4j etl_lib 0.5.1 itself (its SplittingBatchProcessor and
  ParallelBatchProcessor with its canonical_integer_id_extractor), when installed;
* ``waves-mixed``: etl_lib's wave discipline on our mixed extractor
  (``pympx_queues.compat.etl_lib``): the barrier alone;
* ``claims``: ``run_partitioned`` (ClaimScheduler on the pipeline engine): bucket-batches
  whose node buckets never overlap, each started as soon as its claims are free.

Id distributions: ``uniform`` (ids 1..N), ``strided`` (ids that are all multiples of 10),
``skewed`` (Pareto-distributed endpoint popularity).  Printed per case: rows/s,
deadlocks, retries, mean running batches (achieved parallelism), batches; and ratios.
Then two pure-scheduling comparisons without a database, etl_lib 0.5.1's processors vs
ours on the same rows, each batch costing ``--batch-cost`` + ``--row-cost`` per row:

* on a virtual clock (deterministic): etl_lib's real splitter emits its waves, each
  wave's bucket-batches go to ``--workers`` workers in order as its
  ParallelBatchProcessor does; our real ClaimScheduler is driven as the engine drives it.
  Scheduling only: no coordinator or thread time is counted;
* slept: the real processors and the real engine, each batch sleeping its cost (the
  coordinators' own time counts, and so does the machine's load).

``--repeat N`` runs every mode N times in rotation (naive once) and reports ratios of
the medians with their range within a round: on a shared machine one run is noise.

    python scripts/bench_partitions.py --size 20000             # everything
    python scripts/bench_partitions.py --size 20000 --repeat 3  # the docs' figures
    python scripts/bench_partitions.py --size 2000 --no-sim     # PostgreSQL only, small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pympx_queues.compat import etl_lib as compat  # noqa: E402
from pympx_queues.pipeline.claims import monopartite  # noqa: E402
from pympx_queues.pipeline.partitions import run_partitioned  # noqa: E402

DISTS = ("uniform", "strided", "skewed")


# --------------------------------------------------------------------------- rows
def node_ids(dist: str, nodes: int) -> List[int]:
    return [10 * (i + 1) for i in range(nodes)] if dist == "strided" else \
        list(range(1, nodes + 1))


def make_rows(dist: str, size: int, nodes: int, seed: int = 7) -> List[Dict[str, int]]:
    """``size`` relationship rows over ``nodes`` nodes."""
    rnd = random.Random(seed)
    ids = node_ids(dist, nodes)
    if dist == "skewed":
        perm = ids[:]
        rnd.shuffle(perm)  # popular nodes are not neighbours in id order

        def pick() -> int:  # Pareto popularity: a few hubs, a long tail
            rank = int((rnd.paretovariate(1.2) - 1) * 8)
            return perm[rank % nodes]
    else:
        def pick() -> int:
            return rnd.choice(ids)
    return [{"start": pick(), "end": pick()} for _ in range(size)]


def expected_degrees(rows: List[Dict[str, int]]) -> Counter:
    c: Counter = Counter()
    for r in rows:
        for n in {r["start"], r["end"]}:
            c[n] += 1
    return c


# --------------------------------------------------------------------------- activity
class Activity:
    """Batches running over time (mean running batches = busy time / wall time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = 0.0
        self.batches = 0

    def track(self, fn: Callable[[List[Any]], Any]) -> Callable[[List[Any]], Any]:
        def run(rows: List[Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(rows)
            finally:
                dt = time.perf_counter() - t0
                with self.lock:
                    self.busy += dt
                    self.batches += 1
        return run


# --------------------------------------------------------------------------- database
SQL = ("WITH u AS (UPDATE nodes SET degree = degree + 1 WHERE id IN (%s, %s) RETURNING 1) "
       "INSERT INTO rels (s, e) VALUES (%s, %s)")


class Database:
    """Connections to the throwaway cluster (one per worker) and the batch transaction."""

    def __init__(self, dsn: str, workers: int, tx_latency: float = 0.0) -> None:
        import psycopg

        self.psycopg = psycopg
        self.dsn = dsn
        self.tx_latency = tx_latency
        self.pool: "queue.Queue[Any]" = queue.Queue()
        for _ in range(workers):
            self.pool.put(psycopg.connect(dsn))
        self.lock = threading.Lock()
        self.deadlocks = 0

    def setup(self, ids: List[int]) -> None:
        with self.psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS rels; DROP TABLE IF EXISTS nodes")
            conn.execute("CREATE TABLE nodes (id bigint PRIMARY KEY, degree int NOT NULL "
                         "DEFAULT 0)")
            conn.execute("CREATE TABLE rels (s bigint NOT NULL, e bigint NOT NULL)")
            with conn.cursor().copy("COPY nodes (id) FROM STDIN") as cp:
                for i in ids:
                    cp.write_row((i,))

    def reset(self) -> None:
        with self.psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE rels; UPDATE nodes SET degree = 0 WHERE degree <> 0")
        self.deadlocks = 0

    def check(self, rows: List[Dict[str, int]]) -> None:
        with self.psycopg.connect(self.dsn) as conn:
            n = conn.execute("SELECT count(*) FROM rels").fetchone()[0]
            got = dict(conn.execute("SELECT id, degree FROM nodes WHERE degree > 0").fetchall())
        want = dict(expected_degrees(rows))
        if n != len(rows) or got != want:
            raise AssertionError(f"database state wrong: {n} relationships for "
                                 f"{len(rows)} rows, degrees equal: {got == want}")

    def apply(self, rows: List[Dict[str, int]]) -> Dict[str, int]:
        """One batch in one transaction; a deadlock rolls it back and it runs again."""
        conn = self.pool.get()
        try:
            while True:
                try:
                    with conn.cursor() as cur:
                        cur.executemany(SQL, [(r["start"], r["end"], r["start"], r["end"])
                                              for r in rows])
                        if self.tx_latency:  # a remote server's round trips, locks held
                            cur.execute("SELECT pg_sleep(%s)", (self.tx_latency,))
                    conn.commit()
                    return {"rows": len(rows)}
                except self.psycopg.errors.DeadlockDetected:
                    conn.rollback()
                    with self.lock:
                        self.deadlocks += 1
        finally:
            self.pool.put(conn)

    def close(self) -> None:
        while not self.pool.empty():
            self.pool.get().close()


# --------------------------------------------------------------------------- modes
def run_naive(rows: List[Any], apply: Callable, workers: int, batch: int, table: int) -> int:
    with ThreadPoolExecutor(workers) as pool:
        futs = [pool.submit(apply, rows[i:i + batch]) for i in range(0, len(rows), batch)]
        for f in futs:
            f.result()
    return len(futs)


class _Source:
    def __init__(self, rows: List[Any], results: Any) -> None:
        self.rows = rows
        self.results = results
        self.predecessor = None

    def get_batch(self, max_batch_size: int):
        for i in range(0, len(self.rows), max_batch_size):
            chunk = self.rows[i:i + max_batch_size]
            yield self.results(chunk=chunk, statistics={"read": len(chunk)},
                               batch_size=len(chunk))


def _waves(mod: Any, extractor: Any, rows: List[Any], apply: Callable, workers: int,
           batch: int, table: int) -> int:
    """An etl_lib chain: source -> splitter -> parallel processor; workers call apply."""
    BatchResults, BatchProcessor = mod.BatchResults, mod.BatchProcessor

    class Writer(BatchProcessor):
        def get_batch(self, max_batch_size):
            for b in self.predecessor.get_batch(max_batch_size):
                stats = apply(b.chunk)
                yield BatchResults(chunk=[], statistics=stats, batch_size=len(b.chunk))

    split = mod.SplittingBatchProcessor(None, table, extractor,
                                        predecessor=_Source(rows, BatchResults))
    par = mod.ParallelBatchProcessor(None, lambda: Writer(None), predecessor=split,
                                     max_workers=workers)
    waves = 0
    for _ in par.get_batch(batch):
        waves += 1
    return waves


def etl_lib_modules() -> Optional[Any]:
    try:
        from etl_lib.core import BatchProcessor as bp
        from etl_lib.core import ParallelBatchProcessor as pbp
        from etl_lib.core import SplittingBatchProcessor as sbp
    except ImportError:
        return None

    class Mod:
        BatchResults = bp.BatchResults
        BatchProcessor = bp.BatchProcessor
        SplittingBatchProcessor = sbp.SplittingBatchProcessor
        ParallelBatchProcessor = pbp.ParallelBatchProcessor
        canonical_integer_id_extractor = staticmethod(sbp.canonical_integer_id_extractor)
    return Mod


def run_waves_etl_lib(rows, apply, workers, batch, table):
    mod = etl_lib_modules()
    return _waves(mod, mod.canonical_integer_id_extractor(table), rows, apply, workers,
                  batch, table)


def run_waves_mixed(rows, apply, workers, batch, table):
    return _waves(compat, compat.canonical_integer_id_extractor(table), rows, apply,
                  workers, batch, table)


def run_claims(rows, apply, workers, batch, table):
    rep = run_partitioned(rows, apply, monopartite("start", "end", table),
                          batch_size=batch, workers=workers, stop_signals=False)
    if rep.rows_committed != len(rows):
        raise AssertionError(f"claims committed {rep.rows_committed} of {len(rows)} rows")
    return rep.batches


MODES: Dict[str, Callable] = {"naive": run_naive, "waves": run_waves_etl_lib,
                              "waves-mixed": run_waves_mixed, "claims": run_claims}


def measure(mode: str, rows: List[Any], apply: Callable, workers: int, batch: int,
            table: int) -> Dict[str, Any]:
    act = Activity()
    t0 = time.perf_counter()
    groups = MODES[mode](rows, act.track(apply), workers, batch, table)
    wall = time.perf_counter() - t0
    return {"rows_per_s": len(rows) / wall, "seconds": wall, "batches": act.batches,
            "mean_running": act.busy / wall, "groups": groups}


# --------------------------------------------------------------------------- runs
def bench_pg(args: Any, modes: List[str]) -> List[Dict[str, Any]]:
    from _pg import Cluster, unavailable

    why = unavailable()
    if why:
        print(f"PostgreSQL part skipped: {why}")
        return []
    out = []
    settings = {"deadlock_timeout": f"{args.deadlock_timeout_ms}ms"}
    with Cluster(settings=settings, max_connections=args.workers + 10) as pg:
        for dist in args.dists:
            rows = make_rows(dist, args.size, args.nodes, args.seed)
            db = Database(pg.dsn, args.workers, args.tx_latency_ms / 1000.0)
            try:
                db.setup(node_ids(dist, args.nodes))
                for rnd, mode in rounds(modes, args.repeat):
                    db.reset()
                    res = measure(mode, rows, db.apply, args.workers, args.batch, args.table)
                    db.check(rows)
                    res.update(dist=dist, mode=mode, deadlocks=db.deadlocks,
                               retries=db.deadlocks, round=rnd)
                    out.append(res)
                    print(f"  pg {dist:8} {mode:12} {res['rows_per_s']:9.0f} rows/s "
                          f"{res['deadlocks']:5d} deadlocks  {res['mean_running']:4.2f} "
                          f"running  {res['batches']:5d} batches", flush=True)
            finally:
                db.close()
    return out


class SimLocks:
    """Simulated database: sleeps ``row_cost`` per row, fails on overlapping nodes."""

    def __init__(self, row_cost: float, batch_cost: float) -> None:
        self.row_cost = row_cost
        self.batch_cost = batch_cost
        self.lock = threading.Lock()
        self.held: Counter = Counter()
        self.overlaps = 0

    def apply(self, rows: List[Dict[str, int]]) -> Dict[str, int]:
        nodes = {n for r in rows for n in (r["start"], r["end"])}
        with self.lock:
            if any(self.held[n] for n in nodes):
                self.overlaps += 1
            for n in nodes:
                self.held[n] += 1
        time.sleep(self.batch_cost + self.row_cost * len(rows))
        with self.lock:
            for n in nodes:
                self.held[n] -= 1
        return {"rows": len(rows)}


def bench_sim(args: Any, modes: List[str]) -> List[Dict[str, Any]]:
    out = []
    for dist in args.dists:
        rows = make_rows(dist, args.size, args.nodes, args.seed)
        for rnd, mode in rounds(modes, args.repeat):
            sim = SimLocks(args.row_cost, args.batch_cost)
            res = measure(mode, rows, sim.apply, args.workers, args.batch, args.table)
            res.update(dist=dist, mode=mode, overlapping_batches=sim.overlaps, round=rnd)
            out.append(res)
            print(f"  sim {dist:8} {mode:12} {res['rows_per_s']:9.0f} rows/s "
                  f"{res['mean_running']:4.2f} running {res['batches']:5d} batches "
                  f"{sim.overlaps:4d} overlapping", flush=True)
    return out


# --------------------------------------------------------------------------- virtual time
def _cost(args: Any, n: int) -> float:
    return args.batch_cost + args.row_cost * n


def virtual_waves(mod: Any, extractor: Any, rows: List[Any], args: Any) -> Dict[str, Any]:
    """The waves the splitter really emits (etl_lib's own, or the compat face's), each
    run by ``workers`` threads taking its bucket-batches in order (ParallelBatchProcessor:
    one pool per wave, submission order), the next wave when the last batch of this one
    ended.  Returns the makespan in virtual seconds."""
    import heapq

    split = mod.SplittingBatchProcessor(None, args.table, extractor,
                                        predecessor=_Source(rows, mod.BatchResults))
    total = busy = 0.0
    batches = 0
    for wave in split.get_batch(args.batch):
        free = [0.0] * args.workers
        end = 0.0
        for bucket in wave.chunk:
            if not bucket:
                continue
            t = heapq.heappop(free)
            d = _cost(args, len(bucket))
            heapq.heappush(free, t + d)
            end = max(end, t + d)
            busy += d
            batches += 1
        total += end
    return {"seconds": total, "busy": busy, "batches": batches}


def virtual_naive(rows: List[Any], args: Any) -> Dict[str, Any]:
    """Batches in source order on ``workers`` workers, no claims (a ceiling: the
    deadlocks they would cause are not modelled)."""
    import heapq

    free = [0.0] * args.workers
    busy = end = 0.0
    batches = 0
    for i in range(0, len(rows), args.batch):
        t = heapq.heappop(free)
        d = _cost(args, len(rows[i:i + args.batch]))
        heapq.heappush(free, t + d)
        end, busy, batches = max(end, t + d), busy + d, batches + 1
    return {"seconds": end, "busy": busy, "batches": batches}


def virtual_claims(rows: List[Any], args: Any) -> Dict[str, Any]:
    """Our ClaimScheduler driven as the engine drives it (admit rows while the buffer
    has room, start groups on free workers, a group's claims freed when it ends, the
    source's end flushes), on a virtual clock: no coordinator time is counted."""
    import heapq
    from types import SimpleNamespace

    from pympx_queues.pipeline.partitions import ClaimScheduler

    sched = ClaimScheduler(monopartite("start", "end", args.table), args.batch,
                           max_running=args.workers)
    bound = sched.max_buffered
    items = [SimpleNamespace(key=str(i), data=r, attempt=1) for i, r in enumerate(rows)]
    heap: List[Any] = []
    now = busy = 0.0
    pos = batches = 0
    flushed = False
    seq = 0
    while True:
        while pos < len(items) and sched.buffered() < bound:
            sched.offer(items[pos])
            pos += 1
        if pos == len(items) and not flushed:
            sched.flush()
            flushed = True
        free = args.workers - len(heap)
        groups = sched.take(free)
        if not groups and not heap and sched.buffered() >= bound:
            sched.flush()  # the engine's move when a full buffer cannot start anything
            groups = sched.take(free)
        for g in groups:
            d = _cost(args, len(g))
            heapq.heappush(heap, (now + d, seq, g))
            seq += 1
            busy += d
            batches += 1
        if not heap:
            if pos == len(items) and not sched.buffered():
                break
            raise AssertionError("virtual claims run stuck")
        now, _, g = heapq.heappop(heap)
        sched.finished(g)
    return {"seconds": now, "busy": busy, "batches": batches}


def bench_virtual(args: Any, modes: List[str]) -> List[Dict[str, Any]]:
    out = []
    for dist in args.dists:
        rows = make_rows(dist, args.size, args.nodes, args.seed)
        for mode in modes:
            if mode == "naive":
                res = virtual_naive(rows, args)
            elif mode == "waves":
                mod = etl_lib_modules()
                res = virtual_waves(mod, mod.canonical_integer_id_extractor(args.table),
                                    rows, args)
            elif mode == "waves-mixed":
                res = virtual_waves(compat, compat.canonical_integer_id_extractor(args.table),
                                    rows, args)
            else:
                res = virtual_claims(rows, args)
            span = res["seconds"] or float("nan")  # zero costs: no figure
            res.update(dist=dist, mode=mode, rows_per_s=len(rows) / span,
                       mean_running=res["busy"] / span)
            out.append(res)
            print(f"  virtual {dist:8} {mode:12} {res['rows_per_s']:9.0f} rows/s "
                  f"{res['mean_running']:4.2f} running {res['batches']:5d} batches",
                  flush=True)
    return out


def rounds(modes: List[str], repeat: int) -> List[Any]:
    """(round, mode) in rotation: each round runs every mode once, so background load
    on a shared machine falls on all modes alike; naive (slow, deadlocking) runs in the
    first round only."""
    return [(r, m) for r in range(repeat) for m in modes if r == 0 or m != "naive"]


def ratios(results: List[Dict[str, Any]], kind: str) -> List[str]:
    """claims over each other mode: median rows/s over median rows/s, and the range of
    the ratios within a round (the same minute of machine load)."""
    lines = []
    for dist in DISTS:
        ours = [r for r in results if r["dist"] == dist and r["mode"] == "claims"]
        if not ours:
            continue
        parts = []
        for other in ("naive", "waves", "waves-mixed"):
            theirs = [r for r in results if r["dist"] == dist and r["mode"] == other]
            if not theirs:
                continue
            ratio = median([r["rows_per_s"] for r in ours]) / \
                median([r["rows_per_s"] for r in theirs])
            same = [o["rows_per_s"] / t["rows_per_s"] for o in ours for t in theirs
                    if o.get("round") == t.get("round")]
            spread = f" (rounds {min(same):.2f}-{max(same):.2f})" if len(same) > 1 else ""
            parts.append(f"{ratio:.2f}x {other}{spread}")
        lines.append(f"  {kind} {dist:8} claims = " + ", ".join(parts))
    return lines


def median(values: List[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="relationship rows per case")
    ap.add_argument("--nodes", type=int, default=None, help="nodes (default size / 4)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=100, help="rows per batch")
    ap.add_argument("--table", type=int, default=10, help="buckets per side of the grid")
    ap.add_argument("--dists", default=",".join(DISTS))
    ap.add_argument("--modes", default="naive,waves,waves-mixed,claims")
    ap.add_argument("--deadlock-timeout-ms", type=int, default=100,
                    help="PostgreSQL deadlock_timeout (its default 1000 ms slows naive)")
    ap.add_argument("--tx-latency-ms", type=float, default=5.0,
                    help="pg_sleep inside each batch transaction, locks held: the round "
                         "trips of a server on another host (0: all on this machine)")
    ap.add_argument("--row-cost", type=float, default=50e-6, help="simulated s per row")
    ap.add_argument("--batch-cost", type=float, default=1e-3, help="simulated s per batch")
    ap.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL part")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulated part")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every mode (naive once); ratios of medians")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    # psycopg logs every pipeline a deadlock aborted; the count is what matters here
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)
    args.nodes = args.nodes or max(args.size // 4, 10)
    args.dists = [d for d in args.dists.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    if "waves" in modes and etl_lib_modules() is None:
        print("mode 'waves' skipped: neo4j-etl-lib 0.5.1 is not installed "
              "(pip install -e '.[partitions-bench]')")
        modes.remove("waves")
    print(f"bench_partitions: {args.size} rows over {args.nodes} nodes, {args.workers} "
          f"workers, batches of {args.batch}, table {args.table}, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    result: Dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    # every mode once on a few rows first: lazy imports and first-call costs (tens of
    # ms for the engine's) are not measured against whichever mode happens to run first
    warm = make_rows("uniform", 200, 50, args.seed)
    for mode in modes:
        MODES[mode](warm, lambda rows: {"rows": len(rows)}, args.workers, args.batch,
                    args.table)
    if not args.no_pg:
        print("PostgreSQL (throwaway cluster, fsync=off, deadlock_timeout "
              f"{args.deadlock_timeout_ms} ms, {args.tx_latency_ms} ms latency per "
              "transaction):")
        result["pg"] = bench_pg(args, modes)
    if not args.no_sim:
        print(f"Pure scheduling on a virtual clock (deterministic; {args.row_cost * 1e6:.0f} "
              f"us per row + {args.batch_cost * 1e3:.1f} ms per batch, no coordinator "
              "time):")
        result["virtual"] = bench_virtual(args, modes)
        print(f"Pure scheduling (no database; {args.row_cost * 1e6:.0f} us per row + "
              f"{args.batch_cost * 1e3:.1f} ms per batch, slept):")
        result["sim"] = bench_sim(args, [m for m in modes if m != "waves-mixed"])
    print("Ratios (rows/s of claims over the others; medians over "
          f"{args.repeat} round(s)):")
    for kind in ("pg", "virtual", "sim"):
        for line in ratios(result.get(kind, []), kind):
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
