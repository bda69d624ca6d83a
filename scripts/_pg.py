"""A throwaway PostgreSQL cluster for benchmarks and smoke tests.

``initdb`` + ``pg_ctl`` in a temporary directory, run as the unprivileged ``postgres``
user (via ``runuser`` when we are root), listening on a unix socket only, with
``fsync=off``: created, started and stopped in about a second.  Everything is removed
on exit.

    with throwaway_cluster() as dsn:
        psycopg.connect(dsn)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Iterator, List, Optional


def find_bin(name: str) -> Optional[str]:
    """Path of a PostgreSQL server program (Debian keeps them off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def why_unavailable() -> Optional[str]:
    """None when a cluster can be made here, else the reason (for a clean skip)."""
    if find_bin("initdb") is None or find_bin("pg_ctl") is None:
        return "initdb/pg_ctl not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return None


def _as_server_user(cmd: List[str]) -> List[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


@contextlib.contextmanager
def throwaway_cluster(*, deadlock_timeout_ms: int = 100, max_connections: int = 50
                      ) -> Iterator[str]:
    """Yield a libpq connection string of a fresh cluster; stop and delete it after."""
    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    top = tempfile.mkdtemp(prefix="pympx-pg-")
    data, sock = os.path.join(top, "data"), os.path.join(top, "sock")
    os.mkdir(sock)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (top, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    started = False
    try:
        subprocess.run(_as_server_user([initdb, "-D", data, "-U", "postgres", "-A", "trust",
                                        "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        opts = (f"-k {sock} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c deadlock_timeout={deadlock_timeout_ms}ms "
                f"-c max_connections={max_connections}")
        subprocess.run(_as_server_user([pg_ctl, "-D", data, "-o", opts, "-l",
                                        os.path.join(top, "log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)
        started = True
        yield f"host={sock} dbname=postgres user=postgres"
    finally:
        if started:
            subprocess.run(_as_server_user([pg_ctl, "-D", data, "-m", "immediate", "-w",
                                            "-t", "60", "stop"]),
                           capture_output=True, timeout=90)
        shutil.rmtree(top, ignore_errors=True)
