"""Durable pipelines: resume at the last finished stage (P2), done stays done (P3),
journaled state, encoding errors, the sink pattern, compaction (DESIGN.md section 7)."""

from __future__ import annotations

import os
import threading

import pytest

from pympx_queues import journal as jr
from pympx_queues.pipeline import Pipeline, PipelineError, Stage
from pympx_queues.pipeline.journal import fold, scan_pipeline


class Calls:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen = []

    def add(self, stage, key):
        with self.lock:
            self.seen.append((stage, key))

    def count(self, stage):
        return sum(1 for s, _ in self.seen if s == stage)


def journals(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".journal"))


def records(d, name="pipeline"):
    scans, _ = scan_pipeline(str(d), name)
    return [(k, p) for s in scans for _q, k, p in s.records]


def test_a_stopped_run_resumes_at_the_stage_each_item_was_in(tmp_path):
    calls = Calls()
    gate = threading.Event()

    def first(x, ctx):
        calls.add("first", ctx.key)
        return (x, x * x)

    def second(t, ctx):
        calls.add("second", ctx.key)
        if int(ctx.key) >= 5:
            gate.wait(30)  # the stop abandons these (released before the rerun)
        return {"n": t[0], "sq": t[1]}

    def build():
        return Pipeline(range(20), [Stage("first", first, workers=2),
                                    Stage("second", second, workers=2)],
                        journal_dir=str(tmp_path), progress=False)

    p = build()
    for r in p.run():
        if r.key == "4":
            p.stop(drain=False)
    rep1 = p.report
    assert rep1.state == "halted" and rep1.done >= 5
    replay = fold(scan_pipeline(str(tmp_path), "pipeline")[0])
    done1 = set(replay.done)
    past_first = {k for k, saved in replay.unfinished.items() if saved.stage >= 1}
    assert past_first  # some items were abandoned in "second" after finishing "first"
    calls.seen.clear()
    gate.set()

    p = build()
    res = {r.key: r for r in p.run()}
    # Every key ends exactly once over the two runs (P1)
    assert set(res) | done1 == {str(i) for i in range(20)} and not set(res) & done1
    assert all(r.ok and r.value == {"n": int(r.key), "sq": int(r.key) ** 2}
               for r in res.values())
    # Finished stages are not re-run (P2); the stage they were in is
    ran = {(s, k) for s, k in calls.seen}
    assert not {("first", k) for k in past_first} & ran
    assert {("second", k) for k in past_first} <= ran
    # Done keys are skipped (P3)
    assert not {k for _s, k in calls.seen} & done1
    assert p.report.skipped_done == len(done1)
    assert p.report.resumed == len(replay.unfinished)
    assert p.report.stages["second"].rerun == len(past_first)


def test_rerunning_a_finished_pipeline_runs_nothing_and_keep_results_replays_outputs(
        tmp_path):
    calls = Calls()

    def work(x, ctx):
        calls.add("w", ctx.key)
        return {"x": x, "t": (x, b"\x01")}

    def build(keep):
        return Pipeline(range(10), [Stage("w", work)], journal_dir=str(tmp_path),
                        keep_results=keep, progress=False)

    first = {r.key: r.value for r in build(True).run()}
    assert calls.count("w") == 10
    again = {r.key: r for r in build(True).run()}
    assert calls.count("w") == 10  # nothing ran twice (P3)
    assert all(r.from_journal and r.ok for r in again.values())
    assert {k: r.value for k, r in again.items()} == first  # tuples and bytes survive
    rep = build(False).run_all()
    assert rep.skipped_done == 10 and rep.accepted == 0 and calls.count("w") == 10


def test_an_output_that_cannot_be_journaled_fails_its_item_naming_stage_and_key(tmp_path):
    def bad(x):
        return object() if x == 2 else x

    p = Pipeline(range(4), [Stage("convert", bad), Stage("after", lambda x: x)],
                 journal_dir=str(tmp_path), progress=False)
    res = {r.key: r for r in p.run()}
    err = res["2"].error
    assert err.type == "EncodeError" and "'convert'" in err.message and "'2'" in err.message
    assert sum(r.ok for r in res.values()) == 3
    recs = records(tmp_path)
    assert not [p for k, p in recs if k == "S" and p["k"] == "2"]  # nothing half-written
    assert [p for k, p in recs if k == "L" and p["k"] == "2"]

    p = Pipeline([1, object()], [Stage("s", lambda x: x)], journal_dir=str(tmp_path / "b"),
                 progress=False)
    res = {r.key: r for r in p.run()}
    assert res["1"].error.type == "EncodeError" and "source item" in res["1"].error.message


def test_a_user_codec_journals_values_its_way(tmp_path):
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    class Codec:
        def encode(self, v):
            return [v.x, v.y] if isinstance(v, Point) else v

        def decode(self, d):
            return Point(*d) if isinstance(d, list) else d

    p = Pipeline(range(3), [Stage("mk", lambda i: Point(i, -i))], journal_dir=str(tmp_path),
                 codec=Codec(), keep_results=True, progress=False)
    list(p.run())
    again = list(Pipeline(range(3), [Stage("mk", lambda i: Point(i, -i))],
                          journal_dir=str(tmp_path), codec=Codec(), keep_results=True,
                          progress=False).run())
    assert sorted((r.value.x, r.value.y) for r in again) == [(0, 0), (1, -1), (2, -2)]


def test_state_is_journaled_and_replayed_until_cleared(tmp_path):
    def mk():
        return Pipeline([], [Stage("s", lambda x: x)], journal_dir=str(tmp_path),
                        progress=False)

    p = mk()
    p.set_state("switch", {"tripped": True, "cause": ["k1", "ValueError"]})
    p.close()
    p = mk()
    assert p.get_state("switch") == {"tripped": True, "cause": ["k1", "ValueError"]}
    p.run_all()
    p.close()
    p = mk()
    assert p.get_state("switch")["tripped"] is True
    p.clear_state("switch")
    p.close()
    assert mk().get_state("switch") is None


def test_a_second_coordinator_on_a_live_journal_is_refused(tmp_path):
    gate = threading.Event()

    def hold(x):
        gate.wait(10)
        return x

    p = Pipeline(range(3), [Stage("s", hold)], journal_dir=str(tmp_path), progress=False)
    t = threading.Thread(target=p.run_all)
    t.start()
    try:
        from conftest import wait_for

        wait_for(lambda: p.stats().in_flight > 0, message="first run live")
        with pytest.raises(PipelineError, match="a run is live"):
            Pipeline(range(3), [Stage("s", hold)], journal_dir=str(tmp_path),
                     progress=False).run_all()
    finally:
        gate.set()
        t.join(30)
    assert p.report.done == 3


def test_the_journal_stays_bounded_over_many_runs_and_a_long_run(tmp_path):
    for n in range(8):
        Pipeline(range(n * 50, n * 50 + 50), [Stage("s", lambda x: x)],
                 key=lambda x: f"k{x}", journal_dir=str(tmp_path),
                 progress=False).run_all()
        assert len(journals(tmp_path)) <= 2
    replay = fold(scan_pipeline(str(tmp_path), "pipeline")[0], keep_results=False)
    assert len(replay.done) == 400 and not replay.unfinished
    # A long run rotates its journal past compact_bytes and compacts the closed part.
    d = tmp_path / "long"
    p = Pipeline(range(3000), [Stage("s", lambda x: x)], journal_dir=str(d),
                 progress=False)
    p._journal.compact_bytes = 20_000
    assert p.run_all().done == 3000
    assert len(journals(d)) <= 2
    replay = fold(scan_pipeline(str(d), "pipeline")[0], keep_results=False)
    assert len(replay.done) == 3000


def test_fsync_durability_groups_records_and_resumes_like_flush(tmp_path):
    p = Pipeline(range(200), [Stage("a", lambda x: x + 1, workers=4),
                              Stage("b", lambda x: x * 2, workers=4)],
                 journal_dir=str(tmp_path), durability="fsync", progress=False)
    assert sorted(r.value for r in p.run()) == [(x + 1) * 2 for x in range(200)]
    replay = fold(scan_pipeline(str(tmp_path), "pipeline")[0])
    assert len(replay.done) == 200


def test_the_sink_pattern_brackets_the_side_effect_with_pending_and_done(tmp_path):
    seen = []
    gate = threading.Event()

    def sink(x, ctx):
        seen.append((ctx.key, ctx.pending))
        if ctx.key == "1" and not ctx.pending:
            gate.wait(10)  # the run is abandoned here: pending, never done
        return x

    p = Pipeline(range(3), [Stage("store", sink, sink=True)], journal_dir=str(tmp_path),
                 progress=False)
    for r in p.run():
        if r.key == "0":
            p.stop(drain=False)
    gate.set()
    recs = records(tmp_path)
    assert ("R", {"k": "1", "s": 0}) in recs
    assert not [pl for k, pl in recs if k == "Y" and pl["k"] == "1"]
    seen.clear()
    p = Pipeline(range(3), [Stage("store", sink, sink=True)], journal_dir=str(tmp_path),
                 progress=False)
    assert {r.key for r in p.run()} == {"1", "2"}
    assert ("1", True) in seen  # the handler knows its side effect may have happened


def test_duplicate_keys_are_skipped_in_durable_runs_too(tmp_path):
    rows = ["a", "b", "a"]
    p = Pipeline(rows, [Stage("s", str.upper)], key=lambda r: r, journal_dir=str(tmp_path),
                 progress=False)
    assert sorted(r.value for r in p.run()) == ["A", "B"]
    assert p.report.duplicate_keys == 1


def test_journal_records_use_the_reserved_pipeline_kinds(tmp_path):
    Pipeline(range(2), [Stage("s", lambda x: x)], journal_dir=str(tmp_path),
             progress=False).run_all()
    kinds = {k for k, _p in records(tmp_path)}
    assert kinds <= jr.PIPELINE_KINDS and {"A", "Y"} <= kinds


def test_a_torn_tail_is_cut_and_saved_and_corruption_fails_closed(tmp_path):
    from pympx_queues.errors import JournalCorruptError

    Pipeline(range(5), [Stage("s", lambda x: x)], journal_dir=str(tmp_path),
             progress=False).run_all()
    (name,) = journals(tmp_path)
    path = tmp_path / name
    with open(path, "ab") as f:
        f.write(b"0badc0de 99 Y {\"k\":")  # a torn last record
    rep = Pipeline(range(6), [Stage("s", lambda x: x)], journal_dir=str(tmp_path),
                   progress=False).run_all()
    assert rep.skipped_done == 5 and rep.done == 1
    assert [n for n in os.listdir(tmp_path) if ".torn-" in n]

    d = tmp_path / "corrupt"
    Pipeline(range(5), [Stage("s", lambda x: x)], journal_dir=str(d),
             progress=False).run_all()
    (name,) = journals(d)
    data = (d / name).read_bytes()
    lines = data.split(b"\n")
    lines[2] = lines[2][:-3] + b"xyz"
    (d / name).write_bytes(b"\n".join(lines))
    with pytest.raises(JournalCorruptError):
        Pipeline(range(5), [Stage("s", lambda x: x)], journal_dir=str(d),
                 progress=False).run_all()


def test_a_replayed_source_offering_resumed_keys_is_not_counted_as_duplicates(tmp_path, caplog):
    """Keys resumed from the journal come again from a replayed source: that offer is the
    resumed item itself, never a 'duplicate key' warning."""
    from pympx_queues.pipeline import Pipeline, Stage

    items = [f"k{i}" for i in range(40)]
    done = []

    def first(x):
        return x

    p = Pipeline(items, [Stage("s", first, workers=1, queue_size=40)], key=lambda x: x,
                 journal_dir=str(tmp_path))

    def halt(res):
        done.append(res.key)
        if len(done) == 5:
            p.stop(drain=False)

    p.on_complete = halt
    p.run_all()
    again = Pipeline(items, [Stage("s", first, workers=2)], key=lambda x: x,
                     journal_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="pympx_queues.pipeline"):
        report = again.run_all()
    assert report.resumed > 0
    assert report.duplicate_keys == 0
    assert "duplicate key" not in caplog.text
    assert report.done + report.skipped_done == 40
