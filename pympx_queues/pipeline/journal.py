"""A pipeline's journal: the existing journal format with the pipeline's record kinds.

The only module of the pipeline layer that imports the journal module.  One coordinator
writes one journal file per run (``{name}.{run}.{pid}.{rand}.journal`` in
``journal_dir``); workers never write.  Records (payload keys in brackets; ``enc`` is the
codec's JSON form of a value, never pickle)::

    H  header       {"pipeline": {"stages": [...], "keep_results": bool}, ...}
    A  accepted     {"k": key, "i": index, "d": enc[, "s": stage]}   (snapshot: at stage s)
                    {"k": key, "r": 1}          dead letter re-driven (pympx-queues retry)
    S  stage done   {"k": key, "s": stage, "o": enc}    (input of stage s + 1)
    B  batch done   {"s": stage, "k": [keys], "o": [enc...]?, "y": 1?}  (y: last stage)
    Y  item done    {"k": key[, "o": enc]}      (o with keep_results)
    E  attempt failed {"k", "s", "a": attempt, "e": {"type", "message"}}
    L  dead letter  {"k", "s", "a", "e": {"type", "message", "traceback", ...}}
    R  sink pending {"k": key or [keys], "s": stage}   (before the sink's side effect)
    W  state        {"n": name, "v": json}      Q  state reset {"n": name}

Replay (at the start of every run, under the directory lock): torn tails of dead runs are
cut (and saved), every journal is read in order and folded into :class:`Replay`, and the
journals of earlier runs are compacted into one snapshot holding only what is needed
(unfinished items at their stage, done keys, dead letters, states): the directory stays
bounded over many runs.  A long run rotates its journal when it grows past
``compact_bytes`` and compacts the closed part the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _fs
from .. import journal as jr
from ..errors import JournalCorruptError
from ..journal.history import split_superseded
from . import _keys
from ._model import EncodeError, PipelineError

log = logging.getLogger("pympx_queues.pipeline")

KIND_ACCEPT = "A"
KIND_STAGE = "S"
KIND_BATCH = "B"
KIND_DONE = "Y"
KIND_ERROR = "E"
KIND_DEAD = "L"
KIND_PENDING = "R"
KIND_STATE = "W"
KIND_RESET = "Q"
assert set("ASBYELRWQ") <= jr.PIPELINE_KINDS

#: Re-exported for the pipeline's admin module (this is the one module importing the
#: journal module).
list_journals = jr.list_journals
Problem = jr.Problem

#: Header field that marks a pipeline journal (``pympx-queues status`` looks for it).
HEADER_FIELD = "pipeline"
#: A run rotates and compacts its journal past this many bytes (P4 on disk).
COMPACT_BYTES = 64 * 1024 * 1024


_dumps_value = jr.dumps_value


def _dumps_key(key: str) -> str:
    """JSON text of a key (a str: the C string encoder, no encoder call per record)."""
    return jr.dumps_value(key) if type(key) is str else jr.dumps(key)


def check_durability(durability: str) -> str:
    return _fs.check_durability(durability)


class JsonCodec:
    """The journal's codec: JSON plus tuples, bytes, sets and non-str dict keys."""

    encode = staticmethod(jr.encode_value)
    decode = staticmethod(jr.decode_value)


class Saved:
    """What the journal knows about an item that is not done."""

    __slots__ = ("index", "stage", "data", "pending", "dead", "attempts")

    def __init__(self, index: int, data: Any) -> None:
        self.index = index
        self.stage = 0  # the stage it has to run next
        self.data = data  # enc of that stage's input
        self.pending = False
        self.dead: Optional[Dict[str, Any]] = None
        self.attempts = 0


class Replay:
    """The fold of a pipeline's journals."""

    def __init__(self, track_done: bool = True, compact: bool = False,
                 spill_dir: Optional[str] = None, name: str = "") -> None:
        self.track_done = track_done
        self.done_count = 0
        self.unfinished: "OrderedDict[str, Saved]" = OrderedDict()
        # key -> enc output (None unless keep_results); ``compact`` (a run without
        # keep_results): a KeySet of fingerprints in bounded memory (P4), spilled to
        # scratch files in ``spill_dir`` past its budget, not a dict
        self.done: Any = _keys.KeySet(spill_dir=spill_dir, name=name) if compact else {}
        self.states: Dict[str, Any] = {}
        self.stages: List[str] = []
        self.failed_attempts: Dict[int, int] = {}
        self.records = 0

    def apply(self, kind: str, p: Dict[str, Any], keep_results: bool = True) -> None:
        self.records += 1
        if kind == KIND_ACCEPT:
            key = p["k"]
            if p.get("r"):
                saved = self.unfinished.get(key)
                if saved is not None:
                    saved.dead = None
                    saved.attempts = 0
                return
            if self.track_done and key in self.done:
                return
            saved = Saved(int(p.get("i", 0)), p.get("d"))
            saved.stage = int(p.get("s", 0))
            self.unfinished[key] = saved
        elif kind == KIND_STAGE:
            saved = self.unfinished.get(p["k"])
            if saved is not None:
                saved.stage = int(p["s"]) + 1
                saved.data = p.get("o")
                saved.pending = False
        elif kind == KIND_DONE:
            key = p["k"]
            self.unfinished.pop(key, None)
            self.done_count += 1
            if self.track_done:
                self.done[key] = p.get("o") if keep_results else None
        elif kind == KIND_BATCH:
            keys = p["k"]
            outs = p.get("o")
            last = bool(p.get("y"))
            for n, key in enumerate(keys):
                out = outs[n] if outs is not None else None
                if last:
                    self.unfinished.pop(key, None)
                    self.done_count += 1
                    if self.track_done:
                        self.done[key] = out if keep_results else None
                else:
                    saved = self.unfinished.get(key)
                    if saved is not None:
                        saved.stage = int(p["s"]) + 1
                        saved.data = out
                        saved.pending = False
        elif kind == KIND_ERROR:
            saved = self.unfinished.get(p["k"])
            if saved is not None:
                saved.attempts += 1
            s = int(p.get("s", 0))
            self.failed_attempts[s] = self.failed_attempts.get(s, 0) + 1
        elif kind == KIND_DEAD:
            saved = self.unfinished.get(p["k"])
            if saved is not None:
                saved.dead = p.get("e") or {}
                saved.stage = int(p.get("s", saved.stage))
        elif kind == KIND_PENDING:
            keys = p["k"] if isinstance(p["k"], list) else [p["k"]]
            for key in keys:
                saved = self.unfinished.get(key)
                if saved is not None:
                    saved.pending = True
        elif kind == KIND_STATE:
            self.states[p["n"]] = p.get("v")
        elif kind == KIND_RESET:
            self.states.pop(p["n"], None)

    def close(self) -> None:
        """Free the done keys' scratch files (the fold is not asked about them again)."""
        _keys.close_keys(self.done)

    @property
    def dead(self) -> Dict[str, Saved]:
        return {k: s for k, s in self.unfinished.items() if s.dead is not None}


# --------------------------------------------------------------------------- reading
def is_pipeline_header(header: Dict[str, Any]) -> bool:
    return isinstance(header.get(HEADER_FIELD), dict)


def pipeline_prefixes(directory: str) -> List[str]:
    """Prefixes (pipeline names) of the pipeline journals in ``directory``."""
    found = []
    for path, name in jr.list_journals(directory):
        if name.prefix in found:
            continue
        try:
            header = read_header(path)
        except OSError:
            continue
        if is_pipeline_header(header):
            found.append(name.prefix)
    return found


def scan_pipeline(directory: str, name: str, *, strict: bool = True
                  ) -> Tuple[List[Any], List[str]]:
    """(scans that count, in order; paths superseded by a snapshot)."""
    scans = []
    for path, _jn in jr.list_journals(directory, name):
        try:
            scans.append(jr.scan_journal(path, strict=strict))
        except FileNotFoundError:
            continue
    counted, superseded = split_superseded(scans)
    return counted, [s.path for s in superseded]


def fold(scans: Sequence[Any], keep_results: bool = True) -> Replay:
    replay = Replay()
    for scan in scans:
        meta = scan.header.get(HEADER_FIELD) or {}
        if meta.get("stages"):
            replay.stages = list(meta["stages"])
        for _seq, kind, payload in scan.records:
            if kind in jr.PIPELINE_KINDS and kind != jr.KIND_HEADER:
                replay.apply(kind, payload, keep_results)
    return replay


class StreamScan:
    """One journal read record by record: memory O(1) in the journal's size.

    Iterating yields ``(kind, payload)`` of each record after the header.  A bad record
    with a good one after it is corruption (:class:`JournalCorruptError`, fail closed); a
    bad record at the end is a torn tail (``problem``, cut by :meth:`cut`); NUL bytes up
    to the end are a mapped writer's reserved tail.  The same rules as
    ``scan_journal``, without holding the records.
    """

    CHUNK = 1 << 20

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = jr.parse_journal_name(os.path.basename(path))
        try:
            self.locked = bool(_fs.is_flocked(path)) and not self.name.is_snapshot
        except OSError:
            self.locked = not self.name.is_snapshot
        self.header: Dict[str, Any] = read_header(path)
        self.size = 0
        self.good_end = 0
        self.reserved = 0
        self.problem: Optional[jr.Problem] = None

    def writer_alive(self) -> bool:
        return self.locked or jr.writer_alive(self.path, self.header, self.name)

    def __iter__(self):
        self.problem = None
        expected = 0
        pos = 0  # file offset of buf[0]
        buf = b""
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(self.CHUNK)
                eof = not chunk
                buf += chunk
                start = 0
                while True:
                    if start < len(buf) and buf[start] == 0:
                        rest = buf[start:] + f.read()
                        if rest.count(b"\0") == len(rest):
                            self.reserved = len(rest)
                            self.size = pos + start + len(rest)
                            return
                        self._bad(pos + start, "NUL bytes inside the journal", f)
                        return
                    nl = buf.find(b"\n", start)
                    if nl < 0:
                        break
                    try:
                        seq, kind, payload = jr.parse_record(buf[start:nl])
                        if seq != expected:
                            raise jr.RecordError(f"sequence number {seq}, expected "
                                                 f"{expected}")
                    except jr.RecordError as exc:
                        self._bad(pos + start, str(exc), f)
                        return
                    expected += 1
                    start = nl + 1
                    self.good_end = pos + start
                    if kind != jr.KIND_HEADER:
                        yield kind, payload
                pos += start
                buf = buf[start:]
                if eof:
                    self.size = pos + len(buf)
                    if buf:
                        self.problem = jr.Problem("torn", self.path, pos, self.size,
                                                  "incomplete last record")
                    return

    def _bad(self, offset: int, reason: str, f: Any) -> None:
        f.seek(offset)
        rest = f.read()
        self.size = offset + len(rest)
        lines = rest.split(b"\n")[1:]
        if any(jr.valid_line(line) is not None for line in lines if line):
            raise JournalCorruptError(self.path, offset, reason)
        self.problem = jr.Problem("torn", self.path, offset, self.size, reason)

    def cut(self, durable: bool) -> None:
        """Cut a torn or reserved tail once its writer is gone (saved to a side file)."""
        scan = jr.JournalScan(self.path, self.name, self.header, [], self.size,
                              self.good_end, [self.problem] if self.problem else [],
                              self.reserved, self.locked)
        jr.cut_torn_tail(scan, durable=durable)


def read_header(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        line = f.readline(1 << 20)
    try:
        _seq, kind, payload = jr.parse_record(line.rstrip(b"\n"))
    except jr.RecordError:
        return {}
    return payload if kind == jr.KIND_HEADER and isinstance(payload, dict) else {}


def _fold_streams(streams: Sequence[StreamScan], replay: Replay, keep_results: bool,
                  durable: bool, snapshot: bool):
    """Fold ``streams`` into ``replay`` (each journal read once, its torn tail cut after
    it); with ``snapshot``, yield the records of a snapshot as it goes: the done keys as
    they are read (never all held in memory), then the unfinished items, dead letters
    and states of ``replay``.  Without it, a generator that yields nothing."""
    dumps = jr.dumps
    apply = replay.apply
    for st in streams:
        meta = st.header.get(HEADER_FIELD) or {}
        if meta.get("stages"):
            replay.stages = list(meta["stages"])
        for kind, p in st:
            apply(kind, p, keep_results)
            if not snapshot:
                continue
            if kind == KIND_DONE:
                if keep_results and "o" in p:
                    yield KIND_DONE, dumps(p)
                else:
                    yield KIND_DONE, '{"k":%s}' % _dumps_key(p["k"])
            elif kind == KIND_BATCH and p.get("y"):
                outs = p.get("o") if keep_results else None
                for n, key in enumerate(p["k"]):
                    yield KIND_DONE, ('{"k":%s}' % _dumps_key(key) if outs is None
                                      else dumps({"k": key, "o": outs[n]}))
        if st.problem is not None or st.reserved:
            st.cut(durable)
    if not snapshot:
        return
    for key, saved in replay.unfinished.items():
        yield KIND_ACCEPT, dumps({"k": key, "i": saved.index, "d": saved.data,
                                  "s": saved.stage})
        if saved.pending:
            yield KIND_PENDING, dumps({"k": key, "s": saved.stage})
        if saved.dead is not None:
            yield KIND_DEAD, dumps({"k": key, "s": saved.stage, "a": saved.attempts,
                                    "e": saved.dead})
    for n, v in replay.states.items():
        yield KIND_STATE, dumps({"n": n, "v": v})


def write_snapshot(directory: str, name: str, run: str, records: Any, header: dict,
                   merged: Sequence[str]) -> str:
    """Publish a snapshot journal holding ``records`` (an iterable, written in chunks)."""
    rand = _fs.random_id(6)
    final_name = jr.format_journal_name(name, run, jr.SNAPSHOT_PID, rand)
    final = os.path.join(directory, final_name)
    tmp = os.path.join(directory, jr.TEMP_NAME_FORMAT.format(name=final_name))
    host, pid, start = _fs.owner_tag()
    head = {"v": jr.FORMAT_VERSION, "prefix": name, "run": run, "host": host, "pid": pid,
            "start": start, "created": time.time(), "snapshot": True,
            "merged": [os.path.basename(p) for p in merged]}
    head.update(header)
    fd = _fs.open_append_exclusive(tmp)
    try:
        chunk = [jr.format_record(0, jr.KIND_HEADER, jr.dumps(head))]
        size = 0
        for seq, (kind, payload) in enumerate(records, 1):
            line = jr.format_record(seq, kind, payload)
            chunk.append(line)
            size += len(line)
            if size > (1 << 20):
                _fs.append(fd, b"".join(chunk), tmp)
                chunk, size = [], 0
        _fs.append(fd, b"".join(chunk), tmp)
        # Always synced: the merged journals are deleted next (P1 across power loss).
        _fs.fsync_fd(fd, tmp)
    except BaseException:
        os.close(fd)
        _fs.unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        _fs.rename_noreplace(tmp, final)  # never clobbers a journal
    except BaseException:
        _fs.unlink_quiet(tmp)
        raise
    _fs.fsync_dir(directory)
    return final


def compact_dead(directory: str, name: str, header: dict, *, keep_results: bool,
                 exclude: Sequence[str] = (), durable: bool = True,
                 track_done: bool = True) -> Replay:
    """Under the directory lock: refuse a live run, cut torn tails, fold every journal
    (streamed), and merge the journals (other than ``exclude``) into one snapshot when
    there is more than one.  Returns the fold (``track_done=False``: without the done
    keys, for a rotation in a long run: memory O(unfinished items))."""
    excl = {os.path.abspath(p) for p in exclude}
    paths = [p for p, _n in jr.list_journals(directory, name) if os.path.abspath(p) not in excl]
    streams = []
    for path in paths:
        try:
            streams.append(StreamScan(path))
        except FileNotFoundError:
            continue
    counted, superseded_scans = split_superseded(streams)
    superseded = [st.path for st in superseded_scans]
    for st in counted:
        if not st.name.is_snapshot and st.writer_alive():
            raise PipelineError(
                f"pipeline {name!r} in {directory}: a run is live (journal "
                f"{os.path.basename(st.path)}, pid {st.header.get('pid')}); one "
                "coordinator per pipeline")
    _keys.remove_dead(directory, name)  # scratch files of a run that was killed
    replay = Replay(track_done=track_done, compact=not keep_results,
                    spill_dir=directory, name=name)
    if isinstance(replay.done, _keys.KeySet):
        replay.done.load()  # a key is done once in the journals: adds skip the runs
    if not (len(counted) > 1 or superseded):
        for _ in _fold_streams(counted, replay, keep_results, durable, False):
            pass
    else:
        # One pass: the snapshot is written while the journals are folded.
        runs = [st.name.run for st in counted]
        snap = write_snapshot(directory, name, min(runs),
                              _fold_streams(counted, replay, keep_results, durable, True),
                              header, [st.path for st in counted])
        for path in [st.path for st in counted] + superseded:
            _fs.unlink_regular(path)  # P1: the snapshot above is durable already
        _fs.fsync_dir(directory)
        log.info("pipeline %s/%s: %d journal(s) compacted into %s", directory, name,
                 len(counted), os.path.basename(snap))
    if isinstance(replay.done, _keys.KeySet):
        replay.done.freeze()  # looked up only from now on
    return replay


# --------------------------------------------------------------------------- writing
def _run_all(callbacks: List[Any]) -> None:
    for fn in callbacks:
        fn()


class PipelineJournal:
    """The coordinator's side: replay at open, then one record per step.

    ``flush`` durability: each record is in the page cache when the call returns
    (survives kill -9).  ``fsync``: records share fsyncs (group commit: the records that
    come while one fsync runs, and while they keep coming for up to ``SETTLE_SECONDS``
    after it, go in the next one); results are released to the user only after the fsync
    that covers them (:meth:`after_sync`).
    """

    def __init__(self, directory: str, name: str, *, durability: str = "flush",
                 codec: Any = None, stages: Sequence[str] = (),
                 keep_results: bool = False, compact_bytes: int = COMPACT_BYTES) -> None:
        jr.check_prefix(name)
        self.directory = os.path.abspath(os.fspath(directory))
        self.name = name
        self.durability = check_durability(durability)
        self.fsync = self.durability == _fs.FSYNC
        self.codec = codec if codec is not None else JsonCodec
        self.stages = list(stages)
        self.keep_results = keep_results
        self.compact_bytes = compact_bytes
        self.replay = Replay()
        self._writer: Optional[jr.JournalWriter] = None
        self._lock = threading.Lock()
        self._buf: List[Tuple[str, str]] = []
        self._after: List[Any] = []
        self._flush_scheduled = False
        self._inflight: Any = None
        self._inflight_after: List[Any] = []
        self._pool: Any = None
        self._failed: Optional[BaseException] = None
        self._loop: Any = None
        self._run = None
        self._bytes = 0
        self._streams: List[Any] = []  # open_stream()'s writers

    # -- values
    def encode(self, value: Any, what: str, *args: Any) -> str:
        """JSON text of ``value`` by the codec; :class:`EncodeError` naming ``what``
        (formatted with ``args`` only then: a message per record would cost more than
        the record) if it cannot be journaled."""
        try:
            if self.codec is JsonCodec:  # fast paths for str, int, flat rows
                return _dumps_value(value)
            return jr.dumps(self.codec.encode(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"{what % args if args else what}: cannot be journaled: "
                              f"{exc}") from None

    def decode(self, enc: Any) -> Any:
        return self.codec.decode(enc)

    # -- lifecycle
    @property
    def header(self) -> Dict[str, Any]:
        return {HEADER_FIELD: {"stages": self.stages, "keep_results": self.keep_results}}

    def open(self, fresh: bool = False) -> None:
        """Replay and compact the journals, then open this run's journal (idempotent
        unless ``fresh``: a new run replays again, its previous journal included)."""
        with self._lock:
            if self._writer is not None and not fresh:
                return
            after = self._close_writer()
            _fs.makedirs(self.directory)
            self.replay.close()
            with jr.directory_lock(self.directory, self.name):
                self.replay = compact_dead(self.directory, self.name, self.header,
                                           keep_results=self.keep_results,
                                           durable=self.fsync)
                self._run = jr.new_run_id()
                self._writer = jr.JournalWriter(self.directory, self.name, self._run,
                                                durability=self.durability,
                                                header=self.header)
            self._bytes = 0
        _run_all(after)

    def _close_writer(self) -> List[Any]:
        """Close the writer after writing (and syncing) what waits; returns the
        callbacks of those records, to run once the lock is released."""
        w, self._writer = self._writer, None
        after: List[Any] = []
        if w is not None:
            after = self._flush_now(writer=w)  # into this writer: it is no longer ours
            w.close()
        return after

    def close(self) -> None:
        with self._lock:
            after = self._flush_now(writer=self._writer)
            after += self._close_writer()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._loop = None
        _run_all(after)

    def end_run(self, finished: bool) -> None:
        self._loop = None
        self.close()
        self.replay.close()

    # -- appends
    def _append(self, kind: str, payload: str) -> None:
        if self._writer is None:
            raise PipelineError(f"pipeline {self.name!r}: its journal is closed")
        if self._failed is not None:
            raise self._failed
        self._bytes += len(payload) + 24
        if self.fsync:
            self._buf.append((kind, payload))
            self._kick_soon()
        else:
            self._writer.append_one(kind, payload)  # P1: in the page cache on return
            if self._bytes > self.compact_bytes:
                self.rotate()

    # fsync mode: group commit.  Records wait in a buffer; the loop writes each buffer
    # (one write(2)) and one thread fsyncs it while the loop goes on collecting the next
    # one, and work that must not happen before the records are durable (a result to the
    # user, a sink's side effect) waits in after_sync() callbacks for the batch that
    # covers them.
    def _get_loop(self) -> Any:
        if self._loop is None:
            import asyncio

            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
        return self._loop

    def _kick_soon(self) -> None:
        if self._flush_scheduled or self._inflight is not None:
            return
        loop = self._get_loop()
        if loop is None:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._flush_scheduled = False
        if self._inflight is not None or not self._buf or self._writer is None or \
                self._failed is not None:
            return
        buf, self._buf = self._buf, []
        after, self._after = self._after, []
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"journal-{self.name}")
        # The loop formats and writes the batch (one write(2)); the thread only waits
        # for its fsync.  Formatting in the thread made it compete for the GIL with the
        # loop and the stages' threads at every batch (measured: fsync mode ran at half
        # the flush mode's rate; see docs/benchmarks-pipeline.md).
        writer = self._writer
        try:
            ticket = writer.append(buf, sync=False)
        except Exception as exc:  # never retried: nothing that waited for them happens
            self._failed = exc
            log.error("pipeline %s: journal write failed: %r", self.name, exc)
            return
        fut = self._loop.run_in_executor(self._pool, writer.sync, ticket)
        self._inflight = fut
        self._inflight_after = after
        fut.add_done_callback(self._batch_synced)

    def _batch_synced(self, fut: Any) -> None:
        self._inflight = None
        after, self._inflight_after = self._inflight_after, []
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            # Never retried (a later fsync could lie): nothing that waited for these
            # records happens; the run fails at its next record.
            self._failed = exc or PipelineError("journal write cancelled")
            log.error("pipeline %s: journal write failed: %r", self.name, exc)
            return
        for fn in after:
            fn()
        if self._bytes > self.compact_bytes:
            self.rotate()  # writes and syncs what waits first: a long run stays bounded
        elif self._buf and self._loop is not None:  # (None: closing, close() writes them)
            # Records came while the disk synced.  While more keep coming, let them join
            # this batch (up to SETTLE_SECONDS): an fsync costs the whole machine CPU (the
            # file system's journal commit), and back-to-back fsyncs of a few items each
            # halved the item rate.  When a loop turn or a few bring nothing more (the run
            # waits for this sync: a small queue, a sink), the batch goes at once.
            self._flush_scheduled = True
            self._settle_len = len(self._buf)
            self._settle_idle = 0
            self._settle_until = time.monotonic() + self.SETTLE_SECONDS
            self._loop.call_soon(self._settle)

    #: Group commit under load: the next batch waits for records while they keep coming,
    #: at most this long after the previous fsync ended ...
    SETTLE_SECONDS = 0.004
    #: ... and goes once this many loop turns in a row brought no record.
    SETTLE_TURNS = 4
    _settle_len = 0
    _settle_idle = 0
    _settle_until = 0.0

    def _settle(self) -> None:
        loop = self._loop
        if loop is None or self._writer is None or not self._flush_scheduled:
            return  # closed, or flushed meanwhile
        n = len(self._buf)
        self._settle_idle = 0 if n > self._settle_len else self._settle_idle + 1
        self._settle_len = n
        if self._settle_idle < self.SETTLE_TURNS and time.monotonic() < self._settle_until:
            loop.call_soon(self._settle)
            return
        self._kick()

    async def drain(self) -> None:
        """Wait until every record appended so far is durable and its callbacks ran."""
        import asyncio

        while self.fsync and (self._inflight is not None or self._buf):
            if self._failed is not None:
                return
            if self._inflight is None:
                self._kick()
            fut = self._inflight
            if fut is None:
                return
            await asyncio.wait([fut])
            await asyncio.sleep(0)  # let _batch_synced run

    def flush(self) -> None:
        """Write (and in fsync mode, sync) the buffered records now, then run their
        callbacks; blocks."""
        with self._lock:
            after = self._flush_now(writer=self._writer)
        _run_all(after)

    def _flush_now(self, writer: Optional[jr.JournalWriter] = None) -> List[Any]:
        """Write and sync the buffered records; returns their callbacks (run by the
        caller outside ``self._lock``: a callback may journal state, which takes it)."""
        writer = writer or self._writer
        if self._pool is not None and self._inflight is not None:
            self._pool.shutdown(wait=True)  # the batch in flight is written first
            self._pool = None
            self._inflight = None
        buf, self._buf = self._buf, []
        self._flush_scheduled = False
        after, self._after = self._after, []
        if buf and writer is not None and self._failed is None:
            writer.append(buf)  # P1 across power loss: one fsync for the whole batch
            return after
        return []

    def syncing(self) -> bool:
        """True while records appended in fsync mode wait for their fsync (their
        :meth:`after_sync` callbacks have not run yet)."""
        return self.fsync and (self._inflight is not None or bool(self._buf))

    def after_sync(self, fn: Any) -> None:
        """Run ``fn`` once the records appended so far are durable (at once in flush
        mode: they are in the page cache already)."""
        if not self.fsync:
            fn()
        elif self._buf:
            self._after.append(fn)
        elif self._inflight is not None:
            self._inflight_after.append(fn)
        else:
            fn()

    def rotate(self) -> None:
        """Start a new journal file and compact the closed ones (a long run's journal
        stays bounded)."""
        with self._lock:
            after = self._close_writer()
            with jr.directory_lock(self.directory, self.name):
                self._run = jr.new_run_id()
                self._writer = jr.JournalWriter(self.directory, self.name, self._run,
                                                durability=self.durability,
                                                header=self.header)
                live = [w.path for w in self._streams if not w.closed]
                self._streams = [w for w in self._streams if not w.closed]
                compact_dead(self.directory, self.name, self.header,
                             keep_results=self.keep_results,
                             exclude=[self._writer.path] + live,
                             durable=self.fsync, track_done=False)
            self._bytes = 0
        _run_all(after)

    def accept(self, key: str, index: int, data: Any) -> None:
        enc = self.encode(data, "the source item with key %r", key)
        self._append(KIND_ACCEPT, '{"k":%s,"i":%d,"d":%s}' % (_dumps_key(key), index, enc))

    def accept_many(self, keys: Sequence[str], indices: Sequence[int],
                    datas: Sequence[Any]) -> List[Tuple[int, EncodeError]]:
        """:meth:`accept` for many items in one append (a lot of a process stage): one
        writer call, one store into the mapped journal.  Returns the positions whose
        data cannot be journaled, with their error; nothing of those is written."""
        bad: List[Tuple[int, EncodeError]] = []
        payloads = []
        for n, (key, index, data) in enumerate(zip(keys, indices, datas)):
            try:
                enc = self.encode(data, "the source item with key %r", key)
            except EncodeError as exc:
                bad.append((n, exc))
                continue
            payloads.append('{"k":%s,"i":%d,"d":%s}' % (_dumps_key(key), index, enc))
        if payloads:
            self._append_many(KIND_ACCEPT, payloads)
        return bad

    def _append_many(self, kind: str, payloads: Sequence[str]) -> None:
        """:meth:`_append` of several records of one kind, in one writer call."""
        if self._writer is None:
            raise PipelineError(f"pipeline {self.name!r}: its journal is closed")
        if self._failed is not None:
            raise self._failed
        self._bytes += sum(len(p) for p in payloads) + 24 * len(payloads)
        if self.fsync:
            self._buf.extend((kind, p) for p in payloads)
            self._kick_soon()
        else:
            self._writer.append([(kind, p) for p in payloads])  # in the page cache
            if self._bytes > self.compact_bytes:
                self.rotate()

    def stage_done(self, key: str, stage: int, output: Any) -> None:
        enc = self.encode(output, "the output of stage %r for key %r", self.stages[stage],
                          key)
        self._append(KIND_STAGE, '{"k":%s,"s":%d,"o":%s}' % (_dumps_key(key), stage, enc))

    def done(self, key: str, output: Any) -> None:
        if self.keep_results:
            enc = self.encode(output, "the output of stage %r for key %r", self.stages[-1],
                              key)
            self._append(KIND_DONE, '{"k":%s,"o":%s}' % (_dumps_key(key), enc))
        else:
            self._append(KIND_DONE, '{"k":%s}' % _dumps_key(key))

    def open_stream(self) -> "jr.JournalWriter":
        """One more journal file of this run, for a thread that writes its own records
        (a durable thread map's worker: appending to the run's one file from several
        threads made them queue on its lock).  Same format and header; a rerun folds
        every file of the pipeline, so records of different keys may go to different
        files (all records of one key must go to the same one).  The caller closes it."""
        self.open()
        with jr.directory_lock(self.directory, self.name):  # not seen half-made
            w = jr.JournalWriter(self.directory, self.name, jr.new_run_id(),
                                 durability=self.durability, header=self.header)
        self._streams.append(w)  # live: a rotation's compaction leaves it alone
        return w

    @staticmethod
    def done_record(key: str, enc: str) -> Tuple[str, str]:
        """The ``(kind, payload)`` of :meth:`done` for an output already encoded by
        :meth:`encode`, for :meth:`open_stream`'s writers."""
        return KIND_DONE, '{"k":%s,"o":%s}' % (_dumps_key(key), enc)

    @staticmethod
    def dead_records(key: str, index: int, data_enc: str, stage: int, err: Any
                     ) -> List[Tuple[str, str]]:
        """An item accepted with its input (already encoded) and dead at once: the
        ``(kind, payload)`` records of :meth:`accept` and :meth:`dead`."""
        return [(KIND_ACCEPT, '{"k":%s,"i":%d,"d":%s}' % (_dumps_key(key), index, data_enc)),
                (KIND_DEAD, jr.dumps({"k": key, "s": stage, "a": err.attempt,
                                      "e": err.to_json()}))]

    def batch_done(self, group: Sequence[Any], stage: int, outputs: Sequence[Any],
                   last: bool) -> None:
        keys = [g.key for g in group]
        if not last or self.keep_results:
            encs = [self.encode(o, "the output of stage %r for key %r", self.stages[stage],
                                g.key) for g, o in zip(group, outputs)]
            text = "[" + ",".join(encs) + "]"
        else:
            text = None
        body = '{"s":%d,"k":%s%s%s}' % (stage, jr.dumps(keys),
                                        ',"o":' + text if text is not None else "",
                                        ',"y":1' if last else "")
        self._append(KIND_BATCH, body)

    def attempt_failed(self, key: str, stage: int, attempt: int, err: Any) -> None:
        self._append(KIND_ERROR, jr.dumps({"k": key, "s": stage, "a": attempt,
                                           "e": {"type": err.type,
                                                 "message": err.message[:2000]}}))

    def dead(self, key: str, stage: int, err: Any) -> None:
        self._append(KIND_DEAD, jr.dumps({"k": key, "s": stage, "a": err.attempt,
                                          "e": err.to_json()}))

    def pending(self, group: Sequence[Any], stage: int) -> None:
        """The sink pattern: R is durable before the side effect starts."""
        keys = [g.key for g in group]
        self._append(KIND_PENDING, jr.dumps({"k": keys[0] if len(keys) == 1 else keys,
                                             "s": stage}))

    def write_state(self, name: str, value: Any) -> None:
        try:
            text = jr.dumps({"n": name, "v": value})
        except (TypeError, ValueError) as exc:
            raise EncodeError(f"state {name!r}: not JSON data: {exc}") from None
        self.open()
        with self._lock:
            self._writer.append([(KIND_STATE, text)])  # durable on return
        self.replay.states[name] = value
        self._bytes += len(text) + 24
        if self._bytes > self.compact_bytes:
            self.rotate()  # a run that writes much state keeps a bounded journal too

    def clear_state(self, name: str) -> None:
        self.open()
        with self._lock:
            self._writer.append([(KIND_RESET, jr.dumps({"n": name}))])
        self.replay.states.pop(name, None)


def redrive_dead(directory: str, name: str, keys: Optional[Sequence[str]] = None,
                 durability: str = "fsync") -> List[str]:
    """Mark dead letters for a re-run at the next run (an ``A`` record with ``r``),
    journaled by a short-lived writer; refuses while a run is live.  Returns the keys."""
    directory = os.path.abspath(directory)
    with jr.directory_lock(directory, name):
        counted, _sup = scan_pipeline(directory, name)
        header = next((s.header for s in counted if is_pipeline_header(s.header)), {})
        meta = {HEADER_FIELD: header.get(HEADER_FIELD) or {"stages": []}}
        replay = compact_dead(directory, name, meta, keep_results=True,
                              durable=durability == _fs.FSYNC)
        dead = [k for k, s in replay.unfinished.items() if s.dead is not None]
        if keys is not None:
            wanted = set(keys)
            dead = [k for k in dead if k in wanted]
        if not dead:
            return []
        w = jr.JournalWriter(directory, name, jr.new_run_id(), durability=durability,
                             header=meta)
        try:
            w.append([(KIND_ACCEPT, jr.dumps({"k": k, "r": 1})) for k in dead])
        finally:
            w.close()
    return dead
