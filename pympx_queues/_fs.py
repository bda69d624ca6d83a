"""Low-level file-system mechanics: the only module that renames, links, unlinks or fsyncs.

Queue classes speak in claims, leases and journals; this module turns those into system
calls (like filelock's ``_unix.py`` beside its ``_api.py``).  A port to another platform or
to a network file system touches this file only.

Every primitive states which guarantee of ``shared/DESIGN.md`` it serves:

* G1 no loss: data is written and (in fsync mode) synced *before* its name is published,
  and the directory is synced after; an fsync failure raises, it is never retried.
* G2 no corruption: names are published with a no-clobber primitive
  (``renameat2(RENAME_NOREPLACE)``, falling back to ``link()`` + ``unlink()``), so a
  half-written file is never visible under a message name and nothing is overwritten.

The module also offers a tracing hook (:func:`set_tracer`) so the crash-state simulator
in ``scripts/torture.py`` can record the exact sequence of durable operations a workload
performs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import socket
import stat
import sys
import threading
from typing import Any, Callable, Iterator, Optional, Tuple, Union

log = logging.getLogger("pympx_queues")

PathLike = Union[str, "os.PathLike[str]"]

#: Durability modes.  ``flush``: survives a crash of any process (data reaches the OS
#: page cache before ``put`` returns).  ``fsync``: also survives power loss / OS crash.
FLUSH = "flush"
FSYNC = "fsync"
DURABILITY_MODES = (FLUSH, FSYNC)

#: Default permission bits: owner-only (DESIGN.md section 5).  Pass ``0o770``/``0o660``
#: for a folder shared by a group.
DEFAULT_DIR_MODE = 0o700
DEFAULT_FILE_MODE = 0o600

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

# --------------------------------------------------------------------------- tracing
# The tracer sees every durable operation as (op, *args), called just after the operation
# succeeded.  Ops and arguments (the trailing ``fd`` lets a tracer ``fstat`` the inode):
#   ("create", path[, fd])  ("write", path, nbytes[, fd])  ("fsync", path, fd)
#   ("truncate", path, length, fd)  ("rename", src, dst)  ("link", src, dst)
#   ("unlink", path)  ("fsync_dir", path)  ("mkdir", path)
# Used only by the crash-state simulator (scripts/torture.py); tracers accept *args so
# new trailing arguments never break them.
_Tracer = Callable[..., None]
_tracer: Optional[_Tracer] = None


def set_tracer(tracer: Optional[_Tracer]) -> None:
    """Install (or remove with ``None``) a callback told of every durable operation."""
    global _tracer
    _tracer = tracer


def _trace(op: str, *args: object) -> None:
    if _tracer is not None:
        _tracer(op, *args)


# --------------------------------------------------------------------------- validation
def check_durability(durability: str) -> str:
    """Return ``durability`` if it is a known mode, else raise ``ValueError``."""
    if durability not in DURABILITY_MODES:
        raise ValueError(
            f"durability must be one of {DURABILITY_MODES!r}, got {durability!r}"
        )
    return durability


def check_timeout(timeout: Optional[float]) -> Optional[float]:
    """Validate a timeout in seconds: ``None`` or a number >= 0 (like ``queue.Queue``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number, got {timeout!r}")
    return float(timeout)


_RESERVED_NAMES = {"", ".", ".."}
#: Names that pass every rule of check_name by construction (no separator, no control
#: character, no leading dot, ASCII so at most 200 bytes); only device names remain.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@~-]{0,199}")
_WINDOWS_RESERVED = {
    "con", "prn", "aux", "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def check_name(name: str, what: str = "message name") -> str:
    """Validate a single file name supplied by a user or parsed back from disk.

    Refuses path separators, ``.``/``..``, NUL and control characters, leading dots
    (hidden files are litter to us), reserved device names and over-long names.
    Raises ``ValueError`` naming the problem; returns the name unchanged.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if _PLAIN_NAME.fullmatch(name) is not None \
            and name.split(".", 1)[0].lower() not in _WINDOWS_RESERVED:
        return name  # the common case, decided by one regex: plain ASCII, <= 200 bytes
    if name in _RESERVED_NAMES:
        raise ValueError(f"{what} {name!r} is reserved")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise ValueError(f"{what} {name!r} contains a path separator")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{what} {name!r} contains a control character")
    if name.startswith("."):
        raise ValueError(f"{what} {name!r} starts with '.' (hidden names are ignored)")
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise ValueError(f"{what} {name!r} is a reserved device name")
    if len(os.fsencode(name)) > 200:
        raise ValueError(f"{what} {name!r} is longer than 200 bytes")
    return name


#: Names a person's tools leave behind: never messages, never claimed or deleted.
_LITTER_PREFIXES = (".", "~$", "#")
_LITTER_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp", ".part", ".crdownload")
_LITTER_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}


def is_litter(name: str) -> bool:
    """True for hidden files, ``.nfs*`` silly-renames, editor swap/backup and OS files."""
    lower = name.lower()
    return (
        lower.startswith(_LITTER_PREFIXES)
        or lower.endswith(_LITTER_SUFFIXES)
        or lower in _LITTER_NAMES
    )


# --------------------------------------------------------------------------- directories
def makedirs(path: PathLike, mode: int = DEFAULT_DIR_MODE, what: str = "folder") -> None:
    """Create ``path`` and parents with ``mode`` (not subject to a lax umask).

    Each directory actually created is made durable by syncing its parent (G1).  A file
    (or anything but a directory) where one of the folders belongs raises
    ``NotADirectoryError`` naming it; ``what`` says what the folder is for.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent and not os.path.isdir(parent):
        makedirs(parent, mode, what=f"parent of the {what}")
    try:
        os.mkdir(path, mode)
    except (FileExistsError, NotADirectoryError):
        if not os.path.isdir(path):
            raise not_a_folder(path, what) from None
        return
    os.chmod(path, mode)  # mkdir honours the umask; chmod makes the mode explicit
    _trace("mkdir", path)
    # G1: a new directory's own name is durable only once its parent is synced; without
    # this, a power cut could drop a fresh queue or pickup dir with every message in it.
    # Directories are created once per queue, so the cost is negligible in any mode.
    fsync_dir(parent)


def not_a_folder(path: str, what: str) -> NotADirectoryError:
    """The error for a non-directory at ``path`` where the ``what`` (a folder) belongs."""
    st = lstat(path)
    kind = ("a file" if st is None or stat.S_ISREG(st.st_mode) else "a symlink"
            if stat.S_ISLNK(st.st_mode) else "a special file")
    return NotADirectoryError(
        errno.ENOTDIR, f"{kind} where the {what} belongs: move it away or choose "
        "another path", path)


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so the names created, renamed or removed in it are durable (G1).

    Raises ``OSError`` on failure: an fsync failure is fatal for the operation.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _trace("fsync_dir", os.fspath(path))


def fsync_fd(fd: int, path: PathLike = "") -> None:
    """fsync an open file (G1).  Never retried: a failure raises to the caller."""
    os.fsync(fd)
    _trace("fsync", os.fspath(path), fd)


def scandir(path: PathLike) -> Iterator[os.DirEntry]:
    """Iterate the entries of ``path`` (one ``getdents`` pass, no stat per entry)."""
    with os.scandir(os.fspath(path)) as it:
        yield from it


def entry_is_regular(entry: os.DirEntry) -> bool:
    """True when a directory entry is a regular file, not following symlinks."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def is_regular_nofollow(path: PathLike) -> bool:
    """True when ``path`` is a regular file itself (not a symlink to one, not a FIFO)."""
    try:
        return stat.S_ISREG(os.lstat(os.fspath(path)).st_mode)
    except FileNotFoundError:
        return False


def lstat(path: PathLike) -> Optional[os.stat_result]:
    """``os.lstat`` or ``None`` when the path does not exist."""
    try:
        return os.lstat(os.fspath(path))
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- renames
_libc = None
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2_ok = True  # cleared the first time the file system says EINVAL/ENOSYS


if sys.getfilesystemencoding().lower().replace("-", "") == "utf8" \
        and sys.getfilesystemencodeerrors() == "surrogateescape":
    def _encode(path: str) -> bytes:
        """``os.fsencode`` for a str, without its type checks (hot path)."""
        return path.encode("utf-8", "surrogateescape")
else:  # pragma: no cover - non-UTF-8 file system encodings
    _encode = os.fsencode


def libc_with(symbol: str) -> Any:
    """The C library (ctypes, ``use_errno=True``) if it has ``symbol``, else False.

    The running interpreter's own symbols come first (``CDLL(None)``: instant, no search);
    ``ctypes.util.find_library`` (which may start ``ldconfig`` or a compiler) only if they
    lack it.
    """
    for name in (None, "find"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") if name else None, use_errno=True)
            getattr(lib, symbol)
            return lib
        except (OSError, AttributeError, TypeError):
            continue
    return False


def _load_libc():
    global _libc
    if _libc is None:
        _libc = libc_with("renameat2")
    return _libc


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """Try ``renameat2(RENAME_NOREPLACE)``; True if it ran (success or raised error)."""
    global _renameat2_ok
    libc = _load_libc() if _renameat2_ok else False
    if not libc:
        return False
    res = libc.renameat2(_AT_FDCWD, _encode(src), _AT_FDCWD, _encode(dst), _RENAME_NOREPLACE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        # The file system (NFS, some FUSE) does not support the flag: use link().
        _renameat2_ok = False
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _link_checked(src: str, dst: str) -> None:
    """``link(src, dst)``, where an ENOENT with ``src`` still in place means "made".

    FUSE (libfuse's high-level API, so sshfs) looks the new name up after a successful
    link to answer the kernel; when another process renamed the new name away in between
    (a consumer on another host claimed the message just published), the caller gets
    ENOENT for a link that was made.  Retrying would publish a second copy (measured:
    scripts/hosts.py, issue 14).  So: ENOENT while ``src`` is still there (asked of the
    server, not of this mount's cache) and ``dst``'s folder exists counts as made.
    ENOENT because ``src`` is gone is raised as it is.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileNotFoundError:
        folder = os.path.dirname(dst) or "."
        if not os.path.isdir(folder) or fresh_lstat(src, os.path.dirname(src) or ".") is None:
            raise
        log.info("link(%s, %s) said ENOENT with the file still there: made, and the new "
                 "name already taken by another process (FUSE looks it up after linking)",
                 src, dst)


def rename_noreplace(src: PathLike, dst: PathLike) -> None:
    """Atomically move ``src`` to ``dst``; raise ``FileExistsError`` if ``dst`` exists (G2).

    Uses ``renameat2(RENAME_NOREPLACE)``; where the file system lacks it (NFS, some
    FUSE), ``link()`` then ``unlink()``.  A crash between the two leaves both names on one
    inode (``st_nlink == 2``): recovery treats a wip or temp name whose source name still
    exists as the same file and drops the extra name.  Raises ``FileNotFoundError`` when
    ``src`` vanished (a lost claim race); in the fallback the loser's extra link is
    removed again, so exactly one of several racing claimers keeps the file.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if _renameat2_noreplace(src, dst):
        _trace("rename", src, dst)
        return
    try:
        _link_checked(src, dst)
    except PermissionError:
        # sshfs answers a losing link() with EPERM rather than EEXIST (issue 14).
        if lstat(dst) is not None:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), src, None,
                                  dst) from None
        raise
    _trace("link", src, dst)
    # G1: make the new name durable before the old one goes, or a power cut could keep
    # the unlink and drop the link (the two names may live in different directories).
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
    try:
        os.unlink(src)
    except FileNotFoundError:
        # Another claimer linked the same file and unlinked the source first: it won.
        _unlink_quiet(dst)
        raise
    _trace("unlink", src)


def rename_replace(src: PathLike, dst: PathLike) -> None:
    """Atomic ``rename`` that may replace ``dst``; only for files we own (compaction)."""
    src, dst = os.fspath(src), os.fspath(dst)
    os.rename(src, dst)
    _trace("rename", src, dst)


def claim(src: PathLike, dst: PathLike) -> bool:
    """Claim a message: move ``src`` to the unique work-in-progress name ``dst``.

    One atomic rename (DESIGN.md section 4).  Returns False when another consumer won the
    race (``src`` is gone) or when ``src`` is not a regular file (symlinks, FIFOs and
    devices are never claimed).  A symlink swapped in between the check and the rename is
    moved back, never followed.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_regular_nofollow(src):
        return False
    return claim_listed(src, dst) is not None


# --------------------------------------------------------------------------- files
_SYNC_FILE_RANGE_WRITE = 2
_sfr = None  # ctypes sync_file_range, False where unavailable


def start_writeback(fd: int) -> None:
    """Start writing a new file's data to disk now, without waiting (opt-in, flush mode).

    ext4 (and XFS) allocate blocks late: a file renamed to a *new* name can reach the disk
    as an empty file after a power cut, because the rename is journaled before the data
    (ext4's ``auto_da_alloc`` covers only renames that replace a file).  This is the same
    ``filemap_flush`` that heuristic does, asked for explicitly with
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: the data is then ordered before the rename,
    which removes the empty-file case after a power cut (zero-filled files remain
    possible).  It is not a durability barrier (fsync mode is), and it has a price: the
    file gets its blocks at once, so deleting it after it was consumed costs 0.3-1.5 ms
    instead of ~7 us (ext4 mounted with ``discard``).  Folder queues therefore use it only
    when asked (``WritableFolderQueue(writeback=True)``).  Where unavailable it does nothing.
    """
    global _sfr
    if _sfr is None:
        libc = _load_libc()
        fn = getattr(libc, "sync_file_range", None) if libc else None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _sfr = fn or False
    if _sfr:
        _sfr(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # advisory: an error here changes nothing


def _open_new(path: str, flags: int, mode: int) -> int:
    """``os.open(path, O_CREAT|O_EXCL|O_NOFOLLOW|flags, mode)`` with ``mode`` applied exactly.

    ``open()`` honours the umask, which would turn a group-shared ``0o660`` into ``0o640``
    under the usual ``022``; group/other bits are therefore set again with ``fchmod``.
    Owner-only modes (the default) need no extra system call.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, mode)
    if mode & 0o077:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
    return fd


def write_new(path: PathLike, data: bytes, *, durable: bool,
              mode: int = DEFAULT_FILE_MODE, writeback: bool = False) -> None:
    """Create ``path`` exclusively (O_EXCL, O_NOFOLLOW), write ``data``, optionally fsync.

    For files that are not yet visible under a message name (temp area, sidecars).
    ``writeback=True`` (flush mode only) starts the data's writeback before returning,
    see :func:`start_writeback`.  Raises ``FileExistsError`` if the name is taken; on any
    error the partial file is removed before the exception propagates (G2).
    """
    path = os.fspath(path)
    fd = _open_new(path, os.O_WRONLY, mode)
    if _tracer is not None:
        _trace("create", path, fd)
    try:
        n = os.write(fd, data)
        if n != len(data):  # a short write (ENOSPC raises; signals can cut it short)
            view = memoryview(data)[n:]
            while view:
                n = os.write(fd, view)
                view = view[n:]
        if _tracer is not None:
            _trace("write", path, len(data), fd)
        if durable:
            fsync_fd(fd, path)  # G1: data on disk before its name is published
        elif writeback:
            start_writeback(fd)  # opt-in: narrows the power-cut window (flush mode)
    except BaseException:
        os.close(fd)
        _unlink_quiet(path)
        raise
    os.close(fd)


def publish_bytes(tmp_path: PathLike, final_path: PathLike, data: bytes, *,
                  durable: bool, mode: int = DEFAULT_FILE_MODE) -> None:
    """Write ``data`` to ``tmp_path`` then publish it as ``final_path`` without clobbering.

    The DESIGN.md section 3 order: data -> fsync(file) -> no-clobber publish ->
    fsync(directory) -> return.  With ``durable=False`` the same order without the
    fsyncs (process-crash safe).  Raises ``FileExistsError`` if ``final_path`` exists;
    the temp file is removed on every failure, so nothing half-written stays visible.
    """
    write_new(tmp_path, data, durable=durable, mode=mode)
    try:
        rename_noreplace(tmp_path, final_path)  # G2: atomic, no-clobber publish
    except BaseException:
        _unlink_quiet(tmp_path)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(os.fspath(final_path))))  # G1


def read_bytes(path: PathLike) -> bytes:
    """Read a whole regular file without following a symlink or blocking on a FIFO."""
    fd = os.open(os.fspath(path), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_append_exclusive(path: PathLike, mode: int = DEFAULT_FILE_MODE) -> int:
    """Create a new journal file for appending; ``FileExistsError`` if it exists.

    One writer per file, never ``'w'`` on an existing journal (DESIGN.md section 3):
    a reused pid can never truncate an old journal.
    """
    path = os.fspath(path)
    fd = _open_new(path, os.O_WRONLY | os.O_APPEND, mode)
    _trace("create", path, fd)
    return fd


def open_append_existing(path: PathLike) -> int:
    """Open an existing file of ours for appending (never creates, never truncates)."""
    return os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC)


def append(fd: int, data: bytes, path: PathLike = "") -> None:
    """Append ``data`` fully to ``fd`` (handles short writes)."""
    n = os.write(fd, data)  # one write(2) on the hot path (journal records)
    if n != len(data):
        view = memoryview(data)[n:]
        while view:
            n = os.write(fd, view)
            view = view[n:]
    if _tracer is not None:
        _tracer("write", os.fspath(path), len(data), fd)


def truncate(path: PathLike, length: int, *, durable: bool = True) -> None:
    """Cut a torn journal tail at ``length`` bytes before appending again (G2)."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        _trace("truncate", path, length, fd)
        if durable:
            fsync_fd(fd, path)
    finally:
        os.close(fd)


def unlink_regular(path: PathLike) -> bool:
    """Delete a regular file (never a directory, never what a symlink points to).

    Returns False if it was already gone.  A non-regular entry is refused with
    ``OSError`` so that a planted symlink or FIFO is never treated as a message.
    """
    path = os.fspath(path)
    st = lstat(path)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "refusing to delete a non-regular file", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _trace("unlink", path)
    return True


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
        _trace("unlink", path)
    except OSError:
        pass


def touch(path: PathLike) -> bool:
    """Renew a lease: set the mtime of ``path`` to now without following a symlink."""
    try:
        os.utime(os.fspath(path), follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def copy_to(src: PathLike, tmp_path: PathLike, *, durable: bool,
            mode: int = DEFAULT_FILE_MODE) -> None:
    """Copy a regular file's bytes into a new temp file (for ``put(copy=True)``)."""
    write_new(tmp_path, read_bytes(src), durable=durable, mode=mode)


# --------------------------------------------------------------------------- processes
_HOST = socket.gethostname().replace("_", "-").replace(".", "-") or "localhost"
_start_time_cache: dict = {}
_cache_lock = threading.Lock()


def hostname() -> str:
    """This host's name with ``_`` and ``.`` replaced, safe inside a file name."""
    return _HOST


def process_start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None.

    Together with the pid it identifies a process even after the pid is reused.
    On platforms without ``/proc`` returns 0 for a live pid (pid reuse undetected).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return 0 if pid_exists(pid) else None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    rest = data[data.rfind(b")") + 2:].split()
    if rest and rest[0] in (b"Z", b"X"):  # zombie: it has exited, only not yet reaped
        return None
    return int(rest[19])


def my_start_time() -> int:
    """Start time of the calling process (cached per pid, fork-safe)."""
    pid = os.getpid()
    with _cache_lock:
        value = _start_time_cache.get(pid)
        if value is None:
            value = process_start_time(pid) or 0
            _start_time_cache.clear()
            _start_time_cache[pid] = value
    return value


def pid_exists(pid: int) -> bool:
    """True if a process with ``pid`` exists on this host (signal 0 probe)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_alive(pid: int, start_time: int) -> bool:
    """True if the process ``(pid, start_time)`` still runs on this host.

    A reused pid has a different start time and counts as dead.  ``start_time == 0``
    (unknown) falls back to the pid alone.
    """
    current = process_start_time(pid)
    if current is None:
        return False
    return start_time == 0 or current == 0 or current == start_time


def random_id(nbytes: int = 4) -> str:
    """A short random hex id for file names (pid reuse never collides)."""
    return os.urandom(nbytes).hex()


_BOOT_ID: Optional[str] = None


def boot_id() -> str:
    """This boot's id: the first 12 hex digits of ``/proc/sys/kernel/random/boot_id``
    ("" where there is none).  Temp-file names carry it, so that after a reboot a
    process that got the same pid (and the same start time in ticks since boot) is never
    taken for the writer of a file the previous boot left behind."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                text = f.read().strip().replace("-", "").lower()
        except OSError:
            text = ""
        _BOOT_ID = text[:12] if re.fullmatch(r"[0-9a-f]{12,32}", text) else ""
    return _BOOT_ID


def owner_tag() -> Tuple[str, int, int]:
    """(host, pid, start time) of the calling process: who owns a claim or journal."""
    return _HOST, os.getpid(), my_start_time()


# --------------------------------------------------------------------------- folder queues
# Added for the folder queues (pympx_queues/folder/).


def fsync_path(path: PathLike) -> None:
    """fsync an existing regular file by path, without following a symlink (G1).

    Used before a file a user hands to ``put()`` is moved (not copied) into a queue in
    fsync mode: its data must be durable before its name is published.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def copy_new(src: PathLike, dst: PathLike, *, durable: bool,
             mode: int = DEFAULT_FILE_MODE, writeback: bool = False) -> None:
    """Stream a regular file's bytes into a new file ``dst`` (O_EXCL, O_NOFOLLOW).

    Like :func:`copy_to` but never holds the whole file in memory.  On any error (ENOSPC
    included) the partial ``dst`` is removed before the exception propagates (G2).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    sfd = os.open(src, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(sfd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", src)
        dfd = _open_new(dst, os.O_WRONLY, mode)
        _trace("create", dst)
        try:
            total = 0
            while True:
                chunk = os.read(sfd, 1 << 20)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    n = os.write(dfd, view)
                    view = view[n:]
                total += len(chunk)
            _trace("write", dst, total)
            if durable:
                fsync_fd(dfd, dst)  # G1
            elif writeback:
                start_writeback(dfd)  # opt-in (flush mode), see start_writeback
        except BaseException:
            os.close(dfd)
            _unlink_quiet(dst)
            raise
        os.close(dfd)
    finally:
        os.close(sfd)


def claim_listed(src: PathLike, dst: PathLike) -> Optional[os.stat_result]:
    """Claim a message just listed as a regular file: one no-clobber rename, then check.

    Cheaper than :func:`claim` on the hot path (no ``lstat`` before the rename: the
    directory listing already said "regular file").  Returns the ``lstat`` of the claimed
    file, or None when another consumer won the race (ENOENT) or when what was renamed is
    not a regular file (a symlink or FIFO swapped in after the listing): that entry is
    moved back, never followed.  Raises ``FileExistsError`` if ``dst`` exists.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    try:
        rename_noreplace(src, dst)  # the claim itself: one atomic rename (DESIGN.md 4)
    except FileNotFoundError:
        return None
    st = lstat(dst)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        try:
            rename_noreplace(dst, src)
        except OSError:
            log.warning("non-regular file %s left at %s after a claim race", src, dst)
        return None
    return st


def claim_unique(src: str, dst: str) -> bool:
    """Claim a listed message by one atomic ``rename`` to a name only the caller makes.

    The hot-path claim of :class:`~pympx_queues.folder.ReadableFolderQueue`: ``dst`` is a
    ``wip/`` name carrying the caller's own owner tag (host, pid, start time, random id),
    and the caller checked it holds no claim of that name, so nothing can be clobbered and
    a plain ``rename`` (atomic on every POSIX file system, NFS included) is enough: no
    ``renameat2`` through ctypes, and no ``lstat`` afterwards.  ``rename`` moves a symlink
    or FIFO itself, never what it points to, and the directory listing that offered
    ``src`` already skipped non-regular entries; an entry swapped in between listing and
    claim by someone who can write to the folder is not detected (an ``lstat`` here could
    not close that race either: the same person can swap the ``wip/`` entry after it).
    Returns False when another consumer won the race (ENOENT).
    """
    try:
        os.rename(src, dst)  # the claim: one atomic rename (DESIGN.md 4; G3)
    except FileNotFoundError:
        return False
    if _tracer is not None:
        _trace("rename", src, dst)
    return True


def unlink_quiet(path: PathLike) -> bool:
    """Remove a file of ours (a sidecar, a temp file) if present; never raises ENOENT.

    Refuses non-regular entries like :func:`unlink_regular` (returns False, logs).
    """
    try:
        return unlink_regular(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            log.warning("not removing non-regular entry %s", os.fspath(path))
            return False
        raise


def write_replace(path: PathLike, tmp_path: PathLike, data: bytes, *, durable: bool,
                  mode: int = DEFAULT_FILE_MODE) -> None:
    """Atomically (re)write a small file of ours: temp file, then rename over ``path``.

    For sidecars (retry counts, error text) that a newer version replaces.  Readers see
    the old or the new content, never a mix (G2).
    """
    write_new(tmp_path, data, durable=durable, mode=mode)
    try:
        rename_replace(tmp_path, path)  # G2: atomic replace of our own sidecar
    except BaseException:
        _unlink_quiet(os.fspath(tmp_path))
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(os.fspath(path))))  # G1


# --------------------------------------------------------------------------- journal locks
# Added for the PersistentQueue journals (pympx_queues/journal/).
try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - not POSIX
    _fcntl = None  # type: ignore[assignment]


def flock_exclusive_nb(fd: int) -> None:
    """Take an exclusive ``flock`` on ``fd`` without waiting (``BlockingIOError`` if held).

    A journal writer holds it for as long as its file is open; the kernel drops it when
    the process dies, so "locked" means "its writer is still running" (no pid reuse
    problem).  No-op where ``flock`` does not exist.
    """
    if _fcntl is not None:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)


def is_flocked(path: PathLike) -> Optional[bool]:
    """True while some open file description holds a ``flock`` on ``path``.

    False when nobody does (its writer closed it or died), None when the file is gone.
    Never follows a symlink, never blocks.  Where ``flock`` is missing, returns False.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if _fcntl is None:
            return False
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        _fcntl.flock(fd, _fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_claim(path: PathLike) -> bool:
    """Delete a claimed message (``task_done``): one ``unlink``, no ``lstat`` first.

    The claim was checked to be a regular file when it was made, and ``unlink`` never
    follows a symlink, so nothing outside the queue can be deleted through it.  Returns
    False if the claim is gone (requeued by recovery, or settled twice).
    """
    try:
        os.unlink(path)  # G4: the acknowledged message is gone for good
    except FileNotFoundError:
        return False
    if _tracer is not None:
        _trace("unlink", path)
    return True


def discard_claim(src: str, dst: str) -> bool:
    """Acknowledge a claim by moving it into the trash folder (``task_done``).

    One plain ``rename``: it never follows a symlink, and replacing a same-named entry in
    the trash only drops a file that was acknowledged already.  Returns False if ``src``
    is gone (the claim was requeued by recovery, or settled twice).  Other errors raise.
    """
    try:
        os.rename(src, dst)  # G4: the claim leaves wip/ in one atomic step
    except FileNotFoundError:
        return False
    _trace("rename", src, dst)
    return True


_rm_path: Optional[str] = None


def remove_files_batch(paths: Tuple[str, ...]) -> None:
    """Delete many files of ours (acknowledged claims in a queue's trash folder) at once.

    Runs ``rm -f -- <paths>`` in a child process where ``rm`` exists: unlinking a file
    whose blocks were written costs ~0.3-1.5 ms of kernel time (ext4 with ``discard``),
    and doing it from a Python thread makes the caller's threads fight for the GIL after
    every call.  ``rm`` never follows a symlink (it removes the link itself) and refuses
    directories.  Without ``rm`` (Windows) or if it fails, falls back to
    :func:`unlink_quiet` per path.  Never raises for a missing file.
    """
    global _rm_path
    if not paths:
        return
    if _rm_path is None:
        import shutil

        _rm_path = shutil.which("rm") if os.name == "posix" else ""
    # With a tracer installed (crash-state tests) every unlink is made and traced one by
    # one here, so the recorded history stays exact.
    if _rm_path and _tracer is None:
        import subprocess

        try:
            subprocess.run([_rm_path, "-f", "--", *paths], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=False, close_fds=True)
            return
        except OSError:
            pass
    for p in paths:
        unlink_quiet(p)


# --------------------------------------------------------------------------- batched fsync
# Added for fsync-mode batches (folder ``put_many`` / ``task_done_many``).
#
# A batch of new message files must each be fsynced before any name is published (G1,
# DESIGN.md section 3).  One after the other, every fsync waits for its own writes, journal
# commit and disk cache flush (~0.3-1.5 ms each on a virtio disk).  Issued from several
# threads at once (``os.fsync`` releases the GIL), they overlap: a journaling file system
# merges them into a few commits (ext4/XFS group commit), and even without a journal the
# block layer merges the concurrent cache flushes.  Each file still gets its own
# ``fsync``: nothing here relies on one file's sync covering another's data.  ``syncfs()``
# would be faster still but flushes every writer of the file system, so it is not used.

#: Most worker threads a process uses for concurrent fsyncs (the caller's thread helps
#: too).  Measured on a 2-core VM (ext4 on virtio), the fsyncs of 100 new 100-byte files:
#: 8 threads ~4x faster than one after another, 16-64 threads ~6x; put_many end to end
#: showed no consistent difference between 8 and 128.  The threads wait on the disk.
SYNC_THREADS = 32
#: Idle worker threads exit after this many seconds (the pool starts again on demand).
SYNC_IDLE_EXIT = 60.0


class _SyncJob:
    """One call's items, split into chunks taken by the caller and the workers."""

    __slots__ = ("fn", "chunks", "next", "running", "error", "lock", "done")

    def __init__(self, fn: Callable[[str], None], chunks: list) -> None:
        self.fn = fn
        self.chunks = chunks
        self.next = 0
        self.running = 0
        self.error: Optional[BaseException] = None
        self.lock = threading.Lock()
        self.done = threading.Event()

    def work(self) -> None:
        """Run chunks until none is left (or one failed: the rest is skipped)."""
        while True:
            with self.lock:
                if self.error is not None or self.next >= len(self.chunks):
                    if self.running == 0:
                        self.done.set()
                    return
                chunk = self.chunks[self.next]
                self.next += 1
                self.running += 1
            err: Optional[BaseException] = None
            try:
                for item in chunk:
                    self.fn(item)
            except BaseException as exc:  # reported to the caller, never swallowed
                err = exc
            with self.lock:
                self.running -= 1
                if err is not None and self.error is None:
                    self.error = err


class _SyncPool:
    """Lazily started daemon threads that run :class:`_SyncJob` chunks; one per process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        import queue as _queue

        self.tokens: "_queue.SimpleQueue[Optional[_SyncJob]]" = _queue.SimpleQueue()
        self.threads: list = []

    def submit(self, job: _SyncJob, helpers: int) -> None:
        """Offer ``job`` to ``helpers`` worker threads (started as needed, bounded)."""
        with self.lock:
            want = min(helpers, SYNC_THREADS)
            while len(self.threads) < want:
                t = threading.Thread(target=self._work, daemon=True,
                                     name="pympx-fsync-%d" % len(self.threads))
                self.threads.append(t)
                t.start()
            for _ in range(helpers):
                self.tokens.put(job)

    def _work(self) -> None:
        import queue as _queue

        me = threading.current_thread()
        while True:
            try:
                job = self.tokens.get(timeout=SYNC_IDLE_EXIT)
            except _queue.Empty:
                with self.lock:  # submit() puts under this lock: no token is stranded
                    if self.tokens.empty():
                        if me in self.threads:
                            self.threads.remove(me)
                        return
                continue
            if job is None:  # shutdown
                return
            job.work()

    def shutdown(self, timeout: float = 1.0) -> None:
        """Ask every worker to stop; wait at most ``timeout`` seconds in all."""
        import time as _time

        with self.lock:
            threads = list(self.threads)
            self.threads.clear()
            for _ in threads:
                self.tokens.put(None)
        deadline = _time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - _time.monotonic()))


_sync_pool: Optional[_SyncPool] = None
_sync_pool_lock = threading.Lock()


def _get_sync_pool() -> _SyncPool:
    global _sync_pool
    pool = _sync_pool
    if pool is not None and pool.pid == os.getpid():
        return pool
    with _sync_pool_lock:
        # A forked child inherits the parent's pool object but not its threads: start anew.
        if _sync_pool is None or _sync_pool.pid != os.getpid():
            _sync_pool = _SyncPool()
        return _sync_pool


def shutdown_sync_pool(timeout: float = 1.0) -> None:
    """Stop this process's fsync worker threads (run at exit; they restart on demand).

    The threads are daemons, so a hung fsync never blocks interpreter exit.
    """
    global _sync_pool
    with _sync_pool_lock:
        pool, _sync_pool = _sync_pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown(timeout)


def _after_fork_in_child() -> None:
    global _sync_pool, _sync_pool_lock
    _sync_pool = None  # the parent's threads do not exist here
    _sync_pool_lock = threading.Lock()  # may have been held by a parent thread at fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

import atexit as _atexit  # noqa: E402 - kept beside the pool it shuts down
from typing import Iterable  # noqa: E402

_atexit.register(shutdown_sync_pool)


def _run_concurrently(fn: Callable[[str], None], items: list) -> None:
    """Call ``fn(item)`` for every item from up to ``SYNC_THREADS`` + 1 threads at once.

    Returns when every started call has finished; raises the first exception any call
    raised (the items not started yet are then skipped).  The calling thread works too.
    """
    n = len(items)
    if n == 0:
        return
    k = min(n, SYNC_THREADS + 1)
    if k == 1 or _tracer is not None:
        # One item, or a tracer installed (crash-state tests): in this thread, in order,
        # so the recorded history stays exact.
        for item in items:
            fn(item)
        return
    job = _SyncJob(fn, [items[i::k] for i in range(k)])
    _get_sync_pool().submit(job, k - 1)
    job.work()
    job.done.wait()
    if job.error is not None:
        raise job.error


def fsync_files(paths: Iterable[PathLike]) -> None:
    """fsync many existing regular files concurrently (G1); return when all are durable.

    Each file is opened without following a symlink and fsynced on its own.  Any failure
    raises (an fsync failure is fatal for the batch: never retried, never reported as
    success); the caller must then publish none of them.
    """
    _run_concurrently(fsync_path, [os.fspath(p) for p in paths])


def fsync_dirs(paths: Iterable[PathLike]) -> None:
    """fsync several directories concurrently (G1/G4); raise if any fsync fails."""
    _run_concurrently(fsync_dir, list(dict.fromkeys(os.fspath(p) for p in paths)))


# --------------------------------------------------------------------------- mapped journals
def tracing() -> bool:
    """True while a tracer is installed (the crash-state recorder).

    Writers that can bypass ``write(2)`` (a journal mapped into memory) use plain
    :func:`append` while tracing, so every record is a traced operation.
    """
    return _tracer is not None


def map_append_window(path: PathLike, fd: int, offset: int, length: int) -> "object":
    """Reserve bytes ``[offset, offset + length)`` of the journal open as ``fd`` and map
    them shared and writable; returns the ``mmap`` object.

    G1 (flush mode): a record copied into a ``MAP_SHARED`` mapping is in the page cache
    at once and survives the crash of the process, like a ``write(2)``, without a system
    call (and without releasing the GIL).  The space is reserved with ``posix_fallocate``
    first, so a full disk raises ``OSError`` here instead of a ``SIGBUS`` at a later store;
    the reserved tail reads as NUL bytes until written.  ``offset`` must be a multiple of
    ``mmap.ALLOCATIONGRANULARITY``.  ``path`` is reopened read-write (a shared writable
    mapping needs it) and must still be the file ``fd`` is open on (checked by inode).
    """
    import mmap

    path = os.fspath(path)
    rw = os.open(path, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        a, b = os.fstat(rw), os.fstat(fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) or not stat.S_ISREG(a.st_mode):
            raise OSError(errno.ESTALE, "journal was replaced while open", path)
        if hasattr(os, "posix_fallocate"):
            # On the read-write fd: glibc's emulation (file systems without fallocate)
            # refuses an O_APPEND one.
            os.posix_fallocate(rw, offset, length)
        elif a.st_size < offset + length:  # pragma: no cover - no fallocate (macOS)
            raise OSError(errno.EOPNOTSUPP, "cannot reserve journal space", path)
        return mmap.mmap(rw, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)
    finally:
        os.close(rw)  # the mapping keeps its own reference


def trim_fd(fd: int, length: int) -> None:
    """Cut the unwritten reserved tail of a mapped journal at ``length`` bytes.

    Only NUL bytes that never held a record are removed (G2 unaffected); not traced,
    because a traced writer never maps (see :func:`tracing`).
    """
    os.ftruncate(fd, length)


# ------------------------------------------------------------- network file systems
# statfs(2) ``f_type`` values of file systems shared between hosts (linux/magic.h and
# the file systems' own headers).  FUSE is counted as network: sshfs, s3fs, gcsfuse and
# most other FUSE file systems cache listings and attributes and deliver no inotify
# events for other clients' changes, which is what matters to the folder queue.
NETWORK_FS_TYPES = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x01021997: "9p",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
}

#: Environment override of the detection: ``local`` or ``network`` (any other value, or
#: unset, means detect by statfs type).
NETWORK_FS_ENV = "PYMPX_QUEUES_FS"

_fs_kind_cache: dict = {}
_fs_kind_lock = threading.Lock()


def statfs_type(path: PathLike) -> Optional[int]:
    """The ``f_type`` of ``statfs(path)`` (Linux), or None where it cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    libc = libc_with("statfs")
    if not libc:
        return None
    # struct statfs starts with ``__fsword_t f_type`` (a C long on every Linux ABI this
    # runs on); the rest is not needed, so a generous buffer holds the whole struct.
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(_encode(os.fspath(path)), buf) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def network_fs_kind(path: PathLike, override: Optional[str] = None) -> Optional[str]:
    """The kind of network file system ``path`` lives on (``"nfs"``, ``"fuse"``, ...),
    or None for a local one.

    ``override`` (or the ``PYMPX_QUEUES_FS`` environment variable): ``"local"`` forces
    None, ``"network"`` forces ``"network"``.  The answer is cached per device and logged
    once per device, so a queue folder can choose polling wake-ups and the link publish by
    itself (DESIGN.md section 4: network file systems drop inotify events and lack
    ``RENAME_NOREPLACE``).
    """
    choice = (override or os.environ.get(NETWORK_FS_ENV) or "auto").strip().lower()
    if choice == "local":
        return None
    if choice == "network":
        return "network"
    path = os.fspath(path)
    try:
        dev = os.stat(path).st_dev
    except OSError:
        dev = None
    # Anonymous device numbers (FUSE, NFS, tmpfs, overlay) are reused after an unmount:
    # a cached answer could belong to another file system, so those ask statfs again
    # (one system call); every answer is still logged once per device and kind.
    anonymous = dev is not None and os.major(dev) == 0
    if not anonymous:
        with _fs_kind_lock:
            if dev is not None and dev in _fs_kind_cache:
                return _fs_kind_cache[dev]
    ftype = statfs_type(path)
    kind = NETWORK_FS_TYPES.get(ftype) if ftype is not None else None
    if dev is not None:
        with _fs_kind_lock:
            known = dev in _fs_kind_cache
            if not known or (anonymous and _fs_kind_cache[dev] != kind):
                _fs_kind_cache[dev] = kind
                if kind:
                    log.info("%s is on a network file system (%s, statfs type %#x): "
                             "polling wake-ups and link publish; set %s=local to override",
                             path, kind, ftype, NETWORK_FS_ENV)
    return kind


# ------------------------------------------------------------- several hosts
# Several hosts sharing one folder over a network file system (docs/several-hosts.md).
# Three things differ from one host: each host's clock may be off (lease ages must be
# measured on one clock: the file server's), each host caches attributes and listings
# (a heartbeat or a new file may reach another host's ``stat``/``readdir`` late), and
# advisory locks are not coherent (``flock`` on sshfs), so no correctness may rest on
# them.  The primitives below are the only places that know.

#: Prefix of the probe files below (a leading dot: litter to every listing of the queue).
PROBE_PREFIX = ".pympx-probe-"


def _probe_name(directory: str) -> str:
    return os.path.join(directory, f"{PROBE_PREFIX}{os.getpid()}-{random_id()}")


def server_time(directory: PathLike) -> float:
    """The file server's clock now, as the mtime of a file just created in ``directory``.

    On a local file system that is this kernel's clock; on NFS or sshfs the server sets
    the mtime of a new file, so the answer does not depend on this host's clock (sshfs:
    whole seconds).  Creating and removing a file in ``directory`` also drops this
    mount's cached listing of it (sshfs, NFS), see :func:`refresh_listing`.
    """
    path = _probe_name(os.fspath(directory))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        when = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        _unlink_probe(path)
    return when


def _unlink_probe(path: str) -> None:
    """Remove a probe file (not traced: probes are no part of any queue's history)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def refresh_listing(directory: PathLike) -> None:
    """Make this mount's next listing of ``directory`` come from the file server.

    sshfs keeps a listing for ``dcache_timeout`` (20 s) and NFS for up to ``acdirmax``
    (60 s), so a file another host published may be missing from it; a change made in
    the directory through this mount (here: a probe file created and removed) drops the
    cached listing on both (measured on sshfs; the NFS client invalidates a directory's
    page cache when it changes it).  A no-op in effect on a local file system.
    """
    try:
        server_time(directory)
    except OSError:  # read-only folder, quota: the listing may be stale, never wrong
        log.debug("could not refresh the listing of %s", directory, exc_info=True)


def fresh_lstat(path: PathLike, probe_dir: PathLike) -> Optional[os.stat_result]:
    """``lstat(path)`` that this mount cannot answer from its attribute cache.

    sshfs answers ``stat`` from a cache for up to 20 s, so another host's heartbeat
    (an mtime change) may not show: a live claim would look abandoned.  A hard link made
    under a fresh name in ``probe_dir`` has no cache entry: its ``lstat`` comes from the
    server (the link leaves the file's mtime and content alone and is removed at once;
    the owner may settle the file meanwhile, that only removes its own name).  Where
    hard links are refused, the plain ``lstat``.  None when ``path`` is gone.
    """
    path = os.fspath(path)
    probe = _probe_name(os.fspath(probe_dir))
    try:
        os.link(path, probe, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError:
        return lstat(path)
    try:
        return os.lstat(probe)
    finally:
        _unlink_probe(probe)


def last_change(fresh: os.stat_result, before: os.stat_result) -> float:
    """When a file held under a lease last changed: the mtime of :func:`fresh_lstat`'s
    answer, or the ctime of the plain ``lstat`` made before it if later (a rename into
    ``wip/`` sets the ctime; the probe's own link would set it too, so its ctime is not
    used)."""
    return max(fresh.st_mtime, before.st_ctime)


class ServerClock:
    """This host's estimate of the file server's clock: ``time.time()`` plus an offset
    measured with :func:`server_time` in ``directory`` and refreshed every ``refresh``
    seconds.

    Leases are mtimes: a heartbeat writes ``now()`` into a claim's mtime and a recovery
    pass on any host compares ``now()`` with it, so a host whose clock is minutes off
    neither steals live claims nor keeps dead ones (error: the probe's round trip plus the
    server's timestamp granularity, 1 s on sshfs).  If the probe cannot be made, the
    local clock is used (offset 0) and the next call tries again.
    """

    def __init__(self, directory: PathLike, refresh: float = 60.0) -> None:
        self.directory = os.fspath(directory)
        self.refresh = refresh
        self._offset = 0.0
        self._next = 0.0  # monotonic time of the next measurement
        self._pid = os.getpid()

    def offset(self) -> float:
        import time

        mono = time.monotonic()
        if mono >= self._next or self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                before = time.time()
                server = server_time(self.directory)
                after = time.time()
            except OSError:
                self._next = mono + 1.0
                return self._offset
            self._offset = server - (before + after) / 2
            self._next = mono + self.refresh
        return self._offset

    def now(self) -> float:
        import time

        return time.time() + self.offset()


def touch_at(path: PathLike, when: float) -> bool:
    """Renew a lease with an explicit time (the server clock's, see :class:`ServerClock`),
    never following a symlink.  False if ``path`` is gone."""
    try:
        os.utime(os.fspath(path), (when, when), follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def move_aside(src: PathLike, directory: PathLike, mode: int = DEFAULT_DIR_MODE) -> Optional[str]:
    """Move ``src`` into ``directory`` (made if missing) under its own name, or a name
    with a random suffix when that is taken; never deletes, never overwrites.

    For files that look abandoned but might still be someone's data (a temp file of a
    producer on another host).  Returns the new path, or None when ``src`` is gone.
    """
    src, directory = os.fspath(src), os.fspath(directory)
    makedirs(directory, mode, what="folder")
    base = os.path.basename(src)
    for attempt in range(20):
        dst = os.path.join(directory, base if attempt == 0 else f"{base}.{random_id()}")
        try:
            rename_noreplace(src, dst)
            return dst
        except FileExistsError:
            continue
        except FileNotFoundError:
            return None
    raise FileExistsError(errno.EEXIST, "no free name to move a file aside", src)


# --------------------------------------------------------------------------- owned scratch dirs
# Added for the pipeline's spilled key sets (pympx_queues/pipeline/_keys.py): scratch
# files a process writes for itself and nobody else reads.  The directory is named after
# its owner, so one left by a process killed with SIGKILL is told apart from a live one
# and removed by the next process that looks (it never holds anything to recover).


def make_owned_dir(parent: PathLike, prefix: str) -> str:
    """Create a new private directory ``{prefix}.{host}.{pid}.{start}.{rand}`` (mode
    0700) in ``parent``; :func:`remove_dead_owned_dirs` removes it once its owner died."""
    host, pid, start = owner_tag()
    path = os.path.join(os.fspath(parent), f"{prefix}.{host}.{pid}.{start}.{random_id(6)}")
    os.mkdir(path, 0o700)
    _trace("mkdir", path)
    return path


def owned_dir_owner(name: str, prefix: str) -> Optional[Tuple[str, int, int]]:
    """(host, pid, start) of a :func:`make_owned_dir` name with ``prefix``, or None."""
    if not name.startswith(prefix + "."):
        return None
    parts = name[len(prefix) + 1:].split(".")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def remove_dead_owned_dirs(parent: PathLike, prefix: str) -> int:
    """Remove the :func:`make_owned_dir` directories with ``prefix`` in ``parent`` whose
    owner (on this host) is gone; returns how many.  Never follows a symlink."""
    removed = 0
    try:
        entries = list(scandir(parent))
    except FileNotFoundError:
        return 0
    for entry in entries:
        owner = owned_dir_owner(entry.name, prefix)
        if owner is None or owner[0] != _HOST or process_alive(owner[1], owner[2]):
            continue
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
            removed += 1
    return removed


def remove_tree(path: PathLike) -> None:
    """Remove a scratch directory and its files (gone already: nothing to do)."""
    import shutil

    shutil.rmtree(os.fspath(path), ignore_errors=True)
    _trace("unlink", os.fspath(path))


def create_scratch(path: PathLike) -> int:
    """A new file for scratch data (O_EXCL, never synced: it does not outlive its
    process), open for reading and writing."""
    fd = _open_new(os.fspath(path), os.O_RDWR, DEFAULT_FILE_MODE)
    _trace("create", os.fspath(path), fd)
    return fd


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the file position (a short write continues)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_at(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (pread: no file position, no mapping; a mapped
    file's pages would count in the process's resident memory)."""
    return os.pread(fd, length, offset)
