#!/usr/bin/env python3
"""Regenerate the command output that the documentation shows (``docs/generated/*.txt``).

Console blocks pasted by hand drift from what the commands print.  This script builds
small sample queues in a temp folder, runs the real programs on them (the example scripts
in ``docs/examples/`` as real processes, consumers killed with SIGKILL, and the real
``pympx-queues`` click commands) and writes each transcript to ``docs/generated/<name>.txt``;
the pages include them with ``--8<--``.  ``tests/test_docs.py`` regenerates them into a
temp folder and fails when they differ from the committed files.

Usage::

    python scripts/gen_docs_output.py            # rewrite docs/generated/
    python scripts/gen_docs_output.py --out DIR  # write somewhere else (the test does)

What changes from run to run is normalised so that the files are stable: the temp folder
reads ``/tmp``, the host name ``etl01``, process ids, run ids, producer ids and message
ids are replaced by fixed ones (the same real value always by the same stand-in, in order
of first appearance), and every age reads ``3s``.  The normalising happens on the values
before the CLI lays out its tables (through ``cli._cell`` and ``cli.fmt_age``), so the
columns stay aligned exactly as the command aligns them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples")
DEFAULT_OUT = os.path.join(ROOT, "docs", "generated")
sys.path.insert(0, ROOT)

from click.testing import CliRunner  # noqa: E402

from pympx_queues import cli  # noqa: E402

HOST = "etl01"
AGE = "3s"
DEADLINE = 60.0


class Normaliser:
    """Replace volatile parts of command output by fixed stand-ins (idempotent)."""

    def __init__(self, tmp_root: str) -> None:
        self.tmp_root = os.path.realpath(tmp_root)
        self.raw_tmp_root = tmp_root
        self.host = socket.gethostname()
        self.pids: Dict[str, str] = {}
        self.maps: Dict[str, Dict[str, str]] = {}

    def add_pid(self, pid: int) -> None:
        if str(pid) not in self.pids:
            self.pids[str(pid)] = str(4101 + len(self.pids))

    def _stand_in(self, kind: str, value: str, make: Callable[[int], str]) -> str:
        table = self.maps.setdefault(kind, {})
        if value in table.values():
            return value
        if value not in table:
            table[value] = make(len(table))
        return table[value]

    def __call__(self, text: str) -> str:
        for root in {self.tmp_root, self.raw_tmp_root}:
            text = text.replace(root, "/tmp")
        if self.host and self.host != HOST:
            text = re.sub(rf"(?<![A-Za-z0-9.-]){re.escape(self.host)}(?![A-Za-z0-9.-])",
                          HOST, text)
        if self.pids:
            text = re.sub(r"\b(%s)\b" % "|".join(map(re.escape, self.pids)),
                          lambda m: self.pids[m.group(1)], text)
        # run ids: <UTC start, to the microsecond>[Z]-<random hex>
        text = re.sub(r"\b(\d{8}T)(\d{12})(Z?)-([0-9a-f]{6,8})\b", self._run_id, text)
        # producer ids: <host>_<pid>_<process start>_<random hex>
        text = re.sub(rf"\b{HOST}_(\d+)_(\d+)_([0-9a-f]{{8}})\b", self._producer, text)
        # PersistentQueue message ids: <writer id>.<sequence number>
        text = re.sub(r"\b([0-9a-f]{12})\.([0-9a-f]+)\b", self._message_id, text)
        return text

    def _run_id(self, m: "re.Match[str]") -> str:
        return self._stand_in("run", m.group(0), lambda i: (
            f"20261122T{81500 + i * 7:06d}{123456 + i:06d}{m.group(3)}-"
            + f"{0xd95d9904 + i * 0x1111:08x}"[: len(m.group(4))]))

    def _producer(self, m: "re.Match[str]") -> str:
        start = self._stand_in("start", m.group(2), lambda i: str(180104 + i))
        rid = self._stand_in("rid", m.group(3), lambda i: f"{0xb7355779 + i:08x}")
        return f"{HOST}_{self.pids.get(m.group(1), m.group(1))}_{start}_{rid}"

    def _message_id(self, m: "re.Match[str]") -> str:
        writer = self._stand_in("writer", m.group(1), lambda i: f"{0x9e52907b1adb + i:012x}")
        return f"{writer}.{m.group(2)}"


class Transcript:
    """A console session: ``$ command`` lines and what each printed."""

    def __init__(self, norm: Normaliser, paths: Dict[str, str]) -> None:
        self.norm = norm
        self.paths = paths  # shown name -> real path
        self.lines: List[str] = []
        self.last_exit = 0

    def _real(self, arg: str) -> str:
        for shown, real in self.paths.items():
            if arg == shown or arg.startswith(shown + "/"):
                return real + arg[len(shown):]
        return arg

    def cli(self, *args: str, stdin: Optional[str] = None, shown: Optional[str] = None,
            filter_output: Optional[Callable[[str], str]] = None) -> str:
        """Run ``pympx-queues ARGS`` (the real click command) and record it."""
        real = [self._real(a) for a in args]
        result = CliRunner().invoke(cli.main, real, input=stdin, prog_name="pympx-queues",
                                    catch_exceptions=False)
        output = result.output
        if filter_output is not None:
            output = filter_output(output)
        self.last_exit = result.exit_code
        self.record(shown or "pympx-queues " + " ".join(shlex.quote(a) for a in args),
                    output)
        return output

    def python(self, script: str, *args: str) -> str:
        """Run ``python docs/examples/SCRIPT ARGS`` to the end and record it."""
        proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, script),
                                 *[self._real(a) for a in args]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        self.norm.add_pid(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            kill([proc])
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{stderr}")
        self.last_exit = proc.returncode
        self.record(" ".join(["python", script, *args]), stdout)
        return stdout

    def echo_exit(self) -> None:
        self.record("echo $?", f"{self.last_exit}\n")

    def record(self, command: str, output: str) -> None:
        self.lines.append(f"$ {command}")
        text = "\n".join(line.rstrip() for line in self.norm(output).splitlines())
        text = text.rstrip("\n")
        if text:
            self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _regular_files(directory: str) -> List[str]:
    try:
        return [n for n in os.listdir(directory)
                if os.path.isfile(os.path.join(directory, n))]
    except FileNotFoundError:
        return []


@contextmanager
def stable_cli(norm: Normaliser) -> Iterator[None]:
    """Normalise cell values and ages before the CLI aligns its tables."""
    for name in ("_cell", "fmt_age"):
        if not callable(getattr(cli, name, None)):
            raise SystemExit(f"pympx_queues.cli.{name} is gone: update {__file__}")
    original_cell, original_age = cli._cell, cli.fmt_age
    cli._cell = lambda value: norm(original_cell(value))  # type: ignore[assignment]
    cli.fmt_age = lambda s: "" if s is None else AGE  # type: ignore[assignment]
    try:
        yield
    finally:
        cli._cell, cli.fmt_age = original_cell, original_age  # type: ignore[assignment]


def kill(procs: List["subprocess.Popen[str]"]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=DEADLINE)


# --------------------------------------------------------------------------- scenarios
def folder_crash(tmp: str, norm: Normaliser) -> Dict[str, str]:
    """A producer put 20 orders and closed; three consumers were SIGKILLed mid-task."""
    orders = os.path.join(tmp, "orders")
    paths = {"/tmp/orders": orders}
    setup = Transcript(norm, paths)
    setup.python("producer.py", "/tmp/orders")
    consumers: List["subprocess.Popen[str]"] = []
    try:
        for k in range(1, 4):  # one after the other, so each claims the next order
            p = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "consumer.py"),
                                  orders, "--crash"], env=_env(), text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            consumers.append(p)
            norm.add_pid(p.pid)
            wait_for(lambda k=k, p=p: len(_regular_files(os.path.join(orders, "wip"))) == k
                     or p.poll() is not None, f"consumer {k} to claim")
            if p.poll() is not None:
                raise RuntimeError(f"consumer {k} ended early: {p.stderr.read()}")
    finally:
        kill(consumers)
    look = Transcript(norm, paths)
    look.cli("status", "/tmp/orders", "--check")
    look.echo_exit()
    look.cli("ls", "/tmp/orders", "--state", "wip")
    requeue = Transcript(norm, paths)
    requeue.cli("requeue", "/tmp/orders", "--dry-run")
    requeue.cli("requeue", "/tmp/orders")
    finish = Transcript(norm, paths)
    finish.python("consumer.py", "/tmp/orders")
    finish.cli("status", "/tmp/orders", "--check")
    finish.echo_exit()
    return {"crash-folder-look": look.text(), "crash-folder-requeue": requeue.text(),
            "crash-folder-finish": finish.text()}


def pickup_crash(tmp: str, norm: Normaliser) -> Dict[str, str]:
    """A PersistentQueue run put 12 orders, finished 5 and was SIGKILLed."""
    from pympx_queues import NotAQueueError, admin

    pickup = os.path.join(tmp, "pickup")
    paths = {"/tmp/pickup": pickup}
    job = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "job.py"), pickup,
                            "--crash"], env=_env(), text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    norm.add_pid(job.pid)

    def five_done() -> bool:
        if job.poll() is not None:
            raise RuntimeError(f"job.py ended early: {job.stderr.read()}")
        try:
            return admin.status(pickup)["counts"].get("completed") == 5
        except (OSError, ValueError, KeyError, NotAQueueError):
            return False  # not started yet: no journal in the pickup dir

    try:
        wait_for(five_done, "job.py to finish 5 orders")
    finally:
        kill([job])
    t = Transcript(norm, paths)
    t.record("python job.py /tmp/pickup --crash &", "")
    t.record("kill -9 <its pid>", "")
    t.cli("status", "/tmp/pickup", "--check")
    t.echo_exit()
    t.cli("ls", "/tmp/pickup")
    t.cli("requeue", "/tmp/pickup")
    t.python("job.py", "/tmp/pickup")
    t.cli("status", "/tmp/pickup", "--check")
    t.echo_exit()
    t.cli("verify", "/tmp/pickup")
    return {"crash-pickup": t.text()}


def cli_examples(tmp: str, norm: Normaliser) -> Dict[str, str]:
    """ls / show / retry / put / purge / status --json on a small folder queue."""
    from pympx_queues import ReadableFolderQueue, WritableFolderQueue

    ex = os.path.join(tmp, "ex")
    new = os.path.join(tmp, "new.tsv")
    paths = {"/tmp/ex": ex, "/tmp/new.tsv": new}
    with WritableFolderQueue(ex) as producer:
        for i in range(3):
            producer.put_data(f"r{i}.tsv", b"x")
    consumer = ReadableFolderQueue(ex, max_retries=1, wakeups="poll")
    path = consumer.get(timeout=10)
    consumer.nack(path, "ValueError: bad date in row 7")  # r0.tsv: a dead letter now
    consumer.close()
    with open(new, "w") as f:
        f.write("new\n")

    def counts_only(output: str) -> str:
        return f"{json.loads(output)['counts']}\n"

    t = Transcript(norm, paths)
    t.cli("ls", "/tmp/ex")
    t.cli("show", "/tmp/ex", "r0.tsv")
    t.cli("retry", "/tmp/ex", "--pattern", "r0*")
    t.cli("put", "/tmp/ex", "/tmp/new.tsv")
    t.cli("put", "/tmp/ex", "--data", "a\tb", "--name", "hand.tsv",
          shown="pympx-queues put /tmp/ex --data 'a\tb' --name hand.tsv")
    t.cli("purge", "/tmp/ex", stdin="", shown="pympx-queues purge /tmp/ex </dev/null")
    t.cli("status", "/tmp/ex", "--json", filter_output=counts_only,
          shown="pympx-queues status /tmp/ex --json | "
                "python -c 'import json,sys; print(json.load(sys.stdin)[\"counts\"])'")
    t.cli("verify", "/tmp/ex")

    errors = Transcript(norm, {"/tmp/nope": os.path.join(tmp, "nope"),
                               "/tmp/crashwalk": os.path.join(tmp, "crashwalk"),
                               "/tmp/orders": os.path.join(tmp, "orders")})
    os.makedirs(os.path.join(tmp, "crashwalk"))
    errors.cli("status", "/tmp/nope")
    errors.cli("status", "/tmp/crashwalk")
    errors.cli("requeue", "/tmp/orders", "--all")
    return {"cli-examples": t.text(), "cli-errors": errors.text()}


def generate(out: str) -> List[str]:
    os.makedirs(out, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="pympx-docs-") as tmp:
        norm = Normaliser(tmp)
        norm.add_pid(os.getpid())
        with stable_cli(norm):
            outputs: Dict[str, str] = {}
            outputs.update(folder_crash(tmp, norm))
            outputs.update(pickup_crash(tmp, norm))
            outputs.update(cli_examples(tmp, norm))
    for name, text in sorted(outputs.items()):
        target = os.path.join(out, f"{name}.txt")
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(target)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the <name>.txt files (default: docs/generated)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(os.path.relpath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
