"""``scripts/hosts.py --nfs``: the several-hosts workload over real NFS in a QEMU guest.

The real run boots Debian's 6.1 kernel under software emulation (about two minutes for
the smallest configuration on a 2 vCPU machine), far too slow for CI: it runs only when
``PYMPX_QUEUES_NFS_TEST=1`` is set and the guest's cache has been prepared (run
``python scripts/hosts.py --nfs`` once; see docs/several-hosts-nfs.md).  The small checks
of the script's own pieces always run.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

import _nfs_guest  # noqa: E402


def test_initramfs_archive_is_a_newc_cpio_that_cpio_can_list(tmp_path):
    if not shutil.which("cpio"):
        pytest.skip("cpio is not installed (apt-get install cpio)")
    data = _nfs_guest._cpio_newc([("bin", 0o040755, None), ("bin/x", 0o100755, b"abc"),
                                  ("init", 0o100755, b"#!/bin/sh\n")])
    path = tmp_path / "a.cpio.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
    out = subprocess.run(f"zcat {path} | cpio -t --quiet", shell=True, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["bin", "bin/x", "init"]
    (tmp_path / "x").mkdir()
    subprocess.run(f"zcat {path} | cpio -id --quiet", shell=True, check=True,
                   cwd=tmp_path / "x")
    assert (tmp_path / "x" / "bin" / "x").read_bytes() == b"abc"
    assert os.access(tmp_path / "x" / "init", os.X_OK)


def test_hosts_script_offers_the_nfs_options():
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "hosts.py"), "--help"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    for opt in ("--nfs", "--nfs-vers", "--nfs-opts", "--nfs-cache", "--nfs-timeout"):
        assert opt in out


def _nfs_skip_reason():
    if os.environ.get("PYMPX_QUEUES_NFS_TEST") != "1":
        return ("the real NFS run boots a QEMU guest under software emulation (minutes): "
                "too slow for CI; set PYMPX_QUEUES_NFS_TEST=1 to run it")
    if os.geteuid() != 0:
        return "needs root (namespaces and mounts inside the guest use the host's tools)"
    missing = _nfs_guest.missing_tools()
    if missing:
        return f"missing packages {missing}: {_nfs_guest.APT_HINT}"
    if not _nfs_guest.ready_info(_nfs_guest.DEFAULT_CACHE):
        return (f"the guest cache {_nfs_guest.DEFAULT_CACHE} is not prepared: run "
                "python scripts/hosts.py --nfs once")
    return None


@pytest.mark.skipif(_nfs_skip_reason() is not None, reason=str(_nfs_skip_reason()))
def test_two_hosts_over_nfs_v4_2_lose_nothing_and_never_end_early():
    cmd = [sys.executable, os.path.join(SCRIPTS, "hosts.py"), "--nfs", "--nfs-vers", "4.2",
           "--nfs-opts", "actimeo=0", "--nfs-no-probe", "--hosts", "2", "--size", "1",
           "--seed", "7", "--nfs-timeout", "900"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=960, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("mode=hosts fs=nfs")]
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(lines) == 1, r.stdout
    for field in ("lost=0", "corrupt=0", "redelivered_done=0", "dup_beyond_lease=0",
                  "early_done=0", "acked=200"):
        assert f" {field} " in lines[0] + " ", lines[0]
