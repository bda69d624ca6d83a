"""Every CLI command on a real folder queue, through click's CliRunner (in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from pympx_queues.folder import layout as L
from pympx_queues import cli
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

pytestmark = pytest.mark.timeout(60)


def run(*args, input=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], input=input)


def status(queue):
    r = run("status", queue, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture
def queue(tmp_path):
    q = tmp_path / "q"
    w = WritableFolderQueue(q)
    for i in range(4):
        w.put_data(f"m{i}.tsv", f"row {i}\n")
    w.close()
    return q


def reader(q, **kw):
    return ReadableFolderQueue(q, wakeups="poll", poll_interval=0.02, **kw)


def dead_owner():
    """An owner tag of a process that has exited (for leftovers of crashed processes)."""
    p = subprocess.run([sys.executable, "-c",
                        "from pympx_queues.folder import layout as L; print(L.new_owner().format())"],
                       capture_output=True, text=True, check=True, timeout=30)
    return L.parse_owner(p.stdout.strip())


def test_status_counts_each_state(queue):
    rq = reader(queue, max_retries=1)
    claimed = rq.get(timeout=5)
    failed = rq.get(timeout=5)
    rq.nack(failed, error="bad row")  # max_retries=1: straight to dead letters
    report = status(queue)
    assert report["kind"] == "folder"
    assert report["counts"]["ready"] == 2 and report["counts"]["failed"] == 1
    assert report["counts"]["wip_live"] == 1 and report["counts"]["wip_stale"] == 0
    assert report["claims"][0]["state"] == "live" and report["claims"][0]["pid"] == os.getpid()
    assert [p["state"] for p in report["producers"]] == ["closed"]
    assert any("dead letter" in p for p in report["problems"])
    r = run("status", queue)
    assert "(1 live, 0 stale)" in r.output and "dead letters" in r.output
    rq.task_done(claimed)
    rq.close()


def test_ls_and_show_a_dead_letter(queue):
    rq = reader(queue, max_retries=1)
    rq.nack(rq.get(timeout=5), error="ValueError: bad row 0")
    rq.close()
    r = run("ls", queue, "--state", "failed", "--json")
    (letter,) = json.loads(r.stdout)
    assert letter["name"] == "m0.tsv" and "bad row 0" in letter["last_error"]
    r = run("ls", queue)
    assert r.exit_code == 0 and r.output.count(".tsv") == 4
    r = run("show", queue, "m0.tsv")
    assert r.exit_code == 0 and "failed" in r.output and "bad row 0" in r.output
    assert run("show", queue, "nope.tsv").exit_code == 2


def test_put_files_moves_or_copies_and_never_overwrites(queue, tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("A")
    b.write_text("B")
    r = run("put", queue, a, b, "--copy")
    assert r.exit_code == 0, r.output
    assert (queue / "a.tsv").read_text() == "A" and a.exists()
    r = run("put", queue, a)  # same name waiting: refused, nothing changes
    assert r.exit_code == 1 and "already waiting" in r.stderr and a.exists()
    r = run("put", queue, a, "--rename")
    assert r.exit_code == 0 and not a.exists() and "a~" in r.output
    assert not os.listdir(queue / "tmp")
    # no producer registered by a shell put: the stream's end is not touched
    assert len(status(queue)["producers"]) == 1


def test_put_data_and_bad_names(queue):
    r = run("put", queue, "--data", "x\ty\n", "--name", "hand.tsv")
    assert r.exit_code == 0 and (queue / "hand.tsv").read_text() == "x\ty\n"
    assert run("put", queue, "--data", "x", "--name", "../evil.tsv").exit_code == 2
    r = run("put", queue, "--data", "x", "--name", "wrong.csv")
    assert r.exit_code == 2 and "extension" in r.stderr
    assert run("put", queue, "--data", "x", "--name", "ok.csv", "--ext", "csv").exit_code == 0
    r = run("put", queue, queue / "missing.tsv")
    assert r.exit_code == 2 and "no such file" in r.stderr


def test_requeue_leaves_live_claims_unless_forced(queue):
    rq = reader(queue)
    held = rq.get(timeout=5)
    r = run("requeue", queue)
    assert r.exit_code == 0 and "0 messages requeued" in r.output
    assert "skipped: m0.tsv" in r.output
    assert os.path.exists(held)
    assert run("requeue", queue, "--all").exit_code == 2
    r = run("requeue", queue, "--all", "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["moved"] == ["m0.tsv"]
    assert not os.path.exists(held) and status(queue)["counts"]["ready"] == 4
    rq.close()


def test_retry_brings_dead_letters_back_by_pattern(queue):
    rq = reader(queue, max_retries=1)
    for _ in range(2):
        rq.nack(rq.get(timeout=5), error="boom")
    rq.close()
    r = run("retry", queue, "--pattern", "m1*", "--dry-run")
    assert r.exit_code == 0 and "would retry: m1.tsv" in r.output
    assert status(queue)["counts"]["failed"] == 2
    r = run("retry", queue, "--pattern", "m1*")
    assert r.exit_code == 0 and "1 message retried" in r.output
    assert status(queue)["counts"] == {**status(queue)["counts"], "failed": 1, "ready": 3}
    assert "1 message retried" in run("retry", queue).output


PRODUCER_THAT_DIES = """
    import os, sys
    from pympx_queues.folder import WritableFolderQueue
    w = WritableFolderQueue(sys.argv[1])
    w.put_data("late.tsv", "x")
    os._exit(0)  # dies without close(): no DONE
"""


@pytest.mark.parametrize("command,state", [("close", "closed"), ("fail", "failed")])
def test_close_or_fail_for_a_producer_that_died(tmp_path, command, state):
    q = tmp_path / "q"
    subprocess.run([sys.executable, "-c", textwrap.dedent(PRODUCER_THAT_DIES), str(q)],
                   check=True, timeout=30)
    r = run("status", q, "--check")
    assert r.exit_code == 1 and "died without closing" in r.output
    r = run(command, q)
    assert r.exit_code == 0, r.output
    assert f"wrote {state.upper() if state == 'failed' else 'DONE'} for producer" in r.output
    assert [p["state"] for p in status(q)["producers"]] == [state]
    assert "nothing to do" in run(command, q).output  # idempotent


def test_close_refuses_a_live_producer_and_unknown_ids(tmp_path):
    q = tmp_path / "q"
    w = WritableFolderQueue(q)
    r = run("close", q, "--producer", w.producer_id)
    assert r.exit_code == 1 and "still running" in r.stderr
    assert run("close", q, "--producer", "nobody_1_1_abcd").exit_code == 2
    assert run("close", q, "--producer", w.producer_id, "--force").exit_code == 0
    assert [p["state"] for p in status(q)["producers"]] == ["closed"]


def test_reset_returns_stale_claims_and_drops_dead_producers(queue):
    owner = dead_owner()
    os.rename(queue / "m3.tsv", queue / "wip" / L.format_owned(owner, "m3.tsv"))
    r = run("reset", queue, input="n\n")
    assert r.exit_code == 1 and "cancelled" in r.stderr
    assert status(queue)["counts"]["wip_stale"] == 1
    r = run("reset", queue, "--yes", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["requeued"] == ["m3.tsv"]
    report = status(queue)
    assert report["counts"]["ready"] == 4
    # the producer's control files stay: its process (this test) is still running
    assert [p["alive"] for p in report["producers"]] == [True]


def test_purge_asks_then_deletes_everything(queue):
    r = run("purge", queue, input="n\n")
    assert r.exit_code == 1 and status(queue)["counts"]["ready"] == 4
    r = run("purge", queue, input="y\n")
    assert r.exit_code == 0 and "deleted" in r.output
    assert status(queue)["outstanding"] == 0


def test_purge_refuses_live_claims_unless_forced(queue):
    rq = reader(queue)
    rq.get(timeout=5)
    r = run("purge", queue, "--yes")
    assert r.exit_code == 1 and "live claim" in r.stderr and "--force" in r.stderr
    assert run("purge", queue, "--yes", "--force").exit_code == 0
    rq.close()


def test_verify_finds_leftovers_and_repair_cleans_them(queue):
    owner = dead_owner()
    (queue / "tmp" / L.format_owned(owner, "half.tsv")).write_text("half writ")
    (queue / "retries" / "gone.tsv.json").write_text("{}")
    r = run("verify", queue)
    assert r.exit_code == 1
    assert "leftover-temp" in r.output and "orphaned-retry-sidecar" in r.output
    r = run("repair", queue, "--dry-run")
    assert r.exit_code == 0 and "would repair leftover-temp" in r.output
    assert os.listdir(queue / "tmp")
    r = run("repair", queue)
    assert r.exit_code == 0 and "repaired leftover-temp" in r.output
    assert not os.listdir(queue / "tmp")
    assert run("verify", queue).exit_code == 0
    assert status(queue)["counts"]["ready"] == 4  # no message touched


def test_verify_exit_1_on_a_planted_symlink(queue, tmp_path):
    os.symlink(tmp_path / "elsewhere", queue / "wip" / "link.tsv")
    r = run("verify", queue, "--json")
    assert r.exit_code == 1
    assert [i["kind"] for i in json.loads(r.stdout)["issues"]] == ["non-regular"]
    assert run("repair", queue).exit_code == 1  # left alone: a person must look


def test_watch_shows_rates_on_a_live_queue(queue):
    r = run("watch", queue, "--count", "2", "--interval", "0.05", "--json")
    assert r.exit_code == 0
    first, second = map(json.loads, r.stdout.splitlines())
    assert first["rates"] == {} and second["rates"]["ready"] == 0
    assert second["status"]["counts"]["ready"] == 4


def test_a_pickup_only_command_on_a_folder_queue_is_refused(queue):
    r = run("ls", queue, "--state", "bogus")
    assert r.exit_code == 2


def test_status_counts_acknowledged_claims_still_in_trash(tmp_path):
    """trash/ holds acknowledged claims until a consumer's deleter removes them: a person
    reading `status` after a crash sees them counted apart from live work."""
    import json as _json

    from click.testing import CliRunner

    from pympx_queues.folder import layout as _layout
    from pympx_queues.cli import main
    from pympx_queues.folder import WritableFolderQueue

    q = tmp_path / "q"
    WritableFolderQueue(str(q)).close()
    (q / _layout.TRASH_DIR).mkdir(exist_ok=True)
    (q / _layout.TRASH_DIR / "host_1_1_abcd__a.tsv").write_text("x")
    result = CliRunner().invoke(main, ["status", str(q), "--json"])
    assert result.exit_code == 0, result.output
    assert _json.loads(result.output)["counts"]["trash"] == 1
    human = CliRunner().invoke(main, ["status", str(q)])
    assert "acknowledged, deleting" in human.output
