"""Journal file names: ``{prefix}.{run}.{pid}.{rand}.journal`` and its side files."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .. import _fs

log = logging.getLogger("pympx_queues.journal")

JOURNAL_SUFFIX = ".journal"
#: ``{prefix}.{run}.{pid}.{rand}.journal``; snapshots use ``snap`` instead of a pid.
JOURNAL_NAME_FORMAT = "{prefix}.{run}.{pid}.{rand}" + JOURNAL_SUFFIX
SNAPSHOT_PID = "snap"
LOCK_NAME_FORMAT = "{prefix}.lock"
#: A journal being created (hidden until it has its header and its writer's lock).
TEMP_NAME_FORMAT = ".{name}.tmp"
TORN_SUFFIX_FORMAT = ".torn-{offset}"
QUARANTINE_SUFFIX = ".quarantined"
CORRUPT_SUFFIX_FORMAT = ".corrupt-{offset}"
_RUN_RE = re.compile(r"^\d{8}T\d{12}-[0-9a-f]{6}$")
_RAND_RE = re.compile(r"^[0-9a-f]{8,16}r?$")


def new_run_id() -> str:
    """A run id sortable by start time: ``YYYYmmddTHHMMSSffffff-xxxxxx``."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int((now % 1) * 1e6):06d}-{_fs.random_id(3)}"


@dataclass(frozen=True)
class JournalName:
    """The parts of a journal file name."""

    prefix: str
    run: str
    pid: str  # decimal pid, or SNAPSHOT_PID
    rand: str

    def format(self) -> str:
        return format_journal_name(self.prefix, self.run, self.pid, self.rand)

    @property
    def is_snapshot(self) -> bool:
        return self.pid == SNAPSHOT_PID


def format_journal_name(prefix: str, run: str, pid: "int | str", rand: str) -> str:
    return JOURNAL_NAME_FORMAT.format(prefix=prefix, run=run, pid=pid, rand=rand)


def parse_journal_name(name: str) -> Optional[JournalName]:
    """The parts of a journal file name, or None if ``name`` is not one of ours."""
    if not name.endswith(JOURNAL_SUFFIX) or name.startswith("."):
        return None
    parts = name[: -len(JOURNAL_SUFFIX)].rsplit(".", 3)
    if len(parts) != 4:
        return None
    prefix, run, pid, rand = parts
    if not prefix or not _RUN_RE.match(run) or not _RAND_RE.match(rand):
        return None
    if pid != SNAPSHOT_PID and not pid.isdigit():
        return None
    return JournalName(prefix, run, pid, rand)


def check_prefix(prefix: str) -> str:
    """A pickup prefix is a file name part: no separators, no leading dot."""
    _fs.check_name(prefix, "pickup_file_prefix")
    return prefix


def list_journals(directory: str, prefix: Optional[str] = None) -> List[Tuple[str, JournalName]]:
    """(path, name) of every regular journal file in ``directory`` (for ``prefix``), sorted."""
    found = []
    try:
        entries = list(_fs.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        parsed = parse_journal_name(entry.name)
        if parsed is None or (prefix is not None and parsed.prefix != prefix):
            continue
        if not _fs.entry_is_regular(entry):
            log.warning("skipping %s: not a regular file", entry.path)
            continue
        found.append((entry.path, parsed))
    found.sort(key=lambda item: (item[1].run, item[1].pid != SNAPSHOT_PID, item[0]))
    return found
