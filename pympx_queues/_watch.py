"""Wake-up hints for blocked folder-queue consumers.

Two modes:

* ``"watchdog"`` (default): a watchdog observer (inotify on Linux) watches the queue root
  and its ``control/`` folder.  A new message name or a control-file change is pushed to
  the consumer and sets an event, so a blocked ``get()`` wakes at once instead of at its
  next poll.  Events are *hints*: inotify queues overflow and network file systems drop
  events, so the consumer still rescans the folder periodically (the source of truth).
* ``"poll"``: no observer at all, only periodic rescans.  Use it on NFS/SMB, where the
  client never sees changes made by other machines through inotify.

Observers are started lazily in the process that waits (never pickled: a spawned child
starts its own), stopped by :meth:`Wakeups.close`, and never leak threads.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any, Deque, List, Optional

log = logging.getLogger("pympx_queues.watch")

WATCHDOG = "watchdog"
POLL = "poll"
MODES = (WATCHDOG, POLL)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"wakeups must be one of {MODES!r}, got {mode!r}")
    return mode


class Wakeups:
    """Collects wake-up hints for one consumer object.

    ``names()`` returns the message names announced since the last call; ``control_dirty``
    says a control file appeared; ``wait(timeout)`` blocks until a hint arrives or the
    timeout passes (returns True when woken by a hint).
    """

    def __init__(self, root: str, control_dir: str, extension: str, mode: str = WATCHDOG):
        self.root = root
        self.control_dir = control_dir
        self.extension = extension
        self.mode = check_mode(mode)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._event = threading.Event()
        self._names: Deque[str] = collections.deque()
        self.control_dirty = True
        self._observer: Any = None
        self._pid: Optional[int] = None
        self._failed = False

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        return {"root": self.root, "control_dir": self.control_dir,
                "extension": self.extension, "mode": self.mode}

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
            self._observer = None
            self._event = threading.Event()
            self._names = collections.deque()
        try:
            self._observer = self._make_observer()
        except Exception as exc:  # inotify limits, missing backend: fall back to polling
            log.warning("watchdog observer unavailable for %s (%s); polling instead",
                        self.root, exc)
            self._failed = True
            self._observer = None
            return False
        self._pid = os.getpid()
        return True

    def _make_observer(self) -> Any:
        from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

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
        observer.start()
        return observer

    def close(self) -> None:
        """Stop the observer and join its threads (safe to call twice)."""
        observer, self._observer = self._observer, None
        if observer is not None and self._pid == os.getpid():
            try:
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
