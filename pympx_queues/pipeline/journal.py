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
from .. import _journal as jr
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

#: Header field that marks a pipeline journal (``pympx-queues status`` looks for it).
HEADER_FIELD = "pipeline"
#: A run rotates and compacts its journal past this many bytes (P4 on disk).
COMPACT_BYTES = 64 * 1024 * 1024


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

    def __init__(self) -> None:
        self.unfinished: "OrderedDict[str, Saved]" = OrderedDict()
        self.done: Dict[str, Any] = {}  # key -> enc output (None unless keep_results)
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
            if key in self.done:
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
            self.done[key] = p.get("o") if keep_results else None
        elif kind == KIND_BATCH:
            keys = p["k"]
            outs = p.get("o")
            last = bool(p.get("y"))
            for n, key in enumerate(keys):
                out = outs[n] if outs is not None else None
                if last:
                    self.unfinished.pop(key, None)
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
            scan = jr.scan_journal(path, strict=False)
        except (OSError, ValueError):
            continue
        if is_pipeline_header(scan.header):
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
    merged = set()
    for scan in scans:
        if scan.name.is_snapshot:
            merged.update(scan.header.get("merged") or ())
    counted = [s for s in scans if os.path.basename(s.path) not in merged]
    superseded = [s.path for s in scans if os.path.basename(s.path) in merged]
    return counted, superseded


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


def snapshot_records(replay: Replay) -> List[Tuple[str, str]]:
    """The records of a snapshot equivalent to ``replay``."""
    dumps = jr.dumps
    out: List[Tuple[str, str]] = []
    for key, enc in replay.done.items():
        out.append((KIND_DONE, dumps({"k": key} if enc is None else {"k": key, "o": enc})))
    for key, saved in replay.unfinished.items():
        out.append((KIND_ACCEPT, dumps({"k": key, "i": saved.index, "d": saved.data,
                                        "s": saved.stage})))
        if saved.pending:
            out.append((KIND_PENDING, dumps({"k": key, "s": saved.stage})))
        if saved.dead is not None:
            out.append((KIND_DEAD, dumps({"k": key, "s": saved.stage, "a": saved.attempts,
                                          "e": saved.dead})))
    for n, v in replay.states.items():
        out.append((KIND_STATE, dumps({"n": n, "v": v})))
    return out


def write_snapshot(directory: str, name: str, run: str, replay: Replay, header: dict,
                   merged: Sequence[str]) -> str:
    rand = _fs.random_id(6)
    final_name = jr.format_journal_name(name, run, jr.SNAPSHOT_PID, rand)
    final = os.path.join(directory, final_name)
    tmp = os.path.join(directory, jr.TEMP_NAME_FORMAT.format(name=final_name))
    host, pid, start = _fs.owner_tag()
    head = {"v": jr.FORMAT_VERSION, "prefix": name, "run": run, "host": host, "pid": pid,
            "start": start, "created": time.time(), "snapshot": True,
            "merged": [os.path.basename(p) for p in merged]}
    head.update(header)
    lines = [jr.format_record(0, jr.KIND_HEADER, jr.dumps(head))]
    lines += [jr.format_record(i + 1, k, p)
              for i, (k, p) in enumerate(snapshot_records(replay))]
    # Always synced: the merged journals are deleted next (P1 across power loss).
    _fs.publish_bytes(tmp, final, b"".join(lines), durable=True)
    return final


def compact_dead(directory: str, name: str, header: dict, *, keep_results: bool,
                 exclude: Sequence[str] = (), durable: bool = True) -> Replay:
    """Under the directory lock: refuse a live run, cut torn tails, fold every journal,
    and merge the journals (other than ``exclude``) into one snapshot when there is more
    than one.  Returns the fold."""
    counted, superseded = scan_pipeline(directory, name)
    excl = {os.path.abspath(p) for p in exclude}
    for scan in counted:
        if os.path.abspath(scan.path) in excl:
            continue
        if not scan.name.is_snapshot and scan.writer_alive():
            raise PipelineError(
                f"pipeline {name!r} in {directory}: a run is live (journal "
                f"{os.path.basename(scan.path)}, pid {scan.header.get('pid')}); one "
                "coordinator per pipeline")
    for scan in counted:
        if os.path.abspath(scan.path) not in excl:
            jr.cut_torn_tail(scan, durable=durable)
    replay = fold(counted, keep_results)
    mergeable = [s.path for s in counted if os.path.abspath(s.path) not in excl]
    if len(mergeable) > 1 or superseded:
        runs = [s.name.run for s in counted if os.path.abspath(s.path) not in excl]
        part = fold([s for s in counted if os.path.abspath(s.path) not in excl],
                    keep_results)
        snap = write_snapshot(directory, name, min(runs), part, header, mergeable)
        for path in mergeable + superseded:
            _fs.unlink_regular(path)  # P1: the snapshot above is durable already
        _fs.fsync_dir(directory)
        log.info("pipeline %s/%s: %d journal(s) compacted into %s", directory, name,
                 len(mergeable), os.path.basename(snap))
    return replay


# --------------------------------------------------------------------------- writing
class PipelineJournal:
    """The coordinator's side: replay at open, then one record per step.

    ``flush`` durability: each record is in the page cache when the call returns
    (survives kill -9).  ``fsync``: records of one event-loop turn share one fsync (group
    commit); results are released to the user only after it (:meth:`after_sync`).
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
        self._loop: Any = None
        self._run = None
        self._bytes = 0

    # -- values
    def encode(self, value: Any, what: str) -> str:
        try:
            return jr.dumps(self.codec.encode(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"{what}: cannot be journaled: {exc}") from None

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
            self._close_writer()
            _fs.makedirs(self.directory)
            with jr.directory_lock(self.directory, self.name):
                self.replay = compact_dead(self.directory, self.name, self.header,
                                           keep_results=self.keep_results,
                                           durable=self.fsync)
                self._run = jr.new_run_id()
                self._writer = jr.JournalWriter(self.directory, self.name, self._run,
                                                durability=self.durability,
                                                header=self.header)
            self._bytes = 0

    def _close_writer(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            self._flush_now()
            w.close()

    def close(self) -> None:
        with self._lock:
            self._flush_now(writer=self._writer)
            self._close_writer()

    def end_run(self, finished: bool) -> None:
        self._loop = None
        self.close()

    # -- appends
    def _append(self, kind: str, payload: str) -> None:
        if self._writer is None:
            raise PipelineError(f"pipeline {self.name!r}: its journal is closed")
        self._bytes += len(payload) + 24
        if self.fsync:
            self._buf.append((kind, payload))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop = self._loop
                if loop is None:
                    import asyncio

                    try:
                        loop = self._loop = asyncio.get_running_loop()
                    except RuntimeError:
                        loop = None
                if loop is not None:
                    loop.call_soon(self.flush)
                else:
                    self.flush()
        else:
            self._writer.append_one(kind, payload)  # P1: in the page cache on return
        if self._bytes > self.compact_bytes:
            self.rotate()

    def flush(self) -> None:
        with self._lock:
            self._flush_now(writer=self._writer)

    def _flush_now(self, writer: Optional[jr.JournalWriter] = None) -> None:
        writer = writer or self._writer
        buf, self._buf = self._buf, []
        self._flush_scheduled = False
        after, self._after = self._after, []
        if buf and writer is not None:
            writer.append(buf)  # P1 across power loss: one fsync for the whole turn
        for fn in after:
            fn()

    def after_sync(self, fn: Any) -> None:
        """Run ``fn`` once the records written so far are durable."""
        if self.fsync and self._buf:
            self._after.append(fn)
        else:
            fn()

    def rotate(self) -> None:
        """Start a new journal file and compact the closed ones (a long run's journal
        stays bounded)."""
        with self._lock:
            self._close_writer()
            with jr.directory_lock(self.directory, self.name):
                self._run = jr.new_run_id()
                self._writer = jr.JournalWriter(self.directory, self.name, self._run,
                                                durability=self.durability,
                                                header=self.header)
                compact_dead(self.directory, self.name, self.header,
                             keep_results=self.keep_results, exclude=[self._writer.path],
                             durable=self.fsync)
            self._bytes = 0

    def accept(self, key: str, index: int, data: Any) -> None:
        enc = self.encode(data, f"the source item with key {key!r}")
        self._append(KIND_ACCEPT, '{"k":%s,"i":%d,"d":%s}' % (jr.dumps(key), index, enc))

    def stage_done(self, key: str, stage: int, output: Any) -> None:
        enc = self.encode(output, f"the output of stage {self.stages[stage]!r} for key "
                          f"{key!r}")
        self._append(KIND_STAGE, '{"k":%s,"s":%d,"o":%s}' % (jr.dumps(key), stage, enc))

    def done(self, key: str, output: Any) -> None:
        if self.keep_results:
            enc = self.encode(output, f"the output of stage {self.stages[-1]!r} for key "
                              f"{key!r}")
            self._append(KIND_DONE, '{"k":%s,"o":%s}' % (jr.dumps(key), enc))
        else:
            self._append(KIND_DONE, '{"k":%s}' % jr.dumps(key))

    def batch_done(self, group: Sequence[Any], stage: int, outputs: Sequence[Any],
                   last: bool) -> None:
        keys = [g.key for g in group]
        if not last or self.keep_results:
            encs = [self.encode(o, f"the output of stage {self.stages[stage]!r} for key "
                                f"{g.key!r}") for g, o in zip(group, outputs)]
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
        if self.fsync:
            self.flush()

    def write_state(self, name: str, value: Any) -> None:
        try:
            text = jr.dumps({"n": name, "v": value})
        except (TypeError, ValueError) as exc:
            raise EncodeError(f"state {name!r}: not JSON data: {exc}") from None
        self.open()
        with self._lock:
            self._writer.append([(KIND_STATE, text)])  # durable on return
        self.replay.states[name] = value

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
