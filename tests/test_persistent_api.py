"""PersistentQueue API contract in one process: bad input, durability modes, hooks,
earlier-run handling, compat signatures and the pickup admin functions."""

from __future__ import annotations

import inspect as pyinspect
import json
import os
import pickle
import queue

import pytest

from pympx_queues import _fs
from pympx_queues.persistent import pickup
from pympx_queues import journal as jr
from pympx_queues.compat import PersistentQueue as CompatQueue
from pympx_queues.errors import QueueClosed, QueueFailed
from pympx_queues.persistent import Message, PersistentQueue
from pympx_queues.sentinels import DONE, FAILED

pytestmark = pytest.mark.timeout(60)


def _records(directory, kind=None):
    out = []
    for path, _ in jr.list_journals(str(directory)):
        out += [r for r in jr.scan_journal(path).records if kind is None or r[1] == kind]
    return out


def _journal_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(jr.JOURNAL_SUFFIX))


# ------------------------------------------------------------------ bad input
def test_unserialisable_message_raises_and_writes_nothing(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    with pytest.raises(TypeError, match="cannot journal"):
        q.put({"handle": object()})
    with pytest.raises(TypeError):
        q.put_many([1, 2, object()])
    assert _records(tmp_path, jr.KIND_PUT) == []
    assert q.empty()
    q.put(1)
    assert q.get(timeout=5) == 1  # the queue is still usable


def test_self_containing_and_non_finite_messages_raise_and_write_nothing(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    hooked = PersistentQueue("hooked", tmp_path, formatter_list=[str, float],
                             converter_list=[str, float])
    loop = [1]
    loop.append(loop)
    with pytest.raises(TypeError, match="list that contains itself"):
        q.put(loop)
    with pytest.raises(TypeError, match="contains itself"):
        q.put_many([1, {"a": loop}])
    with pytest.raises(TypeError, match="contains itself"):
        q.put(loop, key="k1")
    for bad in (float("nan"), [1.0, float("inf")], {"x": (float("-inf"),)}):
        with pytest.raises(ValueError, match="cannot journal the float"):
            q.put(bad)
        with pytest.raises(ValueError, match="cannot journal the float"):
            q.put(bad, key="k2")
    with pytest.raises(ValueError, match="cannot journal the float nan"):
        q.put_many([1, float("nan")])
    with pytest.raises(ValueError, match="cannot journal the float inf"):
        hooked.put(("a", "inf"))  # the formatter's output is journaled: refused too
    assert _records(tmp_path, jr.KIND_PUT) == []
    assert q.empty()
    q.put(1.5)
    assert q.get(timeout=5) == 1.5  # the queue is still usable


def test_a_file_where_the_pickup_dir_belongs_is_named_as_such(tmp_path):
    (tmp_path / "pickup").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="a file where the pickup dir belongs"):
        PersistentQueue("jobs", tmp_path / "pickup")
    with pytest.raises(NotADirectoryError, match="parent of the pickup dir"):
        PersistentQueue("jobs", tmp_path / "pickup" / "inner")
    assert (tmp_path / "pickup").read_text() == "not a folder"


def test_negative_timeouts_raise_and_write_nothing(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    with pytest.raises(ValueError, match="non-negative"):
        q.put("x", timeout=-1)
    with pytest.raises(ValueError):
        q.get(timeout=-0.5)
    assert _records(tmp_path, jr.KIND_PUT) == []


def test_put_after_close_or_fail_raises_queue_closed(tmp_path):
    q = PersistentQueue("jobs", tmp_path, number_of_workers=2)
    q.put(1)
    q.close()
    for call in (lambda: q.put(2), lambda: q.put_many([3]), lambda: q.put(4, key="k")):
        with pytest.raises(QueueClosed):
            call()
    assert [r[2]["m"] for r in _records(tmp_path, jr.KIND_PUT)] == [1]
    assert [q.get(timeout=5) for _ in range(3)] == [1, DONE, DONE]
    q.close()  # idempotent: no more DONEs
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    q2 = PersistentQueue("jobs2", tmp_path)
    q2.fail()
    with pytest.raises(QueueClosed):
        q2.put(1)
    assert q2.get(timeout=5) is FAILED


def test_task_done_without_a_matching_get_raises_and_writes_nothing(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put("a")
    with pytest.raises(ValueError, match="more times"):
        q.task_done()
    q.get(timeout=5)
    with pytest.raises(ValueError, match="no unacknowledged"):
        q.task_done("b")
    assert _records(tmp_path, jr.KIND_DONE) == []
    q.task_done("a")
    assert len(_records(tmp_path, jr.KIND_DONE)) == 1


def test_bad_constructor_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        PersistentQueue("a/b", tmp_path)
    with pytest.raises(ValueError):
        PersistentQueue("q", tmp_path, durability="sometimes")
    with pytest.raises(ValueError):
        PersistentQueue("q", tmp_path, number_of_workers=-1)
    with pytest.raises(ValueError):
        PersistentQueue("q", None, use_queue=False)
    with pytest.raises(ValueError):
        PersistentQueue("q", tmp_path, formatter_list=[str])


def test_queue_full_withdraws_the_journaled_put(tmp_path):
    q = PersistentQueue("jobs", tmp_path, maxsize=1)
    first = q.put("kept")
    with pytest.raises(queue.Full):
        q.put_nowait("withdrawn")
    with pytest.raises(queue.Full):
        q.put("withdrawn too", timeout=0.05)
    q.dispose()
    left = PersistentQueue("jobs", tmp_path).get_outstanding_messages()
    assert left == [(first, "kept")]


# ------------------------------------------------------------------ durability
def test_fsync_mode_syncs_before_returning_one_fsync_per_batch(tmp_path):
    events = []
    _fs.set_tracer(lambda op, *args: events.append((op, args[0] if args else "")))
    try:
        q = PersistentQueue("jobs", tmp_path, durability="fsync")
        q.put("warm-up")  # creates and syncs the journal (file and directory)
        events.clear()
        q.put("one")
        assert [e[0] for e in events] == ["write", "fsync"]
        events.clear()
        q.put_many([f"m{i}" for i in range(100)])
        assert [e[0] for e in events] == ["write", "fsync"]
        got = q.get_many(102, timeout=5)
        events.clear()
        q.task_done_many(got)
        assert [e[0] for e in events] == ["write", "fsync"]
    finally:
        _fs.set_tracer(None)


def test_flush_mode_writes_through_to_the_os_before_returning(tmp_path):
    events = []
    q = PersistentQueue("jobs", tmp_path)
    q.put("warm-up")
    _fs.set_tracer(lambda op, *args: events.append(op))
    try:
        q.put("x")
        assert events == ["write"]  # one write(2): in the page cache, no fsync
    finally:
        _fs.set_tracer(None)
    assert any(r[2]["m"] == "x" for r in _records(tmp_path, jr.KIND_PUT))


# ------------------------------------------------------------------ behaviour
def test_without_pickup_dirs_it_is_a_plain_joinable_queue():
    q = PersistentQueue(number_of_workers=1)
    assert not q.journaling and q.put((1, object())) is not None  # no journal: anything goes
    body = q.get(timeout=5)
    q.close()
    q.task_done(body)
    q.join()  # DONE is not work: join does not wait for it to be taken
    assert q.get(timeout=5) is DONE


def test_join_returns_when_every_message_is_acknowledged(tmp_path):
    q = PersistentQueue("jobs", tmp_path, number_of_workers=2)
    q.put_many(range(5))
    q.close()
    for body in q:
        q.task_done(body)
    q.join()  # returns although one DONE is still waiting: sentinels are not work
    assert q.get(timeout=5) is DONE


def test_get_message_and_task_done_by_message_or_id(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    ids = q.put_many(["a", "a", "b"])
    m1 = q.get_message(timeout=5)
    m2 = q.get_message(timeout=5)
    assert isinstance(m1, Message) and (m1.id, m2.id) == tuple(ids[:2])
    assert pickle.loads(pickle.dumps(m1)) == m1
    q.task_done(m2)
    q.task_done(id=m1.id)
    q.get(timeout=5)
    q.dispose()
    assert [m.id for m in PersistentQueue("jobs", tmp_path).get_outstanding_messages()] == \
        [ids[2]]


def test_producing_context_closes_on_success_and_fails_on_error(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    with q.producing():
        q.put(1)
    assert [q.get(timeout=5), q.get(timeout=5)] == [1, DONE]
    q2 = PersistentQueue("jobs2", tmp_path)
    with pytest.raises(RuntimeError):
        with q2.producing():
            q2.put(1)
            raise RuntimeError("boom")
    q2.task_done(q2.get(timeout=5))
    with pytest.raises(QueueFailed):
        next(iter(q2))


def test_formatter_and_converter_hooks_are_used_for_the_journal(tmp_path):
    q = PersistentQueue("jobs", tmp_path, formatter_list=[str, str], converter_list=[int, float])
    q.put((1, 2.5))
    assert _records(tmp_path, jr.KIND_PUT)[0][2]["m"] == {jr.TAG_FORMATTED: ["1", "2.5"]}
    q.dispose()
    q2 = PersistentQueue("jobs", tmp_path, formatter_list=[str, str],
                         converter_list=[int, float])
    assert q2.get_list_of_outstanding_work() == [(1, 2.5)]


def test_requeued_work_keeps_types_and_ids(tmp_path):
    value = {"t": (1, b"\x00"), "s": {1, 2}, 3: [None, True]}
    q = PersistentQueue("jobs", tmp_path)
    mid = q.put(value)
    q.dispose()
    q2 = PersistentQueue("jobs", tmp_path)
    q2.requeue_unprocessed_work()
    msg = q2.get_message(timeout=5)
    assert msg == (mid, value)


def test_use_queue_false_replays_this_runs_journal(tmp_path):
    q = PersistentQueue("jobs", tmp_path, use_queue=False)
    q.put_many(["a", "b", "b"])
    got = [q.get(), q.get(), q.get()]
    assert got == ["a", "b", "b"] and q.get() is DONE
    q.task_done("a")
    q.dispose()
    assert PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == ["b", "b"]


def test_dispose_then_use_again_opens_a_new_journal(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put(1)
    first = q.journal_path
    q.dispose()
    q.put(2)
    assert q.journal_path != first and len(_journal_files(tmp_path)) == 2


def test_previous_pickup_dir_rotation_carries_unfinished_work_forward(tmp_path):
    d1, d2, d3 = (str(tmp_path / f"run{i}") for i in (1, 2, 3))
    q1 = PersistentQueue("jobs", d1)
    ids = q1.put_many(["a", "b", "c"])
    q1.task_done(q1.get(timeout=5))
    q1.dispose()
    # Run 2 crashes before it requeues anything: the carry-forward already happened.
    q2 = PersistentQueue("jobs", d2, previous_pickup_dir=d1)
    assert [m.id for m in q2.get_outstanding_messages()] == ids[1:]
    q2.dispose()
    q3 = PersistentQueue("jobs", d3, previous_pickup_dir=d2)
    assert q3.get_list_of_outstanding_work() == ["b", "c"]
    assert os.listdir(d1)  # the previous dirs are only read


def test_finished_runs_leave_no_journal_behind_bounded_disk(tmp_path):
    for run in range(15):
        q = PersistentQueue("jobs", tmp_path)
        q.put_many([run, run])
        q.close()
        for body in q:
            q.task_done(body)
        q.dispose()
    assert len(_journal_files(tmp_path)) == 1  # only the last run, until the next starts
    PersistentQueue("jobs", tmp_path)
    assert _journal_files(tmp_path) == []


def test_many_crashed_runs_compact_to_one_snapshot(tmp_path):
    for run in range(12):
        q = PersistentQueue("jobs", tmp_path)
        q.requeue_unprocessed_work()
        q.put_many([f"a{run}", f"b{run}"])
        # "Crash" (never closed): acknowledge the oldest message, leave the rest.
        q.task_done(q.get(timeout=5))
        q.dispose()
        assert len(_journal_files(tmp_path)) <= 2  # one snapshot + the run just ended
    left = PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work()
    assert len(left) == 12 and left[-2:] == ["a11", "b11"]
    assert len(_journal_files(tmp_path)) == 1


def test_mark_done_gives_up_on_messages(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    ids = q.put_many(["poison", "ok"])
    q.dispose()
    assert pickup.mark_done(tmp_path, "jobs", [ids[0], "unknown"]) == [ids[0]]
    assert PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == ["ok"]


# ------------------------------------------------------------------ pickup admin
def test_inspect_reports_runs_counts_and_is_json(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put_many(["a", "b", "c"])
    q.task_done(q.get(timeout=5))
    q.close()
    q.dispose()
    assert pickup.is_pickup_dir(tmp_path) and not pickup.is_pickup_dir(tmp_path / "nope")
    report = pickup.inspect(tmp_path)
    data = json.loads(json.dumps(report.to_dict()))
    (prefix,) = data["prefixes"]
    assert (prefix["requested"], prefix["completed"], prefix["outstanding"]) == (3, 1, 2)
    (run,) = prefix["runs"]
    assert run["closed"] and not run["live"] and run["state"] == "unfinished"
    assert data["ok"] and data["issues"] == []
    assert pickup.list_prefixes(tmp_path) == ["jobs"]


def test_requeue_consolidates_dead_runs_and_lists_outstanding(tmp_path):
    for _ in range(3):
        q = PersistentQueue("jobs", tmp_path, compact=False)
        q.put("x")
        q.dispose()
    dry = pickup.requeue(tmp_path, dry_run=True)
    assert len(dry.outstanding) == 3 and len(_journal_files(tmp_path)) == 3
    done = pickup.requeue(tmp_path)
    assert len(done.outstanding) == 3 and len(done.snapshots) == 1
    assert len(_journal_files(tmp_path)) == 1
    assert [m.decoded() for m in pickup.outstanding(tmp_path)] == ["x", "x", "x"]
    assert json.dumps(done.to_dict())


def test_repair_cuts_torn_tails_of_dead_writers_keeping_the_bytes(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put("a")
    path = q.journal_path
    q.dispose()
    with open(path, "ab") as f:
        f.write(b"deadbeef 2 P {\"i\":")
    report = pickup.verify(tmp_path)
    assert report.ok and [i.kind for i in report.issues] == ["torn"]
    fixed = pickup.repair(tmp_path)
    assert fixed.ok and len(fixed.cut) == 1
    assert open(fixed.cut[0], "rb").read() == b"deadbeef 2 P {\"i\":"
    assert pickup.verify(tmp_path).issues == []


# ------------------------------------------------------------------ compat
PYMPX_INIT = ["self", "pickup_file_prefix", "current_pickup_dir", "previous_pickup_dir",
              "formatter_list", "converter_list", "number_of_workers", "use_queue"]


def test_compat_signatures_match_pympx():
    params = list(pyinspect.signature(CompatQueue.__init__).parameters)
    assert params == PYMPX_INIT
    sig = pyinspect.signature(CompatQueue.__init__).parameters
    assert sig["number_of_workers"].default == 1 and sig["use_queue"].default is True
    assert sig["formatter_list"].default == [CompatQueue.return_same]
    expected = {
        "put": ["self", "obj", "block", "timeout"], "put_nowait": ["self", "obj"],
        "get": ["self", "block", "timeout"], "get_nowait": ["self"],
        "task_done": ["self", "obj"], "mark_all_work_done": ["self"], "close": ["self"],
        "fail": ["self"], "dispose": ["self"], "requeue_unprocessed_work": ["self"],
        "get_list_of_outstanding_work": ["self"],
    }
    for name, names in expected.items():
        assert list(pyinspect.signature(getattr(CompatQueue, name)).parameters) == names, name


def test_compat_queue_behaves_like_pympx(tmp_path):
    q = CompatQueue("jobs", str(tmp_path), number_of_workers=2)
    q.put(("a", 1))
    q.put(0)  # pympx's old DONE value is a normal message now
    assert q.get() == ("a", 1)
    q.task_done(("a", 1))
    q.dispose()
    q2 = CompatQueue("jobs", str(tmp_path), str(tmp_path), number_of_workers=1)
    assert q2.list_of_outstanding_work == [0]
    assert q2.requeue_unprocessed_work() is None
    assert q2.requeued_work == [0]
    q2.put(0)  # pympx skips puts of requeued work
    q2.put(DONE)  # pympx allowed putting DONE by hand
    assert [q2.get(), q2.get()] == [0, DONE]


def test_compat_iteration_raises_queue_failed_on_failed(tmp_path):
    q = CompatQueue("jobs", str(tmp_path))
    q.put("x")
    q.fail()
    with pytest.raises(QueueFailed):
        for body in q:
            q.task_done(body)


def test_work_of_a_run_still_running_is_not_requeued_nor_compacted(tmp_path, caplog):
    running = PersistentQueue("jobs", tmp_path)
    running.put_many(["in progress", "waiting"])  # its writer is alive (not disposed)
    with caplog.at_level("WARNING", logger="pympx_queues"):
        q2 = PersistentQueue("jobs", tmp_path)
    assert q2.get_outstanding_messages() == []
    assert "still" in caplog.text and len(_journal_files(tmp_path)) == 1
    running.dispose()  # now it is over: its unfinished work is found
    assert PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == [
        "in progress", "waiting"]


def test_repair_removes_unpublished_temp_journals_of_dead_writers(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put("a")
    name = os.path.basename(q.journal_path)
    q.dispose()
    leftover = tmp_path / f".{name[:-8]}0.journal.tmp"
    leftover.write_bytes(b"header only")
    assert pickup.inspect(tmp_path).leftovers == [str(leftover)]
    assert pickup.repair(tmp_path).removed == [str(leftover)]
    assert not leftover.exists() and PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == ["a"]


@pytest.mark.parametrize("io", ["write", "mapped"])
def test_after_a_failed_journal_write_the_next_put_uses_a_new_journal(tmp_path, monkeypatch,
                                                                      io):
    import errno

    if io == "write":  # a file system that cannot map the journal: one write(2) per record
        def no_map(*args):
            raise OSError(errno.ENODEV, "No such device")

        monkeypatch.setattr(_fs, "map_append_window", no_map)
    else:  # a full disk when the mapped window is used up: write(2) gets ENOSPC too
        monkeypatch.setattr(jr.JournalWriter, "MAP_FIRST", 4096)
    q = PersistentQueue("jobs", tmp_path)
    first = q.put("before")
    if io == "mapped":
        assert q._writer.mapped
        real_map = _fs.map_append_window

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(_fs, "map_append_window", full)
        while q._writer._pos + 150 < q._writer._map_end:
            q.task_done(q.get(timeout=5))  # fill the window (puts and acks)
            first = q.put("before")
    real = _fs.append
    state = {"fail": True}

    def disk_full_once(fd, data, path=""):
        if state.pop("fail", False):
            os.write(fd, data[:5])  # a short write, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, path)

    monkeypatch.setattr(_fs, "append", disk_full_once)
    with pytest.raises(OSError):
        q.put("failed" * 50)  # longer than what is left of the mapped window
    if io == "mapped":
        monkeypatch.setattr(_fs, "map_append_window", real_map)
    second = q.put("after")  # space is back: a fresh journal takes it
    assert second is not None and len(_journal_files(tmp_path)) == 2
    monkeypatch.undo()
    bodies = [q.get(timeout=5) for _ in range(2)]
    assert bodies == ["before", "after"]
    q.task_done("before")
    q.dispose()
    left = PersistentQueue("jobs", tmp_path).get_outstanding_messages()
    assert [m.body for m in left] == ["after"] and first not in [m.id for m in left]


def test_put_many_together_travels_as_one_item_and_join_counts_it_once(tmp_path):
    q = PersistentQueue("jobs", tmp_path, number_of_workers=1)
    ids = q.put_many(["a", "b", "c"], together=True)
    q.put("d")
    assert q.qsize() == 2  # one batch item + one message
    assert q.get_many(10, timeout=5) == ["a", "b", "c"]  # only the batch
    assert q.get(timeout=5) == "d"
    q.task_done("d")
    q.task_done_many(["a", "b"])
    q.close()
    m = q.get_message(timeout=5)
    assert m is DONE
    q.task_done(id=ids[2])
    q.join()  # returns: the batch is fully acknowledged
    q.dispose()
    assert PersistentQueue("jobs", tmp_path).get_outstanding_messages() == []


def test_unacknowledged_part_of_a_together_batch_is_outstanding_next_run(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    ids = q.put_many(["a", "b", "c"], together=True)
    q.task_done(q.get(timeout=5))
    q.dispose()  # "crash" holding b (got) and c (still buffered)
    assert [m.id for m in PersistentQueue("jobs", tmp_path).get_outstanding_messages()] == \
        ids[1:]


def test_ids_given_by_the_caller_are_journaled_safely(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put_many(["x", "y"])
    # Not ids of this queue: refused with nothing written, the journal stays readable.
    with pytest.raises(ValueError, match="unknown message id"):
        q.task_done(id='odd "id"\n')
    with pytest.raises(ValueError, match="unknown message id"):
        q.task_done(Message('another"one', "z"))
    q.dispose()
    assert pickup.verify(tmp_path).issues == []
    assert PersistentQueue("jobs", tmp_path).get_list_of_outstanding_work() == ["x", "y"]


def test_mark_all_work_done_drains_until_done_and_acknowledges_everything(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put_many(["a", "b"])
    q.put_nowait("c")
    q.close()
    q.mark_all_work_done()
    q.join()
    q.dispose()
    assert PersistentQueue("jobs", tmp_path).get_outstanding_messages() == []


def test_with_block_releases_this_processes_journal(tmp_path):
    with PersistentQueue("jobs", tmp_path) as q:
        q.put("x")
        path = q.journal_path
        assert _fs.is_flocked(path) is True
        assert q.get(timeout=5) == "x"
    assert _fs.is_flocked(path) is False  # finished: a later run may recover it
