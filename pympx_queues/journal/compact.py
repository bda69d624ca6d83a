"""Recovery and compaction of a pickup dir: the prefix's lock, snapshots, :func:`compact`."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _fs
from .format import (
    FORMAT_VERSION,
    KIND_CLOSE,
    KIND_FAIL,
    KIND_HEADER,
    KIND_KEY,
    KIND_PUT,
    dumps,
    format_record,
)
from .history import History, _live_scans
from .names import LOCK_NAME_FORMAT, SNAPSHOT_PID, TEMP_NAME_FORMAT, format_journal_name, new_run_id
from .scan import cut_torn_tail

log = logging.getLogger("pympx_queues.journal")


def lock_path(directory: str, prefix: str) -> str:
    return os.path.join(directory, LOCK_NAME_FORMAT.format(prefix=prefix))


def directory_lock(directory: str, prefix: str, timeout: float = 60.0):
    """The filelock serialising recovery and compaction of ``prefix`` in ``directory``.

    Message puts and acks never take it (DESIGN.md section 6).
    """
    from filelock import FileLock

    return FileLock(lock_path(directory, prefix), timeout=timeout,
                    mode=_fs.DEFAULT_FILE_MODE)


def write_snapshot(directory: str, prefix: str, run: str, history: History, *,
                   durability: str, file_mode: int = _fs.DEFAULT_FILE_MODE,
                   merged: Sequence[str] = (), empty: bool = False) -> str:
    """Publish one journal holding the outstanding work and completed keys of ``history``
    (``empty``: nothing but a closed marker, for a finished history being deleted).

    Written under a temp name, fsynced, then published without clobbering (G1, G2).  Its
    header lists the ``merged`` journal names, which readers ignore from then on.
    """
    outstanding = [] if empty else history.outstanding()
    latest = history.latest_run()
    records: List[Tuple[str, str]] = []
    for req in outstanding:
        payload: Dict[str, Any] = {"i": req.id, "m": req.body}
        if req.key is not None:
            payload["k"] = req.key
        records.append((KIND_PUT, dumps(payload)))
    if empty:
        records.append((KIND_CLOSE, dumps({})))
    else:
        for key in sorted(history.keys_done(), key=str):
            records.append((KIND_KEY, dumps({"k": key})))
        if latest is not None and latest.closed:
            records.append((KIND_CLOSE, dumps({})))
        if latest is not None and latest.failed:
            records.append((KIND_FAIL, dumps({})))
    rand = _fs.random_id(6)
    final_name = format_journal_name(prefix, run, SNAPSHOT_PID, rand)
    final = os.path.join(directory, final_name)
    tmp = os.path.join(directory, TEMP_NAME_FORMAT.format(name=final_name))
    host, pid, start = _fs.owner_tag()
    header = {"v": FORMAT_VERSION, "prefix": prefix, "run": run, "host": host, "pid": pid,
              "start": start, "created": time.time(), "snapshot": True,
              "merged": [os.path.basename(p) for p in merged]}
    lines = [format_record(0, KIND_HEADER, dumps(header))]
    lines += [format_record(i + 1, k, p) for i, (k, p) in enumerate(records)]
    # Always synced: compaction deletes the originals next, so the copy must be durable.
    _fs.publish_bytes(tmp, final, b"".join(lines), durable=True, mode=file_mode)
    return final


def compact(directory: str, prefix: str, *, extra_dirs: Sequence[str] = (),
            exclude_run: Optional[str] = None, durability: str = _fs.FSYNC,
            file_mode: int = _fs.DEFAULT_FILE_MODE, lock_timeout: float = 60.0,
            ) -> "tuple[History, Dict[str, Any]]":
    """Recover and compact the earlier runs of ``prefix``; return their History.

    Under the prefix's filelock: torn tails of dead writers are cut (saved to side files);
    when the history is complete (nothing outstanding, latest run closed) every journal of
    it in ``directory`` is deleted, so disk use stays bounded after many runs; otherwise
    the journals of dead writers in ``directory`` (and the history found in
    ``extra_dirs``, carried forward) are merged into one snapshot journal and the merged
    files deleted.  Runs with a live writer are never touched.  Crash-safe and idempotent
    (G5): the snapshot is durable before anything is deleted, and ids make a merged
    record and its original count once.

    Raises :class:`JournalCorruptError` on corruption (nothing is changed then) and
    ``filelock.Timeout`` when the lock is not free within ``lock_timeout`` seconds.
    """
    directory = os.path.abspath(directory)
    actions: Dict[str, Any] = {"cut": [], "deleted": [], "snapshot": None}
    with directory_lock(directory, prefix, lock_timeout):
        counted, superseded = _live_scans(directory, prefix, exclude_run, True)
        for scan in counted + superseded:
            side = cut_torn_tail(scan, durable=durability == _fs.FSYNC)
            if side:
                actions["cut"].append(side)
        extra = [os.path.abspath(d) for d in extra_dirs
                 if d and os.path.realpath(d) != os.path.realpath(directory)]
        history = History()
        for scan in counted:
            history.add_scan(scan)
        for d in extra:
            for scan in _live_scans(d, prefix, exclude_run, True)[0]:
                history.add_scan(scan)
        if any(run.live for run in history.runs.values()):
            live = sorted(r.run for r in history.runs.values() if r.live)
            log.warning("pickup %s/%s: run(s) %s still have a live writer; not compacting",
                        directory, prefix, ", ".join(live))
            return history, actions
        # Every local journal goes, superseded leftovers of a power cut included.
        dead_local = [s.path for s in counted + superseded]
        names = [os.path.basename(p) for p in dead_local]
        if history.is_complete():
            if dead_local:
                # A durable empty snapshot lists what is deleted: whichever unlinks a power
                # cut keeps, a surviving put never reappears without its ack (G4, G5).
                marker = write_snapshot(directory, prefix, min(history.runs or [new_run_id()]),
                                        history, durability=durability, file_mode=file_mode,
                                        merged=names, empty=True)
                for path in dead_local:
                    _fs.unlink_regular(path)
                    actions["deleted"].append(path)
                _fs.fsync_dir(directory)  # the unlinks are durable before the marker goes
                _fs.unlink_regular(marker)
                _fs.fsync_dir(directory)
                log.info("pickup %s/%s: %d journal(s) of finished runs compacted away",
                         directory, prefix, len(dead_local))
            return History(), actions
        carried = any(os.path.dirname(s.path) != directory for s in history.scans)
        # A journal of another host reaches this point only when an operator declared
        # that host dead (PYMPX_QUEUES_DEAD_HOSTS): a snapshot of ours takes it over, so
        # later runs here need no declaration, and host A, back, sees its work merged.
        foreign = any(s.header.get("host", _fs.hostname()) != _fs.hostname()
                      for s in counted + superseded)
        if len(dead_local) > 1 or carried or foreign:
            # The snapshot takes the earliest merged run id: it sorts first, so the order
            # of first requests (requeue order) survives, also beside leftovers of an
            # interrupted compaction.
            snap = write_snapshot(directory, prefix, min(history.runs), history,
                                  durability=durability, file_mode=file_mode,
                                  merged=names)
            actions["snapshot"] = snap
            for path in dead_local:
                _fs.unlink_regular(path)  # G5: the snapshot above is already durable
                actions["deleted"].append(path)
            _fs.fsync_dir(directory)
            log.info("pickup %s/%s: %d journal(s) merged into %s (%d outstanding)",
                     directory, prefix, len(dead_local), os.path.basename(snap),
                     len(history.outstanding()))
    return history, actions
