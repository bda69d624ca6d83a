"""Acknowledgement: ``task_done`` deletes a claim (or moves it to
``task_done_directory``), directly or through ``trash/`` and a deleter thread."""

from __future__ import annotations

import errno
import logging
import os
import threading
from time import perf_counter as _perf_counter
from typing import Iterable, List

from .. import _fs
from . import layout as L
from .base import PathLike
from .retries import _Retries

log = logging.getLogger("pympx_queues.folder")


class _Acknowledgement(_Retries):
    """A layer of :class:`~pympx_queues.folder.ReadableFolderQueue`: settling claims."""

    def task_done(self, path: PathLike) -> None:
        """Acknowledge a claimed message: delete it, or move it to ``task_done_directory``.

        Never blocks.  In fsync mode the change is durable on return (G4: a message
        acknowledged is never redelivered).  Raises ``FileNotFoundError`` when the claim
        is no longer held and ``ValueError`` for a path that ``get()`` did not return.
        """
        if self._fast_ack and self._trash_run <= 0 and path.__class__ is str:
            # The common case (flush mode, deleting, files without disk blocks): the exact
            # path get() returned, one unlink.  Everything else goes through _settle.
            claim = self._claims.pop(path, None)
            if claim is not None:
                self._unlink_claim(path)  # G4
                if self._retry_hint or self._wakeups.side:
                    self._drop_retry_sidecar(claim, known=False)
                return
        self._settle(path)
        if self._durable:
            if self.task_done_directory is not None:
                _fs.fsync_dir(self.task_done_directory)  # G4
            _fs.fsync_dir(self._wip)  # G4: the removal of the claim survives power loss
            # G4: so does the claim's removal from the ready folder (with the link()+unlink()
            # fallback that removal is a separate, possibly unsynced, unlink there).
            _fs.fsync_dir(self.path)

    def task_done_many(self, paths: Iterable[PathLike]) -> None:
        """Acknowledge several claims; in fsync mode with one directory fsync for all.

        If one path fails (``FileNotFoundError``: claim lost), the ones before it stay
        acknowledged (and are made durable) and the exception propagates.
        """
        if not self._durable:  # nothing to share: each one takes task_done's fast path
            for p in paths:
                # This class's task_done (a subclass's may call back into this method).
                _Acknowledgement.task_done(self, p)
            return
        settled = 0
        try:
            for p in paths:
                self._settle(p)
                settled += 1
        finally:
            if self._durable and settled:
                # G4, once per batch and concurrently: wip/ (the claims are gone), the
                # ready folder (their removal from it) and task_done_directory if kept.
                dirs = [self._wip, self.path]
                if self.task_done_directory is not None:
                    dirs.append(self.task_done_directory)
                _fs.fsync_dirs(dirs)

    #: Acknowledged claims this process may leave in ``trash/`` for its deleter thread;
    #: beyond that ``task_done`` unlinks itself (the trash never grows without bound).
    TRASH_BACKLOG = 10_000
    #: ``task_done`` unlinks the claim itself (~7 us for a file whose data was never
    #: written to disk: consumed soon after it was put).  SLOW_STREAK unlinks in a row
    #: slower than SLOW_UNLINK seconds say this folder's files have their disk blocks
    #: (they waited long enough to be written back, were fsynced, or were put with
    #: ``writeback=True``; then an unlink costs 0.3-1.5 ms on ext4 with ``discard``): the
    #: next TRASH_RUN acknowledgements are renamed into ``trash/`` and unlinked by the
    #: deleter thread, then direct unlinks are tried again.
    SLOW_UNLINK = 0.0003
    SLOW_STREAK = 3
    TRASH_RUN = 1000

    def _unlink_claim(self, p: str) -> None:
        """Delete an acknowledged claim here and now, timing it (see SLOW_UNLINK)."""
        t0 = _perf_counter()
        if not _fs.remove_claim(p):  # G4: the claim is removed, never redelivered
            raise self._lost(p)
        if _perf_counter() - t0 > self.SLOW_UNLINK:
            self._slow_unlinks += 1
            if self._slow_unlinks >= self.SLOW_STREAK:
                self._slow_unlinks = 0
                self._trash_run = self.TRASH_RUN  # the next acks go through trash/
        elif self._slow_unlinks:
            self._slow_unlinks = 0

    def _settle(self, path: PathLike) -> None:
        p, claim = self._resolve(path)
        if self.task_done_directory is None:
            if self._trash_run <= 0:
                self._unlink_claim(p)
            elif self._trash_backlog < self.TRASH_BACKLOG:
                self._trash_run -= 1
                try:
                    # G4: the claim leaves wip/ in one atomic rename (never redelivered:
                    # nothing in trash/ is ever requeued); the unlink, ~1 ms for a file
                    # whose blocks were written, happens in the deleter thread.
                    moved = _fs.discard_claim(p, self._trash_slash + p[self._wip_cut:])
                except OSError:  # no trash/ (removed by hand?): unlink here
                    moved = None
                if moved is False:
                    raise self._lost(p)
                if moved is None:
                    if not _fs.remove_claim(p):  # G4
                        raise self._lost(p)
                elif _fs.tracing():
                    # The crash-state recorder attributes each file-system change to the
                    # operation traced next: no deleter thread then, every operation in
                    # order in this thread.
                    self._remove_batch([self._trash_slash + p[self._wip_cut:]])
                else:
                    with self._claims_lock:
                        self._trash_backlog += 1
                        if self._trash_thread is None:
                            self._start_trash_deleter()
                        elif not self._trash_wake.is_set():
                            self._trash_wake.set()
            elif not _fs.remove_claim(p):  # G4: the claim is removed, never redelivered
                raise self._lost(p)
        else:
            try:
                self._move_out(p, self.task_done_directory, claim)
            except FileNotFoundError:
                raise self._lost(p) from None
        with self._claims_lock:
            self._claims.pop(p, None)
        if self._retry_hint or self._wakeups.side:
            self._drop_retry_sidecar(claim, known=False)

    def _start_trash_deleter(self) -> None:
        """Start the deleter thread (caller holds ``_claims_lock``)."""
        self._trash_stop = False
        self._trash_halt.clear()
        t = threading.Thread(target=self._trash_loop, name="pympx-folder-trash", daemon=True)
        self._trash_thread = t
        t.start()

    def _empty_trash(self) -> int:
        """Delete what ``trash/`` holds (acknowledged claims, any consumer's); count."""
        n = 0
        batch: List[str] = []
        for entry in _fs.scandir(self._trash):
            if _fs.entry_is_regular(entry):  # only what task_done put there: files
                batch.append(entry.path)
                if len(batch) >= 1000:
                    n += self._remove_batch(batch)
                    batch = []
        return n + self._remove_batch(batch)

    def _remove_batch(self, batch: List[str]) -> int:
        if not batch:
            return 0
        # In a child process (rm): unlinking written files costs ~1 ms of kernel time
        # each here, and doing it in this thread would make get()/task_done wait for the
        # GIL after every call.
        _fs.remove_files_batch(tuple(batch))
        with self._claims_lock:
            self._trash_backlog = max(0, self._trash_backlog - len(batch))
        return len(batch)

    def _kick_trash(self) -> None:
        """Have the deleter thread empty ``trash/`` (leftovers of exited consumers too)."""
        try:
            if _fs.tracing():  # crash-state recording: in order, in this thread
                self._empty_trash()
                return
            with self._claims_lock:
                if self._trash_thread is not None:
                    self._trash_wake.set()
                elif any(True for _ in _fs.scandir(self._trash)):
                    self._start_trash_deleter()
        except FileNotFoundError:  # a queue folder made before trash/ existed
            pass

    def _trash_loop(self) -> None:
        """Unlink acknowledged claims off the caller's clock; ends once idle or stopped."""
        wake = self._trash_wake
        while True:
            stop = self._trash_stop
            try:
                n = self._empty_trash()
            except FileNotFoundError:  # the queue folder was removed
                n = 0
                stop = True
            except Exception:  # pragma: no cover - the next recover() starts a new pass
                log.warning("could not empty %s", self._trash, exc_info=True)
                n = 0
                stop = True
            with self._claims_lock:
                if stop or (n == 0 and not wake.is_set()):  # stop: after a full pass
                    self._trash_thread = None
                    return
                wake.clear()
            # Let acknowledgements gather: one rm per ~50 ms of acks, not one per ack
            # (close() cuts the pause short through _trash_halt).
            halt = self._trash_halt
            if not halt.is_set():
                wake.wait(0.05)
                if n:
                    halt.wait(0.05)

    def _move_out(self, src: str, directory: str, name: str) -> str:
        try:
            return self._move_noclobber(src, directory, name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # task_done_directory on another file system: copy, publish, then remove.
        tmp = os.path.join(directory, "." + L.format_owned(self._owner(_fs.random_id()), name))
        _fs.copy_new(src, tmp, durable=self._durable, mode=self.file_mode)
        try:
            target = self._move_noclobber(tmp, directory, name)
        except BaseException:
            _fs.unlink_quiet(tmp)
            raise
        _fs.unlink_regular(src)
        return target
