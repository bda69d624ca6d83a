"""``pympx-queues demo``: a real SIGKILL, a real recovery, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pympx_queues import cli
from pympx_queues import demo as demo_module


@pytest.mark.timeout(120)
def test_demo_kills_a_consumer_recovers_and_loses_nothing(tmp_path):
    report = demo_module.run_demo(str(tmp_path), messages=60, consumers=3)
    assert report.ok, report
    assert report.put == 60 and report.lost == 0 and report.duplicates == 0
    assert report.killed_pid > 0 and report.killed_holding
    assert report.outstanding_after_crash == len(report.killed_holding) == report.requeued
    assert report.completed_run1 + report.completed_run2 == 60
    assert report.skipped_on_restart == 60  # the restarted producer redid nothing
    assert report.outstanding_at_end == 0
    assert os.path.isdir(report.directory)  # --dir is kept for a look afterwards
    assert "OK" in demo_module.format_report(report)


@pytest.mark.timeout(120)
def test_demo_command_prints_json_and_exits_zero(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pympx_queues.cli", "demo", "--json", "--messages", "40",
         "--dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] is True and data["lost"] == 0 and data["put"] == 40
    assert data["seconds"] < 60


def test_demo_command_exits_one_when_something_was_lost(monkeypatch):
    def fake(directory, messages, consumers):
        r = demo_module.DemoReport("/x", messages, consumers, put=messages, lost=1)
        return r

    monkeypatch.setattr(demo_module, "run_demo", fake)
    result = CliRunner().invoke(cli.main, ["demo"])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "lost 1" in result.output
