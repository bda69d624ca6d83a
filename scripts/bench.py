#!/usr/bin/env python3
"""Benchmark both halves of pympx_queues against the queues people use today.

One run, one process tree, one temporary directory on one file system.  Every system
runs the same workloads on messages of ``--size`` bytes:

* ``put``      - ``--n`` puts from one process into a fresh queue (msg/s);
* ``put_batch``- the same through the system's batch API (``put_many``) where it has one,
  in batches of ``--batch`` (this is where batched commits show in fsync mode);
* ``get_ack``  - get + acknowledge every message of that queue in the same process;
* ``get_ack_batch`` - the same through the batch API (``get_many`` + ``task_done_many``);
* ``drain``    - ``--consumers`` (4) spawned consumer processes drain a preloaded queue of
  ``--n`` messages; the ids they saw are counted for duplicates and losses;
* ``drain_batch`` - the same with batched gets and acks, where the system has them;
* ``pipeline`` - one producer (the worker) puts ``--n`` messages while the consumers get and
  acknowledge them; clock from the first put to the last ack; duplicates/losses counted.

Runs go in ``--repeat`` rounds over all systems (median shown); systems compared by a
target run back to back and targets use the median of per-round ratios.

Systems: our PersistentQueue and folder queue (flush and fsync), the original
``pympx.queuing`` classes, python-dirq ``QueueSimple``, diskcache ``Deque``, litequeue,
persist-queue ``SQLiteAckQueue``, queuelib ``FifoDiskQueue``, plain
``multiprocessing.JoinableQueue``, and raw system-call baselines (append+flush,
append+fsync, create+write+rename+unlink, the same with fsync).  The fsync baselines are
the naive "one fsync per message" rates our batched commits are judged against.

Each system runs in its own worker subprocess (its own session, killed as a group on a
time-out), so a peer that fails to import, hangs or crashes is reported as a row with
its error, never hidden.  Output: tables on stdout and, with ``--json PATH``, a JSON file.

    python scripts/bench.py --quick                 # smoke test, < 1 minute
    python scripts/bench.py --repeat 3 --fsync-n 4000 --json bench-results.json \
        --markdown bench.md                         # the full run in the README
    python scripts/bench.py --systems folder-flush,dirq --n 20000
    python scripts/bench.py --list                  # the systems

Peers: ``bash scripts/install_bench_peers.sh`` (pip extra ``bench`` plus ``pympx`` with
``--no-deps``).  Figures on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import queue as std_queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

ID_WIDTH = 10  # every payload starts with its zero-padded message id

# --------------------------------------------------------------------------- helpers


def make_payload(i: int, size: int) -> str:
    """Message ``i``: its id in ``ID_WIDTH`` digits, padded with 'x' to ``size`` chars."""
    head = "%0*d" % (ID_WIDTH, i)
    return head + "x" * max(0, size - ID_WIDTH)


def payload_id(payload: Any) -> int:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = bytes(payload).decode("ascii", "replace")
    return int(str(payload)[:ID_WIDTH])


def count_ids(ids: List[int], n: int) -> Dict[str, int]:
    """Duplicates (extra deliveries), losses (ids never seen) and foreign ids."""
    seen: Dict[int, int] = {}
    foreign = 0
    for i in ids:
        if 0 <= i < n:
            seen[i] = seen.get(i, 0) + 1
        else:
            foreign += 1
    dup = sum(c - 1 for c in seen.values())
    return {"delivered": len(ids), "unique": len(seen), "duplicates": dup,
            "lost": n - len(seen), "foreign": foreign}


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class EndOfStream(Exception):
    """Raised by an adapter's get_ack when the queue is drained / DONE was seen."""


#: Notes found while running (a peer's bug worked around, ...), reported with the row.
WORKER_NOTES: List[str] = []


def note(text: str) -> None:
    if text not in WORKER_NOTES:
        WORKER_NOTES.append(text)


# --------------------------------------------------------------------------- adapters
#
# An adapter wraps one system behind five verbs.  Producer side (in the worker):
# ``open_producer``, ``put``, optionally ``put_many``, ``finish_producer`` (DONE/close).
# Consumer side: ``get_ack`` returns one payload after acknowledging it, or raises
# EndOfStream.  ``consumer_spec`` is what a spawned consumer process receives (it must
# pickle under spawn) and ``consumer(spec, index, count)`` opens a consumer there.

class Adapter:
    name = ""
    label = ""
    kind = "peer"          # ours | peer | raw
    family = "journal"     # journal | file | memory: picks the raw baseline
    durability = "flush"   # none | flush | fsync (what a returned put survives)
    durability_note = ""
    multi: Optional[str] = None  # None = supports multi-process consumers, else why not
    max_n: Optional[int] = None  # cap on n for very slow systems (reported)
    has_batch = False
    ack_note = ""
    #: True when consumers learn the end of the stream from the queue (DONE sentinels);
    #: False when "empty" is all they see (then the pipeline consumers poll until the
    #: producer has finished).
    has_eos = False

    def __init__(self, root: str, size: int, consumers: int) -> None:
        self.root = root
        self.size = size
        self.consumers = consumers
        self.notes: List[str] = []

    # producer
    def open_producer(self, tag: str) -> None:
        raise NotImplementedError

    def put(self, i: int, payload: str) -> None:
        raise NotImplementedError

    def put_many(self, items: List[Tuple[int, str]]) -> None:
        raise NotImplementedError

    def finish_producer(self) -> None:
        pass

    def finish_local(self) -> None:
        """End the stream for a consumer in this same process (get_ack workload)."""
        self.finish_producer()

    # consumer in the producer's process (get_ack workload)
    def open_local_consumer(self) -> "Adapter":
        return self

    def get_ack(self) -> Any:
        raise NotImplementedError

    #: True when the consumer side has a batch API (``get_ack_many``).
    has_batch_get = False

    def get_ack_many(self, k: int) -> List[Any]:
        """Up to ``k`` payloads, acknowledged with one batch call; EndOfStream when none."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # multi-process consumers
    def consumer_spec(self) -> Any:
        raise NotImplementedError

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        raise NotImplementedError


# ----- raw baselines ---------------------------------------------------------------


class RawAppend(Adapter):
    """One append-only log: put = write() (+fsync); ack = write() of the id to an ack log."""

    kind = "raw"
    family = "journal"
    has_batch = True
    has_batch_get = True
    fsync = False

    def open_producer(self, tag: str) -> None:
        self.dir = os.path.join(self.root, tag)
        os.makedirs(self.dir)
        self.data_path = os.path.join(self.dir, "data.log")
        self.fd = os.open(self.data_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def put(self, i: int, payload: str) -> None:
        os.write(self.fd, payload.encode() + b"\n")
        if self.fsync:
            os.fsync(self.fd)

    def put_many(self, items: List[Tuple[int, str]]) -> None:
        os.write(self.fd, b"".join(p.encode() + b"\n" for _, p in items))
        if self.fsync:
            os.fsync(self.fd)

    def finish_producer(self) -> None:
        os.close(self.fd)

    def open_local_consumer(self) -> "Adapter":
        return _RawAppendConsumer(self.data_path, self.fsync, 0, 1)

    def consumer_spec(self) -> Any:
        return (self.data_path, self.fsync)

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        return _RawAppendConsumer(spec[0], spec[1], index, count)


class _RawAppendConsumer:
    def __init__(self, data_path: str, fsync: bool, index: int, count: int) -> None:
        self.fsync = fsync
        self.f = open(data_path, "rb")  # buffered sequential read
        self.index, self.count, self.line = index, count, -1
        self.partial = b""
        ack = "%s.ack%d" % (data_path, index)
        self.ack_fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _readline(self) -> bytes:
        rec = self.f.readline()
        if rec and not rec.endswith(b"\n"):  # a record still being appended (pipeline)
            self.partial += rec
            return b""
        if self.partial:
            rec, self.partial = self.partial + rec, b""
        return rec

    def get_ack(self) -> Any:
        while True:
            rec = self._readline()
            if not rec:
                raise EndOfStream
            self.line += 1
            if self.line % self.count == self.index:  # disjoint slices: no contention
                os.write(self.ack_fd, rec[:ID_WIDTH] + b"\n")
                if self.fsync:
                    os.fsync(self.ack_fd)
                return rec

    def get_ack_many(self, k: int) -> List[Any]:
        out: List[bytes] = []
        while len(out) < k:
            rec = self._readline()
            if not rec:
                break
            self.line += 1
            if self.line % self.count == self.index:
                out.append(rec)
        if not out:
            raise EndOfStream
        os.write(self.ack_fd, b"".join(r[:ID_WIDTH] + b"\n" for r in out))
        if self.fsync:
            os.fsync(self.ack_fd)  # one fsync per batch of acks
        return out

    def close(self) -> None:
        self.f.close()
        os.close(self.ack_fd)


class RawAppendFlush(RawAppend):
    name = "raw-append-flush"
    label = "raw append+flush"
    durability = "flush"


class RawAppendFsync(RawAppend):
    name = "raw-append-fsync"
    label = "raw append+fsync (naive: 1 fsync/msg)"
    durability = "fsync"
    fsync = True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RawFile(Adapter):
    """File per message: create+write(+fsync) in tmp/, rename into q/ (+fsync dir);
    consume = rename to wip/ (claim), read, unlink (+fsync dir)."""

    kind = "raw"
    family = "file"
    has_batch = True
    has_batch_get = True
    fsync = False

    def open_producer(self, tag: str) -> None:
        self.dir = os.path.join(self.root, tag)
        for sub in ("q", "tmp", "wip"):
            os.makedirs(os.path.join(self.dir, sub))

    def _write(self, i: int, payload: str) -> str:
        name = "%0*d.msg" % (ID_WIDTH, i)
        tmp = os.path.join(self.dir, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload.encode())
        if self.fsync:
            os.fsync(fd)
        os.close(fd)
        return name

    def put(self, i: int, payload: str) -> None:
        name = self._write(i, payload)
        os.rename(os.path.join(self.dir, "tmp", name), os.path.join(self.dir, "q", name))
        if self.fsync:
            _fsync_dir(os.path.join(self.dir, "q"))

    def put_many(self, items: List[Tuple[int, str]]) -> None:
        # Best case for a batch: one directory fsync per batch (file fsyncs stay per file).
        for i, p in items:
            name = self._write(i, p)
            os.rename(os.path.join(self.dir, "tmp", name), os.path.join(self.dir, "q", name))
        if self.fsync:
            _fsync_dir(os.path.join(self.dir, "q"))

    def open_local_consumer(self) -> "Adapter":
        return _RawFileConsumer(self.dir, self.fsync, 0, 1)

    def consumer_spec(self) -> Any:
        return (self.dir, self.fsync)

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        return _RawFileConsumer(spec[0], spec[1], index, count)


class _RawFileConsumer:
    def __init__(self, qdir: str, fsync: bool, index: int, count: int) -> None:
        self.q = os.path.join(qdir, "q")
        self.wip = os.path.join(qdir, "wip")
        self.fsync = fsync
        self.index, self.count = index, count
        self.names: Optional[List[str]] = None

    def get_ack(self) -> Any:
        if self.names is None:  # one listing; disjoint slices: no contention
            names = sorted(os.listdir(self.q), reverse=True)
            self.names = [n for n in names if int(n[:ID_WIDTH]) % self.count == self.index]
        while self.names:
            name = self.names.pop()
            wip = os.path.join(self.wip, name)
            try:
                os.rename(os.path.join(self.q, name), wip)
            except FileNotFoundError:
                continue
            fd = os.open(wip, os.O_RDONLY)
            data = os.read(fd, 1 << 20)
            os.close(fd)
            os.unlink(wip)
            if self.fsync:
                _fsync_dir(self.wip)
            return data
        raise EndOfStream

    def get_ack_many(self, k: int) -> List[Any]:
        fsync, self.fsync = self.fsync, False
        out: List[bytes] = []
        try:
            while len(out) < k:
                try:
                    out.append(self.get_ack())
                except EndOfStream:
                    break
        finally:
            self.fsync = fsync
        if not out:
            raise EndOfStream
        if fsync:
            _fsync_dir(self.wip)  # one directory fsync covers the batch of unlinks
        return out

    def reset(self) -> None:
        self.names = None  # list the folder again (pipeline: the producer adds files)

    def close(self) -> None:
        pass


class RawFileFlush(RawFile):
    name = "raw-file-flush"
    label = "raw create+write+rename+unlink"
    durability = "flush"


class RawFileFsync(RawFile):
    name = "raw-file-fsync"
    label = "raw file + fsync (naive: fsync file+dir/msg)"
    durability = "fsync"
    fsync = True


# ----- our PersistentQueue ---------------------------------------------------------


class OursPersistent(Adapter):
    kind = "ours"
    has_eos = True
    family = "journal"
    mode = "flush"
    has_batch = False

    def open_producer(self, tag: str) -> None:
        from pympx_queues.persistent import PersistentQueue

        self.dir = os.path.join(self.root, tag)
        os.makedirs(self.dir)
        self.q = PersistentQueue(pickup_file_prefix="bench", current_pickup_dir=self.dir,
                                 number_of_workers=self.consumers, durability=self.mode)
        self.has_batch = hasattr(self.q, "put_many")
        self.has_batch_get = hasattr(self.q, "get_many") and hasattr(self.q,
                                                                     "task_done_many")

    def put(self, i: int, payload: str) -> None:
        self.q.put(payload)

    def put_many(self, items: List[Tuple[int, str]]) -> None:
        self.q.put_many([p for _, p in items])

    def finish_producer(self) -> None:
        self.q.close()

    def open_local_consumer(self) -> Any:
        return _QueueConsumer(self.q)

    def close(self) -> None:
        for meth in ("dispose",):
            fn = getattr(self.q, meth, None)
            if fn is not None:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - best effort at teardown
                    pass

    def consumer_spec(self) -> Any:
        return self.q

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        return _QueueConsumer(spec)


class _QueueConsumer:
    """Consumer over a pickled PersistentQueue-like object (ours or pympx's)."""

    def __init__(self, q: Any, done: Any = None, timeout: float = 30) -> None:
        self.q = q
        self.timeout = timeout
        if done is None:
            from pympx_queues.sentinels import DONE, FAILED

            self.ends = (DONE, FAILED)
        else:
            self.ends = done
        self.ended = False  # a batch ended with DONE: this consumer's stream is over

    def _is_end(self, item: Any) -> bool:
        return any(item is e or (type(item) is type(e) and item == e) for e in self.ends)

    def get_ack(self) -> Any:
        if self.ended:
            raise EndOfStream
        item = self.q.get(timeout=self.timeout)
        if self._is_end(item):
            self.ended = True
            raise EndOfStream
        self.q.task_done(item)
        return item

    def get_ack_many(self, k: int) -> List[Any]:
        if self.ended:
            raise EndOfStream
        items = self.q.get_many(k, timeout=self.timeout)
        body = [x for x in items if not self._is_end(x)]
        if len(body) < len(items):
            self.ended = True  # one DONE per consumer: never take a second one
        if body:
            self.q.task_done_many(body)
        if not body:
            raise EndOfStream
        return body

    def close(self) -> None:
        fn = getattr(self.q, "dispose", None)
        if fn is not None:
            fn()


class OursPersistentFlush(OursPersistent):
    name = "pq-flush"
    label = "ours PersistentQueue flush"
    durability = "flush"
    mode = "flush"


class OursPersistentFsync(OursPersistent):
    name = "pq-fsync"
    label = "ours PersistentQueue fsync"
    durability = "fsync"
    mode = "fsync"


# ----- our folder queue ------------------------------------------------------------


class OursFolder(Adapter):
    kind = "ours"
    has_eos = True
    family = "file"
    mode = "flush"

    def open_producer(self, tag: str) -> None:
        from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue

        self.dir = os.path.join(self.root, tag)
        self.w = WritableFolderQueue(self.dir, durability=self.mode)
        self.has_batch = hasattr(self.w, "put_many")
        self.has_batch_get = hasattr(ReadableFolderQueue, "task_done_many")

    def _name(self, i: int) -> str:
        return "%0*d.tsv" % (ID_WIDTH, i)

    def put(self, i: int, payload: str) -> None:
        self.w.put_data(self._name(i), payload.encode())

    def put_many(self, items: List[Tuple[int, str]]) -> None:
        self.w.put_many([(self._name(i), p.encode()) for i, p in items])

    def finish_producer(self) -> None:
        self.w.close()

    #: extra ReadableFolderQueue keyword arguments (the default wake-ups unless set)
    reader_kwargs: Dict[str, Any] = {}

    def open_local_consumer(self) -> Any:
        return _FolderConsumer(self.dir, self.mode, self.reader_kwargs)

    def consumer_spec(self) -> Any:
        return (self.dir, self.mode, self.reader_kwargs)

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        return _FolderConsumer(*spec)


class _FolderConsumer:
    def __init__(self, path: str, mode: str, kwargs: Dict[str, Any]) -> None:
        from pympx_queues.folder import ReadableFolderQueue
        from pympx_queues.sentinels import DONE, FAILED

        self.r = ReadableFolderQueue(path, durability=mode, **kwargs)
        self.done, self.failed = DONE, FAILED
        self.ended = False

    def get_ack(self) -> Any:
        if self.ended:
            raise EndOfStream
        try:
            item = self.r.get(timeout=30)
        except std_queue.Empty:
            raise EndOfStream from None
        if item is self.done or item is self.failed:  # singletons: what users write
            self.ended = True
            raise EndOfStream
        with open(item, "rb") as f:
            data = f.read()
        self.r.task_done(item)
        return data

    def get_ack_many(self, k: int) -> List[Any]:
        """k gets (the first may wait, the rest do not), one task_done_many for all."""
        if self.ended:
            raise EndOfStream
        paths: List[str] = []
        while len(paths) < k:
            try:
                item = self.r.get(timeout=30) if not paths else self.r.get(block=False)
            except std_queue.Empty:
                break
            if item is self.done or item is self.failed:
                self.ended = True
                break
            paths.append(item)
        if not paths:
            raise EndOfStream
        out = []
        for p in paths:
            with open(p, "rb") as f:
                out.append(f.read())
        self.r.task_done_many(paths)
        return out

    def close(self) -> None:
        fn = getattr(self.r, "dispose", None) or getattr(self.r, "close", None)
        if fn is not None:
            fn()


class OursFolderFlush(OursFolder):
    name = "folder-flush"
    label = "ours folder queue flush"
    durability = "flush"
    mode = "flush"


class OursFolderFsync(OursFolder):
    name = "folder-fsync"
    label = "ours folder queue fsync"
    durability = "fsync"
    mode = "fsync"


class OursFolderFlushPoll(OursFolder):
    """Informative: the same queue with polling instead of inotify wake-up hints, to show
    what the wake-up machinery costs (the targets are judged on the default)."""

    name = "folder-flush-poll"
    label = "ours folder queue flush, wakeups='poll'"
    durability = "flush"
    mode = "flush"
    reader_kwargs = {"wakeups": "poll"}


# ----- multiprocessing.JoinableQueue ----------------------------------------------


class MpJoinable(Adapter):
    name = "mp-joinable"
    label = "multiprocessing.JoinableQueue"
    has_eos = True
    kind = "peer"
    family = "memory"
    durability = "none"
    durability_note = "in memory: nothing survives a crash"

    def open_producer(self, tag: str) -> None:
        import multiprocessing

        self.q = multiprocessing.get_context("spawn").JoinableQueue()

    def put(self, i: int, payload: str) -> None:
        self.q.put(payload)

    def finish_producer(self) -> None:
        for _ in range(self.consumers):
            self.q.put(None)

    def get_ack(self) -> Any:
        item = self.q.get(timeout=30)
        self.q.task_done()
        if item is None:
            raise EndOfStream
        return item

    def consumer_spec(self) -> Any:
        return self.q

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        return _MpConsumer(spec)


class _MpConsumer:
    def __init__(self, q: Any) -> None:
        self.q = q

    def get_ack(self) -> Any:
        item = self.q.get(timeout=30)
        self.q.task_done()
        if item is None:
            raise EndOfStream
        return item

    def close(self) -> None:
        pass


# ----- the original pympx.queuing --------------------------------------------------


def _pympx_queuing():
    """Import pympx.queuing; pympx's logger writes to stderr, keep it quiet."""
    import logging

    from pympx import queuing

    logging.getLogger("pympx").setLevel(logging.WARNING)
    return queuing


class PympxPersistent(Adapter):
    name = "pympx-pq"
    label = "pympx PersistentQueue (orig.)"
    has_eos = True
    kind = "peer"
    family = "journal"
    durability = "flush"
    durability_note = "journal flushed per put (no fsync); pickup file opened with 'w'"

    def open_producer(self, tag: str) -> None:
        queuing = _pympx_queuing()
        self.dir = os.path.join(self.root, tag)
        os.makedirs(self.dir)
        self.q = queuing.PersistentQueue(pickup_file_prefix="bench",
                                         current_pickup_dir=self.dir,
                                         number_of_workers=self.consumers)

    def put(self, i: int, payload: str) -> None:
        self.q.put(payload)

    def finish_producer(self) -> None:
        self.q.close()

    def finish_local(self) -> None:
        # pympx's close() also closes the underlying multiprocessing queue, after which
        # this process can no longer get(): put the DONE markers (0) without closing.
        self.notes.append("get+ack in one process: DONE put with put(0) instead of "
                          "close(), which closes the underlying queue for this process")
        for _ in range(self.consumers):
            self.q.put(0)

    def open_local_consumer(self) -> Any:
        return _QueueConsumer(self.q, done=(0, -1))  # pympx DONE=0, FAILED=-1

    def close(self) -> None:
        self.q.dispose()

    def consumer_spec(self) -> Any:
        return self.q

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        _pympx_queuing()
        return _QueueConsumer(spec, done=(0, -1))


def _patch_getlogin(notes: List[str]) -> None:
    """pympx folder queues call os.getlogin(), which raises without a controlling tty."""
    try:
        os.getlogin()
    except OSError as exc:
        import getpass

        os.getlogin = getpass.getuser  # type: ignore[assignment]
        notes.append("pympx calls os.getlogin(), which raised %r here (no controlling "
                     "terminal); ran with os.getlogin patched to getpass.getuser" % exc)


class PympxFolder(Adapter):
    name = "pympx-folder"
    label = "pympx Writable/ReadableFolderQueue"
    has_eos = True
    kind = "peer"
    family = "file"
    durability = "flush"
    durability_note = "rename-based, no fsync"
    max_n = 2000
    ack_note = ""

    def open_producer(self, tag: str) -> None:
        queuing = _pympx_queuing()
        _patch_getlogin(self.notes)
        self.dir = os.path.join(self.root, tag)
        self.stage = os.path.join(self.root, tag + "-stage")
        os.makedirs(self.stage)
        self.w = queuing.WritableFolderQueue(self.dir)

    def put(self, i: int, payload: str) -> None:
        # pympx's API moves an existing file into the queue: writing it is part of a put.
        path = os.path.join(self.stage, "%0*d.tsv" % (ID_WIDTH, i))
        with open(path, "w") as f:
            f.write(payload)
        self.w.put(path)

    def finish_producer(self) -> None:
        self.w.close()

    def open_local_consumer(self) -> Any:
        c = _PympxFolderConsumer(self.dir)
        self._local = c
        return c

    def consumer_spec(self) -> Any:
        return self.dir

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        _pympx_queuing()
        _patch_getlogin([])
        return _PympxFolderConsumer(spec)


class _PympxFolderConsumer:
    def __init__(self, path: str) -> None:
        queuing = _pympx_queuing()
        self.r = queuing.ReadableFolderQueue(path)
        self.broken_task_done: Optional[str] = None

    def get_ack(self) -> Any:
        item = self.r.get(timeout=30000)  # pympx: milliseconds
        if item == 0 or item == -1:
            raise EndOfStream
        with open(item, "rb") as f:
            data = f.read()
        if self.broken_task_done is None:
            try:
                self.r.task_done(item)
                self.broken_task_done = ""
                return data
            except AttributeError as exc:
                self.broken_task_done = repr(exc)
                note("pympx 1.2.5 ReadableFolderQueue.task_done raises %s (a RobustQueue "
                     "method it calls does not exist on folder queues); acked by deleting "
                     "the wip file, as its docs allow" % self.broken_task_done)
        if self.broken_task_done:
            os.remove(item)  # the documented alternative: the caller removes the wip file
        else:
            self.r.task_done(item)
        return data

    def close(self) -> None:
        pass


# ----- python-dirq -----------------------------------------------------------------


class Dirq(Adapter):
    name = "dirq"
    label = "python-dirq QueueSimple"
    kind = "peer"
    family = "file"
    durability = "flush"
    durability_note = "create+write+link, no fsync"

    def open_producer(self, tag: str) -> None:
        from dirq.QueueSimple import QueueSimple

        self.dir = os.path.join(self.root, tag)
        self.q = QueueSimple(self.dir)

    def put(self, i: int, payload: str) -> None:
        self.q.add(payload.encode())

    def open_local_consumer(self) -> Any:
        return _DirqConsumer(self.dir)

    def consumer_spec(self) -> Any:
        return self.dir

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        return _DirqConsumer(spec)


def _dirq_names(it: Any):
    # After its StopIteration, QueueSimple's next() returns '' instead of raising again.
    while True:
        try:
            name = next(it)
        except StopIteration:
            return
        if not name:
            return
        yield name


class _DirqConsumer:
    def __init__(self, path: str) -> None:
        from dirq.QueueSimple import QueueSimple

        self.q = QueueSimple(path)
        self.it = iter(self.q)
        self.passes_without = 0

    def get_ack(self) -> Any:
        # QueueSimple is its own iterator and iter() on it re-lists the folder, so step
        # with next(): one listing per pass, as dirq's documented loop does.
        while True:
            for name in _dirq_names(self.it):
                if self.q.lock(name):  # link(name, name.lck); lost races return False
                    data = self.q.get(name)
                    self.q.remove(name)
                    self.passes_without = 0
                    return data
            # pass exhausted: one fresh pass to be sure the queue is empty
            self.passes_without += 1
            if self.passes_without > 1:
                raise EndOfStream
            self.it = iter(self.q)

    def reset(self) -> None:
        self.passes_without = 0
        self.it = iter(self.q)  # a fresh pass lists the folder again

    def close(self) -> None:
        pass


# ----- diskcache Deque -------------------------------------------------------------


class DiskcacheDeque(Adapter):
    name = "diskcache"
    label = "diskcache Deque"
    kind = "peer"
    family = "journal"
    durability = "flush"
    durability_note = "SQLite WAL, synchronous=NORMAL (no fsync per commit)"
    ack_note = "no ack: popleft() removes (at-most-once)"

    def open_producer(self, tag: str) -> None:
        from diskcache import Deque

        self.dir = os.path.join(self.root, tag)
        self.q = Deque(directory=self.dir)

    def put(self, i: int, payload: str) -> None:
        self.q.append(payload)

    def get_ack(self) -> Any:
        try:
            return self.q.popleft()
        except IndexError:
            raise EndOfStream from None

    def consumer_spec(self) -> Any:
        return self.dir

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        from diskcache import Deque

        inst = cls.__new__(cls)
        inst.q = Deque(directory=spec)
        return inst


# ----- litequeue -------------------------------------------------------------------


def _retry_locked(fn, *args):
    """SQLite peers under multi-process contention: retry 'database is locked'."""
    import sqlite3

    delay = 0.001
    while True:
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


class LiteQueueAdapter(Adapter):
    name = "litequeue"
    label = "litequeue LiteQueue"
    kind = "peer"
    family = "journal"
    durability = "flush"
    durability_note = "SQLite WAL, synchronous=NORMAL (no fsync per commit)"

    def open_producer(self, tag: str) -> None:
        from litequeue import LiteQueue

        os.makedirs(os.path.join(self.root, tag))
        self.path = os.path.join(self.root, tag, "q.sqlite3")
        self.q = LiteQueue(self.path)

    def put(self, i: int, payload: str) -> None:
        self.q.put(payload)

    def get_ack(self) -> Any:
        msg = _retry_locked(self.q.pop)
        if msg is None:
            raise EndOfStream
        _retry_locked(self.q.done, msg.message_id)
        return msg.data

    def consumer_spec(self) -> Any:
        return self.path

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        from litequeue import LiteQueue

        inst = cls.__new__(cls)
        inst.q = _retry_locked(LiteQueue, spec)
        return inst


# ----- persist-queue SQLiteAckQueue -------------------------------------------------


class PersistQueueAck(Adapter):
    name = "persist-queue"
    label = "persist-queue SQLiteAckQueue"
    kind = "peer"
    family = "journal"
    durability = "fsync"
    durability_note = ("SQLite WAL, default synchronous=FULL: one WAL fsync per "
                       "auto-committed put/ack")

    def open_producer(self, tag: str) -> None:
        import logging

        logging.getLogger("persistqueue").setLevel(logging.WARNING)
        from persistqueue import SQLiteAckQueue

        self.dir = os.path.join(self.root, tag)
        self.q = SQLiteAckQueue(self.dir, multithreading=True)

    def put(self, i: int, payload: str) -> None:
        self.q.put(payload)

    def get_ack(self) -> Any:
        from persistqueue import Empty

        try:
            item = _retry_locked(self.q.get, False, None, None, False, True)
        except Empty:
            raise EndOfStream from None
        _retry_locked(self.q.ack, None, item["pqid"])
        return item["data"]

    def consumer_spec(self) -> Any:
        return self.dir

    @classmethod
    def consumer(cls, spec: Any, index: int, count: int) -> Any:
        import logging

        logging.getLogger("persistqueue").setLevel(logging.WARNING)
        from persistqueue import SQLiteAckQueue

        inst = cls.__new__(cls)
        inst.q = _retry_locked(functools.partial(SQLiteAckQueue, spec, multithreading=True))
        return inst


# ----- queuelib FifoDiskQueue ------------------------------------------------------


class QueuelibFifo(Adapter):
    name = "queuelib"
    label = "queuelib FifoDiskQueue"
    kind = "peer"
    family = "journal"
    durability = "none"
    durability_note = ("records are written (os.write) per push, but the head/tail "
                       "positions live in memory until close(): after a crash the queue "
                       "reopens at its last close() and the messages pushed since are gone")
    ack_note = "no ack: pop() removes (at-most-once)"
    multi = ("single process only: read/write offsets live in the owning object and "
             "info.json is written on close(), so a second process would re-read the "
             "same records")

    def open_producer(self, tag: str) -> None:
        from queuelib import FifoDiskQueue

        self.dir = os.path.join(self.root, tag)
        self.q = FifoDiskQueue(self.dir)

    def put(self, i: int, payload: str) -> None:
        self.q.push(payload.encode())

    def get_ack(self) -> Any:
        item = self.q.pop()
        if item is None:
            raise EndOfStream
        return item

    def close(self) -> None:
        self.q.close()


ADAPTERS: Dict[str, type] = {cls.name: cls for cls in (
    OursPersistentFlush, OursPersistentFsync, OursFolderFlush, OursFolderFsync,
    OursFolderFlushPoll,
    PympxPersistent, PympxFolder, Dirq, DiskcacheDeque, LiteQueueAdapter,
    PersistQueueAck, QueuelibFifo, MpJoinable,
    RawAppendFlush, RawAppendFsync, RawFileFlush, RawFileFsync,
)}

#: Systems compared by a target run next to each other, so that a noisy minute on a shared
#: machine falls on both sides of the comparison.
#: --quick caps n for slow systems so that the smoke test stays under a minute.
QUICK_CAP = {"pympx-folder": 60}
QUICK_CAP_FSYNC = 100

RUN_ORDER = ["folder-flush", "dirq", "folder-flush-poll", "pq-flush", "mp-joinable",
             "pq-fsync", "raw-append-fsync", "folder-fsync", "raw-file-fsync",
             "raw-file-flush", "raw-append-flush", "pympx-pq", "pympx-folder", "diskcache",
             "litequeue", "persist-queue", "queuelib"]

# --------------------------------------------------------------------------- consumer


def _consumer_main(name: str, spec: Any, index: int, count: int, ready: Any, start: Any,
                   out_path: str, budget: float, batch: int = 0,
                   producer_done: Any = None) -> None:
    """Runs in each spawned consumer process of the drain and pipeline workloads.

    ``producer_done`` (pipeline): for a system without an end-of-stream signal, "empty"
    only ends the consumer once the producer has finished and one more try finds nothing.
    """
    has_eos = ADAPTERS[name].has_eos
    calls = 0
    ids: List[int] = []
    err = None
    t_end = None
    try:
        cons = ADAPTERS[name].consumer(spec, index, count)
    except BaseException as exc:  # noqa: BLE001 - reported, not hidden
        ready.set()
        with open(out_path, "w") as f:
            json.dump({"ids": [], "error": "open: " + repr(exc), "t_end": None}, f)
        return
    ready.set()
    start.wait(120)
    deadline = time.monotonic() + budget
    try:
        while True:
            try:
                if batch:
                    ids.extend(payload_id(x) for x in cons.get_ack_many(batch))
                    calls += 1
                else:
                    ids.append(payload_id(cons.get_ack()))
            except EndOfStream:
                if producer_done is None or has_eos:
                    break
                if producer_done.is_set():
                    producer_done = None  # one more pass after the producer finished
                else:
                    time.sleep(0.0005)  # empty for now: the producer is still putting
                reset = getattr(cons, "reset", None)
                if reset is not None:
                    reset()
            if time.monotonic() > deadline:
                err = "budget of %.0fs exceeded: stopped" % budget
                break
        t_end = time.monotonic()
        try:
            cons.close()
        except Exception:  # noqa: BLE001
            pass
    except BaseException as exc:  # noqa: BLE001
        t_end = time.monotonic()
        err = "%s (after %d messages)" % (repr(exc)[:300], len(ids))
    with open(out_path, "w") as f:
        json.dump({"ids": ids, "error": err, "t_end": t_end, "calls": calls}, f)


# --------------------------------------------------------------------------- worker


def _rate(n: int, seconds: float) -> Optional[float]:
    return n / seconds if seconds > 0 and n > 0 else None


def _phase_put(ad: Adapter, n: int, size: int, tag: str, batch: int, budget: float,
               profile: Optional[str]) -> Dict[str, Any]:
    ad.open_producer(tag)
    if batch > 0 and not ad.has_batch:
        return {"na": "no batch API (put_many)"}
    payloads = [make_payload(i, size) for i in range(n)]
    prof = _start_profile(profile)
    deadline = time.monotonic() + budget
    t0 = time.perf_counter()
    done = 0
    if batch > 0:
        for s in range(0, n, batch):
            ad.put_many([(i, payloads[i]) for i in range(s, min(n, s + batch))])
            done = min(n, s + batch)
            if time.monotonic() > deadline:
                break
    else:
        for i in range(n):
            ad.put(i, payloads[i])
            done = i + 1
            if time.monotonic() > deadline:
                break
    dt = time.perf_counter() - t0
    _stop_profile(prof, profile)
    res: Dict[str, Any] = {"n": done, "seconds": dt, "rate": _rate(done, dt)}
    if done < n:
        res["partial"] = "stopped at the %.0fs budget after %d of %d" % (budget, done, n)
    return res


def _phase_get_ack(ad: Adapter, n: int, budget: float,
                   profile: Optional[str], batch: int = 0) -> Dict[str, Any]:
    cons = ad.open_local_consumer()
    ids: List[int] = []
    prof = _start_profile(profile)
    deadline = time.monotonic() + budget
    t0 = time.perf_counter()
    partial = None
    calls = 0
    while True:
        try:
            if batch:
                ids.extend(payload_id(x) for x in cons.get_ack_many(batch))
                calls += 1
            else:
                ids.append(payload_id(cons.get_ack()))
        except EndOfStream:
            break
        if time.monotonic() > deadline:
            partial = "stopped at the %.0fs budget after %d of %d" % (budget, len(ids), n)
            break
    dt = time.perf_counter() - t0
    _stop_profile(prof, profile)
    if cons is not ad:
        cons.close()
    res: Dict[str, Any] = {"n": len(ids), "seconds": dt, "rate": _rate(len(ids), dt)}
    if calls:
        res["mean_batch"] = len(ids) / calls  # acks per batch call (per fsync in fsync mode)
    c = count_ids(ids, n)
    res["duplicates"] = c["duplicates"]
    res["lost"] = None if partial else c["lost"]
    if partial:
        res["partial"] = partial
    return res


def _phase_drain(ad: Adapter, n: int, size: int, consumers: int, budget: float,
                 workdir: str, batch: int = 0, pipeline: bool = False) -> Dict[str, Any]:
    """drain: consumers empty a preloaded queue.  pipeline: one producer (this process)
    puts while the consumers take, clock from the first put to the last ack."""
    import multiprocessing

    if ad.multi:
        return {"na": ad.multi}
    ctx = multiprocessing.get_context("spawn")
    tag = "pipeline" if pipeline else ("drain_batch" if batch else "drain")
    ad.open_producer(tag)
    if batch and not ad.has_batch_get:
        return {"na": "no batch get/ack API"}
    # Consumers are spawned first (a multiprocessing queue pickles into a child only while
    # it is open), open their queue, then wait for the start signal; the preload and the
    # end-of-stream markers go in before the clock starts.
    spec = ad.consumer_spec()
    start = ctx.Event()
    producer_done = ctx.Event() if pipeline else None
    readies, procs, outs = [], [], []
    for k in range(consumers):
        ready = ctx.Event()
        out = os.path.join(workdir, "%s-consumer-%d.json" % (tag, k))
        p = ctx.Process(target=_consumer_main,
                        args=(ad.name, spec, k, consumers, ready, start, out, budget, batch,
                              producer_done),
                        daemon=True)
        p.start()
        readies.append(ready)
        procs.append(p)
        outs.append(out)
    if not pipeline:
        if ad.has_batch:  # preload (not timed)
            for s in range(0, n, 1000):
                ad.put_many([(i, make_payload(i, size)) for i in range(s, min(n, s + 1000))])
        else:
            for i in range(n):
                ad.put(i, make_payload(i, size))
        ad.finish_producer()
    for r in readies:
        if not r.wait(120):
            raise RuntimeError("a consumer process did not start within 120 s")
    t0 = time.monotonic()
    start.set()
    t_put = None
    if pipeline:
        payloads = [make_payload(i, size) for i in range(n)]
        for i in range(n):
            ad.put(i, payloads[i])
        ad.finish_producer()
        t_put = time.monotonic() - t0
        assert producer_done is not None
        producer_done.set()
    for p in procs:
        p.join(budget + 60)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    ids: List[int] = []
    errors: List[str] = []
    t_ends: List[float] = []
    per_consumer: List[int] = []
    batch_calls = 0
    for k, out in enumerate(outs):
        try:
            with open(out) as f:
                r = json.load(f)
        except (OSError, ValueError):
            errors.append("consumer %d: no result (exit code %s)" % (k, procs[k].exitcode))
            continue
        ids.extend(r["ids"])
        per_consumer.append(len(r["ids"]))
        batch_calls += r.get("calls") or 0
        if r.get("error"):
            errors.append("consumer %d: %s" % (k, r["error"]))
        if r.get("t_end"):
            t_ends.append(r["t_end"])
    if hung:
        errors.append("consumers %s hung and were killed" % hung)
    dt = (max(t_ends) - t0) if t_ends else 0.0
    c = count_ids(ids, n)
    res: Dict[str, Any] = {"n": len(ids), "seconds": dt, "rate": _rate(c["unique"], dt),
                           "consumers": consumers, "duplicates": c["duplicates"],
                           "lost": c["lost"], "foreign": c["foreign"],
                           "per_consumer": per_consumer, "errors": errors}
    if t_put is not None:
        res["producer_seconds"] = t_put
    if batch and batch_calls:
        res["mean_batch"] = len(ids) / batch_calls  # acks per task_done_many / fsync
    try:
        ad.close()
    except Exception:  # noqa: BLE001
        pass
    return res


def _start_profile(profile: Optional[str]):
    if not profile:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _stop_profile(prof, path: Optional[str]) -> None:
    if prof is None or not path:
        return
    prof.disable()
    prof.dump_stats(path)


def worker_main(args: argparse.Namespace) -> int:
    """Run every workload for one system; print one JSON line on stdout."""
    import multiprocessing

    # Every queue and consumer in the worker uses spawn, including the ones a peer builds
    # on the default context (pympx's PersistentQueue calls multiprocessing.JoinableQueue()).
    multiprocessing.set_start_method("spawn", force=True)
    cls = ADAPTERS[args.worker]
    root = args.root
    os.makedirs(root, exist_ok=True)
    n = args.n if cls.max_n is None else min(args.n, cls.max_n)
    if args.quick:  # smoke test: one fsync per message and pympx's 10 ms per get are slow
        n = min(n, QUICK_CAP.get(cls.name, QUICK_CAP_FSYNC if cls.durability == "fsync"
                                 else n))
    why = "too slow for %d in the time budget%s" % (args.n, " of --quick" if args.quick
                                                    else "")
    if args.fsync_n and cls.durability == "fsync" and args.fsync_n < n:
        n, why = args.fsync_n, "--fsync-n"
    result: Dict[str, Any] = {"n": n, "workloads": {}, "notes": [], "error": None}
    if n < args.n:
        result["notes"].append("n capped at %d (%s)" % (n, why))
    prof_prefix = None
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        prof_prefix = os.path.join(args.profile, args.worker)
    wl = result["workloads"]

    def run(key: str, fn) -> None:
        try:
            wl[key] = fn()
        except BaseException as exc:  # noqa: BLE001 - a failing peer is a row, not a crash
            wl[key] = {"error": "%s: %s" % (type(exc).__name__, str(exc)[:400]),
                       "traceback": traceback.format_exc()[-2000:]}

    ad = cls(root, args.size, args.consumers)
    run("put", lambda: _phase_put(ad, n, args.size, "put", 0, args.budget,
                                  prof_prefix and prof_prefix + "-put.prof"))
    if "error" not in wl["put"]:
        try:
            ad.finish_local()
        except BaseException as exc:  # noqa: BLE001
            wl["put"]["error"] = "close: %r" % exc
        run("get_ack", lambda: _phase_get_ack(ad, wl["put"]["n"], args.budget,
                                              prof_prefix and prof_prefix + "-get_ack.prof"))
        try:
            ad.close()
        except Exception:  # noqa: BLE001
            pass
    else:
        wl["get_ack"] = {"error": "skipped: put failed"}
    if getattr(ad, "has_batch", False) or cls.has_batch:
        ad2 = cls(root, args.size, args.consumers)
        run("put_batch", lambda: _phase_put(ad2, n, args.size, "put_batch", args.batch,
                                            args.budget,
                                            prof_prefix and prof_prefix + "-put_batch.prof"))
        if "error" not in wl["put_batch"] and "na" not in wl["put_batch"]:
            wl["put_batch"]["batch"] = args.batch
            try:
                ad2.finish_local()
            except BaseException as exc:  # noqa: BLE001
                wl["put_batch"]["error"] = "close: %r" % exc
        if "rate" in wl["put_batch"] and "error" not in wl["put_batch"] and ad2.has_batch_get:
            run("get_ack_batch", lambda: _phase_get_ack(
                ad2, wl["put_batch"]["n"], args.budget,
                prof_prefix and prof_prefix + "-get_ack_batch.prof", batch=args.batch))
            wl["get_ack_batch"]["batch"] = args.batch
        try:
            ad2.close()
        except Exception:  # noqa: BLE001
            pass
    else:
        wl["put_batch"] = {"na": "no batch API (put_many)"}
    if "get_ack_batch" not in wl:
        wl["get_ack_batch"] = {"na": "no batch get/ack API"}
    ad3 = cls(root, args.size, args.consumers)
    run("drain", lambda: _phase_drain(ad3, n, args.size, args.consumers, args.budget, root))
    ad5 = cls(root, args.size, args.consumers)
    run("pipeline", lambda: _phase_drain(ad5, n, args.size, args.consumers, args.budget,
                                         root, pipeline=True))
    ad4 = cls(root, args.size, args.consumers)
    if args.quick:
        wl["drain_batch"] = {"na": "skipped in --quick (4 more process spawns per system)"}
    elif cls.has_batch_get or getattr(ad, "has_batch_get", False):
        run("drain_batch", lambda: _phase_drain(ad4, n, args.size, args.consumers,
                                                args.budget, root, batch=args.batch))
        if "rate" in wl["drain_batch"]:
            wl["drain_batch"]["batch"] = args.batch
    else:
        wl["drain_batch"] = {"na": "no batch get/ack API"}
    for a in (ad, ad3, ad4, ad5):
        result["notes"].extend(x for x in a.notes if x not in result["notes"])
    result["notes"].extend(x for x in WORKER_NOTES if x not in result["notes"])
    errs = [k for k, v in wl.items() if isinstance(v, dict) and "error" in v]
    if errs and len(errs) == len(wl):
        result["error"] = wl[errs[0]]["error"]
    sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------- parent


def machine_info(path: str) -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs, dev, mnt = "?", "?", "?"
    try:
        real = os.path.realpath(path)
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(
                        parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                    best, dev, fs = parts[1], parts[0], parts[2]
        mnt = best
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"nproc": os.cpu_count(), "cpu": cpu, "filesystem": fs, "device": dev,
            "mountpoint": mnt, "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "kernel": platform.release(), "loadavg_at_start": load}


def code_version() -> Dict[str, Any]:
    """The commit measured, and whether the library's files differ from it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info: Dict[str, Any] = {"commit": None, "dirty": [], "library": None}
    try:
        info["library"] = subprocess.run(
            [sys.executable, "-c", "import os, pympx_queues as p; "
             "print(os.path.dirname(os.path.dirname(os.path.abspath(p.__file__))))"],
            capture_output=True, text=True, timeout=60,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                        capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
        out = subprocess.run(["git", "status", "--porcelain", "--", "pympx_queues"],
                             cwd=here, capture_output=True, text=True, timeout=10).stdout
        info["dirty"] = [line[3:] for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _code_line(code: Dict[str, Any]) -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = code.get("library")
    if lib and os.path.realpath(lib) != os.path.realpath(here):
        return "pympx_queues imported from %s (this checkout is at commit %s)" % (
            lib, code.get("commit"))
    txt = "commit %s" % code.get("commit")
    if code.get("dirty"):
        txt += " with uncommitted changes in " + ", ".join(code["dirty"])
    return txt


def baseline_for(cls: type) -> Optional[str]:
    if cls.kind == "raw":
        return None
    if cls.family == "file":
        return "raw-file-fsync" if cls.durability == "fsync" else "raw-file-flush"
    return "raw-append-fsync" if cls.durability == "fsync" else "raw-append-flush"


WORKLOADS = ("put", "put_batch", "get_ack", "get_ack_batch", "drain", "drain_batch",
             "pipeline")
WORKLOAD_LABELS = {"put": "put (1 process)",
                   "put_batch": "put_many (batched API)",
                   "get_ack": "get+ack (1 process)",
                   "get_ack_batch": "get_many+task_done_many (batched API, 1 process)",
                   "drain": "drain (%d consumer processes, spawn)",
                   "drain_batch": "drain with batched get/ack (%d consumer processes)",
                   "pipeline": "pipeline: 1 producer putting while %d consumer processes "
                               "get+ack (first put to last ack)"}
COUNTED = ("get_ack", "get_ack_batch", "drain", "drain_batch", "pipeline")  # dup/loss


def run_worker(name: str, args: argparse.Namespace, root: str,
               round_no: int = 0) -> Dict[str, Any]:
    cls = ADAPTERS[name]
    sysroot = os.path.join(root, "round%d" % round_no, name)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--root", sysroot,
           "--n", str(args.n), "--size", str(args.size), "--consumers", str(args.consumers),
           "--batch", str(args.batch), "--budget", str(args.budget)]
    if args.fsync_n:
        cmd += ["--fsync-n", str(args.fsync_n)]
    if args.quick:
        cmd.append("--quick")
    if args.profile:
        cmd += ["--profile", args.profile]
    row: Dict[str, Any] = {"name": name, "label": cls.label, "kind": cls.kind,
                           "family": cls.family, "durability": cls.durability,
                           "durability_note": cls.durability_note, "ack_note": cls.ack_note,
                           "baseline": baseline_for(cls), "multi_process": cls.multi is None,
                           "error": None, "notes": [], "workloads": {}}
    timeout = args.worker_timeout or (args.budget * 8 + 150)
    errpath = os.path.join(root, "%s.round%d.stderr" % (name, round_no))
    t0 = time.monotonic()
    with open(errpath, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            row["error"] = "timed out after %.0f s (worker killed)" % timeout
    row["wall_seconds"] = round(time.monotonic() - t0, 2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stray consumers of this worker, if any
    except (ProcessLookupError, PermissionError):
        pass
    result = None
    for line in (out or "").splitlines():
        if line.startswith("@@RESULT@@"):
            result = json.loads(line[len("@@RESULT@@"):])
    try:
        with open(errpath) as f:
            stderr_tail = f.read()[-1500:]
    except OSError:
        stderr_tail = ""
    if result is None:
        row["error"] = row["error"] or ("worker exited %s without a result: %s"
                                        % (proc.returncode, stderr_tail.strip()[-600:]))
        return row
    row["n"] = result["n"]
    row["notes"] = result["notes"]
    row["workloads"] = result["workloads"]
    if result.get("error"):
        row["error"] = result["error"]
    return row


DURABILITY_RANK = {"none": 0, "flush": 1, "fsync": 2}


def _best_peer(rows: List[Dict[str, Any]], w: str,
               min_durability: str) -> Tuple[Optional[str], float]:
    best_name, best_rate = None, 0.0
    for r in rows:
        if r["kind"] != "peer":
            continue
        if DURABILITY_RANK[r["durability"]] < DURABILITY_RANK[min_durability]:
            continue
        d = r["workloads"].get(w) or {}
        if d.get("partial") or d.get("errors"):
            continue
        rate = d.get("rate")
        if rate and rate > best_rate:
            best_name, best_rate = r["name"], rate
    return best_name, best_rate


def merge_rounds(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from the rounds of one system: median rate, every sample kept, duplicates
    and losses summed (any nonzero count in any round shows), errors listed per round."""
    import statistics

    out = dict(rows[0])
    out["rounds"] = len(rows)
    out["wall_seconds"] = round(sum(r.get("wall_seconds", 0) for r in rows), 2)
    out["notes"] = []
    for r in rows:
        out["notes"].extend(x for x in r["notes"] if x not in out["notes"])
    ok_rows = [r for r in rows if not r["error"]]
    out["error"] = None if ok_rows else rows[0]["error"]
    if len(rows) > 1 and len(ok_rows) < len(rows):
        out["notes"].extend("round %d: ERROR %s" % (k + 1, r["error"])
                            for k, r in enumerate(rows) if r["error"])
    merged: Dict[str, Any] = {}
    keys: List[str] = []
    for r in rows:
        keys.extend(k for k in r["workloads"] if k not in keys)
    for w in keys:
        ds = [r["workloads"][w] for r in rows if w in r["workloads"]]
        good = [d for d in ds if d.get("rate")]
        if not good:
            merged[w] = ds[0]
            continue
        m = dict(good[0])
        samples = [d["rate"] for d in good]
        m["round_rates"] = [d.get("rate") for d in
                            (r["workloads"].get(w) or {} for r in rows)]
        m["rate"] = statistics.median(samples)
        m["samples"] = samples
        m["n"] = sum(d.get("n", 0) for d in good)
        for key in ("duplicates", "lost", "foreign"):
            vals = [d.get(key) for d in good]
            if any(v is not None for v in vals):
                m[key] = None if any(v is None for v in vals) else sum(vals)
        errs: List[str] = []
        for k, d in enumerate(ds):
            if "error" in d:
                errs.append("round %d: %s" % (k + 1, d["error"]))
            errs.extend("round %d: %s" % (k + 1, e) for e in d.get("errors") or [])
            if d.get("partial"):
                m["partial"] = d["partial"]
        if "errors" in m or errs:
            m["errors"] = errs
        merged[w] = m
    out["workloads"] = merged
    return out


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """x raw (the system-call floor for the same durability) and x best peer: the
    fastest peer that promises at least the same durability, plus the fastest of all."""
    by_name = {r["name"]: r for r in rows}
    for w in WORKLOADS:
        any_name, any_rate = _best_peer(rows, w, "none")
        for r in rows:
            d = r["workloads"].get(w)
            if not d or not d.get("rate"):
                continue
            best_name, best_rate = _best_peer(rows, w, r["durability"])
            d["vs_best_any_peer"] = d["rate"] / any_rate if any_rate else None
            d["best_any_peer"] = any_name
            base = by_name.get(r["baseline"] or "")
            brate = ((base or {}).get("workloads", {}).get(w) or {}).get("rate")
            if w.endswith("_batch") and not brate and base:  # raw batch missing: single
                brate = (base["workloads"].get(w[:-len("_batch")]) or {}).get("rate")
            d["vs_raw"] = d["rate"] / brate if brate else None
            d["raw"] = r["baseline"]
            d["vs_best_peer"] = d["rate"] / best_rate if best_rate else None
            d["best_peer"] = best_name


def _wrate(rows_by: Dict[str, Any], name: str, w: str) -> Optional[float]:
    r = rows_by.get(name)
    if not r:
        return None
    return (r["workloads"].get(w) or {}).get("rate")


def _paired_ratio(by: Dict[str, Any], a_name: str, a_w: str, b_name: str,
                  b_w: str) -> Tuple[Optional[float], List[float]]:
    """Median over rounds of (a / b) measured in the same round (noise on a shared machine
    hits both sides of a pair alike), with the per-round ratios; falls back to the ratio
    of the medians."""
    import statistics

    da = (by.get(a_name) or {}).get("workloads", {}).get(a_w) or {}
    db = (by.get(b_name) or {}).get("workloads", {}).get(b_w) or {}
    ra, rb = da.get("round_rates"), db.get("round_rates")
    if ra and rb and len(ra) == len(rb):
        pairs = [x / y for x, y in zip(ra, rb) if x and y]
        if pairs:
            return statistics.median(pairs), pairs
    a, b = da.get("rate"), db.get("rate")
    return (a / b if a and b else None), []


def evaluate_targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, each with the figures it was judged on.  Ratios are medians of
    per-round ratios (see _paired_ratio)."""
    by = {r["name"]: r for r in rows}
    out: List[Dict[str, Any]] = []

    def add(target: str, value: Optional[float], need: str, met: Optional[bool],
            detail: str, rounds: Optional[List[float]] = None) -> None:
        if rounds and len(rounds) > 1:
            detail += "; per round: " + " ".join(_fx(x) for x in rounds)
        out.append({"target": target, "value": value, "need": need, "met": met,
                    "detail": detail, "per_round": rounds or []})

    for w in ("put", "get_ack", "drain", "pipeline"):
        a, b = _wrate(by, "folder-flush", w), _wrate(by, "dirq", w)
        ratio, rounds = _paired_ratio(by, "folder-flush", w, "dirq", w)
        add("folder queue ahead of dirq: %s%s" % (w, " (extra)" if w == "pipeline" else ""),
            ratio, "> 1.0x", None if ratio is None else ratio > 1.0,
            "folder-flush %s msg/s vs dirq %s msg/s" % (_fmt(a), _fmt(b)), rounds)
    for w in ("put", "get_ack", "drain", "pipeline"):
        a, b = _wrate(by, "pq-flush", w), _wrate(by, "mp-joinable", w)
        ratio, rounds = _paired_ratio(by, "pq-flush", w, "mp-joinable", w)
        add("PersistentQueue within 0.6x of mp.JoinableQueue: %s%s" % (
            w, " (issue 2's measure)" if w == "pipeline" else ""), ratio, ">= 0.6x",
            None if ratio is None else ratio >= 0.6,
            "pq-flush %s msg/s vs mp-joinable %s msg/s" % (_fmt(a), _fmt(b)), rounds)
    for name in ("pq-flush", "pq-fsync", "folder-flush", "folder-fsync"):
        d = (by.get(name) or {}).get("workloads", {}).get("drain") or {}
        p = (by.get(name) or {}).get("workloads", {}).get("pipeline") or {}
        if p.get("lost") is not None and d.get("lost") is not None:
            d = {"lost": d["lost"] + p["lost"],
                 "duplicates": d["duplicates"] + p.get("duplicates", 0),
                 "errors": (d.get("errors") or []) + (p.get("errors") or [])}
        if "lost" in d and d.get("lost") is not None:
            bad = d["lost"] + d["duplicates"]
            add("%s: zero losses and zero duplicates (drain + pipeline)" % name, bad, "== 0",
                bad == 0 and not d.get("errors"),
                "lost %d, duplicates %d%s" % (d["lost"], d["duplicates"],
                                              "; errors: " + "; ".join(d["errors"])
                                              if d.get("errors") else ""))
        else:
            add("%s: zero losses and zero duplicates (drain + pipeline)" % name, None, "== 0",
                None, "not measured: %s" % (d.get("error") or d.get("na") or "missing"))
    # fsync durability: our batched commits (the batch API where the system has one) vs
    # the naive one-fsync-per-message rate of the same work (raw *-fsync, unbatched).
    for name, naive in (("pq-fsync", "raw-append-fsync"), ("folder-fsync", "raw-file-fsync")):
        for w in ("put", "get_ack", "drain"):
            single = _wrate(by, name, w)
            batched = _wrate(by, name, w + "_batch")
            b = _wrate(by, naive, w)
            ratio, rounds = _paired_ratio(by, name, w + "_batch" if batched else w, naive, w)
            add("%s >= 10x naive one-fsync-per-message: %s%s" % (
                name, w, " (batched API)" if batched else " (no batch API)"),
                ratio, ">= 10x", None if ratio is None else ratio >= 10.0,
                "%s %s msg/s batched, %s msg/s one call per message; %s %s msg/s" % (
                    name, _fmt(batched), _fmt(single), naive, _fmt(b)), rounds)
    return out


# --------------------------------------------------------------------------- printing


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return "%d" % round(x)
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


def _fx(x: Optional[float]) -> str:
    return "-" if x is None else ("%.2fx" % x if x < 10 else "%.1fx" % x)


def _table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def render(report: Dict[str, Any]) -> str:
    rows = report["systems"]
    m = report["machine"]
    a = report["args"]
    parts = ["pympx_queues benchmark  (%s)" % report["started"],
             "machine: %s CPU(s), %s; file system %s (%s on %s); Python %s %s; "
             "kernel %s; load at start %s" % (
                 m["nproc"], m["cpu"], m["filesystem"], m["device"], m["mountpoint"],
                 m["implementation"], m["python"], m["kernel"],
                 " ".join("%.2f" % x for x in m["loadavg_at_start"] or [])),
             "run: n=%d messages of %d bytes, %d drain consumers, batch %d, budget %gs "
             "per phase, %d round(s) (figures: median over rounds); temp dir %s" % (
                 a["n"], a["size"], a["consumers"], a["batch"], a["budget"],
                 a.get("repeat", 1), report["root"]),
             "command: %s" % report["command"],
             "code: %s" % _code_line(report.get("code", {})),
             "x raw: rate / the raw system-call baseline of the same kind and durability. "
             "x peer>=durab.: rate / the fastest peer promising at least the same "
             "durability (none < flush < fsync); x best any: rate / the fastest peer.", ""]

    def cell_rate(d: Dict[str, Any]) -> str:
        if not d:
            return "-"
        if "na" in d:
            return "N/A"
        if "error" in d:
            return "ERROR"
        s = _fmt(d.get("rate"))
        return s + ("*" if d.get("partial") else "")

    for w in WORKLOADS:
        hdr = ["system", "durab.", "msg/s", "x raw", "raw baseline", "x peer>=durab.",
               "that peer", "x best any", "that peer"]
        if w in COUNTED:
            hdr += ["dup", "lost"]
        tab = []
        na_rows = []
        for r in rows:
            d = r["workloads"].get(w) or {}
            if r["error"] and not d:
                d = {"error": r["error"]}
            if w.endswith("_batch") and "na" in d:
                na_rows.append(r["name"])
                continue
            line = [r["name"], r["durability"], cell_rate(d), _fx(d.get("vs_raw")),
                    d.get("raw") or "-", _fx(d.get("vs_best_peer")),
                    d.get("best_peer") or "-", _fx(d.get("vs_best_any_peer")),
                    d.get("best_any_peer") or "-"]
            if w in COUNTED:
                lost = d.get("lost")
                line += [str(d.get("duplicates", "-")), "-" if lost is None else str(lost)]
            tab.append(line)
        title = WORKLOAD_LABELS[w]
        if "%d" in title:
            title = title % a["consumers"]
        parts += ["== %s ==" % title, _table(hdr, tab)]
        if na_rows:
            parts.append("(no batch API: %s)" % ", ".join(na_rows))
        parts.append("")

    notes = []
    for r in rows:
        for w in WORKLOADS:
            d = r["workloads"].get(w) or {}
            if "error" in d:
                notes.append("%s %s: ERROR %s" % (r["name"], w, d["error"]))
            if "na" in d and w == "drain" and r["kind"] != "raw":
                notes.append("%s drain: N/A - %s" % (r["name"], d["na"]))
            if d.get("partial"):
                notes.append("%s %s: partial (*) - %s" % (r["name"], w, d["partial"]))
            for e in d.get("errors") or []:
                notes.append("%s %s: %s" % (r["name"], w, e))
        if r["error"] and not r["workloads"]:
            notes.append("%s: ERROR %s" % (r["name"], r["error"]))
        for n in r["notes"]:
            notes.append("%s: %s" % (r["name"], n))
        if r.get("ack_note"):
            notes.append("%s: %s" % (r["name"], r["ack_note"]))
        if r.get("durability_note"):
            notes.append("%s: durability %s - %s" % (r["name"], r["durability"],
                                                     r["durability_note"]))
    if notes:
        parts += ["== notes and errors =="] + ["- " + x for x in notes] + [""]

    tg = report["targets"]
    tab = [[t["target"], _fx(t["value"]) if t["need"] != "== 0" else
            ("-" if t["value"] is None else str(t["value"])), t["need"],
            {True: "MET", False: "MISSED", None: "n/a"}[t["met"]], t["detail"]] for t in tg]
    parts += ["== targets (issue 6) ==", _table(["target", "value", "need", "status",
                                                 "figures"], tab), ""]
    parts.append("Figures are from one run on a possibly shared machine: noisy. Ratios "
                 "within the run are the comparison that holds.")
    return "\n".join(parts)


def _md_rate(d: Dict[str, Any]) -> str:
    if not d:
        return ""
    if "na" in d:
        return "n/a"
    if "error" in d and not d.get("rate"):
        return "error"
    r = d.get("rate")
    if r is None:
        return "-"
    txt = "{:,}".format(int(round(r))).replace(",", "\u202f") if r >= 100 else "%.1f" % r
    return txt + ("*" if d.get("partial") else "")


def render_markdown(report: Dict[str, Any]) -> str:
    """README-ready tables of one run (same figures as the text report)."""
    m, a = report["machine"], report["args"]
    lines = [
        "Measured %s on %s CPU(s) (%s), %s on %s, %s %s, kernel %s; load average %s at "
        "the start. Code: %s%s." % (
            report["started"], m["nproc"], m["cpu"], m["filesystem"], m["device"],
            m["implementation"], m["python"], m["kernel"],
            " / ".join("%.2f" % x for x in m["loadavg_at_start"] or []),
            _code_line(report.get("code", {})), ""),
        "",
        "`%s`: %d messages of %d bytes per workload%s, drain with %d spawned consumer "
        "processes, batches of %d, %d round(s), median shown." % (
            report["command"], a["n"], a["size"],
            " (%d for the systems that fsync)" % a["fsync_n"] if a.get("fsync_n") else "",
            a["consumers"], a["batch"], a.get("repeat", 1)),
        "",
        "| system | durability | put/s | put_many/s | get+ack/s | batched get+ack/s "
        "| drain/s | batched drain/s | drain dup/lost | pipeline/s | pipeline dup/lost |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def dl(d: Dict[str, Any]) -> str:
        if not d or "na" in d or "duplicates" not in d:
            return ""
        lost = d.get("lost")
        return "%s/%s" % (d["duplicates"], "?" if lost is None else lost)

    for r in report["systems"]:
        w = r["workloads"]
        if r["error"] and not w:
            lines.append("| %s | %s | error: %s ||||||||| " % (r["name"], r["durability"],
                                                             r["error"][:80]))
            continue
        d = w.get("drain") or {}
        pl = w.get("pipeline") or {}
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["name"], r["durability"], _md_rate(w.get("put")), _md_rate(w.get("put_batch")),
            _md_rate(w.get("get_ack")), _md_rate(w.get("get_ack_batch")),
            _md_rate(d), _md_rate(w.get("drain_batch")), dl(d), _md_rate(pl), dl(pl)))
    lines += ["", "Our systems as ratios: *x raw* to the raw system calls of the same kind and "
              "durability, *x peer* to the fastest peer that promises at least the same "
              "durability (named), both measured in the same run.", "",
              "| system | put | put_many | get+ack | batched get+ack | drain | batched drain "
              "| pipeline |", "|---|---|---|---|---|---|---|---|"]
    for r in report["systems"]:
        if r["kind"] != "ours":
            continue
        cells = []
        for w in ("put", "put_batch", "get_ack", "get_ack_batch", "drain", "drain_batch",
                  "pipeline"):
            d = r["workloads"].get(w) or {}
            if not d.get("rate"):
                cells.append("n/a" if "na" in d else "-")
                continue
            txt = "%s raw" % _fx(d.get("vs_raw"))
            if d.get("best_peer"):
                txt += ", %s %s" % (_fx(d.get("vs_best_peer")), d["best_peer"])
            cells.append(txt)
        lines.append("| %s | %s |" % (r["name"], " | ".join(cells)))
    lines += ["", "| target (issue 6) | measured | need | status |", "|---|--:|---|---|"]
    for t in report["targets"]:
        val = ("-" if t["value"] is None else str(t["value"])) if t["need"] == "== 0" \
            else _fx(t["value"])
        lines.append("| %s | %s | %s | %s |" % (
            t["target"], val, t["need"].replace(">", "&gt;"),
            {True: "met", False: "**missed**", None: "not measured"}[t["met"]]))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small n and budgets, finishes in under a minute")
    p.add_argument("--n", type=int, default=None, help="messages per workload (10000)")
    p.add_argument("--fsync-n", type=int, default=None, metavar="N",
                   help="cap n for the systems that fsync (their per-message cost does not "
                        "depend on n; this shortens a full run)")
    p.add_argument("--size", type=int, default=100, help="message size in bytes (100)")
    p.add_argument("--consumers", type=int, default=4, help="drain consumer processes (4)")
    p.add_argument("--batch", type=int, default=100, help="batch size for put_many (100)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds over all systems; figures are medians (3; quick 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per phase before a slow system is stopped (60; quick 8)")
    p.add_argument("--systems", default="",
                   help="comma-separated subset (see --list); default: all")
    p.add_argument("--list", action="store_true", help="list the systems and exit")
    p.add_argument("--json", default=None, metavar="PATH", help="also write JSON here")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="also write README-ready markdown tables here")
    p.add_argument("--dir", default=None,
                   help="parent of the temp directory (same file system for all systems)")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="cProfile the single-process phases into DIR/<system>-<phase>.prof")
    p.add_argument("--worker-timeout", type=float, default=None, metavar="S",
                   help="kill a system's worker (and its consumers) after S seconds "
                        "(default 8 budgets + 150 s); the row then reports the time-out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 200 if args.quick else 10000
    if args.budget is None:
        args.budget = 8.0 if args.quick else 60.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.n < 1 or args.size < ID_WIDTH or args.consumers < 1 or args.batch < 1:
        p.error("need --n >= 1, --size >= %d, --consumers >= 1, --batch >= 1" % ID_WIDTH)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.list:
        for name, cls in ADAPTERS.items():
            print("%-18s %-6s %-7s %s" % (name, cls.kind, cls.durability, cls.label))
        return 0
    names = list(ADAPTERS)
    if args.systems:
        wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in ADAPTERS]
        if unknown:
            print("unknown system(s): %s; known: %s" % (", ".join(unknown),
                                                          ", ".join(ADAPTERS)),
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    root = tempfile.mkdtemp(prefix="pympx-bench-", dir=args.dir)
    report: Dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", "scripts/bench.py"] + (sys.argv[1:] if argv is None
                                                              else list(argv))),
        "args": {"n": args.n, "fsync_n": args.fsync_n, "size": args.size,
                 "consumers": args.consumers,
                 "batch": args.batch, "budget": args.budget, "quick": args.quick,
                 "repeat": args.repeat,
                 "systems": names},
        "root": root, "machine": machine_info(root), "code": code_version(),
        "systems": []}
    t0 = time.monotonic()
    rounds: Dict[str, List[Dict[str, Any]]] = {name: [] for name in names}
    try:
        # Rounds go over every system in turn, so a noisy minute on a shared machine
        # hits all systems alike; each figure is the median over the rounds.
        run_order = [n for n in RUN_ORDER if n in names] + [n for n in names
                                                            if n not in RUN_ORDER]
        for rnd in range(args.repeat):
            # Every other round runs in reverse: whoever runs right after a mass deletion
            # pays for it (ext4 without a journal skips recently freed inodes when it
            # allocates new ones, so file creation slows down for a while after many
            # unlinks); reversing gives each pair both positions.
            for name in (run_order if rnd % 2 == 0 else run_order[::-1]):
                print("... round %d/%d: %s" % (rnd + 1, args.repeat, name), file=sys.stderr,
                      flush=True)
                rounds[name].append(run_worker(name, args, root, rnd))
    finally:
        if not args.keep:
            _rmtree(root)
    report["systems"] = [merge_rounds(rounds[name]) for name in names]
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    try:
        report["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    add_ratios(report["systems"])
    report["targets"] = evaluate_targets(report["systems"])
    print(render(report))
    print("wall time %.1f s" % report["wall_seconds"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print("JSON written to %s" % args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(report))
        print("markdown written to %s" % args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
