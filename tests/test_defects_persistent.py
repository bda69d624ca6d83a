"""PersistentQueue defects a new user met: join() and exit after a consumer is killed,
acks of unknown ids, fail() after close().  Real spawned processes and SIGKILL."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pympx_queues import ConsumerDied, PersistentQueue, QueueClosed
from pympx_queues import journal as jr
from pympx_queues.persistent import pickup

from conftest import wait_for


SPAWN = mp.get_context("spawn")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold(q, got):
    """Get two messages, say so, never acknowledge them (waits to be killed)."""
    q.get(timeout=30)
    q.get(timeout=30)
    got.put(os.getpid())
    SPAWN.Event().wait(120)


def _work(q):
    for body in q:
        q.task_done(body)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def test_join_raises_naming_a_consumer_killed_while_holding_messages(tmp_path):
    q = PersistentQueue("jobs", tmp_path, number_of_workers=2, context=SPAWN)
    got = SPAWN.Queue()
    victim = SPAWN.Process(target=_hold, args=(q, got))
    victim.start()
    q.put_many(["a", "b"])
    assert got.get(timeout=60) == victim.pid
    worker = SPAWN.Process(target=_work, args=(q,))
    worker.start()
    q.put_many(["c", "d"])  # the live worker acknowledges these
    _kill(victim)
    with pytest.raises(ConsumerDied, match=f"pid {victim.pid} \\(2 messages\\)") as info:
        q.join(timeout=60)  # the bound only guards the test: it raises at once
    assert info.value.pids == (victim.pid,)
    q.close()
    worker.join(30)
    assert worker.exitcode == 0
    q.dispose()
    # The journal holds the dead consumer's messages for the next run.
    assert sorted(PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work()) == \
        ["a", "b"]


def _wait_in_get(q):
    q.get()  # blocks on an empty queue, inside multiprocessing's read lock


def test_read_lock_of_a_consumer_killed_while_waiting_in_get_is_given_back(tmp_path):
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    idle = SPAWN.Process(target=_wait_in_get, args=(q,))
    idle.start()
    consumers = q.joinable_queue.consumers
    wait_for(lambda: any(pid == idle.pid and reading
                         for pid, _, _, reading in consumers._entries()),
             timeout=60, message="the consumer to wait inside get()")
    _kill(idle)  # multiprocessing never releases the read lock it held
    q.put("x")
    assert q.join(timeout=0.3) is False  # nothing to blame: it held no message
    assert q.get(timeout=30) == "x"  # the lock was given back: the queue is readable
    q.task_done()
    assert q.join(timeout=10) is True
    q.dispose()


def test_join_raises_for_a_consumer_killed_while_receiving_a_message(tmp_path):
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    gone = SPAWN.Process(target=_ack_one_and_exit, args=(q,))  # any dead pid will do
    q.put("x")
    gone.start()
    gone.join(60)
    q.put("y")
    # Its slot as a kill in the middle of reading a message would leave it.
    v = q.joinable_queue.consumers.view
    (base,) = [b for b in range(0, len(v), 4) if v[b] == gone.pid]
    v[base + 3] = 2
    with pytest.raises(ConsumerDied, match="receiving") as info:
        q.join(timeout=30)
    assert info.value.pids == (gone.pid,)
    v[base + 3] = 0
    q.task_done(q.get(timeout=5))
    q.dispose()


def _ack_one_and_exit(q):
    q.task_done(q.get(timeout=30))


def test_join_does_not_blame_a_consumer_that_exited_holding_nothing(tmp_path):
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    q.put("x")
    one = SPAWN.Process(target=_ack_one_and_exit, args=(q,))
    one.start()
    one.join(60)
    assert one.exitcode == 0
    q.put("y")
    assert q.join(timeout=0.3) is False  # waits: nobody who died held anything
    q.task_done(q.get(timeout=5))
    assert q.join(timeout=5) is True
    q.dispose()


def test_join_timeout_returns_false_then_true_and_rejects_negative(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    assert q.join(timeout=0) is True
    q.put("a")
    assert q.join(timeout=0.05) is False
    q.task_done(q.get(timeout=5))
    assert q.join(timeout=5) is True
    assert q.join() is True
    with pytest.raises(ValueError):
        q.join(timeout=-1)
    q.dispose()


_EXIT_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys
    sys.path.insert(0, {repo!r})
    from pympx_queues import PersistentQueue

    def consume(q):
        for body in q:
            q.task_done(body)

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q = PersistentQueue("jobs", sys.argv[1], number_of_workers=3, context=ctx)
        consumers = [ctx.Process(target=consume, args=(q,)) for _ in range(3)]
        for c in consumers:
            c.start()
        for i in range(3000):
            q.put((i, "x" * 200))
            if i == 750:  # a quarter of the puts: every consumer dies
                for c in consumers:
                    os.kill(c.pid, signal.SIGKILL)
                for c in consumers:
                    c.join()
        print("puts done", flush=True)
        sys.exit(0)
""")


def test_producer_exits_although_every_consumer_died_with_messages_in_the_pipe(tmp_path):
    script = tmp_path / "producer.py"
    script.write_text(_EXIT_SCRIPT.format(repo=REPO))
    pickup_dir = tmp_path / "pickup"
    # Before the fix this hung forever in multiprocessing's feeder thread at exit.
    done = subprocess.run([sys.executable, str(script), str(pickup_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "puts done" in done.stdout
    # Nothing is lost: every message not acknowledged is outstanding for the next run.
    left = PersistentQueue("jobs", pickup_dir).get_outstanding_messages()
    assert len(left) >= 3000 - 3 * 751 and len(left) <= 3000


def test_producer_exit_still_delivers_everything_to_live_consumers(tmp_path):
    q = PersistentQueue("jobs", tmp_path, number_of_workers=1, context=SPAWN)
    # The producer is a child process that puts, closes and exits at once.
    producer = SPAWN.Process(target=_produce_and_exit, args=(q, 2000))
    producer.start()
    seen = 0
    for body in q:  # still reading while the producer has already finished putting
        q.task_done(body)
        seen += 1
    assert seen == 2000
    producer.join(60)
    assert producer.exitcode == 0
    q.dispose()


def _produce_and_exit(q, n):
    for i in range(n):
        q.put((i, "y" * 200))  # more than the pipe holds: the feeder must flush at exit
    q.close()


def _journal_bytes(directory):
    return {p: os.path.getsize(p) for p, _ in jr.list_journals(str(directory))}


@pytest.mark.parametrize("bad", ["nope", "0123456789ab.1", 'odd "id"\n'])
def test_task_done_with_an_unknown_id_raises_and_writes_nothing(tmp_path, bad):
    q = PersistentQueue("jobs", tmp_path)
    q.put_many(["a", "b"])
    q.task_done(q.get(timeout=5))
    before = _journal_bytes(tmp_path)
    with pytest.raises(ValueError, match="unknown message id") as info:
        q.task_done(id=bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="unknown message id"):
        q.task_done_many(["ignored"], ids=[bad])
    assert _journal_bytes(tmp_path) == before
    q.dispose()
    report = pickup.inspect(str(tmp_path), "jobs")
    (prefix,) = report.prefixes
    assert (prefix.requested, prefix.completed, prefix.outstanding) == (2, 1, 1)
    assert [r.completed for r in prefix.runs] == [1]


def _ack_by_id(q, mid, out):
    q.task_done(id=mid)
    out.put("acked")


def test_task_done_by_id_from_another_process_still_works(tmp_path):
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    mid = q.put("a")
    q.get(timeout=5)  # the parent got it; a helper process acknowledges it by id
    out = SPAWN.Queue()
    p = SPAWN.Process(target=_ack_by_id, args=(q, mid, out))
    p.start()
    assert out.get(timeout=60) == "acked"
    p.join(30)
    assert p.exitcode == 0
    q.dispose()
    assert PersistentQueue("jobs", tmp_path).get_outstanding_messages() == []


def test_task_done_by_id_of_a_message_put_by_another_process(tmp_path):
    q = PersistentQueue("jobs", tmp_path, context=SPAWN)
    producer = SPAWN.Process(target=_produce_and_exit, args=(q, 1))
    producer.start()
    producer.join(60)
    message = q.get_message(timeout=30)
    # A third process acknowledges it by id: it neither put nor got it; the id's prefix
    # names the producer's journal of this run.
    out = SPAWN.Queue()
    p = SPAWN.Process(target=_ack_by_id, args=(q, message.id, out))
    p.start()
    assert out.get(timeout=60) == "acked"
    p.join(30)
    q.dispose()
    assert PersistentQueue("jobs", tmp_path).get_outstanding_messages() == []


def test_ids_of_earlier_runs_are_known(tmp_path):
    q1 = PersistentQueue("jobs", tmp_path)
    mid = q1.put("old")
    q1.dispose()
    q2 = PersistentQueue("jobs", tmp_path, use_queue=False)  # journal only
    q2.task_done(id=mid)  # outstanding from the earlier run: a real id
    q2.dispose()
    assert PersistentQueue("jobs", tmp_path).get_outstanding_messages() == []


def test_fail_after_close_raises_queue_closed(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.close()
    before = _journal_bytes(tmp_path)
    with pytest.raises(QueueClosed):
        q.fail()
    with pytest.raises(QueueClosed):
        q.put("late")
    assert _journal_bytes(tmp_path) == before
    q.close()  # close() stays idempotent
    q2 = PersistentQueue("jobs2", tmp_path)
    q2.fail()
    with pytest.raises(QueueClosed):
        q2.fail()
    q.dispose()
    q2.dispose()


def test_producing_block_that_closed_then_raised_keeps_the_original_error(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with q.producing():
            q.put(1)
            q.close()
            raise RuntimeError("boom")
    q.dispose()
