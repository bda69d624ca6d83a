"""kill -9 rounds of a durable ``batch_map``: the issue-12 resume proof, reusable.

:func:`kill_rounds` runs a durable map (threads, ``size`` calls in flight, some calls
failing, a kill switch that does not trip) in a child process, kills the child with
SIGKILL at a random moment, reads the journal, and starts it again over the same input;
after the last round it lets the map finish and compares its result with the expected
one.  Every call appends ``round position`` to a log after its work, so the checks are
made against what really ran:

* ``lost``: positions without their result (or their failure) in the final result;
* ``wrong``: results that differ from an uninterrupted run's;
* ``done_rerun``: a call that ran although the journal had its position finished (or
  failed) before the round started;
* ``rerun_beyond_inflight``: calls that ran twice beyond ``workers`` per kill (the calls
  in flight at a kill run again; nothing else may).

Used by ``tests/test_torture_map.py`` and ``scripts/torture.py --mode map``::

    python -m pympx_queues.pipeline._torture_map --size 2000 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Set

RUN_ID = "torture-map"
#: Negative control of the checks: each round starts a journal of its own (nothing is
#: resumed), which the checks must report as calls re-run.
ENV_FORGET = "PYMPX_MAP_TORTURE_FORGET"
WORKERS = 4


def _value(i: int) -> Any:
    return {"i": i, "sq": i * i, "s": "x" * (i % 5)}


def _fails(i: int) -> bool:
    return i % 37 == 5


def child(journal_dir: str, size: int, durability: str, log: str, rnd: int,
          delay: float, out: Optional[str]) -> int:
    from .batch_map import batch_map
    from .switches import Count

    def fn(i: int) -> Any:
        time.sleep(delay * random.random())
        line = f"{rnd} {i}\n".encode()
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        if _fails(i):
            raise ValueError(f"bad input {i}")
        return _value(i)

    if os.environ.get(ENV_FORGET):  # negative control: each round a fresh journal
        journal_dir = f"{journal_dir}-round{rnd}"
    res = batch_map(fn, range(size), size=WORKERS, journal_dir=journal_dir,
                    durability=durability, run_id=RUN_ID, errors="return",
                    kill_switch=Count(size))  # journaled counters, never trips
    if out:
        enc = [{"failed": r.type} if type(r).__name__ == "CallFailed" else r for r in res]
        with open(out, "w") as f:
            json.dump(enc, f)
    return 0


def _ended(journal_dir: str) -> Set[int]:
    """Positions the journal has finished or failed (nothing to run for them)."""
    from .journal import fold, scan_pipeline

    if not os.path.isdir(journal_dir):
        return set()
    scans, _ = scan_pipeline(journal_dir, RUN_ID, strict=False)
    replay = fold(scans, keep_results=False)
    return {int(k) for k in replay.done} | {int(k) for k in replay.dead}


def _read_log(log: str) -> List[List[int]]:
    try:
        with open(log) as f:
            return [[int(x) for x in line.split()] for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def kill_rounds(workdir: str, *, size: int = 400, rounds: int = 5, seed: int = 0,
                durability: str = "flush", delay: float = 0.004,
                timeout: float = 120.0) -> Dict[str, Any]:
    """Run ``rounds`` killed rounds and one final round; return the findings (see the
    module doc).  ``result["ok"]`` is the verdict."""
    rng = random.Random(seed)
    journal_dir = os.path.join(workdir, "journal")
    log = os.path.join(workdir, "calls.log")
    out = os.path.join(workdir, "result.json")
    before: Dict[int, Set[int]] = {}
    killed = 0
    t0 = time.monotonic()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [root, env.get("PYTHONPATH")] if p])
    for r in range(rounds + 1):
        before[r] = _ended(journal_dir)
        final = r == rounds
        cmd = [sys.executable, "-m", "pympx_queues.pipeline._torture_map", "--child",
               "--journal", journal_dir, "--size", str(size), "--durability", durability,
               "--log", log, "--round", str(r), "--delay", str(delay)]
        if final:
            cmd += ["--out", out]
        proc = subprocess.Popen(cmd, env=env)
        try:
            if final:
                proc.wait(timeout)
            else:
                # Kill at a random point of the remaining calls (counted in log lines),
                # or after a random time when that point is not reached.
                remaining = size - len(before[r])
                share = max(remaining // max(rounds - r, 1), 1)
                target = len(_read_log(log)) + rng.randint(1, 2 * share)
                deadline = time.monotonic() + rng.uniform(3.0, 15.0)
                while proc.poll() is None and time.monotonic() < deadline \
                        and len(_read_log(log)) < target:
                    time.sleep(0.002)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed += 1
                proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"round {r}: the map did not finish in {timeout} s")
        if final and proc.returncode != 0:
            raise RuntimeError(f"final round exited with status {proc.returncode}")
    with open(out) as f:
        got = json.load(f)
    expected = [{"failed": "ValueError"} if _fails(i) else _value(i) for i in range(size)]
    lost = max(0, size - len(got))
    wrong = sum(1 for a, b in zip(got, expected) if a != b)
    runs: Dict[int, int] = {}
    done_rerun = 0
    for rnd, i in _read_log(log):
        runs[i] = runs.get(i, 0) + 1
        if i in before[rnd]:
            done_rerun += 1
    never = size - len(runs)
    extra = sum(c - 1 for c in runs.values())
    result = {
        "rounds": rounds, "killed": killed, "size": size, "durability": durability,
        "lost": lost + never, "wrong": wrong, "done_rerun": done_rerun,
        "reruns": extra, "rerun_bound": killed * WORKERS,
        "rerun_beyond_inflight": max(0, extra - killed * WORKERS),
        "seconds": round(time.monotonic() - t0, 2),
    }
    result["ok"] = (result["lost"] == 0 and wrong == 0 and done_rerun == 0
                    and result["rerun_beyond_inflight"] == 0)
    return result


def summary_line(result: Dict[str, Any]) -> str:
    verdict = "PASS" if result["ok"] else "FAIL"
    return (f"map {verdict}: rounds={result['rounds']} killed={result['killed']} "
            f"calls={result['size']} lost={result['lost']} wrong={result['wrong']} "
            f"done re-run={result['done_rerun']} re-runs={result['reruns']} "
            f"(bound {result['rerun_bound']}) ({result['seconds']} s, "
            f"{result['durability']})")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--journal", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--delay", type=float, default=0.004, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help="work directory (default: a new temp dir)")
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--durability", default="flush", choices=("flush", "fsync"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.journal, args.size, args.durability, args.log, args.round,
                     args.delay, args.out)
    import tempfile

    work = args.dir or tempfile.mkdtemp(prefix="map-torture-")
    res = kill_rounds(work, size=args.size, rounds=args.rounds, seed=args.seed,
                      durability=args.durability)
    print(json.dumps(res) if args.json else summary_line(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
