"""A throwaway PostgreSQL cluster for benchmarks and smoke tests.

``initdb`` + ``pg_ctl`` in a temporary directory, run as the unprivileged ``postgres``
user (via ``runuser``) when we are root, listening on a Unix socket only, with
``fsync=off`` (a benchmark of locks, not of disks).  Creating, starting and stopping one
takes about a second.  Needs the system's PostgreSQL server binaries
(``apt-get install postgresql``) and ``psycopg`` (the ``partitions-bench`` extra)::

    with Cluster() as pg:
        with psycopg.connect(pg.dsn) as conn: ...

``unavailable()`` says why a cluster cannot be made here (None when it can).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import List, Optional

SERVER_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")


def bindir() -> Optional[str]:
    """The directory of ``initdb``/``pg_ctl``: PATH first, then the distributions' places
    (Debian keeps them out of PATH); the newest version wins."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=os.path.dirname(os.path.realpath(found))):
        return os.path.dirname(os.path.realpath(found))
    dirs = [d for pattern in SERVER_GLOBS for d in glob.glob(pattern)
            if os.path.exists(os.path.join(d, "initdb"))]
    if not dirs:
        return None

    def version(d: str) -> List[int]:
        digits = "".join(ch if ch.isdigit() else " " for ch in d).split()
        return [int(x) for x in digits]
    return sorted(dirs, key=version)[-1]


def unavailable() -> Optional[str]:
    """Why no throwaway cluster can be made here, or None."""
    if bindir() is None:
        return "initdb not found (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg not installed (pip install -e '.[partitions-bench]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


class Cluster:
    """A PostgreSQL server in a temporary directory; :attr:`dsn` connects to it."""

    def __init__(self, settings: Optional[dict] = None, max_connections: int = 40) -> None:
        reason = unavailable()
        if reason:
            raise RuntimeError(f"no throwaway PostgreSQL here: {reason}")
        self.bin = bindir()
        self.settings = {"fsync": "off", "synchronous_commit": "off",
                         "full_page_writes": "off", "max_connections": str(max_connections),
                         "listen_addresses": "''", "shared_buffers": "64MB"}
        self.settings.update(settings or {})
        self.root = ""
        self.started = False

    # -------------------------------------------------------------- process plumbing
    def _as_owner(self, args: List[str]) -> List[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--"] + args
        return args

    def _run(self, args: List[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_owner(args), check=True, capture_output=True,
                              text=True, **kw)

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def socket_dir(self) -> str:
        return os.path.join(self.root, "sock")

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port=5432 user=postgres dbname=postgres"

    def start(self) -> "Cluster":
        self.root = tempfile.mkdtemp(prefix="pympx-pg-")
        os.makedirs(self.socket_dir)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        try:
            self._run([os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust",
                       "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            opts = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
            self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-w", "-t", "60",
                       "-l", os.path.join(self.root, "server.log"),
                       "-o", f"-k {self.socket_dir} {opts}", "start"])
        except subprocess.CalledProcessError as exc:
            log = self.log_tail()
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout}\n"
                               f"{log}") from None
        self.started = True
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.root, "server.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.started:
            try:
                self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m",
                           "immediate", "-w", "stop"], timeout=60)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass
            self.started = False
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a quick check: python scripts/_pg.py
    import time

    why = unavailable()
    if why:
        raise SystemExit(f"unavailable: {why}")
    import psycopg

    t0 = time.monotonic()
    with Cluster() as pg:
        with psycopg.connect(pg.dsn) as conn:
            print(conn.execute("select version()").fetchone()[0])
    print(f"created, started, queried and stopped in {time.monotonic() - t0:.2f} s")
