"""The PersistentQueue replay: what every run requested, completed and left outstanding."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Set, TypeVar

from .format import KIND_CANCEL, KIND_CLOSE, KIND_DONE, KIND_FAIL, KIND_KEY, KIND_PUT
from .names import list_journals
from .scan import JournalScan, scan_journal


@dataclass
class Requested:
    """One piece of work as the journals know it."""

    id: str
    body: Any  # the encoded JSON value (decode with the queue's codec)
    key: Optional[str]
    run: str
    seq: int = 0  # order of first request across the history


@dataclass
class RunState:
    """What the journals of one run say."""

    run: str
    paths: List[str] = field(default_factory=list)
    requested: List[str] = field(default_factory=list)  # ids, first request in this run
    requeued: int = 0  # P records of ids first requested by an earlier run
    completed: int = 0  # D records
    cancelled: int = 0
    closed: bool = False
    failed: bool = False
    live: bool = False
    snapshot: bool = False


@dataclass
class History:
    """Requested minus completed across every run found (DESIGN.md G3/G4)."""

    requested: Dict[str, Requested] = field(default_factory=dict)
    completed: set = field(default_factory=set)
    cancelled: set = field(default_factory=set)
    completed_keys: set = field(default_factory=set)
    runs: Dict[str, RunState] = field(default_factory=dict)
    scans: List[JournalScan] = field(default_factory=list)
    live_ids: set = field(default_factory=set)  # put by a writer that is still running

    def outstanding(self, *, exclude_live: bool = False) -> List[Requested]:
        """Requested, not cancelled and not completed, in order of first request.

        ``exclude_live`` leaves out messages that a still-running writer put (or
        requeued): they are that run's work in progress, not unfinished work (G3).
        """
        done = self.completed
        live = self.live_ids if exclude_live else ()
        return [r for r in self.requested.values()
                if r.id not in done and r.id not in self.cancelled and r.id not in live]

    def outstanding_keys(self) -> Dict[str, str]:
        return {r.key: r.id for r in self.outstanding() if r.key is not None}

    def keys_done(self) -> set:
        keys = set(self.completed_keys)
        for r in self.requested.values():
            if r.key is not None and r.id in self.completed:
                keys.add(r.key)
        return keys

    def latest_run(self) -> Optional[RunState]:
        """The latest run that put, requeued, closed or failed (acks-only runs, such as
        ``pickup.mark_done``, do not count)."""
        active = [r for r in self.runs.values()
                  if r.requested or r.requeued or r.closed or r.failed or r.snapshot]
        return max(active, key=lambda r: r.run) if active else None

    def is_complete(self) -> bool:
        """Nothing outstanding and the latest run closed its stream: a fresh start."""
        latest = self.latest_run()
        return not self.outstanding() and (latest is None or latest.closed)

    def add_scan(self, scan: JournalScan) -> None:
        self.scans.append(scan)
        run = self.runs.setdefault(scan.name.run, RunState(scan.name.run))
        run.paths.append(scan.path)
        run.snapshot = run.snapshot or scan.name.is_snapshot
        live = not scan.name.is_snapshot and scan.writer_alive()
        if live:
            run.live = True
        requested = self.requested
        for _seq, kind, payload in scan.records:
            if kind == KIND_PUT:
                mid = payload["i"]
                if live:
                    self.live_ids.add(mid)
                if mid not in requested:
                    requested[mid] = Requested(mid, payload.get("m"), payload.get("k"),
                                               scan.name.run, len(requested))
                    run.requested.append(mid)
                elif requested[mid].run != scan.name.run:
                    run.requeued += 1
            elif kind == KIND_DONE:
                self.completed.add(payload["i"])
                run.completed += 1
            elif kind == KIND_CANCEL:
                self.cancelled.add(payload["i"])
                run.cancelled += 1
            elif kind == KIND_KEY:
                self.completed_keys.add(payload["k"])
            elif kind == KIND_CLOSE:
                run.closed = True
            elif kind == KIND_FAIL:
                run.failed = True


def scan_dirs(dirs: Iterable[str], prefix: str, *, exclude_run: Optional[str] = None,
              strict: bool = True) -> History:
    """Load every journal of ``prefix`` in ``dirs`` (each dir once) into a History."""
    history = History()
    seen = set()
    for directory in dirs:
        if directory is None:
            continue
        real = os.path.realpath(directory)
        if real in seen:
            continue
        seen.add(real)
        for scan in _live_scans(directory, prefix, exclude_run, strict)[0]:
            history.add_scan(scan)
    return history


def _scan_directory(directory: str, prefix: str, exclude_run: Optional[str],
                    strict: bool) -> List[JournalScan]:
    scans = []
    for path, name in list_journals(directory, prefix):
        if name.run == exclude_run:
            continue
        try:
            scans.append(scan_journal(path, strict=strict))
        except FileNotFoundError:
            continue  # compacted away by another process meanwhile
    return scans


def _live_scans(directory: str, prefix: str, exclude_run: Optional[str], strict: bool
                ) -> "tuple[List[JournalScan], List[JournalScan]]":
    """(scans that count, scans superseded by a snapshot that merged them).

    A snapshot's header lists the journals it merged.  If a power cut kept some of their
    unlinks and lost others, the survivors are ignored: their records are in the
    snapshot, and a survivor's put must not come back without the ack that was in a
    journal already gone (G4).
    """
    return split_superseded(_scan_directory(directory, prefix, exclude_run, strict))


class _ScanLike(Protocol):  # what split_superseded reads (JournalScan, the pipeline's StreamScan)
    path: str
    header: Dict[str, Any]
    name: Any


_S = TypeVar("_S", bound=_ScanLike)


def split_superseded(scans: Sequence[_S]) -> "tuple[List[_S], List[_S]]":
    """(scans that count, scans a snapshot merged): the one rule, for every kind of scan.

    A scan is anything with ``.path``, ``.header`` and ``.name.is_snapshot`` (a
    :class:`JournalScan` or a streamed scan).  A snapshot's header lists the journals it
    merged; those journals no longer count, whether or not their unlink survived.
    """
    merged: Set[str] = set()
    for scan in scans:
        if scan.name.is_snapshot:
            merged.update(scan.header.get("merged") or ())
    counted = [s for s in scans if os.path.basename(s.path) not in merged]
    superseded = [s for s in scans if os.path.basename(s.path) in merged]
    return counted, superseded
