"""Network file system detection by statfs type, and the wake-ups chosen from it."""

import logging

from pympx_queues import _fs
from pympx_queues.folder import ReadableFolderQueue
from pympx_queues.folder import reader as reader_mod
import pytest


@pytest.fixture(autouse=True)
def _fresh_detection(monkeypatch):
    """Detection is cached per device and may be forced by the environment."""
    monkeypatch.setattr(_fs, "_fs_kind_cache", {})
    monkeypatch.delenv(_fs.NETWORK_FS_ENV, raising=False)


def test_a_local_folder_is_not_a_network_file_system(tmp_path):
    assert _fs.statfs_type(str(tmp_path)) is not None
    assert _fs.network_fs_kind(str(tmp_path)) is None


def test_known_network_magic_numbers_are_named(monkeypatch, tmp_path):
    for magic, kind in ((0x6969, "nfs"), (0xFF534D42, "cifs"), (0xFE534D42, "smb2"),
                        (0x65735546, "fuse"), (0x01021997, "9p")):
        monkeypatch.setattr(_fs, "statfs_type", lambda p, m=magic: m)
        monkeypatch.setattr(_fs, "_fs_kind_cache", {})
        assert _fs.network_fs_kind(str(tmp_path)) == kind


def test_a_reader_on_a_network_file_system_polls_and_says_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(_fs, "statfs_type", lambda p: 0x6969)
    reader_mod._NETWORK_LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="pympx_queues.folder"):
        a = ReadableFolderQueue(str(tmp_path))
        b = ReadableFolderQueue(str(tmp_path))
    assert a.wakeups == "poll" and b.wakeups == "poll"
    assert sum("network file system (nfs)" in r.getMessage() for r in caplog.records) == 1
    a.close()
    b.close()


def test_the_wakeups_argument_overrides_the_detection(monkeypatch, tmp_path):
    monkeypatch.setattr(_fs, "statfs_type", lambda p: 0x6969)
    r = ReadableFolderQueue(str(tmp_path), wakeups="events")
    assert r.wakeups == "events"
    r.close()


def test_a_local_reader_keeps_event_wakeups(tmp_path):
    r = ReadableFolderQueue(str(tmp_path))
    assert r.wakeups == "events"
    r.close()
