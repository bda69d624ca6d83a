"""The CLI is safe while producers and consumers are running: every read and repair
command, run over and over during a live run, never causes a loss or a duplicate.  And the
progress bar appears on a terminal (a real pty) but not in a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from conftest import wait_for
from pympx_queues.folder import layout as L
from pympx_queues import cli

pytestmark = pytest.mark.timeout(90)

PRODUCER = """
    import sys, time
    from pympx_queues.folder import WritableFolderQueue
    with WritableFolderQueue(sys.argv[1]) as q:
        for i in range(int(sys.argv[2])):
            q.put_data(f"p-{i:04d}.tsv", str(i))
            time.sleep(0.005)
"""

CONSUMER = """
    import os, sys, time
    from pympx_queues.folder import ReadableFolderQueue
    queue, log = sys.argv[1], sys.argv[2]
    q = ReadableFolderQueue(queue, task_done_directory=os.path.join(queue, "done"),
                            wakeups="poll", poll_interval=0.02)
    with open(log, "a") as out:
        for path in q:
            time.sleep(0.01)
            out.write(q.original_filename_from_wip(path).rsplit("/", 1)[1] + "\\n")
            out.flush()
            q.task_done(path)
"""


def spawn(code, *args, stderr=None):
    """A child process; its stderr goes to a file (a full pipe would block it)."""
    err = open(stderr, "w") if stderr else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code),
                                 *map(str, args)], stderr=err)
    finally:
        if stderr:
            err.close()


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_cli_commands_during_a_live_run_lose_and_duplicate_nothing(tmp_path):
    q, logs = tmp_path / "q", tmp_path / "logs"
    logs.mkdir()
    os.makedirs(q)
    for sub in L.SUBDIRS:
        os.makedirs(q / sub)
    for i in range(5):  # hand drops from the shell, before the run starts
        assert run("put", q, "--data", str(i), "--name", f"hand-{i}.tsv").exit_code == 0

    producer = spawn(PRODUCER, q, 200, stderr=tmp_path / "producer.err")
    consumers = [spawn(CONSUMER, q, logs / f"c{i}.log", stderr=tmp_path / f"c{i}.err")
                 for i in range(2)]
    procs = [producer, *consumers]
    rounds = 0
    deadline = time.monotonic() + 60
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for args in (("status", q, "--json"), ("ls", q, "--state", "wip"),
                         ("requeue", q), ("retry", q), ("verify", q), ("repair", q),
                         ("close", q), ("reset", q, "--yes"), ("watch", q, "--once")):
                r = run(*args)
                # exit 1 is a finding (e.g. a claim seen mid-move), never a crash
                assert r.exit_code in (0, 1), (args, r.output)
                assert r.exception is None or isinstance(r.exception, SystemExit), args
                if args[0] in ("requeue", "retry"):
                    assert "0 messages" in r.output, (args, r.output)  # nothing live taken
            rounds += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    errors = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("*.err")}
    assert [p.returncode for p in procs] == [0, 0, 0], (rounds, errors,
                                                        run("status", q).output)
    assert rounds >= 2

    seen = []
    for f in logs.iterdir():
        seen += f.read_text().split()
    assert len(seen) == len(set(seen)) == 205  # exactly once each
    report = json.loads(run("status", q, "--json").stdout)
    assert report["outstanding"] == 0 and report["counts"]["done"] == 205
    assert run("status", q, "--check").exit_code == 0


def test_progress_bar_on_a_terminal_and_silence_in_a_pipe(tmp_path):
    import pty

    q = tmp_path / "q"
    owner = L.parse_owner(subprocess.run(
        [sys.executable, "-c", "from pympx_queues.folder import layout as L; "
         "print(L.new_owner().format())"], capture_output=True, text=True,
        check=True, timeout=30).stdout.strip())
    for sub in L.SUBDIRS:
        os.makedirs(q / sub)
    for i in range(3000):  # stale claims of a process that is gone
        (q / "wip" / L.format_owned(owner, f"m{i:04d}.tsv")).write_text("x")

    piped = subprocess.run([sys.executable, "-m", "pympx_queues.cli", "requeue", str(q),
                            "--dry-run"], capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == ""

    pid, fd = pty.fork()
    if pid == 0:  # child: stdout and stderr are the pty
        os.execv(sys.executable, [sys.executable, "-m", "pympx_queues.cli", "requeue", str(q)])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-500:]
    assert "requeue  [" in text and "3000 messages requeued" in text
    assert not os.listdir(q / "wip")


def test_reset_while_consumers_drain_a_closed_run_does_not_hang_them(tmp_path):
    q, log = tmp_path / "q", tmp_path / "c.log"
    subprocess.run([sys.executable, "-c", textwrap.dedent(PRODUCER), str(q), "40"],
                   check=True, timeout=30)
    consumer = spawn(CONSUMER, q, log, stderr=tmp_path / "c.err")
    try:
        wait_for(lambda: log.exists() and log.read_text(), timeout=30,
                 message="consumer started")
        assert run("reset", q, "--yes").exit_code == 0
        consumer.wait(timeout=8)  # 40 messages take well under a second
    finally:
        if consumer.poll() is None:
            consumer.kill()
        consumer.wait(timeout=10)
    assert consumer.returncode == 0, (tmp_path / "c.err").read_text()[-2000:]


PERSISTENT_RUN = """
    import sys, time
    from pympx_queues.persistent import PersistentQueue
    q = PersistentQueue("orders", current_pickup_dir=sys.argv[1])
    n = int(sys.argv[2])
    for i in range(n):
        q.put({"order": i})
        if i % 2:
            q.task_done(q.get(timeout=10))
        time.sleep(0.003)
    for _ in range(n - n // 2):
        q.task_done(q.get(timeout=10))
    q.close()
    q.dispose()
"""


def test_cli_commands_during_a_live_persistent_run_take_nothing_from_it(tmp_path):
    pickup = tmp_path / "pickup"
    job = spawn(PERSISTENT_RUN, pickup, 300, stderr=tmp_path / "job.err")
    try:
        wait_for(lambda: pickup.exists() and any(p.endswith(".journal")
                                                 for p in os.listdir(pickup)),
                 timeout=30, message="the run's journal")
        rounds = 0
        while job.poll() is None:
            for args in (("status", pickup, "--json"), ("ls", pickup), ("verify", pickup),
                         ("requeue", pickup), ("repair", pickup), ("watch", pickup, "--once")):
                r = run(*args)
                assert r.exit_code in (0, 1), (args, r.output)
                assert r.exception is None or isinstance(r.exception, SystemExit), args
                if args[0] == "requeue" and job.poll() is None:
                    assert "0 messages ready" in r.output or "skipped: orders" in r.output
                if args[0] == "repair":
                    assert "cut" not in r.output and "quarantine" not in r.output
            rounds += 1
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=10)
    assert job.returncode == 0, (tmp_path / "job.err").read_text()[-2000:]
    assert rounds >= 1
    report = json.loads(run("status", pickup, "--json").stdout)
    # a finished history may already be compacted away by a `requeue` above: 0 or 300
    assert report["counts"]["requested"] == report["counts"]["completed"] in (0, 300)
    assert report["outstanding"] == 0 and report["problems"] == []
    assert run("verify", pickup).exit_code == 0
