"""A progress display on a terminal (per stage: done, failed, in flight, rate).

Uses ``rich`` (the ``progress`` extra) when it is installed: a live table on stderr,
refreshed from a thread that reads :meth:`Pipeline.stats`.  Without ``rich`` a one-line
summary is rewritten in place.  Quiet when stderr is not a terminal (unless forced).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional

REFRESH = 0.5  # seconds between refreshes


def start_progress(pipeline: Any, enabled: Optional[bool]) -> "Optional[_Display]":
    if enabled is None:
        enabled = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if not enabled:
        return None
    return _Display(pipeline)


def _table(pipeline: Any) -> Any:
    from rich.table import Table

    r = pipeline.stats()
    t = Table(title=f"pipeline {pipeline.name}: {r.state}, {r.done} done, {r.dead} dead, "
                    f"{r.in_flight} in flight, {r.elapsed:.1f} s", title_justify="left")
    for col in ("stage", "done", "failed", "retried", "dead", "in flight", "queued",
                "items/s"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in r.stages.items():
        t.add_row(name, str(s.done), str(s.failed_attempts), str(s.retried), str(s.dead),
                  str(s.in_flight), str(s.queued), f"{s.rate:.1f}")
    return t


def _line(pipeline: Any) -> str:
    r = pipeline.stats()
    parts = [f"{n}: {s.done} done/{s.in_flight} run/{s.failed_attempts} failed"
             for n, s in r.stages.items()]
    return f"\r{pipeline.name} {r.done} done {r.dead} dead | " + " | ".join(parts)


class _Display:
    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._stop = threading.Event()
        try:
            from rich.console import Console
            from rich.live import Live

            self._live: Any = Live(_table(pipeline), console=Console(stderr=True),
                                   refresh_per_second=4, transient=False)
            self._live.start()
        except ImportError:
            self._live = None
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"pipeline-{pipeline.name}-progress")
        self._thread.start()

    def _show(self) -> None:
        if self._live is not None:
            self._live.update(_table(self.pipeline))
        else:
            sys.stderr.write(_line(self.pipeline))
            sys.stderr.flush()

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                self._show()
            except Exception:  # a display never breaks a run
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        try:
            self._show()
        except Exception:
            pass
        if self._live is not None:
            self._live.stop()
        else:
            sys.stderr.write("\n")
