"""The CLI's own behaviour (output, exit codes, errors, progress, watch, confirmation),
tested through click's CliRunner over a fake admin backend so that nothing here depends on
a queue implementation.  Real queues are exercised in test_cli_folder.py,
test_cli_pickup.py and test_cli_crash.py."""

from __future__ import annotations

import io
import json
import os

import pytest
from click.testing import CliRunner

from pympx_queues import admin, cli

pytestmark = pytest.mark.timeout(30)


class FakeBackend(admin._Backend):
    kind = "folder"

    def __init__(self):
        self.calls = []
        self.stale = 2
        self.verify_ok = True

    def is_queue(self, path):
        return os.path.exists(os.path.join(path, "FAKEQUEUE"))

    def status(self, path, o):
        self.calls.append(("status",))
        problems = [f"{self.stale} stale claims: run `pympx-queues requeue {path}`"] \
            if self.stale else []
        return {"kind": "folder", "path": path,
                "counts": {"ready": 3, "wip": 1 + self.stale, "wip_live": 1,
                           "wip_stale": self.stale, "done": 7, "failed": 0},
                "outstanding": 4 + self.stale,
                "claims": [{"name": "a.tsv", "state": "stale", "host": "h", "pid": 12,
                            "age": 75.0}],
                "producers": [{"id": "p1", "state": "open", "host": "h", "pid": 10}],
                "problems": problems}

    def list_messages(self, path, state, o):
        self.calls.append(("ls", state, o))
        msgs = [{"name": "a.tsv", "state": "ready", "size": 10, "age": 3.0, "retries": 0},
                {"name": "b.tsv", "state": "failed", "size": 4, "age": 9.0, "retries": 3}]
        return [m for m in msgs if state in (None, m["state"])]

    def show_message(self, path, message, o):
        if message != "a.tsv":
            raise admin.NoSuchMessage(f"no message {message!r} in {path}")
        return {"name": "a.tsv", "state": "ready", "retries": 0, "lease_age": 5.0}

    def put_files(self, path, files, copy, o, rename, progress):
        self.calls.append(("put_files", tuple(files), copy))
        for i, _ in enumerate(files, 1):
            if progress:
                progress(i, len(files))
        return [os.path.basename(f) for f in files]

    def put_data(self, path, name, data, o, rename):
        self.calls.append(("put_data", name, data))
        if "/" in name:
            raise ValueError(f"message name {name!r} contains a path separator")
        return name

    def requeue(self, path, include_live, dry_run, o, progress):
        self.calls.append(("requeue", include_live, dry_run))
        names = [f"m{i}.tsv" for i in range(5)]
        for i, _ in enumerate(names, 1):
            if progress:
                progress(i, len(names))
        return {"moved": names, "skipped": [{"name": "live.tsv", "reason": "owner alive"}],
                "dry_run": dry_run}

    def retry(self, path, pattern, dry_run, o, progress):
        self.calls.append(("retry", pattern, dry_run))
        return {"moved": ["b.tsv"], "skipped": [], "dry_run": dry_run}

    def close(self, path, producer, failed, force, o):
        self.calls.append(("close", producer, failed))
        return {"written": [{"producer": producer or "p1",
                             "sentinel": "FAILED" if failed else "DONE"}]}

    def reset(self, path, force, o, progress):
        self.calls.append(("reset", force))
        return {"requeued": ["x"], "control_removed": 2}

    def purge(self, path, force, o, progress):
        self.calls.append(("purge",))
        return {"deleted": 12}

    def verify(self, path, o):
        if self.verify_ok:
            return {"ok": True, "issues": []}
        return {"ok": False, "issues": [{"kind": "corrupt", "path": "j1", "offset": 40,
                                         "detail": "bad crc"}]}

    def repair(self, path, dry_run, o):
        self.calls.append(("repair", dry_run))
        return {"ok": True, "actions": ["quarantined j1 @40"], "issues": []}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    backend = FakeBackend()
    monkeypatch.setattr(admin, "_FOLDER", backend)
    monkeypatch.setattr(admin, "_folder_backend", lambda: backend)
    (tmp_path / "FAKEQUEUE").write_text("")
    backend.path = str(tmp_path)
    return backend


def run(*args, input=None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], input=input)


def test_status_prints_counts_claims_and_problems(fake):
    r = run("status", fake.path)
    assert r.exit_code == 0, r.output
    assert "folder queue" in r.output and "in progress" in r.output
    assert "(1 live, 2 stale)" in r.output and "1m15s" in r.output
    assert "stale claims" in r.output


def test_status_json_is_parseable(fake):
    r = run("status", fake.path, "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert data["counts"]["wip_stale"] == 2 and data["kind"] == "folder"


def test_status_check_exits_1_on_problems_and_0_when_healthy(fake):
    assert run("status", fake.path, "--check").exit_code == 1
    assert run("status", fake.path).exit_code == 0  # without --check: informational
    fake.stale = 0
    r = run("status", fake.path, "--check")
    assert r.exit_code == 0 and "no problems found" in r.output


def test_missing_folder_is_one_line_on_stderr_exit_2(tmp_path):
    r = CliRunner().invoke(cli.main, ["status", str(tmp_path / "nope")])
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0
    assert "no such file or directory" in r.stderr and "Traceback" not in r.output
    assert r.stdout == ""


def test_not_a_queue_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(cli.main, ["ls", str(tmp_path)])
    assert r.exit_code == 2
    assert r.stderr.startswith("pympx-queues: error: ") and "not a queue" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_a_file_instead_of_a_folder_is_one_line_exit_2(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    r = CliRunner().invoke(cli.main, ["status", str(f)])
    assert r.exit_code == 2 and "not a directory" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_permission_denied_is_one_line_exit_2(tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0)
    try:
        r = CliRunner().invoke(cli.main, ["status", str(d)])
    finally:
        d.chmod(0o700)
    assert r.exit_code == 2 and "permission denied" in r.stderr


def test_permission_error_from_the_library_is_one_line_exit_2(fake, monkeypatch):
    def denied(path, state, o):
        raise PermissionError(13, "Permission denied", os.path.join(path, "wip"))

    monkeypatch.setattr(fake, "list_messages", denied)
    r = run("ls", fake.path)
    assert r.exit_code == 2
    assert r.stderr == f"pympx-queues: error: {fake.path}/wip: permission denied\n"


def test_disk_errors_are_one_line_exit_1(fake, monkeypatch):
    def full(path, name, data, o, rename):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(fake, "put_data", full)
    r = run("put", fake.path, "--data", "x", "--name", "n.tsv")
    assert r.exit_code == 1 and "no space left on device" in r.stderr


def test_queue_options_reach_the_library(fake):
    r = run("ls", fake.path, "--ext", ".csv", "--lease-timeout", "5", "--prefix", "jobs")
    assert r.exit_code == 0
    assert fake.calls[-1] == ("ls", None, admin.Options(".csv", 5.0, "jobs"))
    run("ls", fake.path)
    assert fake.calls[-1] == ("ls", None, admin.Options())


def test_unknown_state_is_a_usage_error(fake):
    assert run("ls", fake.path, "--state", "bogus").exit_code == 2


def test_ls_filters_by_state_and_prints_json(fake):
    r = run("ls", fake.path, "--state", "failed", "--json")
    assert r.exit_code == 0
    assert [m["name"] for m in json.loads(r.output)] == ["b.tsv"]
    r = run("ls", fake.path)
    assert "a.tsv" in r.output and "b.tsv" in r.output and "RETRIES" in r.output


def test_show_prints_fields_and_unknown_message_is_exit_2(fake):
    r = run("show", fake.path, "a.tsv")
    assert r.exit_code == 0 and "lease_age" in r.output and "5s" in r.output
    assert json.loads(run("show", fake.path, "a.tsv", "--json").output)["retries"] == 0
    r = run("show", fake.path, "zzz")
    assert r.exit_code == 2 and "no message 'zzz'" in r.stderr


def test_put_files_and_data(fake, tmp_path):
    f = tmp_path / "in.tsv"
    f.write_text("x")
    r = run("put", fake.path, f, "--copy")
    assert r.exit_code == 0 and r.output.strip() == "in.tsv"
    assert fake.calls[-1] == ("put_files", (str(f),), True)
    r = run("put", fake.path, "--data", "hello", "--name", "h.tsv", "--json")
    assert json.loads(r.output) == {"published": ["h.tsv"]}
    assert fake.calls[-1] == ("put_data", "h.tsv", b"hello")
    r = run("put", fake.path, "--data", "-", "--name", "s.tsv", input="from stdin")
    assert fake.calls[-1] == ("put_data", "s.tsv", b"from stdin")


def test_put_usage_errors(fake, tmp_path):
    assert run("put", fake.path).exit_code == 2
    assert run("put", fake.path, "--data", "x").exit_code == 2
    assert run("put", fake.path, tmp_path / "f", "--data", "x", "--name", "n").exit_code == 2
    r = run("put", fake.path, "--data", "x", "--name", "a/b")
    assert r.exit_code == 2 and "path separator" in r.stderr


def test_requeue_all_needs_force(fake):
    r = run("requeue", fake.path, "--all")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert not any(c[0] == "requeue" for c in fake.calls)
    assert run("requeue", fake.path, "--all", "--force").exit_code == 0
    assert fake.calls[-1] == ("requeue", True, False)


def test_requeue_dry_run_says_would(fake):
    r = run("requeue", fake.path, "--dry-run")
    assert r.exit_code == 0 and "would requeue: m0.tsv" in r.output
    assert "5 messages would be requeued" in r.output
    assert "skipped: live.tsv (owner alive)" in r.output
    assert fake.calls[-1] == ("requeue", False, True)


def test_progress_bar_is_silent_when_piped(fake):
    r = run("requeue", fake.path)  # CliRunner streams are not terminals
    assert r.exit_code == 0
    assert "requeue  [" not in r.output and "%" not in r.output
    assert r.stderr == ""


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal():
    term = FakeTerminal()
    with cli.ProgressBar("requeue", file=term) as bar:
        assert bar.enabled
        for i in range(1, 6):
            bar(i, 5)
    assert "requeue" in term.getvalue() and "100%" in term.getvalue()


def test_progress_bar_is_off_for_a_pipe():
    pipe = io.StringIO()
    with cli.ProgressBar("requeue", file=pipe) as bar:
        for i in range(1, 6):
            bar(i, 5)
    assert pipe.getvalue() == ""


def test_retry_passes_the_pattern(fake):
    r = run("retry", fake.path, "--pattern", "b*", "--json")
    assert json.loads(r.output)["moved"] == ["b.tsv"]
    assert fake.calls[-1] == ("retry", "b*", False)


def test_close_and_fail_write_sentinels(fake):
    r = run("close", fake.path)
    assert r.exit_code == 0 and "wrote DONE for producer p1" in r.output
    r = run("fail", fake.path, "--producer", "p9")
    assert "wrote FAILED for producer p9" in r.output


def test_purge_and_reset_ask_for_confirmation(fake):
    r = run("purge", fake.path, input="n\n")
    assert r.exit_code == 1 and "cancelled" in r.stderr
    assert ("purge",) not in fake.calls
    r = run("purge", fake.path)  # no answer at all (stdin closed): cancelled, not purged
    assert r.exit_code == 1 and ("purge",) not in fake.calls
    r = run("purge", fake.path, input="y\n")
    assert r.exit_code == 0 and ("purge",) in fake.calls
    assert "3 ready" in r.output  # the question says what would be touched
    r = run("reset", fake.path, "--yes", "--force")
    assert r.exit_code == 0 and fake.calls[-1] == ("reset", True)


def test_verify_exit_code_follows_the_findings(fake):
    assert run("verify", fake.path).exit_code == 0
    fake.verify_ok = False
    r = run("verify", fake.path)
    assert r.exit_code == 1 and "corrupt: j1 @40: bad crc" in r.output
    r = run("verify", fake.path, "--json")
    assert r.exit_code == 1 and json.loads(r.output)["ok"] is False


def test_repair_reports_actions(fake):
    r = run("repair", fake.path, "--dry-run")
    assert r.exit_code == 0 and "quarantined j1 @40" in r.output
    assert fake.calls[-1] == ("repair", True)


def test_watch_refreshes_count_times_and_reports_rates(fake):
    r = run("watch", fake.path, "--count", "3", "--interval", "0.01")
    assert r.exit_code == 0
    assert r.output.count("folder queue") == 3
    assert "rates (per second)" in r.output


def test_watch_json_is_one_line_per_refresh(fake):
    r = run("watch", fake.path, "--count", "2", "--interval", "0.01", "--json")
    lines = r.output.strip().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1])["status"]["counts"]["ready"] == 3


def test_watch_once_and_ctrl_c_exit_0(fake, monkeypatch):
    assert run("watch", fake.path, "--once").output.count("folder queue") == 1

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", interrupted)
    r = run("watch", fake.path)
    assert r.exit_code == 0 and r.output.count("folder queue") == 1


def test_unsupported_operation_is_exit_2(fake, monkeypatch):
    monkeypatch.setattr(fake, "purge", admin._Backend.purge.__get__(fake))
    r = run("purge", fake.path, "--yes")
    assert r.exit_code == 2 and "not supported" in r.stderr


def test_unexpected_exceptions_are_not_hidden(fake, monkeypatch):
    def boom(*a):
        raise RuntimeError("a bug")

    monkeypatch.setattr(fake, "retry", boom)
    r = run("retry", fake.path)
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


def test_human_tables_are_capped_and_json_is_complete(fake, monkeypatch):
    base = fake.status

    def many(path, o):
        report = base(path, o)
        report["claims"] = [{"name": f"c{i:02d}.tsv", "state": "stale", "host": "h",
                             "pid": i, "age": 1.0} for i in range(30)]
        return report

    monkeypatch.setattr(fake, "status", many)
    r = run("status", fake.path)
    assert "c19.tsv" in r.output and "c20.tsv" not in r.output
    assert "... and 10 more" in r.output
    assert len(json.loads(run("status", fake.path, "--json").output)["claims"]) == 30
