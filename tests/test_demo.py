"""``pympx-queues demo``: a real SIGKILL, a real recovery, nothing lost, on both queues and
on a durable pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pympx_queues import cli
from pympx_queues import demo as demo_module


def _check_persistent(p, messages):
    assert p.ok, p
    assert p.put == messages and p.lost == 0 and p.duplicates == 0
    assert p.killed_pid > 0 and p.killed_holding
    assert p.outstanding_after_crash == len(p.killed_holding) == p.requeued
    assert p.completed_run1 + p.completed_run2 == messages
    assert p.skipped_on_restart == messages  # the restarted producer redid nothing
    assert p.outstanding_at_end == 0


def _check_folder(f, messages):
    assert f["ok"] is True, f
    assert f["put"] == messages and f["lost"] == 0 and f["duplicates"] == 0
    assert f["killed_pid"] > 0 and f["killed_holding"]
    # status showed exactly the claims the killed consumer said it held, all stale
    assert sorted(f["stale_claims"]) == sorted(f["killed_holding"])
    assert f["live_claims"] == 0 and f["ready_after_crash"] == 0
    # recovery put back exactly those, and the new consumer finished exactly those
    assert f["requeued"] == len(f["killed_holding"]) == f["completed_after_recovery"]
    assert f["completed_before_recovery"] + f["completed_after_recovery"] == messages
    assert f["completed"] == messages and f["outstanding_at_end"] == 0


def _check_pipeline(p, messages):
    assert p["ok"] is True, p
    assert p["messages"] == messages and p["stored"] == messages
    assert p["lost"] == 0 and p["done_twice"] == 0 and p["dead"] == 0
    assert p["killed_pid"] > 0 and 0 < p["stored_run1"] < messages
    assert p["workers_killed"] and p["workers_left"] == 0  # no orphan worker process
    # run 2 skipped what was done, resumed what was in flight, finished the rest
    assert p["skipped_done"] >= p["stored_run1"] - 2  # a store may precede its done record
    assert p["skipped_done"] + p["done_run2"] == messages
    assert set(p["reruns"]) == {"extract", "transform", "load"}
    assert sum(p["reruns"].values()) <= p["in_flight_bound"]


@pytest.mark.timeout(120)
def test_demo_kills_a_consumer_of_each_queue_and_a_pipeline_recovers_and_loses_nothing(
        tmp_path):
    report = demo_module.run_demo(str(tmp_path), messages=40, consumers=3)
    assert report.ok, report
    assert report.queue == "all" and not report.temporary
    _check_persistent(report.persistent, 40)
    _check_folder(report.folder.to_dict(), 40)
    _check_pipeline(report.pipeline.to_dict(), 40)
    stored = os.listdir(os.path.join(str(tmp_path), "pipeline", "warehouse"))
    assert sorted(stored) == [f"row-{i:04d}.json" for i in range(40)]
    # --dir is kept for a look afterwards: every file put is in done/ exactly once
    done = os.listdir(os.path.join(str(tmp_path), "folder", "done"))
    assert sorted(done) == [f"sales_{i:04d}.tsv" for i in range(40)]
    assert os.listdir(os.path.join(str(tmp_path), "folder", "wip")) == []
    assert os.path.isdir(report.persistent.directory)
    text = demo_module.format_report(report)
    assert text.count("OK: nothing lost") == 3
    assert "pympx-queues status DIR" in text and "pympx-queues requeue DIR" in text


@pytest.mark.timeout(120)
def test_demo_command_prints_all_parts_and_the_after_a_crash_hint(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pympx_queues.cli", "demo", "--messages", "30",
         "--dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "PersistentQueue" in text and "folder queue" in text and "durable pipeline" in text
    assert text.count("OK: nothing lost") == 3 and "FAILED" not in text
    assert re.search(r"rows 30, stored 30, lost 0, done twice 0, dead 0", text), text
    assert re.search(r"re-runs per stage  extract \d+, transform \d+, load \d+", text), text
    m = re.search(r"killed\s+with SIGKILL holding (\d+) claim", text)
    assert m, text
    held = int(m.group(1))
    assert f"stale claims {held} (owner gone)" in text
    assert f"requeued {held} stale claim(s)" in text
    assert re.search(r"put 30, completed 30 \(files in done/\), requeued "
                     rf"{held}, lost 0, completed twice 0, outstanding now 0", text), text
    assert text.rstrip().splitlines()[-1].startswith("after a real crash: `pympx-queues status")


@pytest.mark.timeout(120)
def test_demo_command_json_folder_only(tmp_path):
    result = CliRunner().invoke(cli.main, ["demo", "--json", "--queue", "folder",
                                           "--messages", "20", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True and data["queue"] == "folder"
    assert data["persistent"] is None
    _check_folder(data["folder"], 20)
    assert data["seconds"] < 60
    assert not os.path.exists(tmp_path / "pickup")


@pytest.mark.timeout(120)
def test_demo_command_json_pipeline_only(tmp_path):
    result = CliRunner().invoke(cli.main, ["demo", "--json", "--queue", "pipeline",
                                           "--messages", "30", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True and data["persistent"] is None and data["folder"] is None
    _check_pipeline(data["pipeline"], 30)
    assert data["seconds"] < 60


@pytest.mark.timeout(120)
def test_demo_command_json_persistent_only(tmp_path):
    result = CliRunner().invoke(cli.main, ["demo", "--json", "--queue", "persistent",
                                           "--messages", "20", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True and data["folder"] is None
    p = data["persistent"]
    assert p["ok"] is True and p["put"] == 20 and p["lost"] == 0 and p["duplicates"] == 0
    assert p["requeued"] == len(p["killed_holding"]) == p["outstanding_after_crash"]
    assert not os.path.exists(tmp_path / "folder")


def _fake(persistent_lost=0, folder_dup=0):
    def fake(directory, messages, consumers, queue):
        r = demo_module.DemoReport("/x", queue)
        r.persistent = demo_module.PersistentDemoReport("/x/pickup", messages, consumers,
                                                        put=messages, lost=persistent_lost)
        r.folder = demo_module.FolderDemoReport("/x/folder", messages, consumers,
                                                put=messages, completed=messages + folder_dup,
                                                duplicates=folder_dup)
        return r
    return fake


@pytest.mark.parametrize("lost,dup,failed_part", [(1, 0, "the journals"), (0, 1, "done/")])
def test_demo_command_exits_one_when_either_part_lost_or_duplicated(monkeypatch, lost, dup,
                                                                    failed_part):
    monkeypatch.setattr(demo_module, "run_demo", _fake(lost, dup))
    result = CliRunner().invoke(cli.main, ["demo"])
    assert result.exit_code == 1
    assert f"FAILED: {failed_part} do" in result.output
    assert result.output.count("OK: nothing lost") == 1
    result = CliRunner().invoke(cli.main, ["demo", "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["ok"] is False


def test_demo_rejects_an_unknown_queue(tmp_path):
    with pytest.raises(ValueError):
        demo_module.run_demo(str(tmp_path), queue="journal")
    result = CliRunner().invoke(cli.main, ["demo", "--queue", "journal"])
    assert result.exit_code == 2


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.tsv").write_text("old")
    with pytest.raises(FileExistsError):
        demo_module.run_demo(str(tmp_path), queue="folder")


@pytest.mark.timeout(60)
def test_demo_kills_its_own_children_when_it_gives_up(tmp_path):
    import multiprocessing

    with pytest.raises(TimeoutError):
        # nothing can report within a millisecond: the demo gives up at its first wait
        demo_module.run_demo(str(tmp_path), queue="folder", timeout=0.001)
    left = [p.name for p in multiprocessing.active_children() if p.name.startswith("folder-")]
    assert left == []
