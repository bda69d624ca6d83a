"""PersistentQueue against a model: a multiset of outstanding work (DESIGN.md G1, G3, G4, G5).

The model knows, for every body, how many copies are ready, in flight and done.  Rules:
put (new or equal bodies), get, task_done, a clean restart, a process crash (the queue
object dropped without dispose, or a real child process that SIGKILLs itself after some
acknowledged operations), and in fsync mode a power cut: the crash-state simulator of
``scripts/torture.py`` picks a state the weak persistence model allows at that moment,
materialises it in a fresh directory and the queue recovers from there.

After every restart the journals must say exactly: outstanding = put - done (equal bodies
counted), nothing acknowledged lost (G1), nothing done redelivered (G4).
"""

from __future__ import annotations

import collections
import gc
import importlib.util
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pympx_queues import _fs
from pympx_queues.persistent import PersistentQueue

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "torture.py")
_spec = importlib.util.spec_from_file_location("torture", SCRIPT)
torture = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("torture", torture)
_spec.loader.exec_module(torture)

PREFIX = "model"


def body_of(n: int) -> str:
    return torture.make_payload(f"m{n:03d}").decode()


def _queue(pickup: str, durability: str) -> PersistentQueue:
    return PersistentQueue(PREFIX, current_pickup_dir=pickup, durability=durability,
                           context="spawn")


def _child(pickup: str, durability: str, bodies: list, acks: int, conn) -> None:
    """A real process: put ``bodies``, get and ack ``acks`` of them, then SIGKILL itself."""
    q = _queue(pickup, durability)
    for b in bodies:
        q.put(b)
        conn.send(("P", b))
    for _ in range(acks):
        b = q.get(timeout=10)
        q.task_done(b)
        conn.send(("D", b))
    conn.send(("end", None))
    os.kill(os.getpid(), signal.SIGKILL)


class PersistentModel(RuleBasedStateMachine):
    durability = _fs.FLUSH

    @initialize()
    def start(self):
        self.work = tempfile.mkdtemp(prefix="pq-model-", dir=_shm())
        self.generation = 0
        self.root = os.path.join(self.work, "g0")
        os.makedirs(self.root)
        self.pickup = os.path.join(self.root, "pickup")
        self.recorder = None
        if self.durability == _fs.FSYNC:
            self.recorder = torture.FsRecorder(self.root)
            _fs.set_tracer(self.recorder)
        self.q = _queue(self.pickup, self.durability)
        self.ready = collections.Counter()
        self.inflight = collections.Counter()
        self.next_id = 0
        self.last = ("none", None, 0)  # (kind, body, trace index before the last rule)

    def teardown(self):
        _fs.set_tracer(None)
        q = getattr(self, "q", None)
        if q is not None:
            self._drop(q, dispose=True)
        shutil.rmtree(getattr(self, "work", "/nonexistent"), ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _drop(q, dispose: bool) -> None:
        if dispose:
            q.dispose()
        q.joinable_queue.close()
        q.joinable_queue.join_thread()

    def outstanding(self):
        return self.ready + self.inflight

    def _begin(self, kind: str, body=None) -> None:
        index = len(self.recorder.events) if self.recorder is not None else 0
        self.last = (kind, body, index)

    def _restart(self, allowed=()) -> None:
        """A new run on the same pickup dir: check recovery, requeue everything.

        ``allowed``: other outstanding multisets that are also correct (a power cut in
        the middle of an operation may or may not have kept it).
        """
        self.q = _queue(self.pickup, self.durability)
        found = collections.Counter(m.body for m in self.q.get_outstanding_messages())
        expected = self.outstanding()
        if found not in [expected, *allowed]:
            lost = expected - found
            extra = found - expected
            assert not lost, f"acknowledged work lost (G1): {sorted(lost)}"
            assert not extra, f"done or never-put work came back (G4/G2): {sorted(extra)}"
        self.q.requeue_unprocessed_work()
        self.ready = found
        self.inflight = collections.Counter()

    # -- rules -----------------------------------------------------------------------
    @rule(dup=st.booleans())
    def put(self, dup):
        known = sorted(self.outstanding())
        if dup and known:
            body = known[0]
        else:
            body = body_of(self.next_id)
            self.next_id += 1
        self._begin("put", body)
        self.q.put(body)
        self.ready[body] += 1

    @precondition(lambda self: sum(self.ready.values()) > 0)
    @rule()
    def get(self):
        self._begin("get")
        body = self.q.get(timeout=10)
        assert self.ready[body] > 0, f"got {body!r}, which is not ready in the model"
        self.ready[body] -= 1
        self.ready += collections.Counter()  # drop zero counts
        self.inflight[body] += 1

    @precondition(lambda self: sum(self.inflight.values()) > 0)
    @rule(pick=st.integers(0, 100))
    def task_done(self, pick):
        bodies = sorted(self.inflight)
        body = bodies[pick % len(bodies)]
        self._begin("task_done", body)
        self.q.task_done(body)
        self.inflight[body] -= 1
        self.inflight += collections.Counter()

    @rule()
    def restart_cleanly(self):
        self._begin("restart")
        self._drop(self.q, dispose=True)
        self._restart()

    @rule()
    def crash_by_dropping_the_object(self):
        self._begin("restart")
        q = self.q
        self.q = None
        q.joinable_queue.close()  # no dispose(): journals left open, as in a crash
        del q
        gc.collect()
        self._restart()

    @rule(n=st.integers(1, 3), acks=st.integers(0, 3))
    def crash_a_real_child_process(self, n, acks):
        acks = min(acks, n)
        bodies = []
        for _ in range(n):
            bodies.append(body_of(self.next_id))
            self.next_id += 1
        recv, send = multiprocessing.Pipe(duplex=False)
        p = multiprocessing.get_context("spawn").Process(
            target=_child, args=(self.pickup, self.durability, bodies, acks, send))
        p.start()
        send.close()
        log = []
        while True:
            try:
                log.append(recv.recv())
            except EOFError:
                break
        p.join(30)
        assert p.exitcode == -signal.SIGKILL, log
        for kind, body in log:
            if kind == "P":
                self.ready[body] += 1
            elif kind == "D":
                self.ready[body] -= 1
        self.ready += collections.Counter()
        if self.recorder is not None:
            # The child's fsyncs happened in another process, outside our tracer: its
            # acknowledged work is durable, so the tree as it is now is the durable base.
            _fs.set_tracer(None)
            self.recorder = torture.FsRecorder(self.root)
            _fs.set_tracer(self.recorder)
        self._begin("restart")
        self._drop(self.q, dispose=True)
        self._restart()

    @invariant()
    def counts_never_negative(self):
        assert all(v >= 0 for v in self.ready.values())
        assert all(v >= 0 for v in self.inflight.values())


class PersistentFsyncModel(PersistentModel):
    durability = _fs.FSYNC

    @rule(choice=st.integers(0, 10 ** 6))
    def power_cut(self, choice):
        """A power cut during the last operation (or just after it): one crash state the
        weak persistence model allows, materialised in a new dir, then recovery."""
        _fs.set_tracer(None)
        trace = self.recorder.dump()
        kind, body, start = self.last
        points = [k for k, ev in enumerate(trace["events"])
                  if k >= start and ev["op"] != "mark"]
        point = points[choice % len(points)] if points else None
        states = [s for k, _l, s in torture.enumerate_crash_states(
            trace, weak=True, rng=random.Random(choice)) if k == point]
        self._drop(self.q, dispose=False)
        self.generation += 1
        self.root = os.path.join(self.work, f"g{self.generation}")
        if states:
            states[choice % len(states)].materialise(self.root)
        else:  # no durable operation since the last rule: the tree as it is
            shutil.copytree(os.path.dirname(self.pickup), self.root)
        self.pickup = os.path.join(self.root, "pickup")
        self.recorder = torture.FsRecorder(self.root)
        _fs.set_tracer(self.recorder)
        expected = self.outstanding()
        allowed = []
        if kind == "put":  # cut mid-put: the put may be lost (it never returned)
            allowed.append(expected - collections.Counter([body]))
        elif kind == "task_done":  # cut mid-ack: the message may stay outstanding
            allowed.append(expected + collections.Counter([body]))
        self._begin("restart")
        self._restart(allowed)


def _shm():
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


# Modest by default (each class < 20 s); MODEL_EXAMPLES=200 for a long hunt.
_SETTINGS = settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "12")),
                     stateful_step_count=14, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow,
                                            HealthCheck.filter_too_much])

TestPersistentQueueFlushModel = PersistentModel.TestCase
TestPersistentQueueFlushModel.settings = _SETTINGS
TestPersistentQueueFsyncModelWithPowerCuts = PersistentFsyncModel.TestCase
TestPersistentQueueFsyncModelWithPowerCuts.settings = _SETTINGS

pytestmark = pytest.mark.timeout(120)
