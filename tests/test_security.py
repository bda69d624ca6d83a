"""Hostile and messy folders (DESIGN.md section 5): modes, symlinks, FIFOs, names, journals.

Each test plants one hostile thing by hand, then drives the real queue classes over it.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import queue
import stat
import threading
import zlib

import pytest

from pympx_queues import _fs
from pympx_queues import journal as _journal
from pympx_queues.errors import JournalCorruptError

pytestmark = pytest.mark.timeout(60)

# A pickle that, if ever unpickled, creates a marker file (and calls our spy first).
_PWNED = "pympx_queues_pwned_marker"


def _pickle_bait(marker: str) -> bytes:
    class Bait:
        def __reduce__(self):
            return (open, (marker, "w"))

    return pickle.dumps(Bait(), protocol=0)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make any unpickling in this process fail the test loudly."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("something tried to unpickle journal data")

    monkeypatch.setattr(pickle, "loads", spy)
    monkeypatch.setattr(pickle, "load", spy)
    monkeypatch.setattr(pickle, "Unpickler", spy)
    return calls


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["..", ".", "../evil.tsv", "a/b.tsv", "a\\b.tsv", "",
                                  "x\x00y.tsv", "x\ny.tsv", ".hidden.tsv"])
def test_names_with_dots_or_separators_are_refused(name):
    with pytest.raises(ValueError):
        _fs.check_name(name)


# --------------------------------------------------------------------------- _fs level
def test_claim_never_follows_a_symlink_planted_at_a_message(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not touch")
    (tmp_path / "wip").mkdir()
    os.symlink(secret, tmp_path / "msg.tsv")
    assert _fs.claim(tmp_path / "msg.tsv", tmp_path / "wip" / "x__msg.tsv") is False
    assert os.path.islink(tmp_path / "msg.tsv")
    assert secret.read_text() == "do not touch"


def test_unlink_refuses_a_symlink_and_keeps_its_target(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("keep")
    os.symlink(secret, tmp_path / "done.tsv")
    with pytest.raises(OSError):
        _fs.unlink_regular(tmp_path / "done.tsv")
    assert secret.read_text() == "keep"


def test_reading_a_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "msg.tsv"
    os.mkfifo(fifo)
    result = {}

    def reader():
        try:
            _fs.read_bytes(fifo)
            result["ok"] = True
        except OSError as exc:
            result["err"] = exc.errno

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a FIFO hung"
    assert result.get("err") == errno.EINVAL


def test_write_new_never_follows_a_symlink_at_the_temp_name(tmp_path):
    target = tmp_path / "target"
    target.write_text("original")
    os.symlink(target, tmp_path / "tmpname")
    with pytest.raises(OSError):
        _fs.write_new(tmp_path / "tmpname", b"evil", durable=False)
    assert target.read_text() == "original"


def test_default_modes_are_owner_only(tmp_path):
    _fs.makedirs(tmp_path / "q")
    _fs.write_new(tmp_path / "q" / "f", b"x", durable=False)
    assert _mode(tmp_path / "q") == 0o700
    assert _mode(tmp_path / "q" / "f") == 0o600


def test_group_modes_are_configurable_for_shared_folders(tmp_path):
    old = os.umask(0o077)  # even under a strict umask the requested mode is applied
    try:
        _fs.makedirs(tmp_path / "shared", mode=0o770)
        _fs.write_new(tmp_path / "shared" / "f", b"x", durable=False, mode=0o660)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "shared") == 0o770
    # files are created with open(mode) which honours the umask: report what we get
    assert _mode(tmp_path / "shared" / "f") & 0o600 == 0o600


# --------------------------------------------------------------------------- journals
def _journal_line(seq: int, kind: str, payload_text: str) -> bytes:
    body = f"{seq} {kind} {payload_text}".encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _raw_line(seq: int, kind: str, payload: bytes) -> bytes:
    body = f"{seq} {kind} ".encode() + payload
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _write_journal(directory, prefix: str, lines) -> str:
    run = _journal.new_run_id()
    name = _journal.format_journal_name(prefix, run, 999999, "deadbeef")
    header = {"v": 1, "prefix": prefix, "run": run, "host": _fs.hostname(),
              "pid": 999999, "start": 1, "created": 0, "snapshot": False}
    data = _journal_line(0, "H", json.dumps(header)) + b"".join(lines)
    path = os.path.join(str(directory), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_journal_record_holding_a_pickle_is_only_data(tmp_path, no_unpickling):
    marker = str(tmp_path / _PWNED)
    bait = _pickle_bait(marker)
    payloads = [
        # the pickle as bytes (tagged base64): must come back as those very bytes
        json.dumps({"i": "a", "m": {"__bytes__": base64.b64encode(bait).decode()}}),
        # the pickle as text
        json.dumps({"i": "b", "m": bait.decode("latin-1")}),
        # a dict that looks like an object with __reduce__
        json.dumps({"i": "c", "m": {"__reduce__": ["os.system", ["touch " + marker]]}}),
    ]
    lines = [_journal_line(i + 1, "P", p) for i, p in enumerate(payloads)]
    _write_journal(tmp_path, "sec", lines)
    history = _journal.scan_dirs([str(tmp_path)], "sec")
    bodies = {r.id: _journal.decode_value(r.body) for r in history.outstanding()}
    assert bodies["a"] == bait
    assert bodies["b"] == bait.decode("latin-1")
    assert bodies["c"] == {"__reduce__": ["os.system", ["touch " + marker]]}
    assert not no_unpickling
    assert not os.path.exists(marker)


def test_raw_pickle_bytes_in_a_journal_are_rejected_not_unpickled(tmp_path, no_unpickling):
    marker = str(tmp_path / _PWNED)
    good = _journal_line(2, "P", json.dumps({"i": "ok", "m": "fine"}))
    path = _write_journal(tmp_path, "sec", [_raw_line(1, "P", _pickle_bait(marker)), good])
    with pytest.raises(JournalCorruptError) as info:
        _journal.scan_journal(path)
    assert info.value.path == path and info.value.offset > 0
    assert not no_unpickling
    assert not os.path.exists(marker)


def test_truncated_journal_keeps_the_good_prefix_and_runs_nothing(tmp_path, no_unpickling):
    marker = str(tmp_path / _PWNED)
    good = _journal_line(1, "P", json.dumps({"i": "ok", "m": "fine"}))
    torn = _raw_line(2, "P", _pickle_bait(marker))[:-7]  # cut mid-record
    path = _write_journal(tmp_path, "sec", [good, torn])
    scan = _journal.scan_journal(path)
    assert [r[2]["i"] for r in scan.records] == ["ok"]
    assert scan.torn is not None
    assert not no_unpickling
    assert not os.path.exists(marker)


@pytest.mark.parametrize("cut", [1, 9, 12, 25])
def test_corrupt_byte_in_a_journal_fails_closed_with_file_and_offset(tmp_path, cut):
    lines = [_journal_line(i, "P", json.dumps({"i": f"m{i}", "m": i})) for i in range(1, 5)]
    path = _write_journal(tmp_path, "sec", lines)
    data = bytearray(open(path, "rb").read())
    first_p = data.index(b"\n") + 1
    data[first_p + cut] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(JournalCorruptError) as info:
        _journal.scan_journal(path)
    assert info.value.path == path
    assert info.value.offset == first_p


# --------------------------------------------------------------------------- folder queues
def _folder(tmp_path, **kw):
    from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

    root = str(tmp_path / "q")
    w = WritableFolderQueue(root, ".msg", **kw)
    r = ReadableFolderQueue(root, ".msg", wakeups="poll", poll_interval=0.01, **kw)
    return root, w, r


def _run_with_deadline(fn, seconds=10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: B902 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds}s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _dead_owner_name(name):
    import subprocess

    from pympx_queues.folder import layout as L

    p = subprocess.Popen(["true"])
    p.wait()
    return L.format_owned(L.Owner(_fs.hostname(), p.pid, 1, "dead0001"), name)


def test_folder_queue_is_owner_only_by_default(tmp_path):
    root, w, r = _folder(tmp_path)
    path = w.put_data("a.msg", b"x")
    assert _mode(root) == 0o700
    for sub in ("tmp", "wip", "done", "failed", "control"):
        assert _mode(os.path.join(root, sub)) == 0o700, sub
    assert _mode(path) == 0o600
    claimed = r.get(block=False)
    assert _mode(claimed) == 0o600
    r.close()


def test_persistent_queue_pickup_dir_and_journals_are_owner_only_by_default(tmp_path):
    from pympx_queues.persistent import PersistentQueue

    q = PersistentQueue("sec", current_pickup_dir=str(tmp_path / "pickup"), context="spawn")
    q.put("x")
    assert _mode(tmp_path / "pickup") == 0o700
    assert _mode(q.journal_path) == 0o600
    q.dispose()


def test_group_shared_folder_modes_are_applied_to_folders(tmp_path):
    old = os.umask(0o022)
    try:
        root, w, r = _folder(tmp_path, dir_mode=0o770, file_mode=0o660)
    finally:
        os.umask(old)
    for sub in ("", "tmp", "wip", "done", "failed", "control"):
        assert _mode(os.path.join(root, sub)) == 0o770, sub
    r.close()


def test_group_shared_folder_modes_are_applied_to_files_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        root, w, r = _folder(tmp_path, dir_mode=0o770, file_mode=0o660)
        path = w.put_data("a.msg", b"x")
    finally:
        os.umask(old)
    r.close()
    assert _mode(path) == 0o660


@pytest.mark.parametrize("name", ["../evil.msg", "a/b.msg", "..", "sub\\x.msg", "/abs.msg"])
def test_folder_put_refuses_dotdot_and_separators_and_writes_nothing(tmp_path, name):
    root, w, r = _folder(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError):
        w.put_data(name, b"evil")
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert [n for n in os.listdir(root) if n.endswith(".msg")] == []
    r.close()


@pytest.mark.parametrize("prefix", ["../x", "a/b", "..", ".hidden"])
def test_pickup_prefix_with_dotdot_or_separator_is_refused(tmp_path, prefix):
    from pympx_queues.persistent import PersistentQueue

    with pytest.raises(ValueError):
        PersistentQueue(prefix, current_pickup_dir=str(tmp_path / "p"), context="spawn")
    assert not os.path.exists(tmp_path / "x")


def test_symlink_planted_at_a_message_name_is_never_claimed_or_followed(tmp_path):
    root, w, r = _folder(tmp_path)
    secret = tmp_path / "secret.msg"
    secret.write_bytes(b"secret")
    os.symlink(secret, os.path.join(root, "evil.msg"))
    real = w.put_data("real.msg", b"real")
    got = r.get(block=False)
    assert os.path.basename(got).endswith("real.msg")
    r.task_done(got)
    with pytest.raises(queue.Empty):  # the symlink is not a message
        r.get(block=False)
    assert os.path.islink(os.path.join(root, "evil.msg"))
    assert secret.read_bytes() == b"secret"
    assert not os.path.exists(real)
    r.close()


def test_symlink_planted_at_a_wip_name_is_never_requeued_or_followed(tmp_path):
    root, w, r = _folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    link = os.path.join(root, "wip", _dead_owner_name("stolen.msg"))
    os.symlink(secret, link)
    r.recover()
    assert os.path.islink(link), "the planted symlink was moved or removed"
    assert not os.path.exists(os.path.join(root, "stolen.msg"))
    assert secret.read_bytes() == b"secret"
    # Settling it may refuse, or remove the link itself (unlink never follows): the
    # target is never touched either way.
    try:
        r.task_done(link)
    except (ValueError, OSError):
        assert os.path.islink(link)
    assert secret.read_bytes() == b"secret"
    r.close()


def test_symlink_planted_at_the_done_name_is_never_followed_or_overwritten(tmp_path):
    from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

    root = str(tmp_path / "q")
    done = tmp_path / "done_here"
    done.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    os.symlink(secret, done / "a.msg")
    w = WritableFolderQueue(root, ".msg")
    r = ReadableFolderQueue(root, ".msg", str(done), wakeups="poll")
    w.put_data("a.msg", b"payload")
    r.task_done(r.get(block=False))
    assert secret.read_bytes() == b"secret"
    assert os.path.islink(done / "a.msg")
    kept = [n for n in os.listdir(done) if not os.path.islink(done / n)]
    assert len(kept) == 1 and (done / kept[0]).read_bytes() == b"payload"
    r.close()


def test_fifo_planted_as_a_message_never_hangs_a_reader(tmp_path):
    root, w, r = _folder(tmp_path)
    os.mkfifo(os.path.join(root, "fifo.msg"))
    w.put_data("real.msg", b"real")
    got = _run_with_deadline(lambda: r.get(block=False))
    assert got.endswith("real.msg")
    r.task_done(got)
    with pytest.raises(queue.Empty):
        _run_with_deadline(lambda: r.get(block=False))
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo.msg")).st_mode)
    _run_with_deadline(lambda: r.qsize())
    r.close()


def test_fifo_planted_in_wip_never_hangs_recovery(tmp_path):
    root, w, r = _folder(tmp_path)
    fifo = os.path.join(root, "wip", _dead_owner_name("f.msg"))
    os.mkfifo(fifo)
    _run_with_deadline(lambda: r.recover())
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    r.close()


def test_persistent_queue_treats_a_pickle_in_its_journal_as_data(tmp_path, no_unpickling):
    from pympx_queues.persistent import PersistentQueue

    marker = str(tmp_path / _PWNED)
    bait = _pickle_bait(marker)
    payload = json.dumps({"i": "a", "m": {"__bytes__": base64.b64encode(bait).decode()}})
    _write_journal(tmp_path, "sec", [_journal_line(1, "P", payload)])
    q = PersistentQueue("sec", current_pickup_dir=str(tmp_path), context="spawn")
    assert q.get_list_of_outstanding_work() == [bait]
    assert not no_unpickling and not os.path.exists(marker)
    q.joinable_queue.close()


def _journal_name(prefix: str) -> str:
    return _journal.format_journal_name(prefix, _journal.new_run_id(), 999999, "deadbeef")


def test_fifo_named_like_a_journal_never_hangs_recovery(tmp_path):
    from pympx_queues.persistent import PersistentQueue

    fifo = tmp_path / _journal_name("sec")
    os.mkfifo(fifo)
    q = _run_with_deadline(lambda: PersistentQueue("sec", current_pickup_dir=str(tmp_path),
                                                   context="spawn"))
    assert q.get_list_of_outstanding_work() == []
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    q.joinable_queue.close()


def test_symlink_named_like_a_journal_is_never_followed_read_or_cut(tmp_path):
    from pympx_queues.persistent import PersistentQueue

    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.log"
    # Looks like a journal with a torn tail: recovery would cut it if it followed links.
    good = _write_journal(outside, "sec", [_journal_line(1, "P", json.dumps({"i": "x",
                                                                             "m": "y"}))])
    with open(good, "ab") as f:
        f.write(b"torn tail without newline")
    os.rename(good, target)
    before = target.read_bytes()
    pickup = tmp_path / "pickup"
    pickup.mkdir()
    os.symlink(target, pickup / _journal_name("sec"))
    q = PersistentQueue("sec", current_pickup_dir=str(pickup), context="spawn")
    assert q.get_list_of_outstanding_work() == []  # not read through the link
    assert target.read_bytes() == before  # never cut, never deleted
    q.joinable_queue.close()
