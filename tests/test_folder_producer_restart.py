"""A producer killed without closing, and the successor that takes its registration over
(``producer_key``); temp-file names that carry the host's boot id.

Real producer processes, killed with SIGKILL, on a local folder.  G6: a killed producer
never blocks DONE for ever once a successor took over, and never allows an early DONE
(the successor is followed, even when a stale listing does not show it yet).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys

import pytest
from conftest import wait_for

from pympx_queues import DONE, _fs
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue
from pympx_queues.folder import layout as L

RUN = "r1"

# Registers with a key, announces its producer id, then puts until killed.
_PRODUCER = """
import sys, time
from pympx_queues.folder import WritableFolderQueue
w = WritableFolderQueue(sys.argv[1], run_id=sys.argv[2], producer_key=sys.argv[3])
print(w.producer_id, flush=True)
n = int(sys.argv[4])
for k in range(n):
    w.put_data(f"m-{k:06d}.tsv", b"x" * 100)
print("put", n, flush=True)
time.sleep(600)  # killed by the test, never closes
"""


def start_producer(path, key="p", count=10_000):
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, str(path), RUN, key, str(count)],
                            stdout=subprocess.PIPE, text=True)
    producer_id = proc.stdout.readline().strip()
    assert L.parse_owner(producer_id) is not None, producer_id
    return proc, producer_id


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def reader(path, **kw):
    return ReadableFolderQueue(path, run_id=RUN, poll_interval=0.05, **kw)


def drain(r):
    """Acknowledge every message that is there now; return their names."""
    names = []
    while True:
        try:
            p = r.get(timeout=0.3)
        except queue.Empty:
            return names
        assert p is not DONE, "DONE while a producer of the run is open"
        names.append(os.path.basename(r.original_filename_from_wip(p)))
        r.task_done(p)


def control(path):
    return sorted(os.listdir(os.path.join(path, "control")))


def test_a_restarted_producer_takes_over_a_killed_ones_registration_and_ends_the_stream(
        tmp_path):
    proc, dead_id = start_producer(tmp_path)
    wait_for(lambda: len([n for n in os.listdir(tmp_path) if n.endswith(".tsv")]) >= 20,
             message="the producer to publish 20 messages")
    kill(proc)  # mid-loop: a put may have been in flight
    r = reader(tmp_path, expected_producers=1)
    first = drain(r)  # the killed producer never closed: no DONE
    assert first
    w = WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p", if_exists="rename")
    assert w.superseded == [dead_id]
    done = json.loads((tmp_path / "control" / L.format_control(
        L.DONE, RUN, L.parse_owner(dead_id))).read_text())
    assert done["superseded_by"] == w.producer_id and done["key"] == "p"
    dead_pid = L.parse_owner(dead_id).pid
    left = [n for n in os.listdir(tmp_path / "tmp")
            if L.parse_owned(n) is not None and L.parse_owned(n).owner.pid == dead_pid]
    assert left == [], "a killed put's temp file was left behind"
    assert drain(r) == []  # the successor is open: still no DONE
    w.put_data("after.tsv", b"y")
    w.close()
    rest = []
    for p in r:
        rest.append(os.path.basename(r.original_filename_from_wip(p)))
        r.task_done(p)
    assert rest == ["after.tsv"]
    assert r.get(timeout=5) is DONE
    r.close()


def test_a_superseded_producer_does_not_count_toward_expected_producers(tmp_path):
    proc, dead_id = start_producer(tmp_path, count=3)
    wait_for(lambda: proc.stdout.readline().startswith("put"), message="three puts")
    kill(proc)
    r = reader(tmp_path, expected_producers=2)
    w = WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p")
    assert w.superseded == [dead_id]
    w.close()
    # Two registrations, both closed, but they are one producer: the other is missing.
    assert sorted(drain(r)) == ["m-000000.tsv", "m-000001.tsv", "m-000002.tsv"]
    other = WritableFolderQueue(tmp_path, run_id=RUN, producer_key="q")
    assert other.superseded == []
    assert drain(r) == []
    other.close()
    assert r.get(timeout=5) is DONE
    r.close()


def test_a_successor_follows_even_when_the_listing_does_not_show_it_yet(
        tmp_path, monkeypatch):
    proc, dead_id = start_producer(tmp_path, count=1)
    wait_for(lambda: proc.stdout.readline().startswith("put"), message="one put")
    kill(proc)
    r = reader(tmp_path, expected_producers=1)
    hidden = []  # producer ids a stale listing of control/ does not show
    real_scandir = _fs.scandir

    def stale_scandir(path):
        entries = list(real_scandir(path))
        if os.path.basename(str(path)) == "control":
            entries = [e for e in entries if not any(h in e.name for h in hidden)]
        return entries

    monkeypatch.setattr(_fs, "scandir", stale_scandir)
    w = WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p")
    hidden.append(w.producer_id)  # the predecessor's DONE shows, the successor does not
    assert drain(r) == ["m-000000.tsv"]  # no early DONE on the predecessor's DONE
    w.close()  # its DONE is still hidden from the listing: found by name
    assert r.get(timeout=5) is DONE
    r.close()


def test_a_done_file_that_cannot_be_read_yet_is_not_taken_for_a_plain_close(
        tmp_path, monkeypatch):
    # On NFS a name looked up before it existed stays "absent" for up to a minute: the
    # predecessor's DONE shows in the listing but cannot be opened.  Whether it was
    # superseded is unknown, so it must not end the stream.
    proc, dead_id = start_producer(tmp_path, count=1)
    wait_for(lambda: proc.stdout.readline().startswith("put"), message="one put")
    kill(proc)
    r = reader(tmp_path, expected_producers=1)
    w = WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p")
    hidden, blocked = [w.producer_id], [dead_id]
    real_scandir, real_read = _fs.scandir, _fs.read_bytes

    def stale_scandir(path):
        entries = list(real_scandir(path))
        if os.path.basename(str(path)) == "control":
            entries = [e for e in entries if not any(h in e.name for h in hidden)]
        return entries

    def read_bytes(path, *a, **kw):
        if any(b in os.path.basename(str(path)) for b in blocked):
            raise FileNotFoundError(2, "negative lookup cached", str(path))
        return real_read(path, *a, **kw)

    monkeypatch.setattr(_fs, "scandir", stale_scandir)
    monkeypatch.setattr(_fs, "read_bytes", read_bytes)
    w.close()  # closed, but hidden: only the predecessor's (unreadable) DONE shows
    assert drain(r) == ["m-000000.tsv"]  # no DONE: superseded or not is unknown
    blocked.clear()  # readable now: the successor is followed, found closed by name
    assert r.get(timeout=5) is DONE
    r.close()


def test_a_successor_refuses_while_its_predecessor_runs(tmp_path):
    proc, live_id = start_producer(tmp_path, count=0)
    try:
        wait_for(lambda: proc.stdout.readline().startswith("put"), message="registration")
        with pytest.raises(RuntimeError, match="still running"):
            WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p")
        # a different key is a different producer
        WritableFolderQueue(tmp_path, run_id=RUN, producer_key="q").close()
    finally:
        kill(proc)
    assert not any(n.startswith("DONE") and live_id in n for n in control(tmp_path))


def test_a_predecessor_on_another_host_is_left_to_the_operator(tmp_path, monkeypatch):
    real = _fs._HOST
    monkeypatch.setattr(_fs, "_HOST", "other-host")
    WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p")  # never closes
    monkeypatch.setattr(_fs, "_HOST", real)
    before = control(tmp_path)
    with pytest.raises(RuntimeError, match="pympx-queues close"):
        WritableFolderQueue(tmp_path, run_id=RUN, producer_key="p")
    assert control(tmp_path) == before  # wrote nothing: no HELO, no DONE


def test_a_bad_producer_key_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="producer_key"):
        WritableFolderQueue(tmp_path, run_id=RUN, producer_key="a/b")
    assert control(tmp_path) == []


# ------------------------------------------------------------ temp names with the boot id
def test_temp_names_carry_this_boots_id(tmp_path):
    w = WritableFolderQueue(tmp_path, register=False)
    parsed = L.parse_owned(os.path.basename(w._tmp_path("a.tsv")))
    assert parsed is not None and parsed.name == "a.tsv"
    assert parsed.owner.boot == _fs.boot_id()
    assert parsed.owner.pid == os.getpid() and parsed.owner.alive() is True


@pytest.mark.skipif(not _fs.boot_id(), reason="no /proc/sys/kernel/random/boot_id here")
def test_a_temp_file_from_before_a_reboot_is_removed_though_its_pid_and_start_match(tmp_path):
    w = WritableFolderQueue(tmp_path, register=False)
    host, pid, start = _fs.owner_tag()  # this very process: alive
    other_boot = "0" * 12 if _fs.boot_id() != "0" * 12 else "1" * 12
    before_reboot = L.format_owned(L.Owner(host, pid, start, "aaaa0001", other_boot), "a.tsv")
    this_boot = L.format_owned(L.Owner(host, pid, start, "aaaa0002", _fs.boot_id()), "b.tsv")
    old_live = L.format_owned(L.Owner(host, pid, start, "aaaa0003"), "c.tsv")  # no boot id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old_dead = L.format_owned(L.Owner(host, dead.pid, 1, "aaaa0004"), "d.tsv")
    for name in (before_reboot, this_boot, old_live, old_dead):
        (tmp_path / "tmp" / name).write_bytes(b"partial")
    removed = sorted(os.path.basename(p) for p in w._clean_tmp())
    assert removed == sorted([before_reboot, old_dead])
    assert sorted(os.listdir(tmp_path / "tmp")) == sorted([this_boot, old_live])


def test_owner_names_with_and_without_a_boot_id_round_trip():
    for owner in (L.Owner("h-1", 12, 345, "0badf00d"),
                  L.Owner("h-1", 12, 345, "0badf00d", "0123456789ab")):
        name = L.format_owned(owner, "x.tsv")
        assert L.parse_owned(name) == (owner, "x.tsv")
        control = L.format_control(L.HELO, RUN, owner)
        assert L.parse_control(control).producer == owner
    assert L.parse_owned("h_1_2-0123456789AB_0badf00d__x.tsv") is None  # not ours
