import os
import pickle

import pytest

from pympx_queues import _fs
from pympx_queues.sentinels import DONE, FAILED


def test_rename_noreplace_never_overwrites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("new")
    b.write_text("old")
    with pytest.raises(FileExistsError):
        _fs.rename_noreplace(a, b)
    assert b.read_text() == "old" and a.read_text() == "new"


def test_publish_bytes_leaves_no_temp_on_clash(tmp_path):
    (tmp_path / "m.tsv").write_text("first")
    with pytest.raises(FileExistsError):
        _fs.publish_bytes(tmp_path / "t", tmp_path / "m.tsv", b"second", durable=True)
    assert not (tmp_path / "t").exists()
    assert (tmp_path / "m.tsv").read_text() == "first"


def test_claim_skips_symlinks_and_fifos(tmp_path):
    target = tmp_path / "secret"
    target.write_text("x")
    os.symlink(target, tmp_path / "link.tsv")
    os.mkfifo(tmp_path / "fifo.tsv")
    assert not _fs.claim(tmp_path / "link.tsv", tmp_path / "w1")
    assert not _fs.claim(tmp_path / "fifo.tsv", tmp_path / "w2")
    assert (tmp_path / "link.tsv").is_symlink() and target.read_text() == "x"


def test_claim_loser_gets_false(tmp_path):
    (tmp_path / "m").write_text("x")
    assert _fs.claim(tmp_path / "m", tmp_path / "w1")
    assert not _fs.claim(tmp_path / "m", tmp_path / "w2")


def test_read_bytes_never_blocks_on_fifo(tmp_path):
    os.mkfifo(tmp_path / "f")
    with pytest.raises(OSError):
        _fs.read_bytes(tmp_path / "f")


def test_unlink_regular_refuses_symlink(tmp_path):
    target = tmp_path / "t"
    target.write_text("keep")
    os.symlink(target, tmp_path / "l")
    with pytest.raises(OSError):
        _fs.unlink_regular(tmp_path / "l")
    assert target.read_text() == "keep"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x\x00", ".hidden", "con", "NUL.txt"])
def test_check_name_refuses_bad_names(bad):
    with pytest.raises(ValueError):
        _fs.check_name(bad)


def test_check_timeout():
    assert _fs.check_timeout(None) is None
    with pytest.raises(ValueError):
        _fs.check_timeout(-1)


def test_process_alive_detects_dead_and_reused_pid():
    host, pid, start = _fs.owner_tag()
    assert _fs.process_alive(pid, start)
    assert not _fs.process_alive(pid, start + 1)  # same pid, other start time = reused
    assert not _fs.process_alive(2**22 + 12345, 0)


def test_sentinels_survive_pickling_and_differ_from_falsy_values():
    assert pickle.loads(pickle.dumps(DONE)) is DONE
    assert pickle.loads(pickle.dumps(FAILED)) is FAILED
    for v in (0, False, -1, None, "", "DONE", "FAILED"):
        assert v != DONE and v != FAILED


def test_makedirs_is_owner_only(tmp_path):
    old = os.umask(0)
    try:
        _fs.makedirs(tmp_path / "x" / "y")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "x" / "y").st_mode & 0o777) == 0o700


def test_link_fallback_racing_claimers_leave_exactly_one_copy(tmp_path, monkeypatch):
    # Without renameat2 (NFS), two claimers can both link() before either unlink()s.
    monkeypatch.setattr(_fs, "_renameat2_ok", False)
    (tmp_path / "n").write_text("y")
    os.link(tmp_path / "n", tmp_path / "w2")  # the other claimer's link()
    real_unlink = os.unlink

    def racing_unlink(path, *a, **k):
        if os.fspath(path) == os.fspath(tmp_path / "n"):
            real_unlink(path)  # the other claimer's unlink() lands first: it won
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", racing_unlink)
    with pytest.raises(FileNotFoundError):
        _fs.rename_noreplace(tmp_path / "n", tmp_path / "w3")
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert not (tmp_path / "w3").exists()  # the loser's stray link is gone
    assert (tmp_path / "w2").read_text() == "y" and os.stat(tmp_path / "w2").st_nlink == 1


def test_network_fs_kind_local_disk_is_none(tmp_path):
    assert _fs.network_fs_kind(tmp_path) is None


def test_network_fs_kind_override_forces_either_way(tmp_path, monkeypatch):
    assert _fs.network_fs_kind(tmp_path, override="network") == "network"
    monkeypatch.setenv(_fs.NETWORK_FS_ENV, "network")
    assert _fs.network_fs_kind(tmp_path) == "network"
    assert _fs.network_fs_kind(tmp_path, override="local") is None


def test_network_fs_kind_knows_fuse_and_nfs_by_statfs_type():
    assert _fs.NETWORK_FS_TYPES[0x6969] == "nfs"
    assert _fs.NETWORK_FS_TYPES[0x65735546] == "fuse"
    assert _fs.statfs_type("/proc") == 0x9FA0  # PROC_SUPER_MAGIC: the call reads f_type


_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
_SFTP_WRAPPER = """
import socket, subprocess, sys
s = socket.socket()
s.bind(("127.0.0.1", 0)); s.listen(4)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    subprocess.Popen([sys.argv[1]], stdin=c.fileno(), stdout=c.fileno())
    c.close()
"""


def test_network_fs_kind_sees_an_sshfs_mount_as_fuse(tmp_path):
    import shutil
    import subprocess
    import sys

    if not (shutil.which("sshfs") and shutil.which("fusermount") and os.path.exists(_SFTP_SERVER)):
        pytest.skip("sshfs / openssh-sftp-server not installed (apt-get install sshfs openssh-sftp-server)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("FUSE not permitted here (/dev/fuse not usable)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    server = subprocess.Popen([sys.executable, "-c", _SFTP_WRAPPER, _SFTP_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        mounted = subprocess.run(["sshfs", "-o", f"directport={port}", f"127.0.0.1:{src}", str(mnt)],
                                 capture_output=True, text=True, timeout=30)
        if mounted.returncode != 0:
            pytest.skip(f"sshfs mount not permitted here: {mounted.stderr.strip()}")
        try:
            assert _fs.network_fs_kind(mnt) == "fuse"
            assert _fs.network_fs_kind(mnt, override="local") is None
        finally:
            subprocess.run(["fusermount", "-u", str(mnt)], timeout=30)
    finally:
        server.kill()
        server.wait(timeout=30)
