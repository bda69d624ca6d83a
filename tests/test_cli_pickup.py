"""Every CLI command on a real PersistentQueue pickup dir, through click's CliRunner."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from pympx_queues import cli
from pympx_queues.persistent import PersistentQueue

pytestmark = pytest.mark.timeout(60)


def run(*args, input=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], input=input)


def status(pickup):
    r = run("status", pickup, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture
def pickup(tmp_path):
    """A finished-with-leftovers run: 6 messages requested, 2 completed, writer gone."""
    d = tmp_path / "pickup"
    q = PersistentQueue("orders", current_pickup_dir=d)
    for i in range(6):
        q.put({"order": i}, key=f"order-{i}")
    for _ in range(2):
        q.task_done(q.get(timeout=5))
    q.dispose()  # the run ends without finishing: its journal's writer is gone
    return d


def journals(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".journal"))


def test_status_shows_runs_and_outstanding_work(pickup):
    report = status(pickup)
    assert report["kind"] == "pickup"
    assert report["counts"] == {"requested": 6, "completed": 2, "outstanding": 4}
    (run_,) = report["runs"]
    assert run_["prefix"] == "orders" and run_["outstanding"] == 4
    r = run("status", pickup, "--check")
    assert r.exit_code == 1
    assert "PersistentQueue pickup dir" in r.output and "REQUESTED" in r.output
    assert "4 messages outstanding" in r.output


def test_ls_and_show_outstanding_messages(pickup):
    r = run("ls", pickup, "--json")
    msgs = json.loads(r.stdout)
    assert [m["key"] for m in msgs] == [f"order-{i}" for i in range(2, 6)]
    r = run("ls", pickup)
    assert r.exit_code == 0 and "order-5" in r.output and "PREFIX" in r.output
    r = run("show", pickup, "order-3")  # by idempotency key
    assert r.exit_code == 0 and "{'order': 3}" in r.output
    by_id = run("show", pickup, msgs[0]["name"], "--json")
    assert json.loads(by_id.stdout)["key"] == "order-2"
    assert run("show", pickup, "order-0").exit_code == 2  # completed: not outstanding
    assert run("ls", pickup, "--state", "wip").exit_code == 2


def test_requeue_consolidates_and_the_next_run_finishes(pickup):
    r = run("requeue", pickup, "--dry-run")
    assert r.exit_code == 0 and "4 messages ready for the next run" in r.output
    assert "dry run" in r.output
    r = run("requeue", pickup, "--json")
    assert r.exit_code == 0
    assert len(json.loads(r.stdout)["moved"]) == 4
    assert run("requeue", pickup, "--all", "--force").exit_code == 2
    q = PersistentQueue("orders", current_pickup_dir=pickup)
    assert q.requeue_unprocessed_work() == 4
    for _ in range(4):
        q.task_done(q.get(timeout=5))
    q.dispose()
    assert status(pickup)["outstanding"] == 0
    assert run("status", pickup, "--check").exit_code == 0


def test_verify_and_repair_a_corrupt_middle_record(pickup):
    (name,) = journals(pickup)
    path = pickup / name
    lines = path.read_bytes().splitlines(keepends=True)
    offset = sum(len(x) for x in lines[:2])
    lines[2] = lines[2].replace(b"order", b"ordeR")  # bit rot in a put record
    path.write_bytes(b"".join(lines))

    r = run("verify", pickup)
    assert r.exit_code == 1 and "corrupt" in r.output and f"@{offset}" in r.output
    r = run("status", pickup, "--check")
    assert r.exit_code == 1 and f"at byte {offset}" in r.output
    r = run("ls", pickup)  # reading the messages fails closed, in one line
    assert r.exit_code == 1 and "repair" in r.stderr and "Traceback" not in r.stderr

    r = run("repair", pickup, "--dry-run")
    assert r.exit_code == 0 and "would quarantine" in r.output
    r = run("repair", pickup)
    assert r.exit_code == 0, r.output
    assert "quarantined" in r.output
    assert any(p.endswith(".quarantined") for p in os.listdir(pickup))  # kept, not deleted
    assert run("verify", pickup).exit_code == 0
    assert run("repair", pickup).exit_code == 0  # idempotent


def test_purge_gives_up_on_outstanding_work_after_confirmation(pickup):
    r = run("purge", pickup, input="n\n")
    assert r.exit_code == 1 and status(pickup)["outstanding"] == 4
    r = run("purge", pickup, "--yes", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["marked_done"]) == 4
    assert status(pickup)["outstanding"] == 0
    assert len(journals(pickup)) == 2  # journals kept: the give-up is journaled too


@pytest.mark.parametrize("args", [
    ("put", "--data", "x", "--name", "x.tsv"), ("retry",), ("close",), ("fail",),
    ("reset", "--yes"),
])
def test_folder_only_commands_are_refused_in_one_line(pickup, args):
    r = run(args[0], pickup, *args[1:])
    assert r.exit_code == 2
    assert "not supported for PersistentQueue pickup dirs" in r.stderr
    assert r.stderr.count("\n") == 1


def test_watch_a_pickup_dir(pickup):
    r = run("watch", pickup, "--once")
    assert r.exit_code == 0 and "outstanding" in r.output


def test_a_torn_tail_is_a_warning_that_repair_cuts_and_keeps(pickup):
    (name,) = journals(pickup)
    path = pickup / name
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"0badc0de 99 P {\"i\": \"half")  # a record cut by the crash
    r = run("verify", pickup, "--json")
    assert r.exit_code == 0  # torn tails are recovered, not corruption
    (issue,) = json.loads(r.stdout)["issues"]
    assert issue["kind"] == "torn" and issue["offset"] == good
    r = run("status", pickup, "--check")
    assert r.exit_code == 1 and "torn journal tail" in r.output
    r = run("repair", pickup)
    assert r.exit_code == 0 and "cut torn tail" in r.output
    assert path.stat().st_size == good
    assert any(".torn-" in p for p in os.listdir(pickup))  # the bytes are kept aside
    assert json.loads(run("verify", pickup, "--json").stdout)["issues"] == []


def test_a_fully_compacted_pickup_dir_is_still_a_pickup_dir(tmp_path):
    d = tmp_path / "pickup"
    q = PersistentQueue("orders", current_pickup_dir=d)
    q.put("x")
    q.task_done(q.get(timeout=5))
    q.close()  # a closed run with nothing outstanding is finished history
    q.dispose()
    assert run("requeue", d).exit_code == 0  # compacts the finished history away
    assert journals(d) == []
    r = run("status", d, "--check")
    assert r.exit_code == 0 and "PersistentQueue pickup dir" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text("")
    assert run("status", tmp_path / "other").exit_code == 2  # a hidden lock is not ours
