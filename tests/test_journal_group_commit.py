"""fsync mode's group commit: records are acknowledged only after an fsync that covers
them, however batches are gathered (P1 across power loss); a busy run's journal still
rotates (bounded); the writer's write-then-sync split (JournalWriter.sync)."""

from __future__ import annotations

import os
import threading

from pympx_queues import _fs
from pympx_queues import journal as jr
from pympx_queues.journal.format import parse_record
from pympx_queues.pipeline import Pipeline, Stage
from pympx_queues.pipeline.journal import fold, scan_pipeline


async def inc(x):
    return x + 1


class SyncLog:
    """Wraps _fs.fsync_fd: the size of each file when an fsync of it started (what that
    fsync covers once it returns), recorded after it returned."""

    def __init__(self, monkeypatch):
        self.covered = {}
        self.calls = 0
        self.lock = threading.Lock()
        real = _fs.fsync_fd

        def fsync_fd(fd, path=""):
            size = os.fstat(fd).st_size
            real(fd, path)
            with self.lock:
                self.calls += 1
                key = os.path.basename(os.fspath(path))
                self.covered[key] = max(self.covered.get(key, 0), size)
        monkeypatch.setattr(_fs, "fsync_fd", fsync_fd)

    def durable_bytes(self, path):
        with self.lock:
            return self.covered.get(os.path.basename(path), 0)


def record_end(path, kind, key):
    """Byte offset just past the record of ``kind`` for ``key`` (or None)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for line in data.split(b"\n"):
        end = pos + len(line) + 1
        if line.strip(b"\0"):
            _seq, k, payload = parse_record(line)
            if k == kind and isinstance(payload, dict) and payload.get("k") == key:
                return end
        pos = end
    return None


def test_append_without_sync_then_one_sync_covers_every_append(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    w = jr.JournalWriter(str(tmp_path), "q", jr.new_run_id(), durability="fsync")
    base = log.calls
    t1 = w.append([("A", '{"k":"1","i":1,"d":1}')], sync=False)
    t2 = w.append([("A", '{"k":"2","i":2,"d":2}'), ("Y", '{"k":"1"}')], sync=False)
    assert (t1, t2) == (1, 2) and log.calls == base  # written, not yet synced
    w.sync(t1)  # one fsync covers everything written before it started
    assert log.calls == base + 1
    w.sync(t2)
    assert log.calls == base + 1
    assert log.durable_bytes(w.path) == os.path.getsize(w.path)
    assert w.append([]) == 0
    w.append([("Y", '{"k":"2"}')])  # sync=True (the default): durable on return
    assert log.calls == base + 2
    w.close()


def test_every_fsync_mode_result_is_durable_before_it_is_delivered(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    checked = []

    def on_complete(res):
        p = holder["p"]
        path = p._journal._writer.path
        end = record_end(path, "Y", res.key)
        assert end is not None and end <= log.durable_bytes(path), res.key
        checked.append(res.key)

    holder = {}
    stages = [Stage("a", inc, kind="async", workers=4, queue_size=50),
              Stage("b", lambda x: x * 2, kind="thread", workers=4, queue_size=50)]
    p = holder["p"] = Pipeline(range(1500), stages, journal_dir=str(tmp_path),
                               durability="fsync", progress=False, stop_signals=False,
                               on_complete=on_complete)
    rep = p.run_all()
    assert rep.done == 1500 and len(checked) == 1500
    assert log.calls < 1500  # grouped: far fewer fsyncs than items


def test_a_sink_starts_only_once_its_pending_record_is_durable(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    holder = {}
    bad = []

    def sink(x, ctx):
        path = holder["p"]._journal._writer.path
        end = record_end(path, "R", ctx.key)
        if end is None or end > log.durable_bytes(path):
            bad.append(ctx.key)
        return x

    p = holder["p"] = Pipeline(range(200), [Stage("s", sink, kind="thread", workers=2,
                                                  queue_size=4, sink=True)],
                               journal_dir=str(tmp_path), durability="fsync",
                               progress=False, stop_signals=False)
    assert p.run_all().done == 200
    assert bad == []


def test_a_busy_fsync_run_still_rotates_and_compacts_its_journal(tmp_path):
    stages = [Stage("a", inc, kind="async", workers=4, queue_size=100),
              Stage("b", lambda x: x, kind="thread", workers=4, queue_size=100)]
    p = Pipeline(range(6000), stages, journal_dir=str(tmp_path), durability="fsync",
                 progress=False, stop_signals=False)
    p._journal.compact_bytes = 40_000
    rotations = []
    orig = p._journal.rotate

    def rotate():
        rotations.append(1)
        orig()
    p._journal.rotate = rotate
    assert p.run_all().done == 6000
    assert len(rotations) >= 5  # ~1 MB of records at 40 kB per file
    names = [n for n in os.listdir(tmp_path) if n.endswith(".journal")]
    assert len(names) <= 3
    replay = fold(scan_pipeline(str(tmp_path), "pipeline")[0], keep_results=False)
    assert len(replay.done) == 6000 and not replay.unfinished
