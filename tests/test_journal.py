"""The journal format, writer, recovery and compaction (single process, real files)."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest

from pympx_queues import _fs
from pympx_queues import journal as jr
from pympx_queues.errors import JournalCorruptError

pytestmark = pytest.mark.timeout(60)


def _journals(d):
    return sorted(n for n in os.listdir(d) if n.endswith(jr.JOURNAL_SUFFIX))


def _write_run(d, prefix="q", puts=(), dones=(), close=False, durability="flush"):
    """A finished (closed fd) writer of a new run; returns (writer, ids)."""
    w = jr.JournalWriter(str(d), prefix, jr.new_run_id(), durability=durability)
    recs = [(jr.KIND_PUT, jr.dumps({"i": i, "m": jr.encode_value(m)})) for i, m in puts]
    recs += [(jr.KIND_DONE, jr.dumps({"i": i})) for i in dones]
    if close:
        recs.append((jr.KIND_CLOSE, jr.dumps({})))
    w.append(recs)
    w.close()
    return w


# ------------------------------------------------------------------ format
def test_record_format_parse_round_trip_and_layout():
    line = jr.format_record(7, jr.KIND_PUT, jr.dumps({"i": "a.1", "m": "héllo\nworld"}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    crc, rest = line[:-1].split(b" ", 1)
    assert len(crc) == 8 and rest.startswith(b"7 P ")
    assert jr.parse_record(line[:-1]) == (7, "P", {"i": "a.1", "m": "héllo\nworld"})


@pytest.mark.parametrize("mangle", [
    lambda b: b[:-3],  # truncated
    lambda b: b[:12] + bytes([b[12] ^ 1]) + b[13:],  # one bit flipped
    lambda b: b"zzzzzzzz" + b[8:],  # checksum not hex
    lambda b: b"",
])
def test_damaged_record_is_rejected(mangle):
    line = jr.format_record(1, jr.KIND_DONE, jr.dumps({"i": "x"}))[:-1]
    with pytest.raises(jr.RecordError):
        jr.parse_record(mangle(line))


VALUES = [
    0, -1, False, True, None, "", "DONE", 3.5, "ünïcødé\n\ttab", [], {}, (),
    (1, "a", b"\x00\xff"), [1, (2, (3, b"z"))], {"a": (1, 2), "b": [b"x"]},
    {1: "int key", (1, 2): "tuple key"}, {"__tuple__": [1]}, {"__bytes__": "x"},
    {1, 2, 3}, frozenset({"a"}), bytearray(b"ab"), 2 ** 70,
]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:30] for v in VALUES])
def test_values_round_trip_through_json(value):
    text = jr.dumps(jr.encode_value(value))
    assert "\n" not in text
    back = jr.decode_value(json.loads(text))
    assert back == value and type(back) is (bytes if type(value) is bytearray else type(value))


def test_unserialisable_value_raises_type_error():
    with pytest.raises(TypeError, match="cannot journal"):
        jr.encode_value({"a": object()})
    with pytest.raises(TypeError):
        jr.encode_value(lambda: 1)


def test_journal_name_format_parse_pair():
    name = jr.format_journal_name("my.queue", jr.new_run_id(), 1234, "abcdef012345")
    parsed = jr.parse_journal_name(name)
    assert parsed is not None and parsed.prefix == "my.queue" and parsed.pid == "1234"
    assert parsed.format() == name
    for bad in ["x.journal", ".hidden.20260101T000000000000-abcdef.1.abcdef01.journal",
                "q.notarun.1.abcdef01.journal", "q.20260101T000000000000-abcdef.x1.abcdef01.journal"]:
        assert jr.parse_journal_name(bad) is None


# ------------------------------------------------------------------ writer
def test_writer_never_reopens_an_existing_journal_pid_reuse(tmp_path):
    w = _write_run(tmp_path, puts=[("a.0", "keep me")])
    before = open(w.path, "rb").read()
    # Same pid and random id as the old journal (a reused pid that drew the same id):
    with pytest.raises(FileExistsError):
        jr.JournalWriter(str(tmp_path), "q", w.name.run, durability="flush",
                         pid=int(w.name.pid), rand=w.rand)
    assert open(w.path, "rb").read() == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_writer_holds_a_lock_while_open_and_releases_it_on_close(tmp_path):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
    assert _fs.is_flocked(w.path) is True
    w.close()
    assert _fs.is_flocked(w.path) is False


def test_a_journal_read_while_its_writer_ran_stays_live_after_the_writer_closes(tmp_path):
    """The lock is tested before the bytes are read: a writer that closes right after the
    read must not make the prefix we read look like the whole history of a dead run (the
    CLI's requeue once reported a live run's unfinished work as ready)."""
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
    w.append([(jr.KIND_PUT, jr.dumps({"i": "1", "m": "x"}))])
    early = jr.scan_journal(w.path)
    w.append([(jr.KIND_DONE, jr.dumps({"i": "1"}))])
    w.close()
    assert early.writer_alive() is True
    history = jr.History()
    history.add_scan(early)
    assert any(run.live for run in history.runs.values())
    late = jr.scan_journal(w.path)
    assert late.writer_alive() is False


def test_fsync_mode_group_commit_shares_fsyncs_between_threads(tmp_path, monkeypatch):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="fsync")
    calls = []
    real = _fs.fsync_fd
    gate = threading.Event()

    def slow_fsync(fd, path=""):
        calls.append(path)
        gate.wait(0.02)
        real(fd, path)

    monkeypatch.setattr(_fs, "fsync_fd", slow_fsync)

    def worker(n):
        for i in range(20):
            w.append([(jr.KIND_DONE, jr.dumps({"i": f"{n}.{i}"}))])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    w.close()
    scan = jr.scan_journal(w.path)
    assert len(scan.records) == 160 and not scan.problems
    assert 0 < len(calls) < 160  # every append covered by an fsync, far fewer fsyncs


def test_fsync_failure_is_fatal_and_never_retried(tmp_path, monkeypatch):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="fsync")

    def broken(fd, path=""):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_fs, "fsync_fd", broken)
    with pytest.raises(OSError):
        w.append([(jr.KIND_DONE, jr.dumps({"i": "a"}))])
    monkeypatch.undo()
    with pytest.raises(jr.JournalBroken):
        w.append([(jr.KIND_DONE, jr.dumps({"i": "b"}))])
    w.close()


# ------------------------------------------------------------------ recovery
def test_torn_tail_is_reported_then_cut_and_saved_when_writer_is_dead(tmp_path, caplog):
    w = _write_run(tmp_path, puts=[("a.0", 1), ("a.1", 2)])
    good = os.path.getsize(w.path)
    torn = jr.format_record(3, jr.KIND_PUT, jr.dumps({"i": "a.2", "m": 3}))[:-7]
    with open(w.path, "ab") as f:
        f.write(torn)
    scan = jr.scan_journal(w.path)
    assert [r[2]["i"] for r in scan.records] == ["a.0", "a.1"]
    assert scan.torn is not None and scan.torn.offset == good
    with caplog.at_level(logging.WARNING, logger="pympx_queues.journal"):
        history, actions = jr.compact(str(tmp_path), "q")
    assert "torn" in caplog.text and str(good) in caplog.text
    assert os.path.getsize(w.path) == good
    side = actions["cut"][0]
    assert open(side, "rb").read() == torn
    assert [r.id for r in history.outstanding()] == ["a.0", "a.1"]
    # Recovery is idempotent: nothing more to cut.
    assert jr.compact(str(tmp_path), "q")[1]["cut"] == []


def test_zero_filled_tail_of_a_version_1_journal_after_power_loss_is_a_torn_tail(tmp_path):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush",
                         header={"v": 1})
    w.append([(jr.KIND_PUT, jr.dumps({"i": "a.0", "m": 1}))])
    w.close()
    with open(w.path, "ab") as f:
        f.write(b"\0" * 100)
    assert jr.scan_journal(w.path).torn is not None


def test_zero_filled_tail_of_a_version_2_journal_is_reserved_space_cut_at_recovery(tmp_path):
    # A flush-mode writer maps a reserved window: killed before close(), its journal
    # ends in NUL bytes that never held a record.  Neither torn nor corrupt; recovery
    # cuts them once the writer is gone, with nothing to save.
    w = _write_run(tmp_path, puts=[("a.0", 1)])
    good = os.path.getsize(w.path)
    with open(w.path, "ab") as f:
        f.write(b"\0" * 100)
    scan = jr.scan_journal(w.path)
    assert scan.problems == [] and scan.reserved == 100 and scan.good_end == good
    assert [r[2]["i"] for r in scan.records] == ["a.0"]
    history, actions = jr.compact(str(tmp_path), "q")
    assert actions["cut"] == [] and os.path.getsize(w.path) == good
    assert [r.id for r in history.outstanding()] == ["a.0"]


def test_torn_tail_of_a_live_writer_is_never_cut(tmp_path):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
    w.append([(jr.KIND_PUT, jr.dumps({"i": "a", "m": 1}))])
    with open(w.path, "ab") as f:
        f.write(b"0000")
    size = os.path.getsize(w.path)
    jr.compact(str(tmp_path), "q")
    assert os.path.getsize(w.path) == size
    w.close()


def test_corrupt_middle_record_fails_closed_with_file_and_offset(tmp_path):
    w = _write_run(tmp_path, puts=[("a.0", 1), ("a.1", 2), ("a.2", 3)])
    data = bytearray(open(w.path, "rb").read())
    lines = data.split(b"\n")
    offset = len(lines[0]) + 1 + len(lines[1]) + 1  # the second put record
    data[offset + 15] ^= 0x01
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(JournalCorruptError) as info:
        jr.scan_journal(w.path)
    assert info.value.path == w.path and info.value.offset == offset
    with pytest.raises(JournalCorruptError):
        jr.compact(str(tmp_path), "q")
    assert os.path.exists(w.path)  # nothing deleted or truncated
    lax = jr.scan_journal(w.path, strict=False)
    assert [p.kind for p in lax.problems] == ["corrupt"]
    assert [r[2]["i"] for r in lax.records] == ["a.0", "a.2"]


def test_sequence_gap_is_corruption(tmp_path):
    w = _write_run(tmp_path, puts=[("a.0", 1), ("a.1", 2), ("a.2", 3)])
    lines = open(w.path, "rb").read().split(b"\n")
    del lines[2]
    open(w.path, "wb").write(b"\n".join(lines))
    with pytest.raises(JournalCorruptError, match="sequence"):
        jr.scan_journal(w.path)


# ------------------------------------------------------------------ history
def test_outstanding_is_all_requested_minus_all_completed_across_runs(tmp_path):
    _write_run(tmp_path, puts=[("a.0", 1), ("a.1", 2), ("a.2", 3)], dones=["a.0"])
    # A later run requeues a.1 and a.2 (same ids), completes a.1, then crashes.
    _write_run(tmp_path, puts=[("a.1", 2), ("a.2", 3), ("b.0", 4)], dones=["a.1"])
    history = jr.scan_dirs([str(tmp_path)], "q")
    assert [r.id for r in history.outstanding()] == ["a.2", "b.0"]


def test_finished_runs_are_compacted_away_bounded_disk(tmp_path):
    for n in range(30):
        _write_run(tmp_path, puts=[(f"r{n}.0", n)], dones=[f"r{n}.0"], close=True)
    history, actions = jr.compact(str(tmp_path), "q")
    assert history.outstanding() == [] and len(actions["deleted"]) == 30
    assert _journals(tmp_path) == []


def test_many_crashed_runs_merge_into_one_snapshot_keeping_outstanding_and_keys(tmp_path):
    for n in range(10):
        w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
        w.append([(jr.KIND_PUT, jr.dumps({"i": f"r{n}.0", "m": [n], "k": f"k{n}"})),
                  (jr.KIND_PUT, jr.dumps({"i": f"r{n}.1", "m": [n, n], "k": f"j{n}"})),
                  (jr.KIND_DONE, jr.dumps({"i": f"r{n}.1"}))])
        w.close()
    before = jr.scan_dirs([str(tmp_path)], "q")
    history, actions = jr.compact(str(tmp_path), "q")
    assert len(_journals(tmp_path)) == 1 and actions["snapshot"]
    after = jr.scan_dirs([str(tmp_path)], "q")
    assert [(r.id, r.body, r.key) for r in after.outstanding()] == \
        [(r.id, r.body, r.key) for r in before.outstanding()]
    assert after.keys_done() == before.keys_done() == {f"j{n}" for n in range(10)}
    # Compacting again changes nothing (G5).
    jr.compact(str(tmp_path), "q")
    again = jr.scan_dirs([str(tmp_path)], "q")
    assert [r.id for r in again.outstanding()] == [r.id for r in before.outstanding()]


def test_crash_in_the_middle_of_compaction_loses_nothing(tmp_path, monkeypatch):
    for n in range(4):
        _write_run(tmp_path, puts=[(f"r{n}.0", n), (f"r{n}.1", n)], dones=[f"r{n}.0"])
    expected = [r.id for r in jr.scan_dirs([str(tmp_path)], "q").outstanding()]
    real = _fs.unlink_regular
    calls = []

    def crash_after_one(path):
        if calls:
            raise KeyboardInterrupt("simulated crash")
        calls.append(path)
        return real(path)

    monkeypatch.setattr(_fs, "unlink_regular", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        jr.compact(str(tmp_path), "q")
    monkeypatch.undo()
    assert [r.id for r in jr.scan_dirs([str(tmp_path)], "q").outstanding()] == expected
    jr.compact(str(tmp_path), "q")
    assert [r.id for r in jr.scan_dirs([str(tmp_path)], "q").outstanding()] == expected
    assert len(_journals(tmp_path)) == 1


def test_survivor_of_reordered_compaction_unlinks_never_resurrects_done_work(tmp_path):
    j1 = _write_run(tmp_path, puts=[("a.0", "a"), ("a.1", "b")])
    j2 = _write_run(tmp_path, dones=["a.0"])
    saved = open(j1.path, "rb").read()
    _, actions = jr.compact(str(tmp_path), "q")
    assert actions["snapshot"] and not os.path.exists(j1.path)
    # A power cut kept the unlink of j2 (the ack) but lost the unlink of j1 (the put).
    with open(j1.path, "wb") as f:
        f.write(saved)
    assert [r.id for r in jr.scan_dirs([str(tmp_path)], "q").outstanding()] == ["a.1"]
    jr.compact(str(tmp_path), "q")  # and the survivor is cleaned up
    assert not os.path.exists(j1.path) and len(_journals(tmp_path)) == 1
    assert not os.path.exists(j2.path)


def test_survivor_of_a_deleted_finished_history_never_resurrects_done_work(tmp_path, monkeypatch):
    j1 = _write_run(tmp_path, puts=[("a.0", "a")])
    _write_run(tmp_path, dones=["a.0"], close=True)
    real = _fs.unlink_regular
    calls = []

    def power_cut_after_first_unlink(path):
        if calls:
            raise KeyboardInterrupt("power cut")
        calls.append(path)
        return real(path)

    # Deletion order puts j1 first: simulate instead that only the ack's file went.
    saved = open(j1.path, "rb").read()
    monkeypatch.setattr(_fs, "unlink_regular", power_cut_after_first_unlink)
    with pytest.raises(KeyboardInterrupt):
        jr.compact(str(tmp_path), "q")
    monkeypatch.undo()
    if not os.path.exists(j1.path):
        with open(j1.path, "wb") as f:
            f.write(saved)
    history = jr.scan_dirs([str(tmp_path)], "q")
    assert history.outstanding() == [] and history.is_complete()
    jr.compact(str(tmp_path), "q")
    assert _journals(tmp_path) == []


# ------------------------------------------------------------------ mapped appends (flush)
def test_dumps_value_fast_paths_write_what_the_generic_encoder_writes():
    values = ["a\"b\n\x00é\u2028", 5, -3, 10 ** 30, True, None, 1.5, (1, "a"), b"xy", ["q"],
              {"k": 1}, (), [], (1, 2.5, None, True, "x"), [1, (2,)], ((1,),), [b"x"],
              {"__tuple__": [1]}]
    for value in values:
        assert jr.dumps_value(value) == jr.dumps(jr.encode_value(value)), value
    # Both refuse what strict JSON cannot hold, with the same error (never a bare inf).
    for value in ((float("inf"),), [float("nan")]):
        with pytest.raises(ValueError) as fast:
            jr.dumps_value(value)
        with pytest.raises(ValueError) as generic:
            jr.dumps(jr.encode_value(value))
        assert str(fast.value) == str(generic.value)


def test_flush_writer_maps_its_journal_readers_stop_at_the_reserved_tail_close_cuts_it(
        tmp_path, monkeypatch):
    monkeypatch.setattr(jr.JournalWriter, "MAP_FIRST", 4096)  # cross several windows
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
    for i in range(300):
        w.append_one(jr.KIND_PUT, jr.dumps({"i": f"a.{i:x}", "m": "x" * i}))
    assert w.mapped
    live = jr.scan_journal(w.path)  # another reader while the writer is alive
    assert live.problems == [] and live.reserved > 0 and len(live.records) == 300
    assert [r[0] for r in live.records] == list(range(1, 301))
    w.close()
    scan = jr.scan_journal(w.path)
    assert scan.reserved == 0 and os.path.getsize(w.path) == scan.good_end == live.good_end
    assert len(scan.records) == 300


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_records_of_a_mapped_writer_killed_with_sigkill_survive_and_recovery_cuts_the_tail(
        tmp_path):
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from pympx_queues import journal as jr\n"
        "jr.JournalWriter.MAP_FIRST = 4096\n"
        "w = jr.JournalWriter(sys.argv[1], 'q', jr.new_run_id(), durability='flush')\n"
        "for i in range(500):\n"
        "    w.append_one(jr.KIND_PUT, jr.dumps({'i': 'a.%x' % i, 'm': i}))\n"
        "assert w.mapped\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=60)
    assert res.returncode == -signal.SIGKILL
    (path,) = [os.path.join(tmp_path, n) for n in _journals(tmp_path)]
    scan = jr.scan_journal(path)
    assert scan.problems == [] and scan.reserved > 0 and len(scan.records) == 500
    history, actions = jr.compact(str(tmp_path), "q")
    assert actions["cut"] == [] and os.path.getsize(path) == scan.good_end
    assert [r.id for r in history.outstanding()] == [f"a.{i:x}" for i in range(500)]


def test_tracer_installed_while_mapped_switches_to_write_with_no_gap(tmp_path):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
    w.append_one(jr.KIND_PUT, jr.dumps({"i": "a.0", "m": 0}))
    assert w.mapped
    events = []
    _fs.set_tracer(lambda op, *args: events.append(op))
    try:
        w.append_one(jr.KIND_PUT, jr.dumps({"i": "a.1", "m": 1}))
        w.append([(jr.KIND_DONE, jr.dumps({"i": "a.0"}))])
    finally:
        _fs.set_tracer(None)
    assert events == ["write", "write"] and not w.mapped
    scan = jr.scan_journal(w.path)  # the reserved tail was cut before the first write
    assert scan.problems == [] and scan.reserved == 0 and len(scan.records) == 3
    w.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_forgets_the_mapping_without_touching_the_parents_journal(tmp_path):
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="flush")
    w.append_one(jr.KIND_PUT, jr.dumps({"i": "a.0", "m": 0}))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            w.forget()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert w.mapped and _fs.is_flocked(w.path)  # still ours, still locked
    w.append_one(jr.KIND_PUT, jr.dumps({"i": "a.1", "m": 1}))
    w.close()
    scan = jr.scan_journal(w.path)
    assert scan.problems == [] and [r[2]["i"] for r in scan.records] == ["a.0", "a.1"]


# ------------------------------------------------------------------ values the journal refuses
def test_a_container_that_contains_itself_is_a_type_error_naming_it_not_a_recursion_error():
    loop = [1]
    loop.append(loop)
    me = {}
    me["me"] = me
    for bad, kind in ((loop, "list"), ({"k": loop}, "list"), ((1, [loop]), "list"),
                      (me, "dict"), ({1: me}, "dict")):
        with pytest.raises(TypeError, match=f"cannot journal a {kind} that contains itself"):
            jr.dumps_value(bad)
        with pytest.raises(TypeError, match="contains itself"):
            jr.encode_value(bad)
    shared = [1]  # the same list twice is no cycle
    assert jr.decode_value(json.loads(jr.dumps_value([shared, (shared,)]))) == [[1], ([1],)]


def test_nan_and_infinities_are_refused_naming_the_value_never_written_as_bare_nan():
    for bad, text in ((float("nan"), "nan"), ([1, float("inf")], "inf"),
                      ({"a": (float("-inf"),)}, "-inf"), ({2.5: float("nan")}, "nan")):
        with pytest.raises(ValueError, match=f"cannot journal the float {text}: NaN and "):
            jr.dumps_value(bad)
        with pytest.raises(ValueError, match="NaN and infinities are not JSON"):
            jr.dumps(jr.encode_value(bad))
    assert jr.dumps_value([1.5, -0.0, 1e308]) == "[1.5,-0.0,1e+308]"
    # A journal written before the check may hold a bare NaN: it still reads back.
    seq, kind, payload = jr.parse_record(jr.format_record(1, "P", '{"i":"a","m":NaN}')[:-1])
    assert payload["m"] != payload["m"]
