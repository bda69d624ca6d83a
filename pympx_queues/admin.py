"""Administration of queues on disk: one API for both kinds, used by the ``pympx-queues`` CLI.

Every CLI command is a thin layer over one function here, and every function here is a
thin layer over the queue modules' own administration functions:

* a **folder queue** directory (``pympx_queues.folder`` / ``folder_admin``), and
* a **pickup dir** of PersistentQueue journals (``pympx_queues.persistent`` / ``pickup``).

:func:`detect_kind` tells them apart (or raises :class:`~pympx_queues.errors.NotAQueueError`).
Each public function dispatches on the kind and returns plain data (dicts, lists, str, int
and float only) so that the CLI can print it as a table or as ``--json`` without knowing
which kind of queue it is looking at.

Every function is safe to call while producers and consumers are running: reads are
snapshots, and every change goes through the queue modules' claim/publish primitives.

Errors: ``FileNotFoundError`` (no such path), ``PermissionError``, ``NotAQueueError``,
:class:`UnsupportedOperation` (the command has no meaning for this kind of queue),
``ValueError`` (bad arguments), ``JournalCorruptError``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional

from .errors import NotAQueueError, PympxQueueError

__all__ = [
    "FOLDER", "PICKUP", "STATES", "UnsupportedOperation", "NoSuchMessage", "Progress",
    "detect_kind", "status", "list_messages", "show_message", "put_files", "put_data",
    "requeue", "retry", "close", "fail", "reset", "purge", "verify", "repair",
    "snapshot", "rates", "describe_destruction",
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


class NoSuchMessage(PympxQueueError, KeyError):
    """``show_message`` found no message of that name or id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such message"


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
        return UnsupportedOperation(f"{what} is not supported for {self.kind} queues")

    def status(self, path: str) -> Dict[str, Any]:
        raise self._unsupported("status")

    def list_messages(self, path: str, state: Optional[str]) -> List[Dict[str, Any]]:
        raise self._unsupported("ls")

    def show_message(self, path: str, message: str) -> Dict[str, Any]:
        raise self._unsupported("show")

    def put_files(self, path: str, files: List[str], copy: bool,
                  progress: Optional[Progress]) -> List[str]:
        raise self._unsupported("put")

    def put_data(self, path: str, name: str, data: bytes) -> str:
        raise self._unsupported("put --data")

    def requeue(self, path: str, include_live: bool, dry_run: bool,
                progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("requeue")

    def retry(self, path: str, pattern: Optional[str], dry_run: bool,
              progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("retry")

    def close(self, path: str, producer: Optional[str], failed: bool) -> Dict[str, Any]:
        raise self._unsupported("fail" if failed else "close")

    def reset(self, path: str, force: bool, progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("reset")

    def purge(self, path: str, progress: Optional[Progress]) -> Dict[str, Any]:
        raise self._unsupported("purge")

    def verify(self, path: str) -> Dict[str, Any]:
        raise self._unsupported("verify")

    def repair(self, path: str, dry_run: bool) -> Dict[str, Any]:
        raise self._unsupported("repair")


def _folder_backend() -> Optional[_Backend]:
    return _FOLDER


def _pickup_backend() -> Optional[_Backend]:
    return _PICKUP


_FOLDER: Optional[_Backend] = None
_PICKUP: Optional[_Backend] = None


def _backend(path: str) -> "tuple[str, _Backend]":
    kind = detect_kind(path)
    backend = _folder_backend() if kind == FOLDER else _pickup_backend()
    assert backend is not None
    return os.path.abspath(path), backend


# --------------------------------------------------------------------------- public API
def status(path: str) -> Dict[str, Any]:
    """A snapshot of the queue at ``path``.

    Always has ``kind``, ``path``, ``counts`` (state -> number), ``outstanding`` (work not
    finished yet) and ``problems`` (list of one-line strings, each with the command that
    fixes it; empty when healthy).  Folder queues add ``claims`` (owner, age, live or stale)
    and ``producers``; pickup dirs add ``runs`` and ``journal_errors``.
    """
    path, backend = _backend(path)
    return backend.status(path)


def list_messages(path: str, state: Optional[str] = None) -> List[Dict[str, Any]]:
    """Messages in ``state`` (one of :data:`STATES`, or all when None), oldest first."""
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    path, backend = _backend(path)
    return backend.list_messages(path, state)


def show_message(path: str, message: str) -> Dict[str, Any]:
    """Everything known about one message (state, retries, last error, owner, lease age).

    Raises :class:`NoSuchMessage` (a ``KeyError``) when no message of that name exists.
    """
    path, backend = _backend(path)
    return backend.show_message(path, message)


def put_files(path: str, files: List[str], *, copy: bool = False,
              progress: Optional[Progress] = None) -> List[str]:
    """Publish ``files`` into the queue (moved, or copied with ``copy=True``); their names."""
    path, backend = _backend(path)
    return backend.put_files(path, list(files), copy, progress)


def put_data(path: str, name: str, data: "bytes | str") -> str:
    """Publish ``data`` as a new message called ``name``; returns the published name."""
    path, backend = _backend(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    return backend.put_data(path, name, data)


def requeue(path: str, *, include_live: bool = False, dry_run: bool = False,
            progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Return stale claims (folder) or earlier runs' outstanding work (pickup) to the queue.

    ``include_live=True`` also takes claims whose owner is alive (the caller must have
    been told to force it).  ``dry_run`` changes nothing.  Returns ``moved`` (list of
    names), ``skipped`` (names left alone and why) and ``dry_run``.  Idempotent.
    """
    path, backend = _backend(path)
    return backend.requeue(path, include_live, dry_run, progress)


def retry(path: str, *, pattern: Optional[str] = None, dry_run: bool = False,
          progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Move dead letters (all, or those whose name matches the glob ``pattern``) to ready."""
    path, backend = _backend(path)
    return backend.retry(path, pattern, dry_run, progress)


def close(path: str, *, producer: Optional[str] = None) -> Dict[str, Any]:
    """Write DONE for producers that died before closing (or for ``producer`` only)."""
    path, backend = _backend(path)
    return backend.close(path, producer, False)


def fail(path: str, *, producer: Optional[str] = None) -> Dict[str, Any]:
    """Write FAILED for producers that died without closing (or for ``producer`` only)."""
    path, backend = _backend(path)
    return backend.close(path, producer, True)


def reset(path: str, *, force: bool = False,
          progress: Optional[Progress] = None) -> Dict[str, Any]:
    """pympx ``reset()``: drop old control files and return claims to ready.

    Claims whose owner is alive are left alone unless ``force``.
    """
    path, backend = _backend(path)
    return backend.reset(path, force, progress)


def purge(path: str, *, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """pympx ``purge()``: delete every message and control file.  Destructive."""
    path, backend = _backend(path)
    return backend.purge(path, progress)


def verify(path: str) -> Dict[str, Any]:
    """Check journal checksums / folder consistency; changes nothing.

    Returns ``ok`` (bool) and ``issues`` (list of dicts with at least ``kind``, ``path``
    and ``detail``).
    """
    path, backend = _backend(path)
    return backend.verify(path)


def repair(path: str, *, dry_run: bool = False) -> Dict[str, Any]:
    """Quarantine corrupt records and clean leftovers; never deletes a message.

    Returns ``actions`` (what was or would be done), ``ok`` (nothing left to repair) and
    ``issues`` (what remains).
    """
    path, backend = _backend(path)
    return backend.repair(path, dry_run)


def describe_destruction(path: str) -> str:
    """One line saying what ``purge``/``reset`` would touch, for a confirmation prompt."""
    report = status(path)
    counts = ", ".join(f"{n} {state}" for state, n in report["counts"].items() if n)
    return f"{report['kind']} queue {report['path']} ({counts or 'empty'})"


# --------------------------------------------------------------------------- watch
def snapshot(path: str) -> Dict[str, Any]:
    """:func:`status` plus the monotonic time it was taken (for :func:`rates`)."""
    report = status(path)
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
        key: (value - previous["counts"].get(key, 0)) / elapsed
        for key, value in current["counts"].items()
        if isinstance(value, (int, float))
    }
