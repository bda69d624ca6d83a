"""Folder queues against a model: which messages are ready, claimed, done (G1..G6).

Rules: put, get, task_done, nack, recover, a consumer crash (claims abandoned under a dead
owner, then a new consumer recovers them), a real child consumer that claims messages
and SIGKILLs itself, the end of a run (close, drain to DONE, and a new run that a stale
DONE must not end), and in fsync mode a power cut: the crash-state simulator of
``scripts/torture.py`` picks a state the weak persistence model allows during the last
operation, materialises it in a fresh directory, and the queue recovers from there.

The folder itself is compared with the model after every step: the ready messages are
exactly the model's, every one readable (G2); claims match; nothing done comes back (G4).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from queue import Empty

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pympx_queues import DONE, _fs
from pympx_queues.folder import layout as L
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "torture.py")
_spec = importlib.util.spec_from_file_location("torture", SCRIPT)
torture = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("torture", torture)
_spec.loader.exec_module(torture)

EXT = ".msg"


def _writer(root, durability):
    return WritableFolderQueue(root, EXT, durability=durability)


def _reader(root, durability):
    return ReadableFolderQueue(root, EXT, durability=durability, wakeups="poll",
                               poll_interval=0.02, max_retries=None)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def abandon_claims(root: str) -> int:
    """Rename every claim in ``wip/`` to a dead owner (what a crashed consumer leaves)."""
    wip = os.path.join(root, L.WIP_DIR)
    dead = L.Owner(_fs.hostname(), _dead_pid(), 1, "dead0001")
    n = 0
    if not os.path.isdir(wip):  # a power cut before the queue folder was complete
        return 0
    for name in os.listdir(wip):
        parsed = L.parse_owned(name)
        if parsed is not None and parsed.owner.pid == os.getpid():
            os.rename(os.path.join(wip, name), os.path.join(wip, L.format_owned(dead, parsed.name)))
            n += 1
    return n


def _child_claims(root: str, durability: str, k: int, conn) -> None:
    r = _reader(root, durability)
    for _ in range(k):
        try:
            path = r.get(block=False)
        except Empty:
            break
        conn.send(torture.parse_payload(_fs.read_bytes(path)))
    conn.send("end")
    os.kill(os.getpid(), signal.SIGKILL)


def listing(root: str):
    """(ready ids, claimed ids, unreadable count) as found on disk."""
    ready = torture._folder_contents(root)
    wip = torture._folder_contents(os.path.join(root, L.WIP_DIR))
    bad = sum(1 for m in ready + wip if m is None)
    return sorted(m for m in ready if m), sorted(m for m in wip if m), bad


class FolderModel(RuleBasedStateMachine):
    durability = _fs.FLUSH

    @initialize()
    def start(self):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.work = tempfile.mkdtemp(prefix="fq-model-", dir=shm)
        self.generation = 0
        self.root = os.path.join(self.work, "g0", "q")
        os.makedirs(os.path.dirname(self.root))
        self.recorder = None
        if self.durability == _fs.FSYNC:
            self.recorder = torture.FsRecorder(os.path.dirname(self.root))
            _fs.set_tracer(self.recorder)
        self.w = _writer(self.root, self.durability)
        self.r = _reader(self.root, self.durability)
        self.ready = set()
        self.inflight = {}  # id -> wip path
        self.done = set()
        self.next_id = 0
        self.cut = False
        self.last = ("none", None, 0)

    def teardown(self):
        _fs.set_tracer(None)
        if getattr(self, "r", None) is not None:
            self.r.close()
        shutil.rmtree(getattr(self, "work", "/nonexistent"), ignore_errors=True)

    def _begin(self, kind, mid=None):
        index = len(self.recorder.events) if self.recorder is not None else 0
        self.last = (kind, mid, index)

    # -- rules -----------------------------------------------------------------------
    @rule(batch=st.integers(1, 3))
    def put(self, batch):
        mids = [f"m{self.next_id + i:03d}" for i in range(batch)]
        self.next_id += batch
        self._begin("put", mids[-1])
        if batch == 1:
            self.w.put_data(mids[0] + EXT, torture.make_payload(mids[0]))
        else:
            self.w.put_many([(m + EXT, torture.make_payload(m)) for m in mids])
            self.last = ("put_many", tuple(mids), self.last[2])
        self.ready.update(mids)

    @rule()
    def get(self):
        self._begin("get")
        if not self.ready:
            with pytest.raises(Empty):
                self.r.get(block=False)
            return
        path = self.r.get(block=False)
        mid = torture.parse_payload(_fs.read_bytes(path))
        assert mid in self.ready, f"got {mid!r}, not ready in the model (done: {mid in self.done})"
        self.ready.discard(mid)
        self.inflight[mid] = path

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 100), nack=st.booleans())
    def settle(self, pick, nack):
        mid = sorted(self.inflight)[pick % len(self.inflight)]
        path = self.inflight.pop(mid)
        if nack:
            self._begin("nack", mid)
            self.r.nack(path, "model nack")
            self.ready.add(mid)
        else:
            self._begin("task_done", mid)
            self.r.task_done(path)
            self.done.add(mid)

    @rule()
    def recover_leaves_live_claims_alone(self):
        self._begin("recover")
        report = self.r.recover()
        assert not report.requeued  # every claim is ours and we are alive

    @rule()
    def consumer_crash_then_recovery(self):
        self._begin("recover")
        self.r.close()
        assert abandon_claims(self.root) == len(self.inflight)
        self.r = _reader(self.root, self.durability)  # recovers at start
        self.ready.update(self.inflight)
        self.inflight = {}

    @rule(k=st.integers(1, 3))
    def child_consumer_killed_holding_claims(self, k):
        self._begin("recover")
        recv, send = multiprocessing.Pipe(duplex=False)
        p = multiprocessing.get_context("spawn").Process(
            target=_child_claims, args=(self.root, self.durability, k, send))
        p.start()
        send.close()
        got = []
        while True:
            try:
                got.append(recv.recv())
            except EOFError:
                break
        p.join(30)
        assert p.exitcode == -signal.SIGKILL, got
        claimed = [m for m in got if m != "end"]
        assert set(claimed) <= self.ready
        if self.recorder is not None:
            # The child's renames happened outside our tracer: rebase the durable state.
            _fs.set_tracer(None)
            self.recorder = torture.FsRecorder(os.path.dirname(self.root))
            _fs.set_tracer(self.recorder)
            self._begin("recover")
        report = self.r.recover()
        assert len(report.requeued) == len(claimed)

    @precondition(lambda self: not self.inflight and not self.cut)
    @rule()
    def end_of_run_then_a_new_run(self):
        self._begin("end")
        self.w.close()
        seen = set()
        while True:
            path = self.r.get(timeout=20)
            if path is DONE:
                break
            mid = torture.parse_payload(_fs.read_bytes(path))
            assert mid in self.ready and mid not in seen
            seen.add(mid)
            self.r.task_done(path)
        assert seen == self.ready, "DONE came before every message was delivered (G6)"
        self.done |= seen
        self.ready = set()
        # A new run: the stale DONE must not end it (G6).
        self.r.close()
        self.w = _writer(self.root, self.durability)
        self.r = _reader(self.root, self.durability)
        mid = f"m{self.next_id:03d}"
        self.next_id += 1
        self._begin("put", mid)
        self.w.put_data(mid + EXT, torture.make_payload(mid))
        path = self.r.get(timeout=5)
        assert path is not DONE, "a stale DONE ended a new run (G6)"
        assert torture.parse_payload(_fs.read_bytes(path)) == mid
        self.inflight[mid] = path

    @invariant()
    def folder_matches_the_model(self):
        if not hasattr(self, "r"):
            return
        ready, claimed, bad = listing(self.root)
        assert bad == 0, "a half-written or unreadable file under a message name (G2)"
        assert set(ready) == self.ready, (sorted(self.ready), ready)
        assert set(claimed) == set(self.inflight)
        assert not (self.done & (set(ready) | set(claimed))), "done work came back (G4)"


class FolderFsyncModel(FolderModel):
    durability = _fs.FSYNC

    @rule(choice=st.integers(0, 10 ** 6))
    def power_cut(self, choice):
        """A power cut during the last operation: one state the weak model allows."""
        _fs.set_tracer(None)
        trace = self.recorder.dump()
        kind, arg, start = self.last
        points = [k for k, ev in enumerate(trace["events"])
                  if k >= start and ev["op"] != "mark"]
        point = points[choice % len(points)] if points else None
        states = [s for k, _l, s in torture.enumerate_crash_states(
            trace, weak=True, rng=random.Random(choice)) if k == point]
        self.r.close()
        self.generation += 1
        base = os.path.join(self.work, f"g{self.generation}")
        if states:
            states[choice % len(states)].materialise(base)
        else:
            shutil.copytree(os.path.dirname(self.root), base)
        self.root = os.path.join(base, "q")
        abandon_claims(self.root)
        self.recorder = torture.FsRecorder(base)
        _fs.set_tracer(self.recorder)
        self.cut = True
        self.w = _writer(self.root, self.durability)
        self.r = _reader(self.root, self.durability)  # recovers the abandoned claims
        ready, claimed, bad = listing(self.root)
        assert bad == 0 and not claimed
        expected = self.ready | set(self.inflight)
        maybe_missing = set()
        maybe_back = set()
        if kind == "put":
            maybe_missing = {arg}
        elif kind == "put_many":
            maybe_missing = set(arg)
        elif kind == "task_done":
            maybe_back = {arg}
        found = set(ready)
        lost = expected - found - maybe_missing
        extra = found - expected - maybe_back
        assert not lost, f"acknowledged work lost by a power cut in fsync mode (G1): {lost}"
        assert not extra, f"done or unknown work came back (G4/G2): {extra}"
        self.ready = found
        self.inflight = {}
        self.done -= found


# Modest by default (each class well under 20 s); MODEL_EXAMPLES=200 for a long hunt.
_SETTINGS = settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "12")),
                     stateful_step_count=14, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow,
                                            HealthCheck.filter_too_much])

TestFolderQueueFlushModel = FolderModel.TestCase
TestFolderQueueFlushModel.settings = _SETTINGS
TestFolderQueueFsyncModelWithPowerCuts = FolderFsyncModel.TestCase
TestFolderQueueFsyncModelWithPowerCuts.settings = _SETTINGS

pytestmark = pytest.mark.timeout(120)
