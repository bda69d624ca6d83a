"""Folder queues with real processes: exactly-once draining, SIGKILL, races, ENOSPC."""

from __future__ import annotations

import collections
import errno
import multiprocessing as mp
import os
import queue
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import wait_for

from pympx_queues import DONE
from pympx_queues.folder import layout as L
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

SPAWN = mp.get_context("spawn")


def read_log(path):
    """Lines ``claimed <name>`` / ``acked <name>`` written by a consumer process."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split() for line in f if line.endswith("\n")]


def consumer(r: ReadableFolderQueue, log_path: str, delay: float = 0.0) -> None:
    """Claim, log, (work), acknowledge, log; until DONE."""
    with open(log_path, "a", buffering=1) as log:
        for p in r:
            name = os.path.basename(r.original_filename_from_wip(p))
            log.write(f"claimed {name}\n")
            if delay:
                time.sleep(random.uniform(0, delay))
            r.task_done(p)
            log.write(f"acked {name}\n")
    r.close()


def producer(path: str, names, run_id, pause: float) -> None:
    w = WritableFolderQueue(path, run_id=run_id)
    for n in names:
        w.put_data(n, n.encode())
        if pause:
            time.sleep(pause)
    w.close()


def leftovers(path):
    ready = [n for n in os.listdir(path) if n.endswith(".tsv")]
    return ready, os.listdir(os.path.join(path, "wip")), os.listdir(os.path.join(path, "failed"))


@pytest.mark.timeout(120)
def test_four_consumer_processes_process_every_file_exactly_once(tmp_path):
    q = str(tmp_path / "q")
    names = [f"m{i:05d}.tsv" for i in range(3000)]
    r = ReadableFolderQueue(q, poll_interval=0.05, create=True)
    with pytest.raises(queue.Empty):
        r.get(timeout=0.05)  # the parent's observer runs; it must not travel to children
    logs = [str(tmp_path / f"c{k}.log") for k in range(4)]
    procs = [SPAWN.Process(target=consumer, args=(r, logs[k])) for k in range(4)]
    for p in procs:
        p.start()
    # the producer runs while the consumers drain
    prod = SPAWN.Process(target=producer, args=(q, names, None, 0.0))
    prod.start()
    prod.join(60)
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    acked = collections.Counter(n for log in logs for kind, n in read_log(log) if kind == "acked")
    claimed = collections.Counter(n for log in logs for kind, n in read_log(log)
                                  if kind == "claimed")
    assert set(acked) == set(names)
    assert max(acked.values()) == 1 and max(claimed.values()) == 1
    assert sum(1 for log in logs if read_log(log)) >= 2  # the work really was shared
    assert leftovers(q) == ([], [], [])
    r.close()


@pytest.mark.timeout(150)
def test_consumers_killed_at_random_lose_nothing_duplicates_only_in_flight(tmp_path):
    q = str(tmp_path / "q")
    names = [f"k{i:05d}.tsv" for i in range(1500)]
    w = WritableFolderQueue(q, run_id="killrun")
    w.put_many([(n, n.encode()) for n in names])
    w.close()
    r = ReadableFolderQueue(q, poll_interval=0.05, recover_interval=0.2, max_retries=None)
    rng = random.Random(1234)
    procs = {}
    killed = []
    serial = 0

    def start():
        nonlocal serial
        log = str(tmp_path / f"c{serial}.log")
        serial += 1
        p = SPAWN.Process(target=consumer, args=(r, log, 0.005))
        p.start()
        procs[p] = log

    for _ in range(4):
        start()
    deadline = time.monotonic() + 100
    kills = 0
    while kills < 8 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 0.4))
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            break
        working = [p for p in alive if read_log(procs[p])]  # killed mid-work, not at start-up
        if not working:
            continue
        alive = working
        victim = rng.choice(alive)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        killed.append(victim)
        kills += 1
        start()  # a replacement keeps the pool at four
    for p in list(procs):
        p.join(max(1, deadline - time.monotonic()))
        assert not p.is_alive(), "consumer did not finish"
    assert kills >= 3, "the queue drained before enough kills; make the work slower"

    entries = {p: read_log(log) for p, log in procs.items()}
    claimed = collections.Counter(n for e in entries.values() for kind, n in e if kind == "claimed")
    # nothing lost: every message was processed and nothing is left waiting or claimed
    assert set(claimed) == set(names)
    assert leftovers(q) == ([], [], [])
    # duplicates only of what a killed consumer had in flight (claimed, not acked)
    in_flight = set()
    for p in killed:
        c = [n for kind, n in entries[p] if kind == "claimed"]
        a = {n for kind, n in entries[p] if kind == "acked"}
        in_flight.update(n for n in c if n not in a)
    dups = {n for n, k in claimed.items() if k > 1}
    assert dups <= in_flight, dups - in_flight
    assert in_flight, "no kill landed mid-task: the test proved nothing"
    # (a kill between task_done and the "acked" line leaves a name in flight that is
    # rightly never redelivered, so dups may be smaller than in_flight)
    for p in procs:
        if p not in killed:
            assert p.exitcode == 0
    r.close()


def late_producer(path, names, start_evt):
    start_evt.wait(30)
    producer(path, names, "racerun", 0.0)


@pytest.mark.timeout(90)
def test_two_producers_and_the_done_race(tmp_path):
    """The first producer closes before the second even registered: with
    expected_producers=2 the consumers wait for both and lose nothing."""
    q = str(tmp_path / "q")
    r = ReadableFolderQueue(q, poll_interval=0.05, expected_producers=2, create=True)
    logs = [str(tmp_path / f"c{k}.log") for k in range(2)]
    procs = [SPAWN.Process(target=consumer, args=(r, logs[k])) for k in range(2)]
    for p in procs:
        p.start()
    first = [f"a{i:04d}.tsv" for i in range(300)]
    second = [f"b{i:04d}.tsv" for i in range(300)]
    producer(q, first, "racerun", 0.0)  # registers, puts, closes

    def first_drained():
        acked = {n for log in logs for kind, n in read_log(log) if kind == "acked"}
        return set(first) <= acked

    wait_for(first_drained, timeout=60, message="the first producer's messages")
    assert all(p.is_alive() for p in procs), "a consumer saw DONE before producer 2 started"
    ev = SPAWN.Event()
    p2 = SPAWN.Process(target=late_producer, args=(q, second, ev))
    p2.start()
    ev.set()
    p2.join(60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    acked = collections.Counter(n for log in logs for kind, n in read_log(log) if kind == "acked")
    assert set(acked) == set(first + second) and max(acked.values()) == 1
    r.close()


def _get_one(r, out):
    p = r.get(timeout=20)
    out.put(os.path.basename(r.original_filename_from_wip(p)))
    r.task_done(p)
    out.put(r.get(timeout=20) is DONE)
    r.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_queues_pickle_into_child_processes_and_work_there(tmp_path, method):
    ctx = mp.get_context(method)
    q = str(tmp_path / "q")
    w = WritableFolderQueue(q)
    r = ReadableFolderQueue(q, poll_interval=0.05)
    with pytest.raises(queue.Empty):
        r.get(timeout=0.05)  # parent observer started before the child exists
    out = ctx.Queue()
    child = ctx.Process(target=_get_one, args=(r, out))
    child.start()
    w.put_data("for-child.tsv", b"x")
    w.close()
    assert out.get(timeout=30) == "for-child.tsv"
    assert out.get(timeout=30) is True
    child.join(30)
    assert child.exitcode == 0
    r.close()


def _producer_child(w, out):
    w.put_data("from-child.tsv", b"x")
    w.close()
    out.put(w.producer_id)


@pytest.mark.timeout(60)
def test_writer_pickles_into_a_spawned_child(tmp_path):
    q = str(tmp_path / "q")
    w = WritableFolderQueue(q)
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_producer_child, args=(w, out))
    child.start()
    assert out.get(timeout=30) == w.producer_id
    child.join(30)
    r = ReadableFolderQueue(q, poll_interval=0.05)
    p = r.get(timeout=10)
    assert p.endswith("from-child.tsv")
    r.task_done(p)
    assert r.get(timeout=10) is DONE  # the child's close() closed the registered producer
    r.close()


# --------------------------------------------------------------------------- ENOSPC
@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(60)
def test_enospc_during_put_leaves_no_half_message_and_queue_recovers(tiny_tmpfs):
    q = str(tiny_tmpfs / "q")
    w = WritableFolderQueue(q)
    r = ReadableFolderQueue(q, poll_interval=0.05, wakeups="poll")
    with pytest.raises(OSError) as info:
        w.put_data("huge.tsv", b"x" * (1 << 20))
    assert info.value.errno == errno.ENOSPC
    assert leftovers(q) == ([], [], []) and os.listdir(os.path.join(q, "tmp")) == []
    # fill the disk with small messages until it is full
    n = 0
    with pytest.raises(OSError) as info:
        while True:
            w.put_data(f"s{n:05d}.tsv", b"y" * 8192)
            n += 1
    assert info.value.errno == errno.ENOSPC and n > 0
    ready = sorted(x for x in os.listdir(q) if x.endswith(".tsv"))
    assert len(ready) == n and all(os.path.getsize(os.path.join(q, x)) == 8192 for x in ready)
    assert os.listdir(os.path.join(q, "tmp")) == []
    # free space by consuming; puts work again
    for _ in range(5):
        r.task_done(r.get(timeout=5))
    # acknowledged claims are unlinked by the consumer's deleter thread, just after
    wait_for(lambda: os.listdir(os.path.join(q, "trash")) == [], timeout=10,
             message="trash emptied")
    w.put_data("after.tsv", b"z" * 8192)
    w.close()
    got = 0
    for p in r:
        r.task_done(p)
        got += 1
    assert got == n - 5 + 1
    r.close()


@pytest.mark.timeout(60)
def test_put_moves_a_file_across_file_systems_by_copy_then_delete(tiny_tmpfs, tmp_path):
    src = tmp_path / "outside.tsv"  # on the disk; the queue lives on the tmpfs
    src.write_bytes(b"across")
    w = WritableFolderQueue(str(tiny_tmpfs / "q"))
    final = w.put(src)
    assert not src.exists()
    assert open(final, "rb").read() == b"across"
    assert os.listdir(tiny_tmpfs / "q" / "tmp") == []


# --------------------------------------------------------------------------- crash of a put
def _crash_in_put(path):
    """A producer killed between writing the temp file and publishing it."""
    import pympx_queues._fs as fs

    w = WritableFolderQueue(path)
    real = fs.rename_noreplace

    def die(src, dst):
        if "/tmp/" in src and dst.endswith("half.tsv"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    fs.rename_noreplace = die
    w.put_data("half.tsv", b"x" * 1000)


@pytest.mark.timeout(60)
def test_a_put_killed_before_publishing_is_never_published_and_is_cleaned(tmp_path):
    q = str(tmp_path / "q")
    p = SPAWN.Process(target=_crash_in_put, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    tmp_entries = os.listdir(os.path.join(q, "tmp"))
    assert len(tmp_entries) == 1 and L.parse_owned(tmp_entries[0]).name == "half.tsv"
    assert [n for n in os.listdir(q) if n.endswith(".tsv")] == []
    WritableFolderQueue(q)  # the next start cleans the dead producer's temp file
    assert os.listdir(os.path.join(q, "tmp")) == []


@pytest.mark.timeout(120)
def test_bench_folder_quick_run_prints_every_figure():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "bench_folder.py")
    res = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True,
                         timeout=110)
    assert res.returncode == 0, res.stderr[-2000:]
    for label in ("put/s", "get+done/s 1proc", "drain/s 4procs", "get() with", "put->wake"):
        assert label in res.stdout, (label, res.stdout)
