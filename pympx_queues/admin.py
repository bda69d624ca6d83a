"""Administration of queues on disk: one API for both kinds, used by the ``pympx-queues`` CLI.

Every CLI command is a thin layer over one function here, and every function here is a
thin layer over the queue modules' own administration functions:

* a **folder queue** directory: :mod:`pympx_queues.folder.admin`;
* a **pickup dir** of PersistentQueue journals: :mod:`pympx_queues.persistent.pickup`.

:func:`detect_kind` tells them apart (or raises :class:`~pympx_queues.errors.NotAQueueError`).
Each public function dispatches on the kind and returns plain data (dicts, lists, str,
int, float, bool, None) so that the CLI can print it as a table or as ``--json`` without
knowing which kind of queue it is looking at.

What lives here rather than in the queue modules: kind detection, the ``problems`` list of
:func:`status` (one line each, with the command that fixes it), a "hand drop"
:func:`put_files`/:func:`put_data` that publishes into a folder queue *without*
registering a producer (so a shell ``put`` can never end a consumer's stream early),
closing every dead producer at once, progress reporting for long calls, and the rates of
:func:`watch`-style snapshots.

Every function is safe to call while producers and consumers are running: reads are
snapshots, and every change goes through the queue modules' own functions or the
no-clobber primitives of :mod:`pympx_queues._fs`.

Options (keyword arguments of every function, ignored where they do not apply):
``message_extension`` (folder queues, default ``".tsv"``), ``lease_timeout`` (seconds,
folder queues, default 600: when a claim of *another host* counts as abandoned) and
``prefix`` (pickup dirs: only this queue prefix; default all).

Errors: ``FileNotFoundError`` (no such path), ``NotADirectoryError``, ``PermissionError``,
``NotAQueueError``, :class:`UnsupportedOperation` (no meaning for this kind of queue),
:class:`NotFound` (no such message or producer), :class:`Refused` (would touch a live
process's work without ``force``), ``ValueError`` (bad arguments), ``FileExistsError``
(a message of that name is waiting), ``JournalCorruptError`` (run :func:`repair`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import _fs
from .errors import NotAQueueError, PympxQueueError

__all__ = [
    "FOLDER", "PICKUP", "STATES", "Options", "Progress",
    "UnsupportedOperation", "NotFound", "NoSuchMessage", "Refused",
    "detect_kind", "status", "list_messages", "show_message", "put_files", "put_data",
    "requeue", "retry", "close", "fail", "reset", "purge", "verify", "repair",
    "describe_destruction", "snapshot", "rates",
]

#: The two kinds of queue a path can hold.
FOLDER = "folder"
PICKUP = "pickup"

#: Message states that ``list_messages(state=...)`` accepts.
STATES = ("ready", "wip", "done", "failed")

#: ``progress(done, total)`` is called while a long operation runs (for a progress bar).
Progress = Callable[[int, int], None]


class UnsupportedOperation(PympxQueueError, ValueError):
    """The operation has no meaning for this kind of queue (e.g. ``put`` on a pickup dir)."""


class NotFound(PympxQueueError, KeyError):
    """No message (or producer) of that name or id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class NoSuchMessage(NotFound):
    """``show_message`` found no message of that name or id."""


class Refused(PympxQueueError):
    """The operation would take work from a live process; pass ``force=True`` to do it."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-call options; see the module docstring."""

    message_extension: str = ".tsv"
    lease_timeout: float = 600.0
    prefix: Optional[str] = None

    def __post_init__(self) -> None:
        lt = _fs.check_timeout(self.lease_timeout)
        if not lt:
            raise ValueError("lease_timeout must be > 0 seconds")


# --------------------------------------------------------------------------- kind detection
def _check_dir(path: str) -> str:
    """Return the absolute path of an existing, readable directory or raise OSError."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such file or directory", path)
    if not os.path.isdir(path):
        raise NotADirectoryError(20, "not a directory", path)
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(13, "permission denied", path)
    return path


def detect_kind(path: str) -> str:
    """Return :data:`FOLDER` or :data:`PICKUP` for ``path``; never blocks, never writes.

    Raises ``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``, or
    ``NotAQueueError`` when the directory is neither kind.
    """
    path = _check_dir(path)
    folder = _folder_backend()
    if folder is not None and folder.is_queue(path):
        return FOLDER
    pickup = _pickup_backend()
    if pickup is not None and pickup.is_queue(path):
        return PICKUP
    raise NotAQueueError(
        f"{path}: not a queue (neither a folder queue nor a PersistentQueue pickup dir)"
    )


# --------------------------------------------------------------------------- backends
class _Backend:
    """Adapter from one queue kind's own admin functions to the shapes documented here."""

    kind = ""

    def is_queue(self, path: str) -> bool:
        raise NotImplementedError

    def _unsupported(self, what: str) -> UnsupportedOperation:
        names = {FOLDER: "folder queues", PICKUP: "PersistentQueue pickup dirs"}
        return UnsupportedOperation(f"{what} is not supported for "
                                    f"{names.get(self.kind, self.kind)}")

    def status(self, path: str, o: Options) -> Dict[str, Any]:
        raise self._unsupported("status")

    def list_messages(self, path: str, state: Optional[str], o: Options
                      ) -> List[Dict[str, Any]]:
        raise self._unsupported("ls")

    def show_message(self, path: str, message: str, o: Options) -> Dict[str, Any]:
        raise self._unsupported("show")

    def put_files(self, path: str, files: List[str], copy: bool, o: Options,
                  rename: bool, progress: Optional[Progress]) -> List[str]:
        raise self._unsupported("put")

    def put_data(self, path: str, name: str, data: bytes, o: Options, rename: bool) -> str:
        raise self._unsupported("put")

    def requeue(self, path: str, include_live: bool, dry_run: bool, o: Options,
                progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("requeue")

    def retry(self, path: str, pattern: Optional[str], dry_run: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("retry (dead letters)")

    def close(self, path: str, producer: Optional[str], failed: bool, force: bool,
              o: Options) -> Dict[str, Any]:
        raise self._unsupported("fail" if failed else "close")

    def reset(self, path: str, force: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("reset")

    def purge(self, path: str, force: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("purge")

    def verify(self, path: str, o: Options) -> Dict[str, Any]:
        raise self._unsupported("verify")

    def repair(self, path: str, dry_run: bool, o: Options) -> Dict[str, Any]:
        raise self._unsupported("repair")


# --------------------------------------------------------------------------- shared helpers
def _age(path: str, now: Optional[float] = None) -> Optional[float]:
    st = _fs.lstat(path)
    if st is None:
        return None
    return round(max(0.0, (time.time() if now is None else now) - st.st_mtime), 3)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _run_with_progress(fn: Callable[[], Any], total: int, remaining: Callable[[], int],
                       progress: Optional[Progress], interval: float = 0.1) -> Any:
    """Run ``fn()`` and, while it runs, report ``progress(total - remaining(), total)``.

    The queue modules move files under their own locks in one call; progress is observed
    from outside by counting what is left (a cheap directory listing), so a progress bar
    needs no hook inside them.  Without ``progress`` (piped output) ``fn`` just runs.
    """
    if progress is None or total <= 1:
        return fn()
    outcome: Dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: B036 - re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="pympx-queues-admin", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(interval)
        try:
            left = remaining()
        except OSError:
            continue
        progress(max(0, min(total, total - left)), total)
    if "error" in outcome:
        raise outcome["error"]
    progress(total, total)
    return outcome["value"]


def _count_files(directory: str) -> int:
    try:
        return sum(1 for e in _fs.scandir(directory) if _fs.entry_is_regular(e))
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- folder queues
#: Kinds of ``folder_admin.verify`` problems that ``verify(repair=True)`` fixes.
_FOLDER_REPAIRABLE = ("missing-folder", "leftover-temp", "orphaned-retry-sidecar",
                      "orphaned-error-sidecar", "stale-claim")


class _FolderBackend(_Backend):
    """Folder queues: wraps :mod:`pympx_queues.folder.admin`."""

    kind = FOLDER

    @staticmethod
    def _fa() -> Any:
        from .folder import admin as folder_admin

        return folder_admin

    def is_queue(self, path: str) -> bool:
        return bool(self._fa().is_folder_queue(path))

    def _kw(self, o: Options) -> Dict[str, Any]:
        return {"message_extension": o.message_extension, "lease_timeout": o.lease_timeout}

    def status(self, path: str, o: Options) -> Dict[str, Any]:
        st = self._fa().status(path, **self._kw(o))
        counts = {"ready": st.ready, "wip": st.wip_live + st.wip_stale,
                  "wip_live": st.wip_live, "wip_stale": st.wip_stale, "done": st.done,
                  "failed": st.dead_letters, "tmp": st.temp_files, "trash": st.trash}
        claims = [{"name": c.name, "state": "stale" if c.stale else "live", "host": c.host,
                   "pid": c.pid, "age": c.age_seconds, "alive": c.live, "path": c.path}
                  for c in st.claims]
        producers = [{"id": p.producer, "run": p.run, "state": p.state, "host": p.host,
                      "pid": p.pid, "alive": p.alive, "run_ended": p.run_ended}
                     for p in st.producers]
        problems = []
        if st.wip_stale:
            problems.append(f"{_plural(st.wip_stale, 'stale claim')} (owner gone or lease "
                            f"expired): run `pympx-queues requeue {path}`")
        dead = [p for p in producers
                if p["state"] == "open" and p["alive"] is False and not p["run_ended"]]
        if dead:
            problems.append(f"{_plural(len(dead), 'producer')} died without closing: run "
                            f"`pympx-queues close {path}` (or `fail`)")
        if st.dead_letters:
            problems.append(f"{_plural(st.dead_letters, 'dead letter')}: see `pympx-queues "
                            f"ls {path} --state failed`, retry with `pympx-queues retry {path}`")
        return {"kind": FOLDER, "path": st.path, "message_extension": st.message_extension,
                "counts": counts, "outstanding": st.ready + st.wip_live + st.wip_stale,
                "retries_pending": st.retries_pending, "claims": claims,
                "producers": producers, "ended_runs": st.ended_runs, "problems": problems}

    @staticmethod
    def _message(m: Any, now: float) -> Dict[str, Any]:
        return {"name": m.name, "state": m.state, "size": m.size,
                "age": m.lease_age_seconds if m.state == "wip" else _age(m.path, now),
                "retries": m.attempts, "owner": m.owner, "last_error": m.last_error,
                "live": m.live, "path": m.path}

    def list_messages(self, path: str, state: Optional[str], o: Options
                      ) -> List[Dict[str, Any]]:
        now = time.time()
        out = []
        for s in ([state] if state else STATES):
            out += [self._message(m, now)
                    for m in self._fa().list_messages(path, s, **self._kw(o))]
        return out

    def show_message(self, path: str, message: str, o: Options) -> Dict[str, Any]:
        try:
            m = self._fa().show_message(path, message, **self._kw(o))
        except KeyError:
            raise NoSuchMessage(f"no message {message!r} in {path}") from None
        return self._message(m, time.time())

    # -- put: a hand drop, not a registered producer -------------------------------
    def _writer(self, path: str, o: Options, rename: bool) -> Any:
        """The library's producer, unregistered (no HELO/DONE: a hand drop), fsync mode."""
        from .folder import WritableFolderQueue

        return WritableFolderQueue(path, o.message_extension, durability=_fs.FSYNC,
                                   if_exists="rename" if rename else "error",
                                   lease_timeout=o.lease_timeout, register=False)

    def put_files(self, path: str, files: List[str], copy: bool, o: Options,
                  rename: bool, progress: Optional[Progress]) -> List[str]:
        for f in files:  # check every file first: nothing is published for a bad list
            if not _fs.is_regular_nofollow(f):
                if _fs.lstat(f) is None:
                    raise FileNotFoundError(2, "no such file", f)
                raise ValueError(f"{f} is not a regular file")
        writer = self._writer(path, o, rename)
        out = []
        for i, f in enumerate(files, 1):
            out.append(writer.put(f, copy=copy))  # no-clobber, durable before it returns
            if progress:
                progress(i, len(files))
        return out

    def put_data(self, path: str, name: str, data: bytes, o: Options, rename: bool) -> str:
        return self._writer(path, o, rename).put_data(name, data)

    # -- moving messages ------------------------------------------------------------
    def requeue(self, path: str, include_live: bool, dry_run: bool, o: Options,
                progress: Optional[Progress]) -> Dict[str, Any]:
        fa = self._fa()
        before = fa.status(path, **self._kw(o)).claims
        skipped = [{"name": c.name, "reason": f"owner {c.host}:{c.pid} alive"}
                   for c in before if not c.stale and not include_live]
        if dry_run:
            moved = fa.requeue_stale(path, dry_run=True, include_live=include_live,
                                     force=include_live, **self._kw(o))
        else:
            from .folder import layout

            total = len(before) - len(skipped)
            wip = os.path.join(path, layout.WIP_DIR)
            moved = _run_with_progress(
                lambda: fa.requeue_stale(path, include_live=include_live,
                                         force=include_live, **self._kw(o)),
                total, lambda: max(0, _count_files(wip) - len(skipped)), progress)
        return {"kind": FOLDER, "moved": [os.path.basename(m) for m in moved],
                "skipped": skipped, "dry_run": dry_run}

    def retry(self, path: str, pattern: Optional[str], dry_run: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        fa = self._fa()
        if dry_run:
            moved = fa.retry_dead_letters(path, pattern, dry_run=True,
                                          message_extension=o.message_extension)
        else:
            def waiting() -> int:
                return len(fa.retry_dead_letters(path, pattern, dry_run=True,
                                                 message_extension=o.message_extension))

            moved = _run_with_progress(
                lambda: fa.retry_dead_letters(path, pattern,
                                              message_extension=o.message_extension),
                waiting(), waiting, progress)
        return {"moved": [os.path.basename(m) for m in moved], "skipped": [],
                "dry_run": dry_run}

    def close(self, path: str, producer: Optional[str], failed: bool, force: bool,
              o: Options) -> Dict[str, Any]:
        fa = self._fa()
        if producer is None:
            st = fa.status(path, **self._kw(o))
            targets = [p.producer for p in st.producers
                       if p.state == "open" and p.alive is False and not p.run_ended]
        else:
            targets = [producer]
        written = []
        for pid in targets:
            try:
                fa.close_producer(path, pid, failed=failed, force=force,
                                  reason="written by pympx-queues "
                                         + ("fail" if failed else "close"))
            except KeyError:
                raise NotFound(f"no registered producer {pid!r} in {path} "
                               "(see `pympx-queues status`)") from None
            except RuntimeError as exc:  # a live producer, not forced
                raise Refused(f"{exc} (--force)") from None
            written.append({"producer": pid, "sentinel": "FAILED" if failed else "DONE"})
        return {"written": written}

    def reset(self, path: str, force: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        rep = self._fa().reset(path, force=force, **self._kw(o))
        return {"requeued": [os.path.basename(p) for p in rep.requeued],
                "control_removed": rep.control_removed,
                "temp_removed": [os.path.basename(p) for p in rep.temp_removed]}

    def purge(self, path: str, force: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        fa = self._fa()
        st = fa.status(path, **self._kw(o))
        total = (st.ready + st.wip_live + st.wip_stale + st.done + st.dead_letters
                 + st.temp_files)

        def left() -> int:
            s = fa.status(path, **self._kw(o))
            return s.ready + s.wip_live + s.wip_stale + s.done + s.dead_letters + s.temp_files

        try:
            n = _run_with_progress(lambda: fa.purge(path, force=force, **self._kw(o)),
                                   total, left, progress, interval=0.25)
        except RuntimeError as exc:  # live claims, not forced
            raise Refused(f"{exc} (--force)") from None
        return {"deleted": n}

    # -- checking -------------------------------------------------------------------
    @staticmethod
    def _problem(p: Any) -> Dict[str, Any]:
        return {"kind": p.kind, "path": p.path, "offset": None, "detail": p.detail,
                "repaired": p.repaired}

    def verify(self, path: str, o: Options) -> Dict[str, Any]:
        rep = self._fa().verify(path, **self._kw(o))
        return {"path": rep.path, "ok": rep.ok,
                "issues": [self._problem(p) for p in rep.problems]}

    def repair(self, path: str, dry_run: bool, o: Options) -> Dict[str, Any]:
        rep = self._fa().verify(path, repair=not dry_run, **self._kw(o))
        if dry_run:
            fix = [p for p in rep.problems if p.kind in _FOLDER_REPAIRABLE]
            left = [p for p in rep.problems if p.kind not in _FOLDER_REPAIRABLE]
            actions = [f"would repair {p.kind}: {p.path}" for p in fix]
        else:
            left = [p for p in rep.problems if not p.repaired]
            actions = [f"repaired {p.kind}: {p.path}" for p in rep.problems if p.repaired]
        return {"path": rep.path, "dry_run": dry_run, "ok": not left, "actions": actions,
                "issues": [self._problem(p) for p in left]}


# --------------------------------------------------------------------------- pickup dirs
class _PickupBackend(_Backend):
    """PersistentQueue pickup dirs: wraps :mod:`pympx_queues.persistent.pickup`."""

    kind = PICKUP

    @staticmethod
    def _pk() -> Any:
        from .persistent import pickup

        return pickup

    def is_queue(self, path: str) -> bool:
        """A pickup dir holds journals, or only the lock of a prefix whose finished
        history was compacted away (then it is an empty pickup dir, not "not a queue")."""
        if self._pk().is_pickup_dir(path):
            return True
        from . import journal as jr

        suffix = jr.LOCK_NAME_FORMAT.format(prefix="")
        for entry in _fs.scandir(path):
            if entry.name.endswith(suffix) and _fs.entry_is_regular(entry):
                try:
                    jr.check_prefix(entry.name[: -len(suffix)])
                except (TypeError, ValueError):
                    continue
                return True
        return False

    @staticmethod
    def _issue(i: Any) -> Dict[str, Any]:
        d = i.to_dict()
        return {"kind": i.kind, "path": i.path, "offset": i.offset, "detail": i.detail,
                "severity": d.get("severity"), "writer_alive": i.writer_alive}

    def status(self, path: str, o: Options) -> Dict[str, Any]:
        rep = self._pk().inspect(path, o.prefix)
        runs = []
        for p in rep.prefixes:
            for r in p.runs:
                d = r.to_dict()
                runs.append({"prefix": r.prefix, "run": r.run, "requested": r.requested,
                             "requeued": r.requeued, "completed": r.completed,
                             "outstanding": r.outstanding, "state": d["state"],
                             "live": r.live, "files": r.files})
        counts = {"requested": sum(p.requested for p in rep.prefixes),
                  "completed": sum(p.completed for p in rep.prefixes),
                  "outstanding": rep.outstanding}
        problems = []
        corrupt = [i for i in rep.issues if i.kind == "corrupt"]
        for i in corrupt:
            problems.append(f"corrupt record in {i.path} at byte {i.offset}: {i.detail}: "
                            f"run `pympx-queues repair {path}`")
        torn = [i for i in rep.issues if i.kind != "corrupt"]
        if torn:
            problems.append(f"{_plural(len(torn), 'torn journal tail')} of crashed writers "
                            f"(cut by the next run, or `pympx-queues repair {path}`)")
        stranded = sum(r["outstanding"] for r in runs if not r["live"])
        if stranded:
            problems.append(f"{_plural(stranded, 'message')} outstanding from runs that are "
                            f"not running: the next run's requeue_unprocessed_work() puts "
                            f"them back (`pympx-queues requeue {path}` consolidates them)")
        if rep.leftovers:
            problems.append(f"{_plural(len(rep.leftovers), 'leftover temp journal')}: run "
                            f"`pympx-queues repair {path}`")
        return {"kind": PICKUP, "path": rep.path, "counts": counts,
                "outstanding": rep.outstanding, "prefixes": [p.prefix for p in rep.prefixes],
                "runs": runs, "journal_errors": [self._issue(i) for i in rep.issues],
                "leftovers": rep.leftovers, "problems": problems}

    @staticmethod
    def _message(m: Any) -> Dict[str, Any]:
        return {"name": m.id, "state": "ready", "prefix": m.prefix, "key": m.key,
                "run": m.run, "body": m.body}

    def list_messages(self, path: str, state: Optional[str], o: Options
                      ) -> List[Dict[str, Any]]:
        if state not in (None, "ready"):
            raise UnsupportedOperation(
                f"a pickup dir records only outstanding work per message (--state ready); "
                f"use `pympx-queues status {path}` for completed counts")
        return [self._message(m) for m in self._pk().outstanding(path, o.prefix)]

    def show_message(self, path: str, message: str, o: Options) -> Dict[str, Any]:
        for m in self._pk().outstanding(path, o.prefix):
            if message in (m.id, m.key):
                d = self._message(m)
                d["value"] = repr(m.decoded())
                return d
        raise NoSuchMessage(f"no outstanding message with id or key {message!r} in {path}")

    def requeue(self, path: str, include_live: bool, dry_run: bool, o: Options,
                progress: Optional[Progress]) -> Dict[str, Any]:
        if include_live:
            raise UnsupportedOperation("--all is for folder-queue claims; a pickup dir's "
                                       "live runs are never touched")
        rep = self._pk().requeue(path, o.prefix, dry_run=dry_run)
        d = rep.to_dict()
        d.pop("outstanding", None)
        return {**d, "kind": PICKUP, "moved": [m.id for m in rep.outstanding],
                "skipped": [{"name": p, "reason": "a writer of this prefix is running"}
                            for p in rep.skipped], "dry_run": dry_run}

    def purge(self, path: str, force: bool, o: Options,
              progress: Optional[Progress]) -> Dict[str, Any]:
        pk = self._pk()
        rep = pk.inspect(path, o.prefix)
        live = [r.prefix for p in rep.prefixes for r in p.runs if r.live]
        if live and not force:
            raise Refused(f"a writer of {', '.join(sorted(set(live)))} is running in "
                          f"{path} (--force)")
        done: List[str] = []
        for p in rep.prefixes:
            done += pk.mark_done(path, p.prefix, p.outstanding_ids)
        return {"marked_done": done}

    def verify(self, path: str, o: Options) -> Dict[str, Any]:
        rep = self._pk().verify(path, o.prefix)
        issues = [self._issue(i) for i in rep.issues]
        issues += [{"kind": "leftover-temp", "path": p, "offset": None,
                    "detail": "unpublished temp journal of a dead writer"}
                   for p in rep.leftovers]
        return {"path": rep.path, "ok": rep.ok, "outstanding": rep.outstanding,
                "issues": issues}

    def repair(self, path: str, dry_run: bool, o: Options) -> Dict[str, Any]:
        rep = self._pk().repair(path, o.prefix, dry_run=dry_run)
        d = rep.to_dict()
        d.pop("remaining", None)
        return {**d, "ok": rep.ok, "actions": rep.actions,
                "issues": [self._issue(i) for i in rep.remaining]}


_FOLDER: Optional[_Backend] = _FolderBackend()
_PICKUP: Optional[_Backend] = _PickupBackend()


def _folder_backend() -> Optional[_Backend]:
    return _FOLDER


def _pickup_backend() -> Optional[_Backend]:
    return _PICKUP


def _backend(path: str, options: Dict[str, Any]) -> "tuple[str, _Backend, Options]":
    o = Options(**options)
    kind = detect_kind(path)
    backend = _folder_backend() if kind == FOLDER else _pickup_backend()
    assert backend is not None
    return os.path.abspath(path), backend, o


# --------------------------------------------------------------------------- public API
def status(path: str, **options: Any) -> Dict[str, Any]:
    """A snapshot of the queue at ``path``; read-only.

    Always has ``kind``, ``path``, ``counts`` (state -> number), ``outstanding`` (work not
    finished yet) and ``problems`` (one line each, with the command that fixes it; empty
    when healthy).  Folder queues add ``claims`` (owner, age, live or stale) and
    ``producers`` (open, closed or failed); pickup dirs add ``runs`` (requested,
    completed, outstanding per run) and ``journal_errors`` (torn or corrupt records).
    """
    from .pipeline import admin as pipeline_admin  # a pipeline's journal dir (issue 11)

    if pipeline_admin.is_pipeline_dir(path):
        return pipeline_admin.status(path)
    path, backend, o = _backend(path, options)
    return backend.status(path, o)


def list_messages(path: str, state: Optional[str] = None, **options: Any
                  ) -> List[Dict[str, Any]]:
    """Messages in ``state`` (one of :data:`STATES`; all when None), each a dict with
    ``name``, ``state``, ``size``, ``age`` (seconds), ``retries``, ``owner``,
    ``last_error``.  A pickup dir lists its outstanding messages (state ``ready``)."""
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    path, backend, o = _backend(path, options)
    return backend.list_messages(path, state, o)


def show_message(path: str, message: str, **options: Any) -> Dict[str, Any]:
    """Everything known about one message (state, retries, last error, owner, lease age).

    ``message`` is a message name (folder queue) or a message id or key (pickup dir).
    Raises :class:`NoSuchMessage` (a ``KeyError``) when there is none.
    """
    path, backend, o = _backend(path, options)
    return backend.show_message(path, message, o)


def put_files(path: str, files: List[str], *, copy: bool = False, rename: bool = False,
              progress: Optional[Progress] = None, **options: Any) -> List[str]:
    """Publish ``files`` into a folder queue (moved, or copied with ``copy=True``).

    A hand drop: each file is copied to ``tmp/``, fsynced, published by one no-clobber
    rename and the folder fsynced (G1, G2) before a moved original is removed.  No
    producer is registered, so consumers' end-of-stream logic is not affected.  Every
    file is checked before any is published.  A name already waiting raises
    ``FileExistsError`` unless ``rename`` (then ``name~<8 hex>.ext``).  Returns the
    published paths.
    """
    path, backend, o = _backend(path, options)
    return backend.put_files(path, list(files), copy, o, rename, progress)


def put_data(path: str, name: str, data: "bytes | str", *, rename: bool = False,
             **options: Any) -> str:
    """Publish ``data`` (str as UTF-8) as a new message ``name``; like :func:`put_files`."""
    path, backend, o = _backend(path, options)
    if isinstance(data, str):
        data = data.encode("utf-8")
    return backend.put_data(path, name, data, o, rename)


def requeue(path: str, *, include_live: bool = False, dry_run: bool = False,
            progress: Optional[Progress] = None, **options: Any) -> Dict[str, Any]:
    """Return stale claims to the queue (folder) or consolidate earlier runs' outstanding
    work so the next run requeues it (pickup dir).

    ``include_live=True`` also takes claims whose owner is alive (an operator's forced
    decision: that owner's ``task_done`` then fails and the message runs twice).
    ``dry_run`` changes nothing.  Returns ``moved`` (names or ids), ``skipped`` (each with
    a reason) and ``dry_run``.  Idempotent and crash-safe (G5).
    """
    path, backend, o = _backend(path, options)
    return backend.requeue(path, include_live, dry_run, o, progress)


def retry(path: str, *, pattern: Optional[str] = None, dry_run: bool = False,
          progress: Optional[Progress] = None, **options: Any) -> Dict[str, Any]:
    """Move dead letters (all, or those whose name matches the glob ``pattern``) to ready."""
    from .pipeline import admin as pipeline_admin  # a pipeline's dead letters (issue 11)

    if pipeline_admin.is_pipeline_dir(path):
        return pipeline_admin.retry(path, pattern=pattern, dry_run=dry_run)
    path, backend, o = _backend(path, options)
    return backend.retry(path, pattern, dry_run, o, progress)


def close(path: str, *, producer: Optional[str] = None, force: bool = False,
          **options: Any) -> Dict[str, Any]:
    """Write DONE for every producer that registered and died without closing (or for
    ``producer`` only; a live one needs ``force``).  Returns ``written``."""
    path, backend, o = _backend(path, options)
    return backend.close(path, producer, False, force, o)


def fail(path: str, *, producer: Optional[str] = None, force: bool = False,
         **options: Any) -> Dict[str, Any]:
    """Write FAILED for every producer that died without closing (or ``producer`` only):
    consumers stop.  Returns ``written``."""
    path, backend, o = _backend(path, options)
    return backend.close(path, producer, True, force, o)


def reset(path: str, *, force: bool = False, progress: Optional[Progress] = None,
          **options: Any) -> Dict[str, Any]:
    """pympx ``reset()`` for a folder queue: return abandoned claims to ready, remove the
    control files of runs that are over (a consumer saw them end) and crashed producers'
    temp files.  Live claims, and runs still being produced or drained, are left alone
    unless ``force``.  Never deletes a message."""
    path, backend, o = _backend(path, options)
    return backend.reset(path, force, o, progress)


def purge(path: str, *, force: bool = False, progress: Optional[Progress] = None,
          **options: Any) -> Dict[str, Any]:
    """pympx ``purge()``.  Destructive.

    Folder queue: delete every message and queue file (refused while a live consumer
    holds a claim, unless ``force``).  Pickup dir: give up on every outstanding message
    (journaled as done, like ``mark_all_work_done()``; journals are kept, nothing is
    deleted), refused while a writer is running unless ``force``.
    """
    path, backend, o = _backend(path, options)
    return backend.purge(path, force, o, progress)


def verify(path: str, **options: Any) -> Dict[str, Any]:
    """Check journal checksums / folder consistency; read-only.

    Returns ``ok`` (bool) and ``issues`` (dicts with ``kind``, ``path``, ``offset`` and
    ``detail``).  Torn journal tails of crashed writers are listed but do not clear
    ``ok`` (the next run cuts them); corrupt records do.
    """
    path, backend, o = _backend(path, options)
    return backend.verify(path, o)


def repair(path: str, *, dry_run: bool = False, **options: Any) -> Dict[str, Any]:
    """Quarantine corrupt journal records, cut torn tails, remove leftovers of crashed
    writers and requeue stale claims; never deletes a message (corrupt bytes are saved
    to side files).  Returns ``actions`` (done, or "would" with ``dry_run``), ``ok``
    (nothing left that needs a person) and ``issues`` (what remains)."""
    path, backend, o = _backend(path, options)
    return backend.repair(path, dry_run, o)


def describe_destruction(path: str, **options: Any) -> str:
    """One line saying what ``purge``/``reset`` would touch, for a confirmation prompt."""
    report = status(path, **options)
    counts = ", ".join(f"{n} {state}" for state, n in report["counts"].items()
                       if n and not state.startswith("wip_"))
    return f"{report['kind']} queue {report['path']} ({counts or 'empty'})"


# --------------------------------------------------------------------------- watch
def snapshot(path: str, **options: Any) -> Dict[str, Any]:
    """:func:`status` plus the time it was taken (``time`` monotonic, ``wall_time``)."""
    report = status(path, **options)
    report["time"] = time.monotonic()
    report["wall_time"] = time.time()
    return report


def rates(previous: Optional[Dict[str, Any]], current: Dict[str, Any]) -> Dict[str, float]:
    """Per-second change of every count between two snapshots ({} for the first one)."""
    if not previous:
        return {}
    elapsed = current["time"] - previous["time"]
    if elapsed <= 0:
        return {}
    return {
        key: round((value - previous["counts"].get(key, 0)) / elapsed, 3)
        for key, value in current["counts"].items()
        if isinstance(value, (int, float))
    }
