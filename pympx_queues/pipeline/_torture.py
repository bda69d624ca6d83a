"""kill -9 rounds of a durable pipeline: the P1/P2/P3 proof, reusable.

:func:`kill_rounds` runs a three-stage durable pipeline (thread -> process -> async sink)
in a child process, kills the child with SIGKILL at a random moment, checks that none of
its worker processes outlives it, reads the journal, and starts it again; after the last
round it lets the pipeline finish.  Every handler appends ``round stage key`` to a log
file after its work, so the checks are made against what really ran:

* ``lost``: source keys that are not done at the end (P1);
* ``finished_stage_reruns``: a stage ran again for a key after the journal had recorded
  that stage as finished for it (P2);
* ``done_key_reruns``: any stage ran for a key the journal had as done (P3);
* ``sink_duplicates``: keys stored twice, within ``sink_duplicate_bound`` (the sink's
  workers per kill: at-least-once is bounded by what was in flight);
* ``orphans``: worker processes still running after their coordinator was killed.

Used by ``tests/test_pipeline_crash.py`` and ``scripts/torture.py --mode pipeline``::

    python -m pympx_queues.pipeline._torture --size 2000 --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

ENV_LOG = "PYMPX_PIPELINE_TORTURE_LOG"
ENV_ROUND = "PYMPX_PIPELINE_TORTURE_ROUND"
ENV_DELAY = "PYMPX_PIPELINE_TORTURE_DELAY"
ENV_MARK = "PYMPX_PIPELINE_TORTURE_MARK"
STAGE_NAMES = ("parse", "compute", "store")
SINK_WORKERS = 4


def _log(stage: str, key: str) -> None:
    path = os.path.join(os.environ[ENV_LOG], f"{stage}.log")
    line = f"{os.environ.get(ENV_ROUND, '0')} {stage} {key}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write(2) with O_APPEND: whole lines, even from processes
    finally:
        os.close(fd)


def _delay() -> float:
    return float(os.environ.get(ENV_DELAY, "0.002"))


def t_parse(x: int, ctx: Any) -> Dict[str, int]:
    time.sleep(_delay() * random.random())
    _log("parse", ctx.key)
    return {"n": x, "sq": x * x}


def t_compute(d: Dict[str, int], ctx: Any) -> Tuple[int, int]:
    time.sleep(_delay() * random.random() * 2)
    _log("compute", ctx.key)
    return (d["n"], d["sq"] + 1)


async def t_store(v: Tuple[int, int], ctx: Any) -> int:
    await asyncio.sleep(_delay() * random.random())
    _log("store", ctx.key)
    return v[0]


def build(journal_dir: str, size: int, durability: str = "flush") -> Any:
    from . import Pipeline, Stage

    return Pipeline(range(size), [
        Stage("parse", t_parse, kind="thread", workers=2),
        Stage("compute", t_compute, kind="process", workers=2),
        Stage("store", t_store, kind="async", workers=SINK_WORKERS, sink=True),
    ], journal_dir=journal_dir, durability=durability, name="torture", progress=False)


def child(journal_dir: str, size: int, durability: str) -> int:
    rep = build(journal_dir, size, durability).run_all()
    return 0 if rep.state == "finished" else 1


def _marked_pids(mark: str) -> List[int]:
    """Processes whose environment carries ``mark`` (a round's coordinator and workers)."""
    needle = f"{ENV_MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != b"Z":
            found.append(int(entry))
    return found


def _finished(journal_dir: str) -> Tuple[Dict[str, int], Set[str]]:
    """(key -> number of stages finished, done keys) as the journal has them now."""
    from .journal import fold, scan_pipeline

    scans, _ = scan_pipeline(journal_dir, "torture")
    replay = fold(scans, keep_results=False)
    return ({k: s.stage for k, s in replay.unfinished.items()}, set(replay.done))


def _log_bytes(log_dir: str) -> int:
    total = 0
    for stage in STAGE_NAMES:
        try:
            total += os.stat(os.path.join(log_dir, f"{stage}.log")).st_size
        except FileNotFoundError:
            pass
    return total


def _read_logs(log_dir: str) -> List[Tuple[int, str, str]]:
    lines = []
    for stage in STAGE_NAMES:
        path = os.path.join(log_dir, f"{stage}.log")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                r, s, k = line.split()
                lines.append((int(r), s, k))
    return lines


def kill_rounds(workdir: str, *, size: int = 300, rounds: int = 5, seed: int = 0,
                durability: str = "flush", delay: float = 0.002,
                kill_after: Tuple[float, float] = (0.3, 1.5),
                timeout: float = 120.0) -> Dict[str, Any]:
    """Run ``rounds`` killed rounds and one final round; return the findings (see the
    module doc).  ``result["ok"]`` is the verdict."""
    rng = random.Random(seed)
    journal_dir = os.path.join(workdir, "journal")
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    before: Dict[int, Tuple[Dict[str, int], Set[str]]] = {}
    killed = 0
    orphans = 0
    t0 = time.monotonic()
    for r in range(rounds + 1):
        before[r] = _finished(journal_dir)
        mark = f"{os.getpid()}-{seed}-{r}-{random.random()}"
        env = dict(os.environ, **{ENV_LOG: log_dir, ENV_ROUND: str(r), ENV_DELAY: str(delay),
                                  ENV_MARK: mark})
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in [os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__)))), env.get("PYTHONPATH")] if p])
        proc = subprocess.Popen(
            [sys.executable, "-m", "pympx_queues.pipeline._torture", "--child",
             "--journal", journal_dir, "--size", str(size), "--durability", durability],
            env=env)
        final = r == rounds
        try:
            if final:
                proc.wait(timeout)
            else:
                # Kill at a random point of the remaining work (measured in log bytes),
                # or after a random time when that point is not reached.
                unfinished, done_before = before[r]
                remaining = 3 * size - 3 * len(done_before) - sum(unfinished.values())
                share = max(remaining // max(rounds - r, 1), 1)
                target = _log_bytes(log_dir) + 16 * rng.randint(1, 2 * share)
                deadline = time.monotonic() + rng.uniform(*kill_after) * 10
                while proc.poll() is None and time.monotonic() < deadline \
                        and _log_bytes(log_dir) < target:
                    time.sleep(0.002)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed += 1
                proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"round {r}: the pipeline did not finish in {timeout} s")
        # Nothing outlives its coordinator: workers die with it (PR_SET_PDEATHSIG).
        deadline = time.monotonic() + 10
        left = _marked_pids(mark)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _marked_pids(mark)
        if left:
            orphans += len(left)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if final and proc.returncode != 0:
            raise RuntimeError(f"final round exited with status {proc.returncode}")
    stages_done, done = _finished(journal_dir)
    keys = {str(i) for i in range(size)}
    lost = sorted(keys - done, key=int)
    finished_reruns = 0
    done_reruns = 0
    store_count: Dict[str, int] = {}
    for r, stage, key in _read_logs(log_dir):
        s_idx = STAGE_NAMES.index(stage)
        unfinished, done_before = before[r]
        if key in done_before:
            done_reruns += 1
        elif unfinished.get(key, 0) > s_idx:
            finished_reruns += 1
        if stage == "store":
            store_count[key] = store_count.get(key, 0) + 1
    stored = set(store_count)
    sink_dups = sum(c - 1 for c in store_count.values())
    bound = killed * SINK_WORKERS
    result = {
        "rounds": rounds, "killed": killed, "size": size, "durability": durability,
        "lost": len(lost), "lost_keys": lost[:20],
        "not_stored": len(keys - stored),
        "finished_stage_reruns": finished_reruns, "done_key_reruns": done_reruns,
        "sink_duplicates": sink_dups, "sink_duplicate_bound": bound,
        "orphans": orphans, "seconds": round(time.monotonic() - t0, 2),
    }
    result["ok"] = (not lost and not result["not_stored"] and finished_reruns == 0
                    and done_reruns == 0 and sink_dups <= bound and orphans == 0)
    return result


def summary_line(result: Dict[str, Any]) -> str:
    verdict = "PASS" if result["ok"] else "FAIL"
    return (f"pipeline {verdict}: rounds={result['rounds']} killed={result['killed']} "
            f"items={result['size']} lost={result['lost']} "
            f"finished stages re-run={result['finished_stage_reruns']} "
            f"done keys re-run={result['done_key_reruns']} "
            f"duplicates at the sink={result['sink_duplicates']} "
            f"(bound {result['sink_duplicate_bound']}) orphans={result['orphans']} "
            f"({result['seconds']} s, {result['durability']})")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--journal", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help="work directory (default: a new temp dir)")
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--durability", default="flush", choices=("flush", "fsync"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.journal, args.size, args.durability)
    import tempfile

    work = args.dir or tempfile.mkdtemp(prefix="pipeline-torture-")
    res = kill_rounds(work, size=args.size, rounds=args.rounds, seed=args.seed,
                      durability=args.durability)
    print(json.dumps(res) if args.json else summary_line(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
