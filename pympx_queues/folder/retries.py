"""Retries and dead letters: ``nack``, the retry sidecars in ``retries/``, ``failed/``."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Any, List, Optional, Tuple

from .. import _fs
from . import layout as L
from .base import PathLike, _format_error, _json, _now
from .claims import _Claims

log = logging.getLogger("pympx_queues.folder")


class _Retries(_Claims):
    """A layer of :class:`~pympx_queues.folder.ReadableFolderQueue`: retries and dead letters."""

    def _drop_retry_sidecar(self, name: str, known: bool = True) -> None:
        """Remove ``retries/<name>.json``.  On the hot path (``known=False``) only when
        the last listing showed one; missed ones are harmless (each sidecar records the
        inode it belongs to) and :meth:`recover` sweeps orphans."""
        if name in self._retry_hint:
            self._retry_hint.discard(name)
        elif not known:
            if not self._wakeups.side:  # the common case: no sidecar was ever announced
                return
            side = self._wakeups.side
            entry = L.format_retry_sidecar(name)
            if entry not in side:  # written by another consumer after our last listing?
                return
            side.discard(entry)
        _fs.unlink_quiet(os.path.join(self._retries, L.format_retry_sidecar(name)))

    def _read_retry(self, name: str, dev: int, ino: int) -> dict:
        """Sidecar of a returned message, or {} when absent, unreadable or stale."""
        try:
            data = json.loads(_fs.read_bytes(
                os.path.join(self._retries, L.format_retry_sidecar(name))))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("ino") != ino or data.get("dev") != dev:
            return {}  # written for an earlier message of the same name
        return data

    def _held(self, path: PathLike) -> Tuple[str, str, os.stat_result]:
        """``(wip path, message name, its lstat)`` of a claim still held; raises like
        :meth:`task_done` otherwise."""
        p, claim = self._resolve(path)
        st = _fs.lstat(p)
        if st is None:
            raise self._lost(p)
        return p, claim, st

    def _attempt(self, claim: str, st: os.stat_result) -> int:
        return int(self._read_retry(claim, st.st_dev, st.st_ino).get("attempts", 0)) + 1

    def attempts(self, path: PathLike) -> int:
        """Which attempt the claim at ``path`` is (1 for a message never returned)."""
        _, claim, st = self._held(path)
        return self._attempt(claim, st)

    def nack(self, path: PathLike, error: Any = None) -> str:
        """Give a claimed message back for a retry; returns where it went.

        The attempt count and ``error`` (text or an exception, with its traceback) are
        kept in ``retries/<name>.json``.  After ``max_retries`` attempts the message goes
        to ``failed/`` with ``failed/<name>.error.json`` beside it (a dead letter;
        :meth:`retry_failed` brings it back).  Raises like :meth:`task_done`.
        """
        p, claim, st = self._held(path)
        return self._give_back(p, claim, st, self._attempt(claim, st), _format_error(error))

    def _give_back(self, p: str, claim: str, st: os.stat_result, attempt: int,
                   error: str) -> str:
        """Requeue the claim ``p`` after its ``attempt``-th attempt, or make it a dead
        letter once that is ``max_retries``; returns where it went."""
        if self.max_retries is not None and attempt >= self.max_retries:
            return self._dead_letter(p, claim, attempt, error)
        target = self._requeue(p, claim, st, attempt, error, "nack")
        self._forget(p)
        return target

    def _requeue(self, wip_path: str, name: str, st: os.stat_result, attempts: int,
                 error: str, why: str, claim_rid: str = "") -> str:
        """Return a claim to the ready folder, sidecar first (count survives a crash).

        The original name is tried first and taken only if free (no-clobber rename);
        no ``lstat`` decides it beforehand: on a network file system that answer may come
        from a cache seconds old and rename a message for nothing."""
        target_name = name
        payload = {"attempts": attempts, "last_error": error, "reason": why,
                   "time": _now(), "by": self._owner().format(), "dev": st.st_dev,
                   "ino": st.st_ino, "claim": claim_rid or os.path.basename(wip_path)}
        for _ in range(20):
            sidecar = os.path.join(self._retries, L.format_retry_sidecar(target_name))
            _fs.write_replace(sidecar, self._tmp_path(L.format_retry_sidecar(target_name)),
                              _json(payload), durable=self._durable, mode=self.file_mode)
            target = os.path.join(self.path, target_name)
            try:
                _fs.rename_noreplace(wip_path, target)  # G1/G3: back to ready, no clobber
            except FileExistsError:
                _fs.unlink_quiet(sidecar)
                target_name = L.unique_variant(name, self.message_extension)
                continue
            except FileNotFoundError:
                _fs.unlink_quiet(sidecar)
                raise self._lost(wip_path) from None
            if self._durable:
                _fs.fsync_dir(self.path)  # G1
            self._retry_hint.add(target_name)  # task_done of its next claim removes it
            self._wakeups.poke()
            return target
        raise FileExistsError(f"could not find a free name for {name!r} in {self.path}")

    def _dead_letter(self, wip_path: str, name: str, attempts: int, error: str) -> str:
        target_name = self._free_name(self._failed, name)
        payload = {"attempts": attempts, "error": error, "time": _now(),
                   "by": self._owner().format(), "claim": os.path.basename(wip_path),
                   "original_name": name}
        sidecar = os.path.join(self._failed, L.format_error_sidecar(target_name))
        _fs.write_replace(sidecar, self._tmp_path(L.format_error_sidecar(target_name)),
                          _json(payload), durable=self._durable, mode=self.file_mode)
        try:
            _fs.rename_noreplace(wip_path, os.path.join(self._failed, target_name))  # G1
        except FileNotFoundError:
            _fs.unlink_quiet(sidecar)
            raise self._lost(wip_path) from None
        except FileExistsError:
            _fs.unlink_quiet(sidecar)
            return self._dead_letter(wip_path, L.unique_variant(name, self.message_extension),
                                     attempts, error)
        if self._durable:
            _fs.fsync_dir(self._failed)  # G1
        self._forget(wip_path)
        self._drop_retry_sidecar(name)
        log.warning("message %s moved to dead letters after %d attempt(s)", name, attempts)
        return os.path.join(self._failed, target_name)

    def retry_failed(self, pattern: Optional[str] = None) -> List[str]:
        """Move dead letters (optionally only names matching the glob ``pattern``) back
        to the ready folder with a fresh attempt count; returns their new paths."""
        back: List[str] = []
        for entry in list(_fs.scandir(self._failed)):
            name = entry.name
            if not _fs.entry_is_regular(entry) or not self.is_message_name(name):
                continue
            if L.parse_error_sidecar(name, self.message_extension) is not None and \
                    _fs.lstat(os.path.join(self._failed, name[: -len(L.ERROR_SUFFIX)])):
                continue  # the sidecar of a dead letter whose extension is .json
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            _fs.unlink_quiet(os.path.join(self._retries, L.format_retry_sidecar(name)))
            try:
                target = self._move_noclobber(entry.path, self.path, name)  # G1
            except FileNotFoundError:
                continue
            _fs.unlink_quiet(os.path.join(self._failed, L.format_error_sidecar(name)))
            back.append(target)
        if back:
            if self._durable:
                _fs.fsync_dir(self.path)
            self._wakeups.poke()
        return back
