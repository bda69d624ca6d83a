"""The claim-spreading benchmark runs small, drains every message under both policies."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_claims_runs_tiny_and_every_message_is_taken_once_per_policy():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_claims.py"),
                          "--consumers", "3", "--size", "60"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("mode=claims")]
    assert len(lines) == 2
    assert "policy=window" in lines[0] and "policy=spread" in lines[1]
    assert all("messages=60 " in ln for ln in lines)


def test_a_single_consumer_keeps_strict_order_under_the_spread_policy(tmp_path):
    from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue
    w = WritableFolderQueue(str(tmp_path))
    names = [f"m{i:04d}.tsv" for i in range(50)]
    w.put_many([(n, b"x") for n in reversed(names)])
    r = ReadableFolderQueue(str(tmp_path))
    assert r.claim_policy == "spread"
    got = []
    for _ in names:
        m = r.get_nowait()
        got.append(os.path.basename(str(m)).split("~")[-1][-len(names[0]):])
        r.task_done(m)
    assert got == names
