"""The on-disk layout of a folder queue, in one place (format/parse pairs, like queuelib).

A person must be able to read a queue folder with ``ls`` after a failure::

    myqueue/
      20261122-0001.tsv                      ready message (any file with the extension)
      tmp/   <owner>__<name>                 partial writes of a producer (never a message)
      tmp/abandoned/<owner>__<name>          another host's partial write, moved aside
                                             after TMP_ABANDON_AGE (never deleted)
      wip/   <owner>__<name>                 claimed message: owner + original name kept
      done/  <name>                          task_done files when kept
      failed/<name>, <name>.error.json       dead letters and the error beside each
      retries/<name>.json                    attempt count + last error of a returned message
      control/HELO__<run>__<producer>.json   producer registry, one file per producer and run
              DONE__<run>__<producer>.json
              FAILED__<run>__<producer>.json
              ENDED__<run>.json              a reader saw the run end (it is history now)

``<owner>`` is ``<host>_<pid>_<start>_<rid>``: host name (``_`` and ``.`` replaced by
``-``), process id, process start time in clock ticks since boot (pid reuse detection) and
a random hex id.  Temp files add the host's boot id: ``<host>_<pid>_<start>-<boot>_<rid>``
(12 hex digits of ``/proc/sys/kernel/random/boot_id``), so a host that rebooted never
takes a new process with the same pid and start time for the old writer; names without
it (earlier versions) are judged by pid and start time.  ``<producer>`` has the same shape.  A run id is ``[A-Za-z0-9][A-Za-z0-9.-]*``
(no ``_``), so every name splits unambiguously on ``__`` and ``_``.

Every ``parse_*`` returns ``None`` for a name that is not ours (hand-dropped files, litter,
names another version wrote): callers skip those with a logged warning, never claim or
delete them.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, NamedTuple, Optional

from .. import _fs

# --------------------------------------------------------------------------- folders
TMP_DIR = "tmp"
WIP_DIR = "wip"
DONE_DIR = "done"
FAILED_DIR = "failed"
RETRIES_DIR = "retries"
CONTROL_DIR = "control"
#: Acknowledged claims waiting to be deleted by a background thread (task_done renames
#: the claim here and returns; unlinking a file whose blocks were written costs ~1 ms on
#: ext4 with ``discard``).  Everything in it is acknowledged: never requeued, safe to delete.
TRASH_DIR = "trash"
#: Under ``tmp/``: temp files of producers on *other* hosts found unchanged for
#: ``_FolderQueue.TMP_ABANDON_AGE`` are moved here, never deleted (the owner's host
#: alone can tell by its pid that a writer is gone; see docs/several-hosts.md).
ABANDONED_DIR = "abandoned"
#: Sub-folders created in every queue folder (the root holds the ready messages).
SUBDIRS = (TMP_DIR, WIP_DIR, DONE_DIR, FAILED_DIR, RETRIES_DIR, CONTROL_DIR, TRASH_DIR)

#: Lock file of the same-host filelock around recovery passes: it only saves redundant
#: work (flock is not coherent across hosts on sshfs); correctness never rests on it.
LOCK_NAME = ".lock"

# --------------------------------------------------------------------------- owners
_OWNER_RE = (r"(?P<host>[A-Za-z0-9-]+)_(?P<pid>[0-9]{1,10})_(?P<start>[0-9]{1,20})"
             r"(?:-(?P<boot>[0-9a-f]{12}))?_(?P<rid>[0-9a-f]{4,32})")
SEP = "__"


class Owner(NamedTuple):
    """Who owns a claim, a temp file or a producer registration.

    ``boot``: the boot id of the owner's host when the name carries one (temp files do:
    ``<host>_<pid>_<start>-<boot>_<rid>``); "" for names without it (claims, control
    files, and temp files written by earlier versions), which are judged by pid and
    start time alone."""

    host: str
    pid: int
    start: int
    rid: str
    boot: str = ""

    def format(self) -> str:
        if self.boot:
            return f"{self.host}_{self.pid}_{self.start}-{self.boot}_{self.rid}"
        return f"{self.host}_{self.pid}_{self.start}_{self.rid}"

    def is_local(self) -> bool:
        return self.host == _fs.hostname()

    def alive(self) -> Optional[bool]:
        """True/False for a process on this host; None when it runs on another host."""
        if not self.is_local():
            return None
        if self.boot and _fs.boot_id() and self.boot != _fs.boot_id():
            return False  # written before this host rebooted: its process is gone
        return _fs.process_alive(self.pid, self.start)

    def abandoned(self, path: str, lease_timeout: float, now: float,
                  st: "Optional[os.stat_result]" = None) -> bool:
        """True when the file this owner holds at ``path`` (a claim, a temp file) is
        abandoned: its process is gone (this host), or, on another host, its lease ran
        out (the file unchanged for ``lease_timeout`` seconds; ``st``: its stat, if known).
        """
        alive = self.alive()
        if alive is not None:
            return not alive
        if st is None:
            st = _fs.lstat(path)
            if st is None:
                return False  # gone meanwhile: nothing is abandoned
        return now - max(st.st_mtime, st.st_ctime) > lease_timeout


#: A recovery pass takes a claim over under a rid of this many random bytes (12 hex
#: digits; every other rid has 8), so that a takeover its process abandoned (the pass
#: raised midway) is told apart from that process's live claims.
TAKEOVER_RID_BYTES = 6


def is_takeover(owner: Owner) -> bool:
    """True for the owner tag of a claim taken over by a recovery pass."""
    return len(owner.rid) == 2 * TAKEOVER_RID_BYTES


def new_owner(rid: Optional[str] = None) -> Owner:
    host, pid, start = _fs.owner_tag()
    return Owner(host, pid, start, rid or _fs.random_id())


def parse_owner(text: str) -> Optional[Owner]:
    m = re.fullmatch(_OWNER_RE, text)
    if m is None:
        return None
    return _owner_of(m)


def _owner_of(m: "re.Match[str]") -> Owner:
    return Owner(m["host"], int(m["pid"]), int(m["start"]), m["rid"], m["boot"] or "")


# --------------------------------------------------------------------------- names
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,@~-]{0,199}")


#: One regex for the common case of valid_message_name (every listed name goes through
#: it): a plain ASCII name that is no Windows device name, no litter suffix or OS file.
#: Anything it does not match takes the full check below.
_COMMON_VALID = re.compile(
    r"(?!(?i:(?:con|prn|aux|nul|com[1-9]|lpt[1-9])(?:\.|$)|thumbs\.db$|desktop\.ini$))"
    r"[A-Za-z0-9][A-Za-z0-9._+=,@~-]{0,199}"
    r"(?<!~)(?<!(?i:\.tmp))(?<!(?i:\.part))(?<!(?i:\.swp))(?<!(?i:\.swo))(?<!(?i:\.swx))"
    r"(?<!(?i:\.crdownload))")


def valid_message_name(name: str) -> bool:
    """True when ``name`` read from disk is an acceptable message name (not litter)."""
    return _COMMON_VALID.fullmatch(name) is not None or _valid_message_name_full(name)


def _valid_message_name_full(name: str) -> bool:
    """The complete rule behind :func:`valid_message_name` (its regex is a shortcut)."""
    if _fs.is_litter(name):
        return False
    if _PLAIN_NAME.fullmatch(name) is not None and name.split(".")[0].lower() not in _fs._WINDOWS_RESERVED:
        return True  # fast path for the common case; the full check below is slower
    try:
        _fs.check_name(name)
    except (ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- wip / tmp
_OWNED_RE = re.compile(_OWNER_RE + SEP + r"(?P<name>.+)")


class OwnedName(NamedTuple):
    owner: Owner
    name: str  # the original message name, extension kept


def format_owned(owner: Owner, name: str) -> str:
    """``wip/`` and ``tmp/`` entry name: ``<host>_<pid>_<start>_<rid>__<original name>``."""
    return owner.format() + SEP + name


def parse_owned(entry: str) -> Optional[OwnedName]:
    """Inverse of :func:`format_owned`; None for names that are not ours or not valid."""
    m = _OWNED_RE.fullmatch(entry)
    if m is None:
        return None
    name = m["name"]
    if not valid_message_name(name):
        return None
    return OwnedName(_owner_of(m), name)


# --------------------------------------------------------------------------- sidecars
ERROR_SUFFIX = ".error.json"  # failed/<name>.error.json beside a dead letter
RETRY_SUFFIX = ".json"  # retries/<name>.json


def format_error_sidecar(name: str) -> str:
    return name + ERROR_SUFFIX


def parse_error_sidecar(entry: str, extension: str) -> Optional[str]:
    """The message name an ``failed/`` error sidecar belongs to, else None."""
    if not entry.endswith(ERROR_SUFFIX):
        return None
    name = entry[: -len(ERROR_SUFFIX)]
    if not name.endswith(extension) or not valid_message_name(name):
        return None
    return name


def format_retry_sidecar(name: str) -> str:
    return name + RETRY_SUFFIX


def parse_retry_sidecar(entry: str) -> Optional[str]:
    if not entry.endswith(RETRY_SUFFIX):
        return None
    name = entry[: -len(RETRY_SUFFIX)]
    return name if valid_message_name(name) else None


# --------------------------------------------------------------------------- unique names

def unique_variant(name: str, extension: str) -> str:
    """``report.tsv`` -> ``report~1a2b3c4d.tsv``: same extension, a fresh random suffix.

    Used when a name is taken (two producers putting the same name with
    ``if_exists="rename"``, a returned message meeting a new one of the same name).
    """
    if extension and name.endswith(extension):
        stem, ext = name[: -len(extension)], extension
    else:
        stem, ext = name, ""
    return f"{stem}~{_fs.random_id()}{ext}"


# --------------------------------------------------------------------------- control files
HELO = "HELO"
DONE = "DONE"
FAILED = "FAILED"
ENDED = "ENDED"
CONTROL_KINDS = (HELO, DONE, FAILED)
CONTROL_EXT = ".json"

_RUN_RE = r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}"
_CONTROL_RE = re.compile(
    r"(?P<kind>HELO|DONE|FAILED)" + SEP + r"(?P<run>" + _RUN_RE + r")" + SEP + _OWNER_RE
    + re.escape(CONTROL_EXT)
)
_ENDED_RE = re.compile(ENDED + SEP + r"(?P<run>" + _RUN_RE + r")" + re.escape(CONTROL_EXT))


def valid_producer_key(key: Any) -> bool:
    """True for an acceptable ``producer_key`` (kept in control files' JSON only)."""
    return isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", key) \
        is not None


def check_run_id(run_id: str) -> str:
    """Validate a user-supplied run id (``ValueError`` if it cannot sit in a file name)."""
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str, got {type(run_id).__name__}")
    if not re.fullmatch(_RUN_RE, run_id):
        raise ValueError(
            f"run_id {run_id!r} must match [A-Za-z0-9][A-Za-z0-9.-]* (no '_' or '/'), "
            "at most 64 characters"
        )
    return run_id


def new_run_id() -> str:
    """A fresh run id that sorts by creation time: ``20261122T072000123456Z-1a2b3c4d``."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{_fs.random_id()}"


class ControlName(NamedTuple):
    kind: str  # HELO, DONE or FAILED
    run: str
    producer: Owner


def format_control(kind: str, run: str, producer: Owner) -> str:
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control kind {kind!r}")
    return f"{kind}{SEP}{run}{SEP}{producer.format()}{CONTROL_EXT}"


def parse_control(entry: str) -> Optional[ControlName]:
    m = _CONTROL_RE.fullmatch(entry)
    if m is None:
        return None
    return ControlName(m["kind"], m["run"], _owner_of(m))


def format_ended(run: str) -> str:
    return f"{ENDED}{SEP}{run}{CONTROL_EXT}"


def parse_ended(entry: str) -> Optional[str]:
    m = _ENDED_RE.fullmatch(entry)
    return None if m is None else m["run"]


# --------------------------------------------------------------------------- extensions
def normalise_extension(message_extension: str) -> str:
    """``'tsv'``, ``'.tsv'`` -> ``'.tsv'`` (pympx accepted both).  ``''`` = every file."""
    if not isinstance(message_extension, str):
        raise TypeError("message_extension must be a str")
    ext = message_extension.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if ext:
        try:
            _fs.check_name("x" + ext, "message extension")
        except ValueError:  # its wording would show the probe name "x" + ext
            raise ValueError(f"bad message extension {message_extension!r}: a dot and plain "
                             "name characters, such as '.tsv', expected") from None
    return ext
