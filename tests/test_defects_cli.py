"""CLI defects a new user met: option names in errors, broken pipes, typo'd prefixes,
invisible files, the memory of `ls --json`, `python -m pympx_queues`."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pympx_queues import PersistentQueue, admin, cli
from pympx_queues.folder import admin as folder_admin
from pympx_queues.folder import WritableFolderQueue

pytestmark = pytest.mark.timeout(120)


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture
def queue(tmp_path):
    q = tmp_path / "q"
    w = WritableFolderQueue(q)
    for i in range(3):
        w.put_data(f"m{i}.tsv", f"row {i}\n")
    w.close()
    return q


def test_duplicate_name_error_names_the_rename_flag(queue):
    r = run("put", queue, "--data", "again", "--name", "m0.tsv")
    assert r.exit_code == 1
    assert "--rename" in r.stderr and "if_exists" not in r.stderr
    assert "'m0.tsv' is already waiting" in r.stderr
    assert run("put", queue, "--data", "again", "--name", "m0.tsv", "--rename").exit_code == 0


def test_duplicate_file_put_error_names_the_rename_flag(queue, tmp_path):
    f = tmp_path / "m1.tsv"
    f.write_text("x\n")
    r = run("put", queue, f)
    assert r.exit_code == 1 and "--rename" in r.stderr and f.exists()


@pytest.mark.parametrize("ext", ["/x", "a/b", "t\tsv"])
def test_bad_extension_is_named_as_given(queue, ext):
    r = run("ls", queue, "--ext", ext)
    assert r.exit_code == 2
    assert f"bad message extension {ext!r}" in r.stderr
    assert "'x." not in r.stderr


def test_watch_into_a_closed_pipe_ends_quietly_with_exit_0(queue):
    p = subprocess.Popen([sys.executable, "-m", "pympx_queues", "watch", str(queue),
                          "--interval", "0.01", "--count", "2000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline()  # `| head -1`: read a line, then go away
    p.stdout.close()
    try:
        err = p.stderr.read()
        rc = p.wait(timeout=60)
    finally:
        p.kill()
    assert rc == 0
    assert err == b""


def test_verify_with_an_unknown_prefix_is_a_usage_error(tmp_path):
    q = PersistentQueue("jobs", tmp_path)
    q.put(1)
    q.dispose()
    r = run("verify", tmp_path, "--prefix", "jbos")
    assert r.exit_code == 2
    assert "no journals with prefix 'jbos'" in r.stderr
    assert "no problems" not in r.output
    assert run("verify", tmp_path, "--prefix", "jobs").exit_code == 0
    assert "Exit 2" in run("verify", "--help").output


def test_verify_reports_a_file_whose_name_has_a_newline(queue):
    bad = os.path.join(queue, "bad\nname.tsv")
    with open(bad, "w") as f:
        f.write("row\n")
    r = run("verify", queue)
    assert r.exit_code == 1
    assert "bad\\nname.tsv" in r.stdout and "bad-name" in r.stdout
    data = json.loads(run("verify", queue, "--json").stdout)
    (issue,) = [i for i in data["issues"] if i["kind"] == "bad-name"]
    assert issue["path"].endswith("bad\\nname.tsv") and "\n" not in issue["path"]
    assert os.path.exists(bad)  # reported, never touched


def test_folder_listing_is_read_lazily(queue):
    messages = folder_admin.iter_messages(queue, "ready")
    assert inspect.isgenerator(messages)
    assert next(messages).name == "m0.tsv"
    with pytest.raises(ValueError):
        folder_admin.iter_messages(queue, "ready", "/x")  # checked before any message
    assert inspect.isgenerator(admin.iter_messages(str(queue)))


def test_ls_json_is_written_while_the_listing_is_read(monkeypatch):
    written = []
    monkeypatch.setattr(cli.click, "echo", lambda text="", nl=True, **kw:
                        written.append(text + ("\n" if nl else "")))
    seen_at_write = []

    def items():
        for i in range(1000):
            seen_at_write.append(len(written))
            yield {"name": f"m{i}", "size": i, "nested": {"a": [1, "x\ny"]}}

    cli.emit_json_list(items(), chunk=100)
    assert seen_at_write[-1] >= 9  # most chunks went out before the last item was read
    text = "".join(written)
    expected = [{"name": f"m{i}", "size": i, "nested": {"a": [1, "x\ny"]}}
                for i in range(1000)]
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=2) + "\n"  # the same document as before
    written.clear()
    cli.emit_json_list(iter(()))
    assert "".join(written) == "[]\n"


def test_ls_json_of_a_real_queue_is_one_json_document(queue):
    r = run("ls", queue, "--json")
    assert r.exit_code == 0
    assert [m["name"] for m in json.loads(r.stdout)] == ["m0.tsv", "m1.tsv", "m2.tsv"]


def test_python_dash_m_runs_the_cli(queue):
    done = subprocess.run([sys.executable, "-m", "pympx_queues", "ls", str(queue)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "m0.tsv" in done.stdout
    helped = subprocess.run([sys.executable, "-m", "pympx_queues", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "pympx-queues" in helped.stdout
