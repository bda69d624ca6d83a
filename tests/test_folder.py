"""Folder queues in one process: the contract, message by message."""

from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import time

import pytest

from pympx_queues import DONE, FAILED, QueueClosed, QueueFailed, _fs
from pympx_queues.folder import layout as L
from pympx_queues.folder import admin
from pympx_queues.folder import (
    ReadableFolderQueue,
    ReadableGroupedFileFolderQueue,
    WritableFolderQueue,
)

pytestmark = pytest.mark.timeout(60)

FAST = dict(poll_interval=0.05)


def reader(path, **kw):
    opts = dict(FAST)
    opts.update(kw)
    return ReadableFolderQueue(path, **opts)


def ready_names(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".tsv"))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def drain(r, limit=10_000):
    out = []
    for p in r:
        out.append(os.path.basename(r.original_filename_from_wip(p)))
        r.task_done(p)
        assert len(out) <= limit
    return out


# --------------------------------------------------------------------------- basics
def test_put_get_task_done_roundtrip_in_name_order(tmp_path):
    w = WritableFolderQueue(tmp_path)
    for name in ["b.tsv", "a.tsv", "c.tsv"]:
        w.put_data(name, name.upper())
    w.close()
    r = reader(tmp_path)
    got = []
    for p in r:
        assert os.path.dirname(p) == str(tmp_path / "wip")
        with open(p) as f:
            got.append(f.read())
        r.task_done(p)
    assert got == ["A.TSV", "B.TSV", "C.TSV"]
    assert r.get() is DONE  # DONE stays DONE
    assert ready_names(tmp_path) == [] and os.listdir(tmp_path / "wip") == []
    r.close()


def test_claim_name_records_owner_and_keeps_original_name(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("report.2026.tsv", b"x")
    r = reader(tmp_path)
    p = r.get(timeout=5)
    parsed = L.parse_owned(os.path.basename(p))
    assert parsed is not None and parsed.name == "report.2026.tsv"
    assert parsed.owner.pid == os.getpid() and parsed.owner.host == _fs.hostname()
    assert parsed.owner.start == _fs.my_start_time()
    assert p.endswith(".tsv")
    assert r.original_filename_from_wip(p) == str(tmp_path / "report.2026.tsv")
    assert r.wip_filename(tmp_path / "report.2026.tsv") == p
    r.close()


def test_same_name_put_never_overwrites(tmp_path):
    w1 = WritableFolderQueue(tmp_path)
    w2 = WritableFolderQueue(tmp_path, if_exists="rename")
    w1.put_data("x.tsv", b"first")
    with pytest.raises(FileExistsError):
        w1.put_data("x.tsv", b"second")
    assert (tmp_path / "x.tsv").read_bytes() == b"first"
    p2 = w2.put_data("x.tsv", b"third")
    assert os.path.basename(p2) != "x.tsv" and p2.endswith(".tsv")
    assert (tmp_path / "x.tsv").read_bytes() == b"first"
    assert open(p2, "rb").read() == b"third"
    assert os.listdir(tmp_path / "tmp") == []


def test_put_moves_or_copies_a_file(tmp_path):
    q = tmp_path / "q"
    src = tmp_path / "in.tsv"
    src.write_text("moved")
    w = WritableFolderQueue(q)
    w.put(src)
    assert not src.exists() and (q / "in.tsv").read_text() == "moved"
    src2 = tmp_path / "other.tsv"
    src2.write_text("copied")
    w.put(str(src2), copy=True)
    assert src2.exists() and (q / "other.tsv").read_text() == "copied"


def test_put_many_publishes_a_batch_with_one_directory_fsync(tmp_path, monkeypatch):
    w = WritableFolderQueue(tmp_path, durability="fsync")
    calls = []
    orig = _fs.fsync_dir
    monkeypatch.setattr(_fs, "fsync_dir", lambda p: (calls.append(os.fspath(p)), orig(p)))
    paths = w.put_many([(f"m{i}.tsv", b"x") for i in range(20)])
    assert len(paths) == 20 and len(ready_names(tmp_path)) == 20
    assert calls == [str(tmp_path)]


def test_fsync_mode_syncs_data_before_publishing(tmp_path):
    ops = []
    _fs.set_tracer(lambda op, *a: ops.append((op,) + a))
    try:
        w = WritableFolderQueue(tmp_path, durability="fsync")
        ops.clear()
        w.put_data("a.tsv", b"payload")
    finally:
        _fs.set_tracer(None)
    kinds = [o[0] for o in ops]
    assert kinds.index("fsync") < kinds.index("rename") < kinds.index("fsync_dir")


def test_fsync_mode_end_to_end(tmp_path):
    ops = []
    w = WritableFolderQueue(tmp_path, durability="fsync")
    r = reader(tmp_path, durability="fsync", max_retries=1, task_done_directory=tmp_path / "kept")
    _fs.set_tracer(lambda op, *a: ops.append(op))
    try:
        w.put_many([(f"m{i}.tsv", b"x") for i in range(4)])
        a, b, c = r.get(timeout=5), r.get(timeout=5), r.get(timeout=5)
        r.task_done_many([a, b])
        assert r.nack(c, "once") == str(tmp_path / "failed" / "m2.tsv")
        assert r.retry_failed() == [str(tmp_path / "m2.tsv")]
        w.close()
        assert sorted(drain(r)) == ["m2.tsv", "m3.tsv"]
    finally:
        _fs.set_tracer(None)
    assert ops.count("fsync_dir") >= 6 and ops.count("fsync") >= 4
    assert sorted(os.listdir(tmp_path / "kept")) == ["m0.tsv", "m1.tsv", "m2.tsv", "m3.tsv"]
    r.close()


@pytest.mark.parametrize("bad", ["../evil.tsv", "a/b.tsv", "", ".", "..", ".hidden.tsv",
                                 "con.tsv", "nul\x00.tsv", "x\n.tsv", "noext", "x.swp"])
def test_bad_names_are_refused_and_nothing_is_written(tmp_path, bad):
    w = WritableFolderQueue(tmp_path / "q")
    before = {d: sorted(os.listdir(tmp_path / "q" / d)) for d in ("tmp", "wip")}
    with pytest.raises((ValueError, TypeError)):
        w.put_data(bad, b"data")
    assert ready_names(tmp_path / "q") == []
    assert {d: sorted(os.listdir(tmp_path / "q" / d)) for d in ("tmp", "wip")} == before
    assert not (tmp_path / "evil.tsv").exists()


def test_bad_arguments_raise_clear_errors(tmp_path):
    w = WritableFolderQueue(tmp_path)
    with pytest.raises(TypeError):
        w.put_data("a.tsv", object())
    with pytest.raises(ValueError):
        WritableFolderQueue(tmp_path, run_id="has_underscore")
    with pytest.raises(ValueError):
        WritableFolderQueue(tmp_path, durability="sometimes")
    r = reader(tmp_path)
    with pytest.raises(ValueError):
        r.get(timeout=-1)
    with pytest.raises(ValueError):
        reader(tmp_path, expected_producers=0)
    with pytest.raises(ValueError):
        reader(tmp_path, wakeups="telepathy")
    assert ready_names(tmp_path) == []
    r.close()


def test_put_after_close_raises_queue_closed(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.close()
    with pytest.raises(QueueClosed):
        w.put_data("a.tsv", b"x")


def test_get_times_out_with_queue_empty(tmp_path):
    WritableFolderQueue(tmp_path)
    r = reader(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    with pytest.raises(queue.Empty):
        r.get(block=False)
    r.close()


def test_get_does_not_list_the_folder_on_every_call(tmp_path, monkeypatch):
    w = WritableFolderQueue(tmp_path)
    w.put_many([(f"m{i:04d}.tsv", b"x") for i in range(1000)])
    r = reader(tmp_path, rescan_interval=60, recover_interval=60)
    listed = []
    real = _fs.scandir

    def counting(path):
        if os.fspath(path) == str(tmp_path):
            listed.append(1)
        return real(path)

    monkeypatch.setattr(_fs, "scandir", counting)
    for _ in range(500):
        r.task_done(r.get(timeout=5))
    assert len(listed) <= 2, len(listed)  # one listing serves hundreds of gets
    r.close()


def test_put_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "target.tsv"
    target.write_text("secret")
    link = tmp_path / "link.tsv"
    os.symlink(target, link)
    w = WritableFolderQueue(tmp_path / "q")
    with pytest.raises(ValueError):
        w.put(link)
    with pytest.raises(FileNotFoundError):
        w.put(tmp_path / "missing.tsv")
    assert link.is_symlink() and target.read_text() == "secret"
    assert ready_names(tmp_path / "q") == []


def test_hand_dropped_files_are_picked_up(tmp_path):
    r = reader(tmp_path)
    (tmp_path / "by-hand.tsv").write_text("hello")
    p = r.get(timeout=5)
    assert os.path.basename(r.original_filename_from_wip(p)) == "by-hand.tsv"
    r.task_done(p)
    r.close()


def test_symlinks_fifos_and_litter_are_skipped_never_claimed_or_deleted(tmp_path, folder_log):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not touch")
    q = tmp_path / "q"
    w = WritableFolderQueue(q)
    os.symlink(secret, q / "link.tsv")
    os.mkfifo(q / "fifo.tsv")
    litter = [".nfs000123.tsv", ".~lock.a.tsv#", "a.tsv~", "#a.tsv#", "x.tsv.swp", ".hidden.tsv"]
    for n in litter:
        (q / n).write_text("litter")
    (q / "bad\x01name.tsv").write_text("odd")
    w.put_data("real.tsv", b"real")
    w.close()
    r = reader(q)
    got = drain(r)
    assert got == ["real.tsv"]
    assert (q / "link.tsv").is_symlink() and os.path.exists(q / "fifo.tsv")
    assert secret.read_text() == "do not touch"
    for n in litter + ["bad\x01name.tsv"]:
        assert (q / n).exists(), n
    text = folder_log.text
    assert "link.tsv" in text and "fifo.tsv" in text and "bad" in text
    r.close()


# --------------------------------------------------------------------------- retries
def test_nack_returns_message_with_attempt_count_then_dead_letter(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("poison.tsv", b"x")
    r = reader(tmp_path, max_retries=3)
    for attempt in (1, 2):
        p = r.get(timeout=5)
        assert r.attempts(p) == attempt
        back = r.nack(p, RuntimeError(f"boom {attempt}"))
        assert back == str(tmp_path / "poison.tsv")
        side = json.loads((tmp_path / "retries" / "poison.tsv.json").read_text())
        assert side["attempts"] == attempt and f"boom {attempt}" in side["last_error"]
    p = r.get(timeout=5)
    assert r.attempts(p) == 3
    dead = r.nack(p, "final error")
    assert dead == str(tmp_path / "failed" / "poison.tsv")
    err = json.loads((tmp_path / "failed" / "poison.tsv.error.json").read_text())
    assert err["attempts"] == 3 and err["error"] == "final error"
    assert not (tmp_path / "retries" / "poison.tsv.json").exists()
    with pytest.raises(queue.Empty):
        r.get(timeout=0.1)
    info = admin.list_messages(tmp_path, "failed")
    assert [m.name for m in info] == ["poison.tsv"] and info[0].attempts == 3
    # retry_failed brings it back with a fresh count
    assert r.retry_failed() == [str(tmp_path / "poison.tsv")]
    assert not (tmp_path / "failed" / "poison.tsv.error.json").exists()
    p = r.get(timeout=5)
    assert r.attempts(p) == 1
    r.task_done(p)
    r.close()


def test_retry_failed_by_pattern(tmp_path):
    w = WritableFolderQueue(tmp_path)
    for n in ("a1.tsv", "a2.tsv", "b1.tsv"):
        w.put_data(n, b"x")
    r = reader(tmp_path, max_retries=1)
    for _ in range(3):
        r.nack(r.get(timeout=5), "bad")
    assert sorted(os.listdir(tmp_path / "failed")) == sorted(
        ["a1.tsv", "a2.tsv", "b1.tsv", "a1.tsv.error.json", "a2.tsv.error.json",
         "b1.tsv.error.json"])
    back = admin.retry_dead_letters(tmp_path, pattern="a*")
    assert sorted(os.path.basename(b) for b in back) == ["a1.tsv", "a2.tsv"]
    assert ready_names(tmp_path) == ["a1.tsv", "a2.tsv"]
    r.close()


def test_stale_retry_sidecar_of_an_earlier_message_is_not_counted(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("x.tsv", b"1")
    r = reader(tmp_path, max_retries=2)
    r.nack(r.get(timeout=5), "once")
    p = r.get(timeout=5)
    r.task_done(p)  # done; a sidecar may linger if the hint missed it
    w.put_data("x.tsv", b"2")  # a new message with the same name
    p = r.get(timeout=5)
    assert r.attempts(p) == 1
    assert r.nack(p, "first failure of the new one") == str(tmp_path / "x.tsv")
    r.close()


def _nack_in_child(path):
    from pympx_queues.folder import ReadableFolderQueue as R

    q = R(path, wakeups="poll", recover_on_start=False)
    q.nack(q.get(timeout=10), "child says no")
    q.close()


def test_sidecar_written_by_another_consumer_is_cleaned_after_task_done(tmp_path):
    import multiprocessing as mp

    w = WritableFolderQueue(tmp_path)
    r = reader(tmp_path, max_retries=3)
    with pytest.raises(queue.Empty):
        r.get(timeout=0.05)  # listed the empty folder; the observer runs
    w.put_data("x.tsv", b"1")
    child = mp.get_context("spawn").Process(target=_nack_in_child, args=(str(tmp_path),))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    p = r.get(timeout=5)
    assert r.attempts(p) == 2
    r.task_done(p)
    r.recover()  # sweeps any sidecar the hints missed
    assert os.listdir(tmp_path / "retries") == []
    w.put_data("x.tsv", b"2")  # same name, possibly the same recycled inode
    p = r.get(timeout=5)
    assert r.attempts(p) == 1
    r.close()


def test_task_done_directory_keeps_files(tmp_path):
    done = tmp_path / "archive"
    w = WritableFolderQueue(tmp_path / "q")
    w.put_data("a.tsv", b"1")
    w.close()
    r = reader(tmp_path / "q", task_done_directory=done)
    assert drain(r) == ["a.tsv"]
    assert (done / "a.tsv").read_bytes() == b"1"
    r.close()


def test_task_done_twice_raises(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"1")
    r = reader(tmp_path)
    p = r.get(timeout=5)
    r.task_done(p)
    with pytest.raises(FileNotFoundError):
        r.task_done(p)
    with pytest.raises(ValueError):
        r.task_done(tmp_path / "a.tsv")
    r.close()


# --------------------------------------------------------------------------- leases
def plant_claim(q, name, owner, data=b"x", age=0.0):
    path = os.path.join(q, "wip", L.format_owned(owner, name))
    with open(path, "wb") as f:
        f.write(data)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def test_recover_requeues_claims_of_dead_owner_never_live_ones(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("live.tsv", b"l")
    r = reader(tmp_path)
    live = r.get(timeout=5)
    dead = L.Owner(_fs.hostname(), dead_pid(), 1, "deadbeef")
    plant_claim(tmp_path, "orphan.tsv", dead)
    rep = r.recover()
    assert [os.path.basename(p) for p in rep.requeued] == ["orphan.tsv"]
    assert rep.live == 1 and os.path.exists(live)
    again = r.recover()  # idempotent (G5)
    assert again.requeued == [] and again.live == 1
    side = json.loads((tmp_path / "retries" / "orphan.tsv.json").read_text())
    assert side["attempts"] == 1 and "owner died" in side["last_error"]
    r.close()


def test_a_message_whose_consumers_keep_dying_becomes_a_dead_letter(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("poison.tsv", b"x")
    r = reader(tmp_path, max_retries=2, recover_on_start=False)
    claim_and_die = ("import os, signal, sys; from pympx_queues.folder import "
                     "ReadableFolderQueue as R; q = R(sys.argv[1], wakeups='poll', "
                     "recover_on_start=False); q.get(timeout=10); "
                     "os.kill(os.getpid(), signal.SIGKILL)")
    for attempt in (1, 2):
        proc = subprocess.run([sys.executable, "-c", claim_and_die, str(tmp_path)])
        assert proc.returncode == -9 and len(os.listdir(tmp_path / "wip")) == 1
        rep = r.recover()
        if attempt == 1:
            assert [os.path.basename(p) for p in rep.requeued] == ["poison.tsv"]
        else:
            assert rep.requeued == []
            assert [os.path.basename(p) for p in rep.dead_lettered] == ["poison.tsv"]
    err = json.loads((tmp_path / "failed" / "poison.tsv.error.json").read_text())
    assert err["attempts"] == 2 and "owner died" in err["error"]
    assert ready_names(tmp_path) == [] and os.listdir(tmp_path / "wip") == []
    r.close()


def test_recover_completes_nothing_twice_after_a_link_claim_cut_in_half(tmp_path):
    """Without renameat2 a claim is link() then unlink(); a consumer killed between the two
    leaves the same file under its ready name and in wip/: recovery drops the wip name and
    never publishes a second copy."""
    w = WritableFolderQueue(tmp_path)
    w.put_data("x.tsv", b"once")
    dead = L.Owner(_fs.hostname(), dead_pid(), 1, "0ddba11a")
    os.link(tmp_path / "x.tsv", tmp_path / "wip" / L.format_owned(dead, "x.tsv"))
    r = reader(tmp_path, recover_on_start=False)
    rep = r.recover()
    assert [os.path.basename(p) for p in rep.requeued] == ["x.tsv"]
    assert ready_names(tmp_path) == ["x.tsv"] and os.listdir(tmp_path / "wip") == []
    assert os.lstat(tmp_path / "x.tsv").st_nlink == 1
    w.close()
    assert drain(r) == ["x.tsv"]
    r.close()


def test_recover_judges_other_hosts_by_lease(tmp_path):
    WritableFolderQueue(tmp_path)
    r = reader(tmp_path, lease_timeout=60)
    remote = L.Owner("some-other-host", 4242, 99, "cafebabe")
    fresh = plant_claim(tmp_path, "fresh.tsv", remote)
    old = L.Owner("some-other-host", 4243, 99, "cafebab2")
    plant_claim(tmp_path, "expired.tsv", old)
    # ctime cannot be set back; emulate an expired lease with a tiny lease_timeout reader
    r2 = reader(tmp_path, lease_timeout=60)
    assert r2.recover().requeued == []
    assert os.path.exists(fresh)
    r3 = reader(tmp_path, lease_timeout=0.05, recover_on_start=False)
    time.sleep(0.1)  # let the claim age past the 50 ms lease
    assert r3.heartbeat(fresh)  # renewed: stays
    got = sorted(os.path.basename(p) for p in r3.recover().requeued)
    assert got == ["expired.tsv"]
    for q in (r, r2, r3):
        q.close()


def test_background_heartbeat_renews_leases(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("long.tsv", b"x")
    r = reader(tmp_path, lease_timeout=30, heartbeat_interval=0.05)
    p = r.get(timeout=5)
    first = os.lstat(p).st_mtime_ns
    from conftest import wait_for

    wait_for(lambda: os.lstat(p).st_mtime_ns > first, timeout=10, message="heartbeat touch")
    r.task_done(p)
    r.close()
    assert r._hb_thread is None


def test_reset_never_revives_live_claims_unless_forced(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"x")
    r = reader(tmp_path)
    p = r.get(timeout=5)
    w.reset()
    assert os.path.exists(p) and ready_names(tmp_path) == []
    w.reset(force=True)
    assert not os.path.exists(p) and ready_names(tmp_path) == ["a.tsv"]
    with pytest.raises(FileNotFoundError):
        r.task_done(p)
    r.close()


def test_reset_keeps_the_control_files_of_a_run_still_being_drained(tmp_path):
    old = WritableFolderQueue(tmp_path)
    old.put_data("yesterday.tsv", b"x")
    old.fail("yesterday")
    r0 = reader(tmp_path)
    assert r0.get(timeout=5) is FAILED  # seen: that run is over (ENDED)
    w = WritableFolderQueue(tmp_path)
    for n in ("a.tsv", "b.tsv"):
        w.put_data(n, b"x")
    w.close()
    r = reader(tmp_path)
    r.task_done(r.get(timeout=5))
    admin.reset(tmp_path)  # an operator resets while the closed run is drained
    ctrl = os.listdir(tmp_path / "control")
    assert any(n.startswith("DONE__" + w.run_id) for n in ctrl)
    assert not any(old.run_id in n for n in ctrl)  # the ended run's files are gone
    left = drain(r)
    assert left == ["yesterday.tsv", "b.tsv"] or sorted(left) == ["b.tsv", "yesterday.tsv"]
    r.close()
    r0.close()


def test_purge_refuses_with_live_claims_unless_forced(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"x")
    w.put_data("b.tsv", b"x")
    (tmp_path / "notes.txt").write_text("keep me")
    r = reader(tmp_path)
    p = r.get(timeout=5)
    with pytest.raises(RuntimeError):
        w.purge()
    assert os.path.exists(p)
    assert w.purge(force=True) >= 2
    assert ready_names(tmp_path) == [] and os.listdir(tmp_path / "wip") == []
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    # the producer re-registered itself and the queue still works
    w.put_data("c.tsv", b"x")
    assert os.path.basename(r.original_filename_from_wip(r.get(timeout=5))) == "c.tsv"
    r.close()


def test_temp_leftovers_of_a_crashed_put_are_cleaned_on_start(tmp_path):
    WritableFolderQueue(tmp_path)
    dead = L.Owner(_fs.hostname(), dead_pid(), 1, "0badf00d")
    leftover = tmp_path / "tmp" / L.format_owned(dead, "half.tsv")
    leftover.write_bytes(b"half writ")
    mine = tmp_path / "tmp" / L.format_owned(L.new_owner(), "inflight.tsv")
    mine.write_bytes(b"being written")
    WritableFolderQueue(tmp_path)
    assert not leftover.exists() and mine.exists()
    assert ready_names(tmp_path) == []


# --------------------------------------------------------------------------- end of stream
def test_done_only_after_all_registered_producers_closed(tmp_path):
    w1 = WritableFolderQueue(tmp_path, run_id="batch1")
    w2 = WritableFolderQueue(tmp_path, run_id="batch1")
    r = reader(tmp_path)
    w1.put_data("a.tsv", b"1")
    w1.close()
    r.task_done(r.get(timeout=5))
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)
    w2.put_data("b.tsv", b"2")
    w2.close()
    assert drain(r) == ["b.tsv"]
    r.close()


def test_expected_producers_wins_the_done_race(tmp_path):
    r = reader(tmp_path, expected_producers=2)
    w1 = WritableFolderQueue(tmp_path)
    w1.put_data("a.tsv", b"1")
    w1.close()  # closes before the second producer even started
    r.task_done(r.get(timeout=5))
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)  # not DONE: only one of two producers seen
    w2 = WritableFolderQueue(tmp_path)
    w2.put_data("b.tsv", b"2")
    w2.close()
    assert drain(r) == ["b.tsv"]
    r.close()


def test_failed_stops_consumers_and_iteration_raises(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"1")
    r = reader(tmp_path)
    w.fail("upstream broke")
    assert r.get(timeout=5) is FAILED
    with pytest.raises(QueueFailed):
        next(iter(r))
    assert ready_names(tmp_path) == ["a.tsv"]  # nothing dropped
    r.close()


def test_stale_failed_from_an_earlier_run_does_not_stop_a_new_run(tmp_path):
    old = WritableFolderQueue(tmp_path)
    old.fail("yesterday")
    # nobody consumed yesterday's run; today a new producer starts, then consumers
    new = WritableFolderQueue(tmp_path)
    r = reader(tmp_path)
    new.put_data("today.tsv", b"x")
    new.close()
    assert drain(r) == ["today.tsv"]
    r.close()


def test_stale_failed_seen_earlier_does_not_stop_a_consumer_started_first(tmp_path):
    old = WritableFolderQueue(tmp_path)
    old.fail("yesterday")
    r0 = reader(tmp_path)
    assert r0.get(timeout=5) is FAILED  # yesterday's consumer saw it: run ended
    r0.close()
    r = reader(tmp_path)  # today's consumer starts before today's producer
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)
    w = WritableFolderQueue(tmp_path)
    w.put_data("today.tsv", b"x")
    w.close()
    assert drain(r) == ["today.tsv"]
    r.close()


def test_stale_done_from_an_earlier_run_does_not_end_a_new_run(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("yesterday.tsv", b"x")
    w.close()
    r0 = reader(tmp_path)
    assert drain(r0) == ["yesterday.tsv"]
    r0.close()
    r = reader(tmp_path)  # started before today's producer
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)
    w2 = WritableFolderQueue(tmp_path)
    w2.put_data("today.tsv", b"x")
    w2.close()
    assert drain(r) == ["today.tsv"]
    r.close()


def test_reader_with_explicit_run_id_follows_only_that_run(tmp_path):
    other = WritableFolderQueue(tmp_path, run_id="other")
    other.fail("not ours")
    mine = WritableFolderQueue(tmp_path, run_id="mine")
    r = reader(tmp_path, run_id="mine")
    mine.put_data("a.tsv", b"x")
    mine.close()
    assert drain(r) == ["a.tsv"]
    r.close()


def test_context_manager_closes_or_fails(tmp_path):
    with WritableFolderQueue(tmp_path) as w:
        w.put_data("a.tsv", b"x")
    r = reader(tmp_path)
    assert drain(r) == ["a.tsv"]
    with pytest.raises(RuntimeError):
        with WritableFolderQueue(tmp_path / "q2"):
            raise RuntimeError("producer crashed")
    r2 = reader(tmp_path / "q2")
    assert r2.get(timeout=5) is FAILED
    r.close()
    r2.close()


def test_sorting_function_orders_messages(tmp_path):
    w = WritableFolderQueue(tmp_path)
    for n in ("a_3.tsv", "b_1.tsv", "c_2.tsv"):
        w.put_data(n, b"x")
    w.close()
    r = reader(tmp_path, sorting_function=lambda n: n.split("_")[1])
    assert drain(r) == ["b_1.tsv", "c_2.tsv", "a_3.tsv"]
    r.close()


# --------------------------------------------------------------------------- wake-ups
@pytest.mark.parametrize("mode", ["events", "watchdog"])
def test_event_wakeup_beats_a_long_poll_interval(tmp_path, mode):
    w = WritableFolderQueue(tmp_path)
    r = ReadableFolderQueue(tmp_path, wakeups=mode, poll_interval=60)
    with pytest.raises(queue.Empty):
        r.get(timeout=0.3)  # observer running, folder listed
    result = {}

    def consume():
        t0 = time.monotonic()
        result["path"] = r.get(timeout=30)
        result["waited"] = time.monotonic() - t0

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)  # the consumer is blocked in get()
    w.put_data("wake.tsv", b"x")
    t.join(40)
    assert "path" in result
    # A poll would only come after 60 s (capped by the 30 s timeout): an event woke it.
    assert result["waited"] < 20
    r.close()


def test_an_event_queue_overflow_makes_the_consumer_list_the_folder_again(tmp_path):
    w = WritableFolderQueue(tmp_path)
    # poll mode: no real events race with the simulated ones below
    r = reader(tmp_path, rescan_interval=3600, poll_interval=3600, wakeups="poll")
    w.put_data("a.tsv", b"x")
    w.put_data("b.tsv", b"x")
    r.task_done(r.get(timeout=5))  # a.tsv; b.tsv stays in the cached listing

    def drop(name):  # a file whose event is lost
        (tmp_path / name).write_bytes(b"x")
        r._wakeups.names()

    def next_name():
        p = r.get(timeout=5)
        r.task_done(p)
        return os.path.basename(r.original_filename_from_wip(p))

    drop("0-first.tsv")
    r._wakeups._on_inotify(-1, "")  # the kernel reports IN_Q_OVERFLOW: list again
    assert next_name() == "0-first.tsv"
    drop("00-unseen.tsv")  # no overflow reported: the cached listing is used
    assert next_name() == "b.tsv"
    assert next_name() == "00-unseen.tsv"  # found when the listing ran dry
    r.close()


def test_poll_mode_has_no_observer_threads(tmp_path):
    w = WritableFolderQueue(tmp_path)
    before = threading.active_count()
    r = reader(tmp_path, wakeups="poll")
    w.put_data("a.tsv", b"x")
    assert r.get(timeout=5)
    assert threading.active_count() == before
    r.close()


def test_close_stops_observer_threads(tmp_path):
    WritableFolderQueue(tmp_path)
    before = set(threading.enumerate())
    fds_before = len(os.listdir("/proc/self/fd"))
    readers = [reader(tmp_path, wakeups=m) for m in ("events", "events")]
    for r in readers:
        with pytest.raises(queue.Empty):
            r.get(timeout=0.05)
    assert len(set(threading.enumerate()) - before) >= 2
    for r in readers:
        r.close()
    from conftest import wait_for

    wait_for(lambda: not (set(threading.enumerate()) - before), timeout=10,
             message="observer threads to stop")
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # inotify fds and pipes closed


def test_close_stops_the_watchdog_observer(tmp_path):
    WritableFolderQueue(tmp_path)
    before = set(threading.enumerate())
    r = reader(tmp_path, wakeups="watchdog")
    with pytest.raises(queue.Empty):
        r.get(timeout=0.05)
    assert set(threading.enumerate()) - before
    r.close()
    from conftest import wait_for

    wait_for(lambda: not (set(threading.enumerate()) - before), timeout=10,
             message="watchdog threads to stop")


def test_readers_and_writers_pickle_without_runtime_state(tmp_path):
    w = WritableFolderQueue(tmp_path)
    r = reader(tmp_path)
    with pytest.raises(queue.Empty):
        r.get(timeout=0.05)  # starts the observer
    r2 = pickle.loads(pickle.dumps(r))
    w2 = pickle.loads(pickle.dumps(w))
    assert r2._wakeups._observer is None and r2.claims == []
    w2.put_data("a.tsv", b"x")
    p = r2.get(timeout=5)
    r2.task_done(p)
    r.close()
    r2.close()


# --------------------------------------------------------------------------- admin
def test_status_reports_counts_owners_and_producers(tmp_path):
    w = WritableFolderQueue(tmp_path)
    for i in range(3):
        w.put_data(f"m{i}.tsv", b"x")
    r = reader(tmp_path, max_retries=1)
    live = r.get(timeout=5)
    r.nack(r.get(timeout=5), "bad")  # dead letter
    plant_claim(tmp_path, "orphan.tsv", L.Owner(_fs.hostname(), dead_pid(), 1, "deadbeef"))
    st = admin.status(tmp_path)
    assert (st.ready, st.wip_live, st.wip_stale, st.dead_letters) == (1, 1, 1, 1)
    assert {c.name for c in st.claims} == {os.path.basename(r.original_filename_from_wip(live)),
                                           "orphan.tsv"}
    assert st.producers[0].state == "open" and st.producers[0].alive is True
    d = st.to_dict()
    assert json.loads(json.dumps(d))["ready"] == 1
    assert admin.requeue_stale(tmp_path, dry_run=True) == ["orphan.tsv"]
    with pytest.raises(ValueError):
        admin.requeue_stale(tmp_path, include_live=True)
    assert [os.path.basename(p) for p in admin.requeue_stale(tmp_path)] == ["orphan.tsv"]
    msg = admin.show_message(tmp_path, "orphan.tsv")
    assert msg.state == "ready" and msg.attempts == 1 and "owner died" in msg.last_error
    r.close()


def test_close_producer_for_a_producer_that_died(tmp_path):
    code = ("import sys; from pympx_queues.folder import WritableFolderQueue as W; "
            "w = W(sys.argv[1]); w.put_data('a.tsv', b'x'); print(w.producer_id)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    pid = out.stdout.strip()
    r = reader(tmp_path)
    r.task_done(r.get(timeout=5))
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)  # the producer died without closing: no DONE yet
    admin.close_producer(tmp_path, pid)
    assert r.get(timeout=5) is DONE
    r.close()


def test_verify_and_repair_never_delete_a_message(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("keep.tsv", b"x")
    dead = L.Owner(_fs.hostname(), dead_pid(), 1, "0badf00d")
    (tmp_path / "tmp" / L.format_owned(dead, "half.tsv")).write_bytes(b"ha")
    (tmp_path / "retries" / "gone.tsv.json").write_text("{}")
    (tmp_path / "failed" / "gone.tsv.error.json").write_text("{}")
    os.symlink("/etc/passwd", tmp_path / "evil.tsv")
    rep = admin.verify(tmp_path)
    kinds = sorted(p.kind for p in rep.problems)
    assert kinds == ["leftover-temp", "non-regular", "orphaned-error-sidecar",
                     "orphaned-retry-sidecar"]
    assert not rep.ok
    rep2 = admin.verify(tmp_path, repair=True)
    assert all(p.repaired for p in rep2.problems if p.kind != "non-regular")
    assert ready_names(tmp_path) == ["evil.tsv", "keep.tsv"]  # nothing deleted
    assert (tmp_path / "evil.tsv").is_symlink()
    assert sorted(p.kind for p in admin.verify(tmp_path).problems) == ["non-regular"]


def test_admin_refuses_a_folder_that_is_not_a_queue(tmp_path):
    from pympx_queues.errors import NotAQueueError

    with pytest.raises(NotAQueueError):
        admin.status(tmp_path)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- compat
def test_compat_classes_keep_pympx_signatures_and_millisecond_timeouts(tmp_path):
    from pympx_queues.compat import ReadableFolderQueue as R
    from pympx_queues.compat import WritableFolderQueue as W

    w = W(str(tmp_path), ".tsv", None)
    r = R(str(tmp_path), "tsv", None, lambda x: x, poll_interval=0.02)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        r.get(150)  # milliseconds
    assert 0.1 <= time.monotonic() - t0 < 5
    w.put_data("a.tsv", b"x")
    p = r.get(5000)
    r.task_done(p)
    w.close()
    assert r.get(1000) is DONE
    r.dispose()


@pytest.mark.timeout(60)
def test_event_wakeups_claim_hinted_names_without_listing_the_folder_again(tmp_path, monkeypatch):
    from conftest import wait_for

    """Thundering herd fix: a put wakes a waiting consumer, which claims the hinted name;
    it does not list the whole folder once per wake-up (the periodic listing stays)."""
    q = ReadableFolderQueue(tmp_path / "q", poll_interval=5.0, create=True)
    if q.wakeups != "events":
        pytest.skip("needs event wake-ups")
    w = WritableFolderQueue(tmp_path / "q")
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)  # starts the watch; lists once
    if not q._wakeups.active:
        pytest.skip("inotify/watchdog unavailable here")
    scans = []
    real = ReadableFolderQueue._scan_ready

    def counting(self):
        scans.append(1)
        return real(self)

    monkeypatch.setattr(ReadableFolderQueue, "_scan_ready", counting)
    n = 20
    got = []

    def consume():
        for _ in range(n):
            p = q.get(timeout=10)
            got.append(os.path.basename(p).split("__")[-1])
            q.task_done(p)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(n):
        w.put_data(f"m{i:03d}.tsv", b"x")
        wait_for(lambda i=i: len(got) > i, timeout=10)
    t.join(10)
    assert sorted(got) == [f"m{i:03d}.tsv" for i in range(n)]
    assert len(scans) <= 3, f"{len(scans)} listings for {n} wake-ups"
    w.close()
    assert q.get(timeout=5) is DONE
    q.close()


@pytest.mark.timeout(60)
def test_task_done_moves_claims_to_trash_which_is_emptied_and_never_requeued(tmp_path):
    from conftest import wait_for

    root = tmp_path / "q"
    w = WritableFolderQueue(root)
    for i in range(50):
        w.put_data(f"m{i:03d}.tsv", b"x")
    w.close()
    q = ReadableFolderQueue(root, **FAST)
    paths = [q.get(timeout=5) for _ in range(50)]
    for p in paths:
        q.task_done(p)
        assert not os.path.exists(p)  # gone from wip/ when task_done returns (G4)
    assert q.get(timeout=5) is DONE
    q.close()  # waits for the deleter
    assert os.listdir(root / "trash") == []
    assert os.listdir(root / "wip") == []
    # Leftovers of a consumer that exited before its deleter ran: deleted, never requeued.
    (root / "trash" / "host_1_2_abcd__left.tsv").write_bytes(b"x")
    q2 = ReadableFolderQueue(root, **FAST)
    wait_for(lambda: os.listdir(root / "trash") == [], timeout=10, message="trash emptied")
    assert q2.qsize() == 0 and os.listdir(root / "wip") == []
    q2.close()


@pytest.mark.timeout(60)
def test_close_does_not_wait_for_other_consumers_acknowledgements(tmp_path):
    root = tmp_path / "q"
    w = WritableFolderQueue(root)
    for i in range(3):
        w.put_data(f"m{i}.tsv", b"x")
    q = ReadableFolderQueue(root, **FAST)
    for _ in range(3):
        q.task_done(q.get(timeout=5))
    stop = threading.Event()

    def other_consumer_acks():  # files keep landing in trash/
        i = 0
        while not stop.is_set():
            (root / "trash" / f"h_1_2_abcd__o{i}.tsv").write_bytes(b"x")
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=other_consumer_acks)
    t.start()
    try:
        t0 = time.monotonic()
        q.close()
        assert time.monotonic() - t0 < 5.0
    finally:
        stop.set()
        t.join()
    w.close()


def test_unregistered_producer_publishes_without_joining_or_ending_a_run(tmp_path):
    q = tmp_path / "q"
    w = WritableFolderQueue(str(q), register=False)
    w.put_data("a.tsv", b"x")
    w.close()
    assert os.listdir(q / "control") == []  # no HELO, no DONE: a hand drop
    assert (q / "a.tsv").read_bytes() == b"x"


# ------------------------------------------------------------------ paths that are not queues
def test_a_consumer_of_a_missing_folder_raises_instead_of_creating_it_and_waiting(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="no queue folder here.*create=True") as info:
        ReadableFolderQueue(missing)
    assert info.value.filename == str(missing)
    with pytest.raises(FileNotFoundError):
        ReadableGroupedFileFolderQueue(missing, list_of_items_in_group=["a"])
    assert not missing.exists()  # nothing was created
    r = ReadableFolderQueue(missing, create=True, wakeups="poll")  # asked to: created
    assert (missing / L.WIP_DIR).is_dir()
    with pytest.raises(queue.Empty):
        r.get(timeout=0)
    r.close()
    w = WritableFolderQueue(tmp_path / "new")  # producers create the folder as before
    assert (tmp_path / "new" / L.CONTROL_DIR).is_dir()
    w.close()


def test_a_file_where_a_queue_folder_belongs_is_named_as_such(tmp_path):
    (tmp_path / "f").write_text("data")
    for make in (lambda p: WritableFolderQueue(p), lambda p: ReadableFolderQueue(p)):
        with pytest.raises(NotADirectoryError, match="a file where the queue folder belongs"):
            make(tmp_path / "f")
        with pytest.raises(NotADirectoryError, match="parent of the queue folder"):
            make(tmp_path / "f" / "q")
    q = tmp_path / "q"
    q.mkdir()
    (q / L.WIP_DIR).write_text("oops")
    with pytest.raises(NotADirectoryError, match="a file where the queue sub-folder belongs"):
        ReadableFolderQueue(q)
    with pytest.raises(NotADirectoryError, match="task_done_directory"):
        WritableFolderQueue(tmp_path / "q2", task_done_directory=tmp_path / "f")
    assert (tmp_path / "f").read_text() == "data" and (q / L.WIP_DIR).read_text() == "oops"
