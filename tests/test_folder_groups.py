"""ReadableGroupedFileFolderQueue: complete sets only, all-or-nothing, nothing dropped."""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import queue

import pytest

from pympx_queues import DONE, IncompleteGroupsError
from pympx_queues.folder import (
    ReadableFolderQueue,
    ReadableGroupedFileFolderQueue,
    WritableFolderQueue,
)

pytestmark = pytest.mark.timeout(60)

UNITS = ["north", "south", "east"]


def group_of(name):  # "20260101_north.tsv" -> "20260101"
    return name.split("_")[0]


def unit_of(name):  # "20260101_north.tsv" -> "north"
    return name.split("_")[1].split(".")[0]


def grouped(path, **kw):
    return ReadableGroupedFileFolderQueue(path, ".tsv", None, group_of, unit_of, UNITS,
                                          poll_interval=0.05, **kw)


def originals(q, paths):
    return [os.path.basename(q.original_filename_from_wip(p)) for p in paths]


def put(w, *names):
    for n in names:
        w.put_data(n, n.encode())


def test_a_group_is_handed_out_only_when_complete(tmp_path):
    w = WritableFolderQueue(tmp_path)
    q = grouped(tmp_path)
    put(w, "20260101_north.tsv", "20260101_south.tsv")
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    put(w, "20260101_east.tsv")
    paths = q.get(timeout=5)
    assert originals(q, paths) == ["20260101_east.tsv", "20260101_north.tsv",
                                   "20260101_south.tsv"]
    assert all(os.path.dirname(p) == str(tmp_path / "wip") for p in paths)
    q.task_done(paths)
    assert os.listdir(tmp_path / "wip") == []
    w.close()
    assert q.get(timeout=5) is DONE
    q.close()


def test_groups_come_in_sorted_order_and_foreign_files_are_reported_not_claimed(tmp_path, folder_log):
    w = WritableFolderQueue(tmp_path)
    for day in ("20260102", "20260101"):
        put(w, *[f"{day}_{u}.tsv" for u in UNITS])
    put(w, "20260101_west.tsv", "garbage.tsv")
    w.close()
    q = grouped(tmp_path)
    first = q.get(timeout=5)
    second = q.get(timeout=5)
    assert {group_of(n) for n in originals(q, first)} == {"20260101"}
    assert {group_of(n) for n in originals(q, second)} == {"20260102"}
    q.task_done(first)
    q.task_done(second)
    assert q.foreign_files == ["20260101_west.tsv", "garbage.tsv"]
    assert "20260101_west.tsv" in folder_log.text and "garbage.tsv" in folder_log.text
    assert q.get(timeout=5) is DONE
    assert (tmp_path / "20260101_west.tsv").exists() and (tmp_path / "garbage.tsv").exists()
    q.close()


def test_incomplete_groups_at_done_raise_by_default(tmp_path):
    w = WritableFolderQueue(tmp_path)
    put(w, *[f"20260101_{u}.tsv" for u in UNITS])
    put(w, "20260102_north.tsv", "20260103_south.tsv", "20260103_east.tsv")
    w.close()
    q = grouped(tmp_path)
    q.task_done(q.get(timeout=5))
    with pytest.raises(IncompleteGroupsError) as info:
        q.get(timeout=5)
    assert info.value.groups == {"20260102": ["20260102_north.tsv"],
                                 "20260103": ["20260103_east.tsv", "20260103_south.tsv"]}
    assert q.incomplete_groups == info.value.groups
    # never dropped: the files are still waiting
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".tsv")) == [
        "20260102_north.tsv", "20260103_east.tsv", "20260103_south.tsv"]
    q.close()


def test_incomplete_groups_can_be_returned_instead(tmp_path, folder_log):
    w = WritableFolderQueue(tmp_path)
    put(w, "20260102_north.tsv")
    w.close()
    q = grouped(tmp_path, on_incomplete="return")
    assert q.get(timeout=5) is DONE
    assert q.incomplete_groups == {"20260102": ["20260102_north.tsv"]}
    assert "incomplete" in folder_log.text
    q.close()


def test_partial_group_claim_is_rolled_back(tmp_path):
    w = WritableFolderQueue(tmp_path)
    put(w, *[f"20260101_{u}.tsv" for u in UNITS])
    q = grouped(tmp_path)
    thief = ReadableFolderQueue(tmp_path, wakeups="poll")
    real = q._claim_name
    stolen = []

    def racing_claim(name):
        if name == "20260101_south.tsv" and not stolen:
            # another consumer takes this file between our listing and our claim
            stolen.append(thief._claim_name(name))
        return real(name)

    q._claim_name = racing_claim
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    # east and north were claimed first (sorted order), then rolled back
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".tsv")) == [
        "20260101_east.tsv", "20260101_north.tsv"]
    assert [os.path.basename(p) for p in os.listdir(tmp_path / "wip")] == [
        os.path.basename(stolen[0])]
    assert q.claims == []
    # the thief gives its file back: the group is complete again
    thief.nack(stolen[0])
    paths = q.get(timeout=5)
    assert len(paths) == 3
    q.task_done(paths)
    q.close()
    thief.close()


def test_nack_takes_the_whole_group_and_dead_letters_it_together(tmp_path):
    w = WritableFolderQueue(tmp_path)
    put(w, *[f"20260101_{u}.tsv" for u in UNITS])
    q = grouped(tmp_path, max_retries=2)
    paths = q.get(timeout=5)
    back = q.nack(paths, "bad batch")
    assert sorted(os.path.basename(b) for b in back) == sorted(f"20260101_{u}.tsv" for u in UNITS)
    paths = q.get(timeout=5)
    dead = q.nack(paths, "still bad")
    assert all(os.path.dirname(d) == str(tmp_path / "failed") for d in dead)
    assert len(os.listdir(tmp_path / "failed")) == 6  # three letters + three error files
    assert q.retry_failed() and len(q.get(timeout=5)) == 3
    q.close()


def _group_consumer(q, out):
    got = []
    for paths in q:
        got.append(sorted(os.path.basename(q.original_filename_from_wip(p)) for p in paths))
        q.task_done(paths)
    out.put(got)
    q.close()


@pytest.mark.timeout(90)
def test_two_consumer_processes_each_group_exactly_once_and_complete(tmp_path):
    ctx = mp.get_context("spawn")
    w = WritableFolderQueue(tmp_path)
    days = [f"2026{i:04d}" for i in range(1, 121)]
    q = grouped(tmp_path)
    out = ctx.Queue()
    procs = [ctx.Process(target=_group_consumer, args=(q, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for d in days:
        put(w, *[f"{d}_{u}.tsv" for u in UNITS])
    w.close()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    groups = [tuple(g) for r in results for g in r]
    assert len(groups) == len(days)
    assert collections.Counter(groups).most_common(1)[0][1] == 1
    for g in groups:
        assert len(g) == 3 and len({group_of(n) for n in g}) == 1
    assert os.listdir(tmp_path / "wip") == []
    q.close()


def test_grouped_get_claims_from_a_cached_listing_not_one_listing_per_call(tmp_path, monkeypatch):
    """DESIGN.md 4: finding the next group must not list the folder on every get()."""
    w = WritableFolderQueue(tmp_path / "q")
    days = [f"2026010{d}" for d in range(1, 10)] + [f"202601{d}" for d in range(10, 31)]
    for day in days:
        put(w, *[f"{day}_{u}.tsv" for u in UNITS])
    w.close()
    q = ReadableGroupedFileFolderQueue(tmp_path / "q", ".tsv", None, group_of, unit_of, UNITS,
                                       poll_interval=5.0, rescan_interval=60.0)
    scans = []
    real = ReadableFolderQueue._scan_ready

    def counting(self):
        scans.append(1)
        return real(self)

    monkeypatch.setattr(ReadableFolderQueue, "_scan_ready", counting)
    got = []
    for _ in days:
        paths = q.get(timeout=5)
        got.append(group_of(originals(q, paths)[0]))
        q.task_done(paths)
    assert got == days
    assert len(scans) <= 2, f"{len(scans)} listings for {len(days)} get() calls"
    assert q.get(timeout=5) is DONE  # the end of the stream still lists once more (G6)
    q.close()
