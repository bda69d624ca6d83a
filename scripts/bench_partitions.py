#!/usr/bin/env python3
"""Parallel relationship loads into PostgreSQL: naive batches, etl_lib-style waves, and
our claims scheduling (issue 13), on uniform, strided and skewed ids.

A throwaway cluster (scripts/_pg.py) holds a ``nodes`` table; each relationship row
``(a, b)`` is loaded by updating both endpoint rows in the batch's transaction, in row
order: two concurrent batches that touch the same node can deadlock (SQLSTATE 40P01),
as relationship writes do in Neo4j.

* naive: the rows cut into batches in source order, ``--workers`` threads; a deadlocked
  batch is rolled back and retried (both counted);
* waves: etl_lib's mix-and-batch (its last-digit extractor, a barrier after each wave),
  through ``pympx_queues.compat.etl_lib``;
* claims: ``run_partitioned`` (64-bit mixed ids, no barrier).

Prints rows/s, deadlocks, retries and mean running batches per case, and the ratios the
issue sets as targets.  ``--size`` is the number of rows per case.

    python scripts/bench_partitions.py --size 20000 --workers 4
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _pg  # noqa: E402

from pympx_queues.compat import etl_lib as compat  # noqa: E402
from pympx_queues.pipeline.partitions import run_partitioned  # noqa: E402

END_OFFSET = 10_000_000  # end nodes live in their own id range (bipartite)


def make_rows(dist: str, n: int, nodes: int, seed: int) -> List[Tuple[int, int]]:
    rnd = random.Random(seed)
    rows = set()
    while len(rows) < n:
        if dist == "uniform":
            a, b = rnd.randrange(nodes), rnd.randrange(nodes)
        elif dist == "strided":
            a, b = 10 * rnd.randrange(nodes // 10), 10 * rnd.randrange(nodes // 10)
        elif dist == "skewed":
            a = min(int(rnd.paretovariate(1.1)) - 1, nodes - 1)
            b = rnd.randrange(nodes)
        else:
            raise ValueError(dist)
        rows.add((a, b))
    out = list(rows)
    rnd.shuffle(out)
    return out


class Meter:
    """Running batches integrated over time, deadlocks and retries."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.area = 0.0
        self.t0 = self.last = time.monotonic()
        self.deadlocks = 0
        self.retries = 0

    def change(self, d: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.area += self.running * (now - self.last)
            self.last = now
            self.running += d

    def mean(self) -> float:
        span = self.last - self.t0
        return self.area / span if span > 0 else 0.0


class Loader:
    """One connection per thread; loads a batch in one transaction, retrying deadlocks."""

    def __init__(self, dsn: str, meter: Meter, row_cost: float) -> None:
        self.dsn = dsn
        self.meter = meter
        self.local = threading.local()
        self.row_cost = row_cost

    def conn(self) -> Any:
        import psycopg
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = psycopg.connect(self.dsn)
        return c

    def load(self, batch: List[Tuple[int, int]]) -> Dict[str, int]:
        import psycopg
        conn = self.conn()
        self.meter.change(+1)
        try:
            while True:
                try:
                    with conn.transaction():
                        with conn.cursor() as cur:
                            for a, b in batch:
                                cur.execute("UPDATE nodes SET touched = touched + 1 "
                                            "WHERE id = %s", (a,))
                                cur.execute("UPDATE nodes SET touched = touched + 1 "
                                            "WHERE id = %s", (b + END_OFFSET,))
                                if self.row_cost:
                                    time.sleep(self.row_cost)
                    return {"rows": len(batch)}
                except psycopg.errors.DeadlockDetected:
                    with self.meter.lock:
                        self.meter.deadlocks += 1
                        self.meter.retries += 1
        finally:
            self.meter.change(-1)


def reset(dsn: str, nodes: int) -> None:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS nodes")
        c.execute("CREATE TABLE nodes (id bigint PRIMARY KEY, touched int NOT NULL)")
        c.execute("INSERT INTO nodes SELECT g, 0 FROM generate_series(0, %s) g", (nodes,))
        c.execute("INSERT INTO nodes SELECT g + %s, 0 FROM generate_series(0, %s) g",
                  (END_OFFSET, nodes))
        c.execute("ANALYZE nodes")


def check(dsn: str, rows: List[Tuple[int, int]]) -> bool:
    import psycopg
    with psycopg.connect(dsn) as c:
        total = c.execute("SELECT sum(touched) FROM nodes").fetchone()[0]
    return total == 2 * len(rows)


def run_naive(rows, loader: Loader, workers: int, batch_size: int, max_seconds: float
              ) -> int:
    """Rows loaded; stops taking new batches after ``max_seconds`` (deadlock storms)."""
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    deadline = time.monotonic() + max_seconds
    done = [0]

    def one(batch):
        if time.monotonic() > deadline:
            return
        loader.load(batch)
        with loader.meter.lock:
            done[0] += len(batch)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, batches))
    return done[0]


def last_digit_extractor(table_size: int = 10) -> Callable[[Any], Tuple[int, int]]:
    """etl_lib 0.5's tuple_id_extractor: the last decimal digit of each id."""
    def extractor(item: Any) -> Tuple[int, int]:
        a, b = item
        return int(str(a)[-1]) % table_size, int(str(b)[-1]) % table_size
    extractor.table_size = table_size  # type: ignore[attr-defined]
    return extractor


def run_waves(rows, loader: Loader, workers: int, batch_size: int, table_size: int) -> None:
    class Source(compat.BatchProcessor):
        def get_batch(self, max_batch_size):
            for i in range(0, len(rows), 1000):
                yield compat.BatchResults(rows[i:i + 1000], {}, 1000)

    class Worker(compat.BatchProcessor):
        def get_batch(self, max_batch_size):
            for b in self.predecessor.get_batch(max_batch_size):
                yield compat.BatchResults(b.chunk, loader.load(b.chunk), len(b.chunk))

    split = compat.SplittingBatchProcessor(None, table_size, last_digit_extractor(table_size),
                                           predecessor=Source(None))
    par = compat.ParallelBatchProcessor(None, lambda: Worker(None), predecessor=split,
                                        max_workers=workers)
    for _ in par.get_batch(batch_size):
        pass


def run_claims(rows, loader: Loader, workers: int, batch_size: int, table_size: int
               ) -> float:
    rep = run_partitioned(rows, loader.load, table_size=table_size, batch_size=batch_size,
                          workers=workers, kind="thread")
    return rep.mean_parallelism


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="rows per case")
    ap.add_argument("--nodes", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--table-size", type=int, default=10)
    ap.add_argument("--row-cost", type=float, default=0.0,
                    help="extra seconds per row inside the transaction (simulated work)")
    ap.add_argument("--dists", default="uniform,strided,skewed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--strategies", default="naive,waves,claims")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="naive parallel stops taking batches after this (it can deadlock "
                    "for minutes); its rows/s counts the rows it loaded")
    args = ap.parse_args(argv)
    reason = _pg.why_unavailable()
    if reason:
        print(f"SKIP: {reason}")
        return 0
    failures = 0
    print(f"rows={args.size} nodes={args.nodes} workers={args.workers} "
          f"batch_size={args.batch_size} table_size={args.table_size} "
          f"(deadlock_timeout 100 ms, fsync off)")
    print(f"{'ids':8} {'strategy':8} {'rows/s':>9} {'deadlocks':>9} {'retries':>8} "
          f"{'parallel':>8} ok")
    with _pg.throwaway_cluster() as dsn:
        for dist in args.dists.split(","):
            rows = make_rows(dist, args.size, args.nodes, args.seed)
            speed: Dict[str, float] = {}
            deadlocks: Dict[str, int] = {}
            for strategy in args.strategies.split(","):
                reset(dsn, args.nodes)
                meter = Meter()
                loader = Loader(dsn, meter, args.row_cost)
                t0 = time.perf_counter()
                par = None
                loaded = len(rows)
                if strategy == "naive":
                    loaded = run_naive(rows, loader, args.workers, args.batch_size,
                                       args.max_seconds)
                elif strategy == "waves":
                    run_waves(rows, loader, args.workers, args.batch_size, args.table_size)
                else:
                    par = run_claims(rows, loader, args.workers, args.batch_size,
                                     args.table_size)
                secs = time.perf_counter() - t0
                ok = check(dsn, rows) if loaded == len(rows) else None
                failures += ok is False
                speed[strategy] = loaded / secs
                deadlocks[strategy] = meter.deadlocks
                print(f"{dist:8} {strategy:8} {speed[strategy]:9.0f} {meter.deadlocks:9d} "
                      f"{meter.retries:8d} {par if par is not None else meter.mean():8.2f} "
                      f"{'yes' if ok else 'NO' if ok is False else f'cut at {args.max_seconds:g} s'}",
                      flush=True)
            if "claims" in speed:
                ratios = "  ".join(f"claims/{k} {speed['claims'] / v:.2f}x"
                                   for k, v in speed.items() if k != "claims" and v)
                print(f"{dist:8} {ratios}  claims deadlocks {deadlocks['claims']}",
                      flush=True)
                failures += deadlocks["claims"] != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
