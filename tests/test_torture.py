"""scripts/torture.py run small: every mode, both queue kinds, plus the checker's own teeth.

Each mode runs through the script in a subprocess, exactly as a person would run it; the
long runs quoted in the README use the same script with a bigger ``--size``.  Powercut
and enospc need root and mounts: they skip cleanly where that is not permitted.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Dict, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "torture.py")

ZERO_KEYS = ("lost", "corrupt", "redelivered_done", "dup_beyond_inflight", "unrecoverable",
             "not_idempotent", "half_written_visible", "errors", "worker_errors",
             "failed_after_free")


def _load_torture():
    spec = importlib.util.spec_from_file_location("torture", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torture", mod)
    spec.loader.exec_module(mod)
    return mod


torture = _load_torture()


def run(*args: str, timeout: float = 90) -> "tuple[int, List[Dict[str, str]], str]":
    res = subprocess.run([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
    summaries = []
    for line in res.stdout.splitlines():
        if line.startswith("mode="):
            summaries.append(dict(kv.split("=", 1) for kv in line.split()))
    return res.returncode, summaries, res.stdout + res.stderr


def assert_clean(summaries: List[Dict[str, str]], output: str) -> None:
    assert summaries, output
    for s in summaries:
        for key in ZERO_KEYS:
            assert s.get(key, "0") == "0", f"{key} != 0 in {s}\n{output}"


def skip_if_skipped(summaries: List[Dict[str, str]]) -> None:
    reasons = [s["skipped"] for s in summaries if "skipped" in s]
    if reasons and len(reasons) == len(summaries):
        pytest.skip(f"not permitted here: {reasons[0]}")


# --------------------------------------------------------------------------- crashstates
@pytest.mark.timeout(120)
def test_crashstates_every_state_recovers_for_both_queue_kinds():
    code, summaries, out = run("--mode", "crashstates", "--queue", "both", "--size", "3",
                               "--durability", "flush")
    assert code == 0, out
    assert_clean(summaries, out)
    assert {s["queue"] for s in summaries} == {"persistent", "folder"}
    for s in summaries:
        assert int(s["states"]) > 10 and int(s["recovery_states"]) > 0


@pytest.mark.timeout(120)
def test_crashstates_folder_queue_fsync_mode_survives_the_weak_power_loss_model():
    code, summaries, out = run("--mode", "crashstates", "--queue", "folder", "--size", "3",
                               "--durability", "fsync")
    assert code == 0, out
    assert_clean(summaries, out)
    assert int(summaries[0]["states"]) > 50


@pytest.mark.timeout(120)
def test_crashstates_persistent_queue_fsync_mode_survives_the_weak_power_loss_model():
    code, summaries, out = run("--mode", "crashstates", "--queue", "persistent", "--size",
                               "3", "--durability", "fsync")
    assert code == 0, out
    assert_clean(summaries, out)


@pytest.mark.timeout(60)
def test_crashstates_persistent_queue_with_link_publish_survives_every_process_crash():
    code, summaries, out = run("--mode", "crashstates", "--queue", "persistent", "--size",
                               "3", "--durability", "flush", "--publish", "link")
    assert code == 0, out
    assert_clean(summaries, out)


@pytest.mark.timeout(60)
def test_crashstates_folder_queue_with_link_publish_survives_every_process_crash():
    code, summaries, out = run("--mode", "crashstates", "--queue", "folder", "--size", "3",
                               "--durability", "flush", "--publish", "link")
    assert code == 0, out
    assert_clean(summaries, out)


@pytest.mark.timeout(60)
def test_crashstates_simulator_catches_a_queue_that_skips_its_fsyncs():
    code, summaries, out = run("--mode", "crashstates", "--queue", "toy-buggy", "--size",
                               "3", "--durability", "fsync")
    assert code == 1, out
    assert int(summaries[0]["lost"]) > 0
    code, summaries, out = run("--mode", "crashstates", "--queue", "toy", "--size", "3",
                               "--durability", "fsync")
    assert code == 0, out
    assert_clean(summaries, out)


# --------------------------------------------------------------------------- kill
@pytest.mark.timeout(120)
def test_kill_random_sigkills_lose_nothing_for_both_queue_kinds():
    code, summaries, out = run("--mode", "kill", "--queue", "both", "--size", "10",
                               timeout=110)
    assert code == 0, out
    assert_clean(summaries, out)
    for s in summaries:
        assert int(s["acked"]) > 0
        assert int(s.get("processes_killed", "0")) > 0


# --------------------------------------------------------------------------- powercut
@pytest.mark.timeout(120)
def test_powercut_fsync_mode_loses_nothing_for_both_queue_kinds():
    code, summaries, out = run("--mode", "powercut", "--queue", "both", "--size", "1",
                               "--durability", "fsync", timeout=110)
    skip_if_skipped(summaries)
    assert code == 0, out
    assert_clean(summaries, out)
    assert all(int(s["acked"]) > 0 for s in summaries)


@pytest.mark.timeout(120)
def test_powercut_flush_mode_may_lose_unsynced_work_and_the_journal_never_corrupts():
    code, summaries, out = run("--mode", "powercut", "--queue", "both", "--size", "1",
                               "--durability", "flush", timeout=110)
    skip_if_skipped(summaries)
    assert code == 0, out
    assert_clean(summaries, out)


@pytest.mark.timeout(60)
def test_powercut_flush_mode_folder_put_with_writeback_never_leaves_an_empty_message():
    """``writeback=True`` (opt-in) starts the data's writeback before the publish, so a
    power cut never finds the published name with an empty file."""
    from pympx_queues.folder import WritableFolderQueue

    try:
        ctx = torture.ext4_image(64)
        img = ctx.__enter__()
    except torture.Skip as exc:
        pytest.skip(str(exc))
    try:
        q = os.path.join(img.mnt, "q")
        w = WritableFolderQueue(q, ".msg", durability="flush", writeback=True)
        data = b"hello\n" * 100
        w.put_data("a.msg", data)
        # Any fsync on the file system commits the journal (and with it the rename), but
        # not a.msg's delayed data blocks.
        fd = os.open(os.path.join(img.mnt, "other"), os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x")
        os.fsync(fd)
        os.close(fd)
        img.power_cut()
        img.umount()
        img.mount()
        path = os.path.join(q, "a.msg")
        found = None
        if os.path.exists(path):
            with open(path, "rb") as f:
                found = f.read()
        assert found is None or found == data, f"{len(found)} bytes under the message name"
    finally:
        ctx.__exit__(None, None, None)


# --------------------------------------------------------------------------- enospc
@pytest.mark.timeout(60)
def test_enospc_folder_queue_refuses_puts_cleanly_and_continues_after_space_is_freed():
    code, summaries, out = run("--mode", "enospc", "--queue", "folder", "--size", "80")
    skip_if_skipped(summaries)
    assert code == 0, out
    assert_clean(summaries, out)
    assert all(int(s["puts_refused"]) > 0 for s in summaries)


@pytest.mark.timeout(60)
def test_enospc_persistent_queue_loses_nothing_acknowledged():
    code, summaries, out = run("--mode", "enospc", "--queue", "persistent", "--size", "80")
    skip_if_skipped(summaries)
    for s in summaries:
        assert int(s["puts_refused"]) > 0
        for key in ("lost", "corrupt", "redelivered_done"):
            assert s[key] == "0", out


@pytest.mark.timeout(60)
def test_enospc_persistent_queue_continues_after_space_is_freed():
    code, summaries, out = run("--mode", "enospc", "--queue", "persistent", "--size", "80")
    skip_if_skipped(summaries)
    assert code == 0, out
    assert_clean(summaries, out)


# --------------------------------------------------------------------------- the checker
def _ev(t, pid, kind, mid):
    return torture.AckEvent((t, pid, kind, mid))


def _check(events, killed=(), evidence=(), final=()):
    s = torture.Summary()
    torture.check_deliveries(events, set(killed), set(evidence), list(final), s)
    return s


def test_checker_counts_an_acknowledged_put_that_never_comes_back_as_lost():
    s = _check([_ev(1, 10, "P", "a"), _ev(2, 10, "P", "b"), _ev(3, 20, "G", "a"),
                _ev(4, 20, "D", "a")])
    assert s["lost"] == 1 and s.violations() == 1


def test_checker_counts_delivery_after_an_acknowledged_task_done():
    s = _check([_ev(1, 10, "P", "a"), _ev(2, 20, "G", "a"), _ev(3, 20, "D", "a")],
               final=["a"])
    assert s["redelivered_done"] == 1


def test_checker_allows_redelivery_of_work_in_flight_at_a_kill_only():
    events = [_ev(1, 10, "P", "a"), _ev(2, 20, "G", "a"), _ev(5, 30, "G", "a"),
              _ev(6, 30, "D", "a")]
    assert _check(events, killed={20}).violations() == 0
    assert _check(events, killed=set())["dup_beyond_inflight"] == 1


def test_checker_trusts_durable_evidence_of_a_done_whose_log_line_was_killed():
    events = [_ev(1, 10, "P", "a"), _ev(2, 20, "G", "a")]
    assert _check(events, killed={20}, evidence={"a"}).violations() == 0
    assert _check(events, killed={20})["lost"] == 1


def test_checker_counts_unreadable_messages_as_corrupt():
    s = _check([_ev(1, 10, "P", "a"), _ev(2, 20, "C", "x")], final=["a", None])
    assert s["corrupt"] == 2


def test_payloads_carry_their_checksum_so_a_torn_copy_never_validates():
    data = torture.make_payload("m1", 300)
    assert torture.parse_payload(data) == "m1"
    for cut in (1, len(data) // 2, len(data) - 1):
        assert torture.parse_payload(data[:cut]) is None
    assert torture.parse_payload(b"\0" * len(data)) is None
