"""The folder queue's fast paths keep the contract: opt-in writeback, direct unlinks with
a fall-back to the trash deleter when unlinks turn slow, claims of twin names, cheap
temp names that crash recovery still understands."""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from pympx_queues import DONE, _fs
from pympx_queues.folder import layout as L
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

from conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def reader(path, **kw):
    kw.setdefault("poll_interval", 0.05)
    return ReadableFolderQueue(path, **kw)


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(_fs, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_fs, name, wrapper)
    return calls


# --------------------------------------------------------------------------- writeback
def test_flush_mode_puts_start_no_writeback_unless_asked(tmp_path, monkeypatch):
    started = count_calls(monkeypatch, "start_writeback")
    for name in ("in1.tsv", "in2.tsv"):
        (tmp_path / name).write_bytes(b"copied")
    w = WritableFolderQueue(tmp_path / "q")
    w.put_data("a.tsv", b"a")
    w.put(tmp_path / "in1.tsv", copy=True)
    w.put_many([("b.tsv", b"b")])
    assert started == []
    wb = WritableFolderQueue(tmp_path / "q", writeback=True)
    wb.put_data("c.tsv", b"c")
    wb.put(tmp_path / "in2.tsv", copy=True)
    wb.put_many([("d.tsv", b"d"), ("e.tsv", b"e")])
    assert len(started) == 4  # c, the copy of in2, d, e
    assert sorted(n for n in os.listdir(tmp_path / "q") if n.endswith(".tsv")) == [
        "a.tsv", "b.tsv", "c.tsv", "d.tsv", "e.tsv", "in1.tsv", "in2.tsv"]


def test_writeback_is_meaningless_and_off_in_fsync_mode(tmp_path, monkeypatch):
    started = count_calls(monkeypatch, "start_writeback")
    w = WritableFolderQueue(tmp_path, durability="fsync", writeback=True)
    assert w.writeback is False
    w.put_data("a.tsv", b"a")
    assert started == []
    with open(tmp_path / "a.tsv", "rb") as f:
        assert f.read() == b"a"


# --------------------------------------------------------------------------- acks
def test_task_done_unlinks_directly_while_unlinks_are_fast(tmp_path, monkeypatch):
    w = WritableFolderQueue(tmp_path)
    for i in range(20):
        w.put_data("m%02d.tsv" % i, b"x")
    w.close()
    trashed = count_calls(monkeypatch, "discard_claim")
    r = reader(tmp_path)
    got = 0
    for p in r:
        r.task_done(p)
        got += 1
    assert got == 20
    assert trashed == []
    assert os.listdir(tmp_path / "wip") == [] and os.listdir(tmp_path / "trash") == []


def test_slow_unlinks_switch_acks_to_the_trash_deleter_and_back(tmp_path, monkeypatch):
    """Three unlinks in a row slower than SLOW_UNLINK (files with written blocks) send the
    next TRASH_RUN acknowledgements through trash/; then direct unlinks are tried again.
    Every acknowledged message is gone in the end, none is redelivered (G4)."""
    w = WritableFolderQueue(tmp_path)
    for i in range(30):
        w.put_data("m%02d.tsv" % i, b"x")
    w.close()
    real_remove = _fs.remove_claim
    slow = {"on": True}
    direct = []

    def remove_claim(path):
        direct.append(path)
        if slow["on"]:
            time.sleep(0.002)  # like unlinking a written-back file on ext4 + discard
        return real_remove(path)

    monkeypatch.setattr(_fs, "remove_claim", remove_claim)
    trashed = count_calls(monkeypatch, "discard_claim")
    r = reader(tmp_path)
    r.TRASH_RUN = 10
    seen = []
    for _ in range(3):  # three slow direct unlinks ...
        p = r.get(timeout=5)
        seen.append(p)
        r.task_done(p)
    assert len(direct) == 3 and trashed == []
    slow["on"] = False
    for _ in range(10):  # ... then TRASH_RUN acknowledgements go through trash/
        p = r.get(timeout=5)
        seen.append(p)
        r.task_done(p)
    assert len(trashed) == 10 and len(direct) == 3
    p = r.get(timeout=5)  # and then direct unlinks again
    seen.append(p)
    r.task_done(p)
    assert len(direct) == 4 and len(trashed) == 10
    rest = []
    for p in r:
        rest.append(p)
        r.task_done(p)
    assert len(seen) + len(rest) == 30
    assert len({L.parse_owned(os.path.basename(p)).name for p in seen + rest}) == 30
    wait_for(lambda: os.listdir(tmp_path / "trash") == [], 30, message="trash emptied")
    assert os.listdir(tmp_path / "wip") == []
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tsv")] == []
    r.close()


def test_task_done_accepts_a_path_object_and_refuses_a_settled_claim(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"a")
    w.put_data("b.tsv", b"b")
    r = reader(tmp_path)
    p = r.get(timeout=5)
    r.task_done(pathlib.Path(p))
    assert not os.path.exists(p)
    with pytest.raises(FileNotFoundError):
        r.task_done(p)
    q = r.get(timeout=5)
    r.task_done(q)
    with pytest.raises(FileNotFoundError):
        r.task_done(q)
    w.close()
    assert r.get(timeout=5) is DONE


# --------------------------------------------------------------------------- claims
def test_a_twin_of_a_name_still_held_gets_its_own_claim(tmp_path):
    """A message put again under a name this consumer still holds is claimed under a
    fresh id: the held claim is never overwritten (the hot path claims by plain rename)."""
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"first")
    r = reader(tmp_path)
    first = r.get(timeout=5)
    w.put_data("a.tsv", b"second")
    second = r.get(timeout=5)
    assert first != second
    with open(first, "rb") as f1, open(second, "rb") as f2:
        assert (f1.read(), f2.read()) == (b"first", b"second")
    assert r.attempts(first) == 1 and r.attempts(second) == 1
    r.task_done(first)
    r.task_done(second)
    assert os.listdir(tmp_path / "wip") == []


def test_attempts_of_a_lost_claim_raise(tmp_path):
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"a")
    r = reader(tmp_path)
    p = r.get(timeout=5)
    os.unlink(p)
    with pytest.raises(FileNotFoundError):
        r.attempts(p)


# --------------------------------------------------------------------------- temp names
def test_temp_names_are_unique_owned_by_this_process_and_cleaned_after_a_crash(tmp_path):
    w = WritableFolderQueue(tmp_path)
    names = {w._tmp_path("a.tsv") for _ in range(1000)}
    assert len(names) == 1000
    for path in list(names)[:10]:
        parsed = L.parse_owned(os.path.basename(path))
        assert parsed is not None and parsed.name == "a.tsv"
        assert parsed.owner.pid == os.getpid() and parsed.owner.alive()
    # A temp file left by a dead producer (its pid gone) is removed by the next producer.
    dead = os.path.join(str(tmp_path / "tmp"),
                        L.format_owned(L.Owner(_fs.hostname(), 2 ** 22 + 7, 1, "abcd1"),
                                       "b.tsv"))
    with open(dead, "wb") as f:
        f.write(b"half")
    WritableFolderQueue(tmp_path)
    assert not os.path.exists(dead)


# --------------------------------------------------------------------------- names
_NAME_CHARS = "abcXYZ019._+=,@~-#$ \r/\\é\x00"


@pytest.mark.parametrize("name", [
    "con", "CON.tsv", "com1.x", "lpt9", "nul.txt.tsv", "thumbs.db", "Desktop.INI", "a.TMP",
    "a.part", "x~", "~$a", "#a", ".a", "a~b.tsv", "a.swp", "b.SWX", "a.crdownload",
    "conx.tsv", "com0.tsv", "a" * 200, "a" * 201, "0001.tsv"])
def test_the_name_shortcut_agrees_with_the_full_rule_on_edge_cases(name):
    assert L.valid_message_name(name) == L._valid_message_name_full(name)


def test_the_name_shortcut_agrees_with_the_full_rule_on_generated_names():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=3000, deadline=None)
    @hypothesis.given(st.text(alphabet=_NAME_CHARS, min_size=1, max_size=14)
                      | st.text(alphabet="ab.", min_size=195, max_size=205))
    def check(name):
        if L._COMMON_VALID.fullmatch(name) is not None:
            assert L._valid_message_name_full(name), name
        assert L.valid_message_name(name) == L._valid_message_name_full(name)

    check()
