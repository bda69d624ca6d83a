"""Folder queues in fsync mode: batched commits (put_many / task_done_many).

put_many fsyncs the files of a batch from several threads at once (``_fs.fsync_files``),
then publishes them, then fsyncs the queue folder once; task_done_many fsyncs the folders
it touched once per batch (``_fs.fsync_dirs``).  These tests hold that to DESIGN.md 3:
every file's data is fsynced before any name of the batch is published, an fsync failure
raises and publishes nothing, and a producer killed in the middle of a batch leaves only
complete files under message names.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import pympx_queues
from pympx_queues import _fs
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

from conftest import wait_for

pytestmark = pytest.mark.timeout(60)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pympx_queues.__file__)))


def ready_names(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".tsv"))


def payload(name: str, size: int = 100) -> bytes:
    """Content derived from the name, so a torn or swapped file is recognised."""
    unit = (name + "|").encode()
    return (unit * (size // len(unit) + 1))[:size]


def fsync_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pympx-fsync-")]


class Recorder:
    """Time-ordered record of fsync / rename / fsync_dir calls from any thread."""

    def __init__(self, monkeypatch):
        self.events = []
        self.lock = threading.Lock()
        for name in ("fsync_path", "rename_noreplace", "fsync_dir"):
            orig = getattr(_fs, name)
            monkeypatch.setattr(_fs, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def call(path, *args, **kw):
            result = orig(path, *args, **kw)
            with self.lock:
                self.events.append((name, os.fspath(path), threading.current_thread().name))
            return result
        return call

    def of(self, kind):
        return [e for e in self.events if e[0] == kind]


# --------------------------------------------------------------------------- put_many
def test_put_many_fsync_mode_publishes_every_file_with_its_content_and_mode(tmp_path, monkeypatch):
    q = tmp_path / "q"
    w = WritableFolderQueue(q, durability="fsync", file_mode=0o640, register=False)
    rec = Recorder(monkeypatch)
    names = [f"m{i:04d}.tsv" for i in range(300)]
    paths = w.put_many([(n, payload(n)) for n in names])
    assert [os.path.basename(p) for p in paths] == names
    assert ready_names(q) == names
    for n in names:
        st = os.lstat(q / n)
        assert (q / n).read_bytes() == payload(n)
        assert st.st_mode & 0o777 == 0o640
    assert os.listdir(q / "tmp") == []
    # G1: every temp file fsynced (once each), all before the first publish, then one
    # fsync of the queue folder after the last publish.
    fsyncs, renames = rec.of("fsync_path"), rec.of("rename_noreplace")
    assert len(fsyncs) == 300 and len({e[1] for e in fsyncs}) == 300
    assert {e[1] for e in fsyncs} == {e[1] for e in renames}
    idx = rec.events.index
    assert max(idx(e) for e in fsyncs) < min(idx(e) for e in renames)
    assert rec.of("fsync_dir") == [("fsync_dir", str(q), threading.current_thread().name)]
    assert idx(rec.of("fsync_dir")[0]) > max(idx(e) for e in renames)
    # The fsyncs ran concurrently: worker threads took part.
    assert any(e[2].startswith("pympx-fsync-") for e in fsyncs)


def test_put_many_fsync_mode_with_a_tracer_syncs_in_order_in_the_callers_thread(tmp_path):
    # The crash-state simulator (scripts/torture.py) needs an exact, ordered history.
    w = WritableFolderQueue(tmp_path, durability="fsync", register=False)
    ops = []
    _fs.set_tracer(lambda op, *a: ops.append((op, threading.current_thread().name)))
    try:
        w.put_many([(f"m{i}.tsv", b"x") for i in range(20)])
    finally:
        _fs.set_tracer(None)
    kinds = [o for o, _ in ops]
    assert kinds.count("fsync") == 20
    assert max(i for i, k in enumerate(kinds) if k == "fsync") < kinds.index("rename")
    assert kinds[-1] == "fsync_dir"
    assert {t for _, t in ops} == {threading.current_thread().name}


@pytest.mark.parametrize("where", ["fsync_path", "os.fsync"])
def test_fsync_failure_in_the_middle_of_a_batch_raises_and_publishes_nothing(
        tmp_path, monkeypatch, where):
    q = tmp_path / "q"
    w = WritableFolderQueue(q, durability="fsync", register=False)
    w.put_many([("before.tsv", b"kept")])
    calls = [0]
    lock = threading.Lock()

    def failing(orig):
        def call(arg):
            with lock:
                calls[0] += 1
                n = calls[0]
            if n == 57:
                raise OSError(errno.EIO, "injected fsync failure")
            return orig(arg)
        return call

    if where == "os.fsync":
        monkeypatch.setattr(os, "fsync", failing(os.fsync))
    else:
        monkeypatch.setattr(_fs, "fsync_path", failing(_fs.fsync_path))
    with pytest.raises(OSError) as info:
        w.put_many([(f"m{i:04d}.tsv", payload(f"m{i:04d}")) for i in range(200)])
    assert info.value.errno == errno.EIO
    assert calls[0] >= 57
    # Nothing of the failed batch is visible under a message name (G1/G2).
    assert ready_names(q) == ["before.tsv"]
    monkeypatch.undo()
    # Temp leftovers (none expected: put_many removes them) are cleaned later anyway.
    WritableFolderQueue(q, durability="fsync", register=False)._clean_tmp()
    assert os.listdir(q / "tmp") == []
    # The next batch works (the worker pool survived the failure).
    w.put_many([(f"n{i}.tsv", b"y") for i in range(50)])
    assert len(ready_names(q)) == 51


def test_put_many_fsync_mode_moves_and_copies_files(tmp_path):
    q, src = tmp_path / "q", tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.tsv").write_bytes(payload(f"f{i:02d}"))
    w = WritableFolderQueue(q, durability="fsync", register=False)
    w.put_many([str(src / f"f{i:02d}.tsv") for i in range(15)])  # moved in
    w.put_many([str(src / f"f{i:02d}.tsv") for i in range(15, 30)], copy=True)
    assert ready_names(q) == [f"f{i:02d}.tsv" for i in range(30)]
    assert sorted(os.listdir(src)) == [f"f{i:02d}.tsv" for i in range(15, 30)]
    for i in range(30):
        assert (q / f"f{i:02d}.tsv").read_bytes() == payload(f"f{i:02d}")


def test_fsync_files_raises_when_a_file_is_gone_and_waits_for_all_started_fsyncs(tmp_path):
    paths = []
    for i in range(40):
        p = str(tmp_path / f"f{i}")
        _fs.write_new(p, b"x", durable=False)
        paths.append(p)
    os.unlink(paths[20])
    with pytest.raises(FileNotFoundError):
        _fs.fsync_files(paths)
    _fs.fsync_files([p for p in paths if os.path.exists(p)])
    _fs.fsync_files([])


# --------------------------------------------------------------------------- task_done_many
def _claim_all(r, n):
    paths = [r.get(timeout=5) for _ in range(n)]
    assert all(os.path.dirname(p) == r._wip for p in paths)
    return paths


@pytest.mark.parametrize("keep", [False, True])
def test_task_done_many_fsync_mode_syncs_each_touched_folder_once_per_batch(
        tmp_path, monkeypatch, keep):
    q = tmp_path / "q"
    kept = tmp_path / "kept"
    w = WritableFolderQueue(q, durability="fsync")
    w.put_many([(f"m{i:03d}.tsv", payload(f"m{i:03d}")) for i in range(60)])
    w.close()
    r = ReadableFolderQueue(q, durability="fsync", wakeups="poll", poll_interval=0.05,
                            task_done_directory=kept if keep else None)
    paths = _claim_all(r, 60)
    rec = Recorder(monkeypatch)
    r.task_done_many(paths)
    dirs = sorted(e[1] for e in rec.of("fsync_dir"))
    want = [str(q), str(q / "wip")] + ([str(kept)] if keep else [])
    assert dirs == sorted(want)  # G4: each touched folder once, for the whole batch
    assert os.listdir(q / "wip") == []
    if keep:
        assert sorted(os.listdir(kept)) == [f"m{i:03d}.tsv" for i in range(60)]
        assert (kept / "m007.tsv").read_bytes() == payload("m007")
    monkeypatch.undo()
    assert r.get(timeout=5) is pympx_queues.DONE  # never redelivered (G4)
    r.close()


def test_task_done_many_directory_fsync_failure_raises(tmp_path, monkeypatch):
    q = tmp_path / "q"
    w = WritableFolderQueue(q, durability="fsync", register=False)
    w.put_many([(f"m{i}.tsv", b"x") for i in range(10)])
    r = ReadableFolderQueue(q, durability="fsync", wakeups="poll", poll_interval=0.05)
    paths = _claim_all(r, 10)
    orig = _fs.fsync_dir

    def failing(path):
        if os.fspath(path) == str(q / "wip"):
            raise OSError(errno.EIO, "injected directory fsync failure")
        return orig(path)

    monkeypatch.setattr(_fs, "fsync_dir", failing)
    with pytest.raises(OSError) as info:
        r.task_done_many(paths)  # never reported as a success
    assert info.value.errno == errno.EIO
    r.close()


# --------------------------------------------------------------------------- the pool
def _child_put_many(path, out):
    """Forked child: the parent's pool threads do not exist here; a new pool must serve."""
    try:
        w = WritableFolderQueue(path, durability="fsync", register=False)
        w.put_many([(f"child{i}.tsv", b"c") for i in range(40)])
        pool = _fs._get_sync_pool()
        out.put(("ok", pool.pid == os.getpid()))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        out.put(("error", repr(exc)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method only")
def test_forked_child_gets_its_own_fsync_pool(tmp_path):
    w = WritableFolderQueue(tmp_path, durability="fsync", register=False)
    w.put_many([(f"parent{i}.tsv", b"p") for i in range(40)])  # parent's pool is running
    assert fsync_threads()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_child_put_many, args=(str(tmp_path), out))
    proc.start()
    try:
        status = out.get(timeout=30)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert status == ("ok", True)
    assert proc.exitcode == 0
    assert len(ready_names(tmp_path)) == 80


def test_fsync_pool_is_bounded_and_shuts_down_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(_fs, "SYNC_THREADS", 4)
    _fs.shutdown_sync_pool()
    wait_for(lambda: not fsync_threads(), timeout=10, message="pool threads to stop")
    w = WritableFolderQueue(tmp_path, durability="fsync", register=False)
    w.put_many([(f"m{i}.tsv", b"x") for i in range(100)])
    threads = fsync_threads()
    assert 1 <= len(threads) <= 4 and all(t.daemon for t in threads)
    _fs.shutdown_sync_pool()
    wait_for(lambda: not fsync_threads(), timeout=10, message="pool threads to stop")
    w.put_many([(f"n{i}.tsv", b"x") for i in range(10)])  # starts again on demand
    assert len(ready_names(tmp_path)) == 110


def test_idle_fsync_threads_exit_and_come_back_on_demand(tmp_path, monkeypatch):
    _fs.shutdown_sync_pool()
    wait_for(lambda: not fsync_threads(), timeout=10, message="pool threads to stop")
    monkeypatch.setattr(_fs, "SYNC_IDLE_EXIT", 0.2)
    w = WritableFolderQueue(tmp_path, durability="fsync", register=False)
    w.put_many([(f"m{i}.tsv", b"x") for i in range(30)])
    assert fsync_threads()
    wait_for(lambda: not fsync_threads(), timeout=10, message="idle threads to exit")
    w.put_many([(f"n{i}.tsv", b"x") for i in range(30)])
    assert len(ready_names(tmp_path)) == 60


# --------------------------------------------------------------------------- crash
PRODUCER = r"""
import sys
from pympx_queues.folder import WritableFolderQueue
path, size, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
w = WritableFolderQueue(path, durability="fsync", register=False)
def payload(name):
    unit = (name + "|").encode()
    return (unit * (size // len(unit) + 1))[:size]
b = 0
while True:
    names = ["%s%04d_%04d" % (tag, b, i) for i in range(500)]
    w.put_many([(n + ".tsv", payload(n)) for n in names])
    b += 1
"""


@pytest.mark.timeout(90)
def test_kill_9_in_the_middle_of_put_many_leaves_only_complete_files(tmp_path):
    q = tmp_path / "q"
    size = 6000  # two pages: a torn write would show
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
    mid_batch = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(q), str(size), f"p{attempt}_"],
                                env=env)
        try:
            # Kill while a batch is staged in tmp/ after at least one batch (or part of one)
            # was published: the interesting moment for G2.
            least = 500 * attempt
            wait_for(lambda: (q / "tmp").is_dir() and os.listdir(q / "tmp")
                     and len(ready_names(q)) > least,  # noqa: B023 - called right here
                     timeout=60, interval=0.002, message="a batch staged in tmp/")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        mid_batch += bool(os.listdir(q / "tmp"))  # killed with a batch staged
        for name in ready_names(q):
            data = (q / name).read_bytes()
            assert data == payload(name[:-4], size), f"incomplete message {name}"
    assert mid_batch >= 1
    # The killed producers' temp files are removed by the next queue object (G2).
    WritableFolderQueue(q, durability="fsync", register=False)
    assert os.listdir(q / "tmp") == []
    assert ready_names(q)


def test_the_pool_threads_never_keep_a_process_alive(tmp_path):
    code = ("import sys\nfrom pympx_queues.folder import WritableFolderQueue\n"
            "w = WritableFolderQueue(sys.argv[1], durability='fsync', register=False)\n"
            "w.put_many([('m%d.tsv' % i, b'x') for i in range(50)])\n")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60,
                         env=dict(os.environ, PYTHONPATH=PROJECT_ROOT))
    assert res.returncode == 0
    assert time.monotonic() - t0 < 30
    assert len(ready_names(tmp_path)) == 50
