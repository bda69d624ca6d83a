"""PersistentQueue across real processes: spawn/fork/forkserver, SIGKILL, recovery."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

from pympx_queues import journal as jr
from pympx_queues.persistent import pickup
from pympx_queues.errors import JournalCorruptError, QueueFailed
from pympx_queues.persistent import PersistentQueue
from pympx_queues.sentinels import DONE, FAILED

from conftest import wait_for

SPAWN = mp.get_context("spawn")


# ------------------------------------------------------------------ child processes
def produce(q, items, keys=None, close=True, hang_event=None):
    """Put ``items`` (with ``keys``); close, or wait to be killed (a crashed producer)."""
    for n, item in enumerate(items):
        q.put(item, key=None if keys is None else keys[n])
    if close:
        q.close()
    elif hang_event is not None:
        hang_event.set()
        signal.pause()


def consume(q, report, ack_limit=None, name="c"):
    """Ack everything until DONE; with ``ack_limit``, ack that many, then take one more,
    report its id and block until killed.  Reports ("got", name, id, body) per message."""
    acked = 0
    while True:
        msg = q.get_message(timeout=60)
        if msg is DONE or msg is FAILED:
            report.put(("end", name, repr(msg)))
            q.dispose()
            return
        if ack_limit is not None and acked >= ack_limit:
            report.put(("held", name, msg.id, msg.body))
            signal.pause()
        q.task_done(msg)
        acked += 1
        report.put(("got", name, msg.id, msg.body))


def iterate(q, report):
    """Consume with ``for`` (stops at DONE, raises at FAILED); report the bodies."""
    got = []
    try:
        for body in q:
            got.append(body)
            q.task_done(body)
    except QueueFailed:
        report.put(("failed", got))
        return
    report.put(("done", got))


def _drain(report, until, out=None, timeout=60):
    """Collect report tuples into ``out`` (all so far) until ``until(out)`` holds."""
    out = [] if out is None else out
    wait_for(lambda: _pull(report, out) or until(out), timeout=timeout, message="reports")
    return out


def _pull(report, out):
    try:
        while True:
            out.append(report.get_nowait())
    except Exception:
        return False


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def _join(*procs):
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, p


# ------------------------------------------------------------------ crash and recovery
@pytest.mark.timeout(120)
def test_consumer_killed_mid_run_new_run_requeues_exactly_the_unfinished_ids(tmp_path):
    q = PersistentQueue("jobs", tmp_path, number_of_workers=3, context=SPAWN)
    report = SPAWN.Queue()
    items = [(i, f"payload-{i}") for i in range(60)]
    producer = SPAWN.Process(target=produce, args=(q, items))
    victim = SPAWN.Process(target=consume, args=(q, report, 3, "victim"))
    others = [SPAWN.Process(target=consume, args=(q, report, None, f"c{n}")) for n in (1, 2)]
    victim.start()
    producer.start()
    reports = _drain(report, lambda r: any(x[0] == "held" for x in r))
    held = next(x for x in reports if x[0] == "held")
    for p in others:
        p.start()
    _drain(report, lambda r: any(x[0] == "got" and x[1] != "victim" for x in r), reports)
    _kill(victim)  # SIGKILL mid-run, holding one unacknowledged message
    _join(producer, *others)
    _drain(report, lambda r: sum(x[0] == "end" for x in r) == 2, reports)
    acked = [x[2] for x in reports if x[0] == "got"]
    assert len(acked) == len(set(acked)) == 59

    q.dispose()
    history = jr.scan_dirs([str(tmp_path)], "jobs")
    assert len(history.requested) == 60
    assert {r.id for r in history.outstanding()} == {held[2]}
    q2 = PersistentQueue("jobs", tmp_path, number_of_workers=1, context=SPAWN)
    outstanding = q2.get_outstanding_messages()
    assert [m.id for m in outstanding] == [held[2]]
    assert outstanding[0].body == held[3]

    assert q2.requeue_unprocessed_work() == 1
    assert q2.requeue_unprocessed_work() == 0  # never twice
    q2.close()
    c = SPAWN.Process(target=consume, args=(q2, report, None, "r"))
    c.start()
    _join(c)
    redone = _drain(report, lambda r: any(x[0] == "end" for x in r))
    assert [(x[2], x[3]) for x in redone if x[0] == "got"] == [(held[2], held[3])]
    q2.dispose()

    q3 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    assert q3.get_list_of_outstanding_work() == []
    assert [n for n in os.listdir(tmp_path) if n.endswith(".journal")] == []  # compacted


@pytest.mark.timeout(120)
def test_two_crashes_in_a_row_lose_nothing(tmp_path):
    report = SPAWN.Queue()
    # Run 1: 20 messages, the only consumer acks 5, holds 1 and is killed.
    q1 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    ids = q1.put_many([{"n": i} for i in range(20)])
    c1 = SPAWN.Process(target=consume, args=(q1, report, 5))
    c1.start()
    r1 = _drain(report, lambda r: any(x[0] == "held" for x in r))
    _kill(c1)
    q1.dispose()
    acked1 = {x[2] for x in r1 if x[0] == "got"}
    assert len(acked1) == 5

    # Run 2: requeue the 15, the consumer acks 4 more, holds 1 and is killed.
    q2 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    assert {m.id for m in q2.get_outstanding_messages()} == set(ids) - acked1
    assert q2.requeue_unprocessed_work() == 15
    c2 = SPAWN.Process(target=consume, args=(q2, report, 4))
    c2.start()
    r2 = _drain(report, lambda r: any(x[0] == "held" for x in r))
    _kill(c2)
    q2.dispose()
    acked2 = {x[2] for x in r2 if x[0] == "got"}
    assert len(acked2) == 4 and not acked2 & acked1

    # Run 3: everything requested in run 1 minus everything completed in runs 1 and 2.
    q3 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    left = q3.get_outstanding_messages()
    assert {m.id for m in left} == set(ids) - acked1 - acked2
    assert sorted(m.body["n"] for m in left) == sorted(
        i for i, mid in enumerate(ids) if mid not in acked1 | acked2)
    assert len(left) == 11


@pytest.mark.timeout(120)
def test_torn_tail_of_a_killed_writer_is_cut_reported_and_nothing_else_lost(tmp_path, caplog):
    report = SPAWN.Queue()
    q1 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    ids = q1.put_many(list(range(10)))
    c1 = SPAWN.Process(target=consume, args=(q1, report, 4))
    c1.start()
    r1 = _drain(report, lambda r: any(x[0] == "held" for x in r))
    _kill(c1)
    q1.dispose()
    # The consumer died while writing its next ack: half a record at the end.
    consumer_journal = next(
        os.path.join(tmp_path, n) for n in os.listdir(tmp_path)
        if n.endswith(".journal") and f".{c1.pid}." in n)
    half = jr.format_record(99, jr.KIND_DONE, jr.dumps({"i": "never"}))[:20]
    # Where its next record goes: the end of its records (a flush-mode writer maps a
    # reserved NUL tail after them, so that is not the end of the file).
    end = jr.scan_journal(consumer_journal).good_end
    with open(consumer_journal, "r+b") as f:
        f.seek(end)
        f.write(half)
    with caplog.at_level(logging.WARNING, logger="pympx_queues"):
        q2 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    assert "torn" in caplog.text and consumer_journal in caplog.text
    acked = {x[2] for x in r1 if x[0] == "got"}
    assert {m.id for m in q2.get_outstanding_messages()} == set(ids) - acked
    # The torn bytes were saved beside the journal before it was cut (and compacted).
    sides = [n for n in os.listdir(tmp_path) if ".journal.torn-" in n]
    assert len(sides) == 1 and open(os.path.join(tmp_path, sides[0]), "rb").read() == half


def test_corrupt_middle_record_fails_closed_then_repair_quarantines_it(tmp_path):
    q1 = PersistentQueue("jobs", tmp_path)
    q1.put_many(["a", "b", "c", "d"])
    path = q1.journal_path
    q1.dispose()
    data = bytearray(open(path, "rb").read())
    lines = bytes(data).split(b"\n")
    offset = sum(len(x) + 1 for x in lines[:2])  # record of "b"
    data[offset + 12] ^= 0x20
    open(path, "wb").write(bytes(data))
    with pytest.raises(JournalCorruptError) as info:
        PersistentQueue("jobs", tmp_path)
    assert info.value.path == path and info.value.offset == offset
    report = pickup.verify(tmp_path)
    assert not report.ok and report.issues[0].offset == offset
    assert report.to_dict()["issues"][0]["path"] == path

    fixed = pickup.repair(tmp_path)
    assert fixed.ok and os.path.exists(path + ".quarantined")
    assert open(path + f".corrupt-{offset}", "rb").read() == bytes(data[offset:]).split(
        b"\n")[0] + b"\n"
    assert pickup.repair(tmp_path).actions == []  # idempotent
    q2 = PersistentQueue("jobs", tmp_path)
    assert q2.get_list_of_outstanding_work() == ["a", "c", "d"]


# ------------------------------------------------------------------ message identity
@pytest.mark.timeout(120)
def test_equal_messages_are_two_pieces_of_work(tmp_path):
    report = SPAWN.Queue()
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    ids = q.put_many(["same", "same", "same"])
    assert len(set(ids)) == 3
    c = SPAWN.Process(target=consume, args=(q, report, 2))
    c.start()
    r = _drain(report, lambda r: any(x[0] == "held" for x in r))
    _kill(c)
    q.dispose()
    held = next(x for x in r if x[0] == "held")
    q2 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    assert q2.get_outstanding_messages() == [(held[2], "same")]


def test_task_done_by_body_identity_then_equality_and_by_message(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    a, b = q.put_many([[1], [1]])
    _first, second = q.get(), q.get()
    q.task_done(second)  # identity picks the second, not the oldest equal one
    q.dispose()
    assert [m.id for m in PersistentQueue("jobs", tmp_path).get_outstanding_messages()] == [a]



def test_task_done_fast_path_keeps_identity_equality_and_oldest_rules(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    ids = q.put_many([[1], [2], [1], [3], [4]])
    got = [q.get() for _ in range(5)]
    q.task_done(got[0])  # the oldest, by identity: the O(1) path
    q.task_done([1])  # an equal copy, not the oldest any more: the oldest equal, ids[2]
    q.task_done()  # no argument: the oldest left, ids[1]
    q.task_done(got[4])  # identity, out of order
    with pytest.raises(ValueError):
        q.task_done([9])  # nothing equal in flight: nothing written
    q.dispose()
    assert [m.id for m in PersistentQueue("jobs", tmp_path).get_outstanding_messages()] \
        == [ids[3]]
    q = PersistentQueue("jobs", tmp_path)
    with pytest.raises(ValueError):
        q.task_done()  # nothing got in this process
    q.dispose()

# ------------------------------------------------------------------ restartable producers
@pytest.mark.timeout(120)
@pytest.mark.parametrize("requeue_first", [True, False])
def test_idempotent_producer_restart_skips_finished_keys(tmp_path, requeue_first):
    report = SPAWN.Queue()
    keys = [f"file-{i:02d}" for i in range(20)]
    items = [{"file": k} for k in keys]
    q1 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    hang = SPAWN.Event()
    producer = SPAWN.Process(target=produce, args=(q1, items, keys, False, hang))
    consumer = SPAWN.Process(target=consume, args=(q1, report, 8))
    producer.start()
    consumer.start()
    r1 = _drain(report, lambda r: any(x[0] == "held" for x in r))
    assert hang.wait(60)
    _kill(consumer)
    _kill(producer)  # the producer dies too, before close()
    done1 = {x[3]["file"] for x in r1 if x[0] == "got"}
    assert len(done1) == 8

    q2 = PersistentQueue("jobs", tmp_path, context=SPAWN)
    if requeue_first:
        assert q2.requeue_unprocessed_work() == 12
    # The producer starts again from the beginning, in a child process.
    producer = SPAWN.Process(target=produce, args=(q2, items, keys))
    consumer = SPAWN.Process(target=consume, args=(q2, report, None, "c2"))
    producer.start()
    consumer.start()
    _join(producer, consumer)
    r2 = _drain(report, lambda r: any(x[0] == "end" and x[1] == "c2" for x in r))
    redone = [x[3]["file"] for x in r2 if x[0] == "got"]
    assert sorted(redone) == sorted(set(keys) - done1)  # each once, none finished redone
    q2.dispose()
    assert PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == []


def test_key_put_twice_in_one_process_is_skipped(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    assert q.put("x", key="k") is not None
    assert q.put("x", key="k") is None
    assert q.qsize() == 1 or q.empty() is False


# ------------------------------------------------------------------ sentinels
@pytest.mark.timeout(60)
def test_falsy_values_are_never_mistaken_for_sentinels(tmp_path):
    values = [0, False, -1, None, "", "DONE", "FAILED", [], {}, 0.0]
    report = SPAWN.Queue()
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    c = SPAWN.Process(target=iterate, args=(q, report))
    c.start()
    q.put_many(values)
    q.close()
    _join(c)
    kind, got = report.get(timeout=30)
    assert kind == "done"
    assert got == values and [type(v) for v in got] == [type(v) for v in values]


@pytest.mark.timeout(60)
def test_fail_stops_iterating_consumers_with_queue_failed(tmp_path):
    report = SPAWN.Queue()
    q = PersistentQueue("jobs", tmp_path, number_of_workers=2, context=SPAWN)
    cs = [SPAWN.Process(target=iterate, args=(q, report)) for _ in range(2)]
    for c in cs:
        c.start()
    q.put(1)
    q.fail()
    _join(*cs)
    results = [report.get(timeout=30) for _ in cs]
    assert sorted(r[0] for r in results) == ["failed", "failed"]
    assert sorted(sum((r[1] for r in results), [])) == [1]
    with pytest.raises(Exception, match="closed"):
        q.put(2)


def test_sentinel_put_directly_is_refused():
    q = PersistentQueue()
    with pytest.raises(ValueError):
        q.put(DONE)


# ------------------------------------------------------------------ start methods
def _consume_all(q, report):
    got = []
    for body in q:
        got.append(body)
        q.task_done(body)
    report.put(got)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_queue_pickles_into_children_with_every_start_method(tmp_path, method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"{method} not available")
    ctx = mp.get_context(method)
    q = PersistentQueue("jobs", tmp_path, number_of_workers=2, context=method)
    q.put(("before", b"\x01"))  # the parent's journal is open before a fork
    report = ctx.Queue()
    cs = [ctx.Process(target=_consume_all, args=(q, report)) for _ in range(2)]
    for c in cs:
        c.start()
    q.put_many([("after", i) for i in range(10)])
    q.close()
    q.join()
    _join(*cs)
    got = [report.get(timeout=30) for _ in cs]
    assert sorted(map(repr, sum(got, []))) == sorted(
        map(repr, [("before", b"\x01")] + [("after", i) for i in range(10)]))
    q.dispose()
    journals = [n for n in os.listdir(tmp_path) if n.endswith(".journal")]
    pids = {jr.parse_journal_name(n).pid for n in journals}
    assert str(os.getpid()) in pids and len(journals) == len(pids)  # one file per process
    for n in journals:  # each strictly sequenced: no two writers ever shared a file
        assert not jr.scan_journal(os.path.join(tmp_path, n)).problems
    assert PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == []


def test_import_and_construction_do_not_fix_the_start_method(tmp_path):
    code = (
        "import multiprocessing as mp, pympx_queues, pympx_queues.persistent, "
        "pympx_queues.compat\n"
        "from pympx_queues import PersistentQueue\n"
        "q = PersistentQueue('jobs', %r)\n"
        "q.put(1)\n"
        "assert mp.get_start_method(allow_none=True) is None, mp.get_start_method()\n"
        "assert not mp.active_children()\n"
        "mp.set_start_method('spawn')\n"
        "print('ok')\n" % str(tmp_path)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _compat_consume(q, report):
    got = []
    for body in q:
        got.append(body)
        q.task_done(body)
    report.put(got)


@pytest.mark.timeout(60)
def test_compat_queue_goes_to_children_of_the_default_start_method_with_requeued_work(
        tmp_path):
    from pympx_queues.compat import PersistentQueue as CompatQueue
    from pympx_queues.persistent.queue import _default_context

    ctx = _default_context()  # pympx's signature has no context: the default one is used

    q1 = CompatQueue("jobs", str(tmp_path))
    q1.put(("a", 1))
    q1.put(("b", 2))
    q1.dispose()
    q2 = CompatQueue("jobs", str(tmp_path), str(tmp_path), number_of_workers=1)
    q2.requeue_unprocessed_work()
    report = ctx.Queue()
    c = ctx.Process(target=_compat_consume, args=(q2, report))
    c.start()
    q2.put(("a", 1))  # pympx: already requeued, not put twice
    q2.put(("c", 3))
    q2.close()
    _join(c)
    assert report.get(timeout=30) == [("a", 1), ("b", 2), ("c", 3)]
