"""Wake-up hints for blocked folder-queue consumers.

Three modes:

* ``"events"`` (default): file-system events wake a blocked ``get()`` at once.  On Linux a
  small inotify reader (below) subscribes to ``IN_CREATE | IN_MOVED_TO`` on the queue root
  and ``control/`` only; elsewhere (or if inotify is unavailable) a watchdog observer.
* ``"watchdog"``: always the watchdog observer (FSEvents, kqueue, ReadDirectoryChangesW,
  or inotify through watchdog).
* ``"poll"``: no observer at all, only periodic rescans.  Use it on NFS/SMB, where the
  client never sees changes made by other machines through events.

Why not watchdog's observer for inotify too: it subscribes to every move, so each claim
(a rename *out* of the root) becomes an event, and its move-pairing holds every
``IN_MOVED_FROM`` for 0.5 s at the head of a FIFO, delaying the next put's wake-up by up
to half a second (measured: median put->wake 480 ms while consumers claim).  The direct
reader never sees claims at all, so draining costs nothing extra and a put wakes a
consumer in well under 10 ms.

Events are *hints*: inotify queues overflow (we then ask for a rescan) and network file
systems drop events, so consumers still rescan the folder periodically (the source of
truth).

Observers are started lazily in the process that waits (never pickled: a spawned child
starts its own), stopped by :meth:`Wakeups.close`, and never leak threads.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import sys
import threading
import time
from typing import Any, Callable, Deque, List, Optional

log = logging.getLogger("pympx_queues.watch")

EVENTS = "events"
WATCHDOG = "watchdog"
POLL = "poll"
MODES = (EVENTS, WATCHDOG, POLL)

# --------------------------------------------------------------------------- inotify
_IN_CREATE = 0x00000100
_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
#: The inotify reader waits this long after the first event before reading the batch.
COALESCE_SECONDS = 0.001
_libc: Any = None


def _inotify_libc() -> Any:
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
        else:
            from .._fs import libc_with

            lib = libc_with("inotify_init1")
            if lib:
                lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            _libc = lib
    return _libc


class _InotifyReader:
    """One inotify fd watching a few folders for new names; a thread calls ``callback``.

    ``callback(folder_index, name)`` for each created / moved-in entry, and
    ``callback(-1, "")`` when the kernel queue overflowed (events were lost: rescan).
    """

    def __init__(self, folders: List[str], callback: Callable[[int, str], None]) -> None:
        lib = _inotify_libc()
        if not lib:
            raise OSError(errno.ENOSYS, "inotify is not available")
        fd = lib.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "inotify_init1: " + os.strerror(err))
        self._fd = fd
        self._wds = {}
        try:
            for i, folder in enumerate(folders):
                wd = lib.inotify_add_watch(fd, os.fsencode(folder),
                                           _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR)
                if wd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, "inotify_add_watch: " + os.strerror(err), folder)
                self._wds[wd] = i
            self._rpipe, self._wpipe = os.pipe()
        except BaseException:
            os.close(fd)
            raise
        self._callback = callback
        self._thread = threading.Thread(target=self._run, name="pympx-inotify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd, rpipe = self._fd, self._rpipe
        header = _EVENT_HEADER
        hsize = header.size
        wds = self._wds
        cb = self._callback
        while True:
            try:
                ready, _, _ = select.select([fd, rpipe], [], [])
            except InterruptedError:  # pragma: no cover - PEP 475 retries anyway
                continue
            except (OSError, ValueError):
                return
            if rpipe in ready:
                return
            # Let a burst of puts gather (1 ms): one wake-up then carries many names,
            # instead of every consumer process waking once per file while a producer
            # publishes thousands per second.
            time.sleep(COALESCE_SECONDS)
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            pos = 0
            while pos + hsize <= len(buf):
                wd, mask, _cookie, length = header.unpack_from(buf, pos)
                pos += hsize
                raw = buf[pos:pos + length]
                pos += length
                if mask & _IN_Q_OVERFLOW:
                    cb(-1, "")
                    continue
                if mask & (_IN_IGNORED | _IN_ISDIR):
                    continue
                idx = wds.get(wd)
                if idx is not None:
                    cb(idx, os.fsdecode(raw.rstrip(b"\0")))

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors (the thread is not here)."""
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._rpipe, self._wpipe):
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        try:
            os.write(self._wpipe, b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._close_fds()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"wakeups must be one of {MODES!r}, got {mode!r}")
    return mode


class _StopNoise(logging.Filter):
    """Drop watchdog's ERROR "queue_events() called when the thread is inactive", which
    some watchdog versions log on every normal ``observer.stop()``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


_stop_noise_installed = False


def _quiet_watchdog_stop() -> None:
    global _stop_noise_installed
    if not _stop_noise_installed:
        logging.getLogger("watchdog.observers.inotify").addFilter(_StopNoise())
        _stop_noise_installed = True


class Wakeups:
    """Collects wake-up hints for one consumer object.

    ``names()`` returns the message names announced since the last call; ``control_dirty``
    says a control file appeared; ``wait(timeout)`` blocks until a hint arrives or the
    timeout passes (returns True when woken by a hint).
    """

    def __init__(self, root: str, control_dir: str, extension: str, mode: str = EVENTS,
                 side_dir: Optional[str] = None):
        self.root = root
        self.control_dir = control_dir
        self.side_dir = side_dir  # a folder whose new entry names are collected in ``side``
        self.extension = extension
        self.mode = check_mode(mode)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._event = threading.Event()
        self._names: Deque[str] = collections.deque()
        self.control_dirty = True
        self.rescan_needed = False
        #: Names created in ``side_dir`` (retry sidecars) since the consumer last cleared it.
        self.side: set = set()
        self._observer: Any = None
        self._pid: Optional[int] = None
        self._failed = False

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        return {"root": self.root, "control_dir": self.control_dir,
                "extension": self.extension, "mode": self.mode, "side_dir": self.side_dir}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        """True when an observer is running in this process."""
        return self._observer is not None and self._pid == os.getpid()

    def start(self) -> bool:
        """Start the observer (idempotent, lazy); False in poll mode or when unavailable."""
        if self.mode == POLL or self._failed:
            return False
        if self._observer is not None:
            if self._pid == os.getpid():
                return True
            # Inherited through fork: the observer's threads do not exist here.
            if isinstance(self._observer, _InotifyReader):
                self._observer.abandon()
            self._observer = None
            self._event = threading.Event()
            self._names = collections.deque()
        try:
            if self.mode == EVENTS and _inotify_libc():
                folders = [self.root, self.control_dir]
                if self.side_dir:
                    folders.append(self.side_dir)
                self._observer = _InotifyReader(folders, self._on_inotify)
            else:
                self._observer = self._make_observer()
        except Exception as exc:  # inotify limits, missing backend: fall back to polling
            log.warning("watchdog observer unavailable for %s (%s); polling instead",
                        self.root, exc)
            self._failed = True
            self._observer = None
            return False
        self._pid = os.getpid()
        return True

    def _on_inotify(self, idx: int, name: str) -> None:
        if idx == 0:
            if name.endswith(self.extension):
                self._names.append(name)
                self._event.set()
        elif idx == 1:
            self.control_dirty = True
            self._event.set()
        elif idx == 2:
            self.side.add(name)  # no wake-up: only a hint for the consumer's bookkeeping
        else:  # overflow: events were lost, the folder must be listed again
            self.rescan_needed = True
            self.control_dirty = True
            self._event.set()

    def _make_observer(self) -> Any:
        from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        _quiet_watchdog_stop()

        wake = self

        class _Handler(FileSystemEventHandler):
            def dispatch(self, event: Any) -> None:  # hot: keep it tiny
                path = getattr(event, "dest_path", "") or event.src_path
                if isinstance(path, bytes):
                    path = os.fsdecode(path)
                head, name = os.path.split(path)
                if head == wake.root:
                    if name.endswith(wake.extension) and not event.is_directory:
                        wake._names.append(name)
                        wake._event.set()
                elif head == wake.control_dir:
                    wake.control_dirty = True
                    wake._event.set()
                elif wake.side_dir and head == wake.side_dir:
                    wake.side.add(name)

        observer = Observer()
        observer.daemon = True
        handler = _Handler()
        kwargs: dict = {}
        try:
            import inspect

            if "event_filter" in inspect.signature(observer.schedule).parameters:
                kwargs["event_filter"] = [FileCreatedEvent, FileMovedEvent]
        except (TypeError, ValueError):  # pragma: no cover - exotic watchdog builds
            pass
        observer.schedule(handler, self.root, recursive=False, **kwargs)
        observer.schedule(handler, self.control_dir, recursive=False, **kwargs)
        if self.side_dir:
            observer.schedule(handler, self.side_dir, recursive=False, **kwargs)
        observer.start()
        return observer

    def close(self) -> None:
        """Stop the observer and join its threads (safe to call twice)."""
        observer, self._observer = self._observer, None
        if observer is not None and self._pid == os.getpid():
            try:
                if isinstance(observer, _InotifyReader):
                    observer.close()
                else:
                    observer.stop()
                    observer.join(timeout=5.0)
            except Exception:  # pragma: no cover - shutting down anyway
                log.debug("error stopping observer", exc_info=True)
        self._event.set()  # release anyone still waiting

    # ------------------------------------------------------------------ hints
    def names(self) -> List[str]:
        """Message names announced since the last call (may repeat; may be stale)."""
        out: List[str] = []
        pop = self._names.popleft
        try:
            while True:
                out.append(pop())
        except IndexError:
            pass
        return out

    def pending(self) -> bool:
        return bool(self._names)

    def wait(self, timeout: Optional[float]) -> bool:
        """Block until a hint arrives or ``timeout`` seconds pass; True if woken by a hint."""
        woke = self._event.wait(timeout)
        self._event.clear()
        return woke

    def poke(self) -> None:
        """Wake a waiter (used by tests and by ``close``)."""
        self._event.set()
