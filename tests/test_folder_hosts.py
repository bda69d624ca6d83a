"""One queue folder, several hosts: the cross-host rules of the folder queue in one
process (another host is simulated by a different host name in the owner tags, a stale
network listing by a patched ``_fs.scandir``, a skewed clock by a patched ``time.time``).

The real several-hosts run (network namespaces + sshfs) is ``test_hosts_script_small``
at the end, which skips with its reason where that set-up is not permitted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_for

from pympx_queues import DONE, _fs
from pympx_queues.folder import ReadableFolderQueue, WritableFolderQueue
from pympx_queues.folder import admin
from pympx_queues.folder import layout as L

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(poll_interval=0.05)


def reader(path, **kw):
    opts = dict(FAST)
    opts.update(kw)
    return ReadableFolderQueue(path, **opts)


def as_host(monkeypatch, name):
    """Make objects created from now on belong to host ``name`` (their owner tags)."""
    monkeypatch.setattr(_fs, "_HOST", name)


def age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def later(monkeypatch, q, seconds):
    """Let ``seconds`` pass on ``q``'s view of the file server's clock (a lease or an
    abandonment age runs out without sleeping; ctime cannot be set back)."""
    real = q._clock.now
    monkeypatch.setattr(q._clock, "now", lambda: real() + seconds)


def ready_names(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".tsv"))


# ------------------------------------------------------------ 1. temp files of producers
def test_recovery_on_another_host_leaves_a_live_producers_temp_file_alone(tmp_path, monkeypatch):
    real = _fs.hostname()
    as_host(monkeypatch, "producer-host")
    w = WritableFolderQueue(tmp_path)
    tmp = w._tmp_path("slow.tsv")  # a put in progress: the temp file is being written
    _fs.write_new(tmp, b"half", durable=False)
    age(tmp, 3600)  # its mtime looks an hour old (a cached or skewed view)
    as_host(monkeypatch, real)
    r = reader(tmp_path, lease_timeout=0.05)  # another host, a short lease
    # The file's ctime too is older than the lease now (the old rule removed it here).
    wait_for(lambda: time.time() - os.lstat(tmp).st_ctime > 0.2, timeout=10)
    rep = r.recover()
    assert rep.temp_removed == [] and os.path.exists(tmp)
    # The producer finishes its put: nothing was lost.
    assert w._publish(tmp, "slow.tsv") == os.path.join(str(tmp_path), "slow.tsv")
    w.close()
    r.close()


def test_an_abandoned_temp_file_of_another_host_is_moved_aside_never_deleted(tmp_path, monkeypatch):
    real = _fs.hostname()
    as_host(monkeypatch, "gone-host")
    w = WritableFolderQueue(tmp_path)
    tmp = w._tmp_path("left.tsv")
    _fs.write_new(tmp, b"partial data", durable=False)
    age(tmp, 7200)
    as_host(monkeypatch, real)
    r = reader(tmp_path, recover_on_start=False)
    r.TMP_ABANDON_AGE = 3600.0
    assert r.recover().temp_removed == []  # not old enough yet (ctime: just now)
    later(monkeypatch, r, 7200)
    rep = r.recover()
    assert rep.temp_removed == [tmp] and not os.path.exists(tmp)
    aside = tmp_path / "tmp" / L.ABANDONED_DIR / os.path.basename(tmp)
    assert aside.read_bytes() == b"partial data"
    assert ready_names(tmp_path) == []  # a partial write is never published (G2)
    r.close()


def test_a_producer_whose_temp_file_was_moved_aside_fails_clearly_and_publishes_nothing(
        tmp_path, monkeypatch):
    real = _fs.hostname()
    as_host(monkeypatch, "producer-host")
    w = WritableFolderQueue(tmp_path)
    as_host(monkeypatch, real)
    r = reader(tmp_path, recover_on_start=False)
    r.TMP_ABANDON_AGE = 0.0  # a recovery pass that runs while the put is in progress
    later(monkeypatch, r, 10)
    real_write = _fs.write_new

    def write_then_recover(path, data, **kw):
        real_write(path, data, **kw)
        if "/tmp/" in path and path.endswith("msg.tsv"):
            age(path, 10)
            r.recover()

    monkeypatch.setattr(_fs, "write_new", write_then_recover)
    with pytest.raises(FileNotFoundError, match="vanished before it was published"):
        w.put_data("msg.tsv", b"data")
    assert ready_names(tmp_path) == []
    moved = os.listdir(tmp_path / "tmp" / L.ABANDONED_DIR)
    assert len(moved) == 1 and moved[0].endswith("__msg.tsv")
    w.close()
    r.close()


# ------------------------------------------------------------ 2. G6 with stale listings
class StaleListing:
    """A patched ``_fs.scandir`` for one folder: a name appears in listings only
    ``delay`` seconds after it was first there (sshfs: ~20 s); ``stat`` by name is
    immediate, as on sshfs."""

    def __init__(self, folder, delay):
        self.folder, self.delay = str(folder), delay
        self.first_seen = {}
        self.real = _fs.scandir

    def __call__(self, path):
        entries = list(self.real(path))
        if os.fspath(path) != self.folder:
            return iter(entries)
        now = time.monotonic()
        out = []
        for e in entries:
            t = self.first_seen.setdefault(e.name, now)
            if now - t >= self.delay:
                out.append(e)
        return iter(out)


def test_a_stale_listing_never_ends_the_stream_early_names_from_done_are_checked(
        tmp_path, monkeypatch):
    w = WritableFolderQueue(tmp_path)
    r = reader(tmp_path, expected_producers=1)
    stale = StaleListing(tmp_path, delay=3600.0)  # the listing never shows new files
    monkeypatch.setattr(_fs, "scandir", stale)
    for i in range(3):
        w.put_data(f"m{i}.tsv", b"x")
    w.close()
    got = []
    for p in r:
        got.append(os.path.basename(r.original_filename_from_wip(p)))
        r.task_done(p)
    assert sorted(got) == ["m0.tsv", "m1.tsv", "m2.tsv"]  # found by name, not listed
    r.close()


def test_listing_delay_waits_out_a_stale_listing_beyond_the_names_done_lists(
        tmp_path, monkeypatch):
    monkeypatch.setattr(WritableFolderQueue, "DONE_RECENT", 1)  # DONE names one message
    w = WritableFolderQueue(tmp_path)
    r = reader(tmp_path, expected_producers=1, listing_delay=1.5)
    monkeypatch.setattr(_fs, "scandir", StaleListing(tmp_path, delay=0.5))
    for i in range(5):
        w.put_data(f"m{i}.tsv", b"x")
    w.close()
    got = []
    for p in r:
        got.append(os.path.basename(r.original_filename_from_wip(p)))
        r.task_done(p)
    assert sorted(got) == [f"m{i}.tsv" for i in range(5)]
    r.close()


def test_done_records_how_many_messages_a_producer_published(tmp_path):
    import json

    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"1")
    w.put_many([("b.tsv", b"2"), ("c.tsv", b"3")])
    w.close()
    done = [n for n in os.listdir(tmp_path / "control") if n.startswith("DONE__")]
    data = json.loads((tmp_path / "control" / done[0]).read_text())
    assert data["published"] == 3 and data["last"] == ["a.tsv", "b.tsv", "c.tsv"]


# ------------------------------------------------------------ 3. exclusive steps, no locks
class NoLock:
    def acquire(self, *a, **kw):
        pass

    def release(self):
        pass


@pytest.mark.parametrize("link_publish", [False, True], ids=["renameat2", "link-fallback"])
def test_two_recovery_passes_at_once_without_the_lock_requeue_each_claim_once(
        tmp_path, monkeypatch, link_publish):
    if link_publish:  # the publish path of NFS and sshfs (no RENAME_NOREPLACE)
        monkeypatch.setattr(_fs, "_renameat2_ok", False)
    WritableFolderQueue(tmp_path, register=False)
    gone = L.Owner("gone-host", 4242, 1, "0ddba11a")
    n = 150
    for i in range(n):
        p = tmp_path / "wip" / L.format_owned(gone, f"m{i:03d}.tsv")
        p.write_bytes(b"x")
        age(p, 60)
    a = reader(tmp_path, lease_timeout=1.0, recover_on_start=False)
    b = reader(tmp_path, lease_timeout=1.0, recover_on_start=False)
    for q in (a, b):  # as if on two hosts: flock serialises nothing across sshfs mounts
        monkeypatch.setattr(q, "_lock", lambda: NoLock())
        later(monkeypatch, q, 60)
    reports = []
    start = threading.Barrier(2)

    def sweep(q):
        start.wait()
        reports.append(q.recover())

    threads = [threading.Thread(target=sweep, args=(q,)) for q in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    requeued = sum(len(rep.requeued) for rep in reports)
    assert requeued == n
    assert ready_names(tmp_path) == [f"m{i:03d}.tsv" for i in range(n)]  # once each
    assert os.listdir(tmp_path / "wip") == []
    for q in (a, b):
        q.close()


def test_two_control_compactions_at_once_remove_each_file_once(tmp_path):
    for run in ("r1", "r2", "r3"):
        w = WritableFolderQueue(tmp_path, run_id=run)
        w.close()
    r = reader(tmp_path)
    r._mark_ended(["r1", "r2", "r3"], "test")
    before = len(os.listdir(tmp_path / "control"))
    counts = []
    start = threading.Barrier(2)

    def purge():
        start.wait()
        counts.append(admin._purge_control(r, keep=set()))

    threads = [threading.Thread(target=purge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(counts) == before - 1  # every file but the lock file, removed once
    r.close()


# ------------------------------------------------------------ 4. leases: fencing and clocks
def test_a_host_back_after_its_lease_expired_cannot_acknowledge_a_reclaimed_message(
        tmp_path, monkeypatch):
    real = _fs.hostname()
    w = WritableFolderQueue(tmp_path)
    w.put_data("m.tsv", b"x")
    w.close()
    as_host(monkeypatch, "host-a")
    a = reader(tmp_path, lease_timeout=0.3, recover_on_start=False)
    held = a.get(timeout=5)
    as_host(monkeypatch, real)
    age(held, 5)  # host A went quiet: no heartbeat for longer than the lease
    b = reader(tmp_path, lease_timeout=0.3, recover_on_start=False)
    later(monkeypatch, b, 5)
    assert [os.path.basename(p) for p in b.recover().requeued] == ["m.tsv"]
    again = b.get(timeout=5)
    # Host A comes back: its claim is fenced off.
    assert a.heartbeat(held) is False
    with pytest.raises(FileNotFoundError, match="claim no longer held"):
        a.task_done(held)
    with pytest.raises(FileNotFoundError, match="claim no longer held"):
        a.nack(held)
    b.task_done(again)
    assert b.get(timeout=5) is DONE  # acknowledged once, never redelivered (G4)
    a.close()
    b.close()


def test_an_ack_racing_a_recovery_either_wins_or_fails_clearly(tmp_path, monkeypatch):
    real = _fs.hostname()
    w = WritableFolderQueue(tmp_path)
    w.put_many([(f"m{i}.tsv", b"x") for i in range(40)])
    w.close()
    as_host(monkeypatch, "host-a")
    a = reader(tmp_path, lease_timeout=0.3, recover_on_start=False)
    held = [a.get(timeout=5) for _ in range(40)]
    as_host(monkeypatch, real)
    for p in held:
        age(p, 5)
    b = reader(tmp_path, lease_timeout=0.3, recover_on_start=False)
    later(monkeypatch, b, 5)
    acked, fenced = [], []

    def ack_all():
        for p in held:
            try:
                a.task_done(p)
                acked.append(p)
            except FileNotFoundError:
                fenced.append(p)

    t = threading.Thread(target=ack_all)
    t.start()
    rep = b.recover()
    t.join(30)
    assert len(acked) + len(fenced) == 40
    assert len(rep.requeued) == len(fenced)  # each message: acked, or back once
    assert len(ready_names(tmp_path)) == len(fenced)
    a.close()
    b.close()


def test_lease_ages_use_the_file_servers_clock_not_a_skewed_local_one(tmp_path, monkeypatch):
    WritableFolderQueue(tmp_path, register=False)
    other = L.Owner("other-host", 4242, 1, "cafebabe")
    claim = tmp_path / "wip" / L.format_owned(other, "m.tsv")
    claim.write_bytes(b"x")  # claimed just now (file server's clock)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 1000.0)  # our clock: +1000 s
    r = reader(tmp_path, lease_timeout=60.0, recover_on_start=False)
    rep = r.recover()
    assert rep.requeued == [] and rep.live == 1 and claim.exists()
    # This host's heartbeats are written on the server's clock too.
    monkeypatch.setattr(time, "time", lambda: real_time() - 1000.0)  # our clock: -1000 s
    slow = reader(tmp_path, lease_timeout=60.0, recover_on_start=False)
    p = tmp_path / "wip" / L.format_owned(slow._owner(), "n.tsv")
    p.write_bytes(b"y")
    age(p, 3600)
    assert slow.heartbeat(str(p))
    monkeypatch.setattr(time, "time", real_time)
    assert abs(os.lstat(p).st_mtime - real_time()) < 5  # not 1000 s in the past
    r.close()
    slow.close()


def test_a_claim_on_a_network_file_system_starts_its_lease_when_claimed(tmp_path, monkeypatch):
    monkeypatch.setenv(_fs.NETWORK_FS_ENV, "network")
    w = WritableFolderQueue(tmp_path)
    w.put_data("old.tsv", b"x")
    age(tmp_path / "old.tsv", 3600)  # waited an hour in the queue
    r = reader(tmp_path, lease_timeout=60.0)
    p = r.get(timeout=5)
    assert time.time() - os.lstat(p).st_mtime < 30  # a fresh lease, not the file's age
    r.task_done(p)
    w.close()
    r.close()


def test_recovery_on_a_network_file_system_never_waits_for_a_file_lock(tmp_path, monkeypatch):
    # NFS's lock manager may not answer (firewall, no lockd): flock then blocks in the
    # kernel.  The lock only saves redundant work there, so recovery does not take it.
    monkeypatch.setenv(_fs.NETWORK_FS_ENV, "network")
    w = WritableFolderQueue(tmp_path)
    w.put_data("a.tsv", b"x")
    r = reader(tmp_path, lease_timeout=60.0)
    lock_path = os.path.join(str(tmp_path), L.CONTROL_DIR, L.LOCK_NAME)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(60)\n", lock_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = []
        t = threading.Thread(target=lambda: done.append(r.recover()), daemon=True)
        t.start()
        wait_for(lambda: done, timeout=10, message="recovery returned despite a held flock")
        assert not done[0].skipped
        p = r.get(timeout=5)
        r.task_done(p)
    finally:
        holder.kill()
        holder.wait(10)
    w.close()
    r.close()


# ------------------------------------------------------------ 6. the several-hosts script
def _hosts_unavailable():
    missing = [t for t in ("sshfs", "ip", "nsenter", "unshare") if shutil.which(t) is None]
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        missing.append("fusermount")
    if missing:
        return f"missing tools: {missing} (apt-get install sshfs iproute2 util-linux)"
    if not os.path.exists("/usr/lib/openssh/sftp-server"):
        return "missing /usr/lib/openssh/sftp-server (apt-get install openssh-sftp-server)"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE not permitted here)"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True)
    if probe.returncode != 0:
        return "namespaces not permitted: " + probe.stderr.decode(errors="replace").strip()
    return None


@pytest.mark.timeout(240)
def test_hosts_script_small_run_has_no_violation():
    """Two hosts over sshfs: consumers, whole hosts (a producer killed mid-stream and
    restarted), a partition, and host 0's clock 10 s ahead (twice the lease)."""
    why = _hosts_unavailable()
    if why:
        pytest.skip(why)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYMPX_HOSTS_NO_SERVER_CLOCK", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "hosts.py"), "--size", "1",
         "--hosts", "2", "--consumers", "2", "--seed", "7", "--partitions", "1",
         "--host-kills", "1", "--pace", "0.05", "--skew", "10"],
        capture_output=True, text=True, timeout=220, env=env)
    if proc.returncode == 2 and "skipped" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("mode=hosts ")]
    assert lines, proc.stdout
    for ln in lines:
        for key in ("lost", "corrupt", "redelivered_done", "dup_beyond_lease", "early_done"):
            assert f" {key}=0 " in ln, ln
        assert " producer_kills=0 " not in ln, ln  # a producer was killed and restarted


# ------------------------------------------------------------ 5. PersistentQueue, two hosts
_WRITE_ON_HOST_A = """
import os, sys
from pympx_queues import _fs
_fs._HOST = "host-a"  # this process runs on "host-a"
from pympx_queues import PersistentQueue
q = PersistentQueue("jobs", current_pickup_dir=sys.argv[1], number_of_workers=0)
for i in range(3):
    q.put({"n": i})
q.get(); q.task_done()  # one finished; two outstanding
os._exit(0)  # crash: no dispose
"""

_REQUEUE_ON = """
import json, sys
from pympx_queues import _fs
_fs._HOST = sys.argv[2]
from pympx_queues import PersistentQueue
from pympx_queues.persistent import pickup
rep = pickup.requeue(sys.argv[1])
q = PersistentQueue("jobs", current_pickup_dir=sys.argv[1], previous_pickup_dir=sys.argv[1],
                    number_of_workers=0)
n = q.requeue_unprocessed_work()
items = sorted(q.get()["n"] for _ in range(n))
for _ in range(n):
    q.task_done()
q.dispose()
print(json.dumps({"skipped": rep.skipped, "outstanding": len(rep.outstanding),
                  "requeued": n, "items": items}))
"""


def _run_as(code, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None


def test_a_pickup_journal_on_a_shared_folder_is_requeued_by_its_own_host_only(tmp_path):
    shared = str(tmp_path / "pickup")
    _run_as(_WRITE_ON_HOST_A, shared)
    before = sorted(os.listdir(shared))
    # Host B cannot tell whether host A's writer still runs: it lists the work, leaves
    # the journal alone and requeues nothing (never a second copy of live work, G3).
    on_b = _run_as(_REQUEUE_ON, shared, "host-b")
    assert on_b["skipped"] == ["jobs"] and on_b["outstanding"] == 2
    assert on_b["requeued"] == 0
    assert all(n in os.listdir(shared) for n in before)  # host A's journal untouched
    # On host A (its writer's pid is gone there) the same command requeues both, once.
    on_a = _run_as(_REQUEUE_ON, shared, "host-a")
    assert on_a["requeued"] == 2 and on_a["items"] == [1, 2]
    again = _run_as(_REQUEUE_ON, shared, "host-a")
    assert again["requeued"] == 0  # done stays done (G4)


_CLI_ON = """
import sys
from pympx_queues import _fs
_fs._HOST = sys.argv[1]
from pympx_queues.cli import main
main(sys.argv[2:], prog_name="pympx-queues")
"""


def test_a_dead_hosts_pickup_journal_is_requeued_from_another_host_when_declared_dead(
        tmp_path):
    shared = str(tmp_path / "pickup")
    _run_as(_WRITE_ON_HOST_A, shared)
    env = dict(os.environ, PYTHONPATH=ROOT)

    def cli(*args):
        return subprocess.run([sys.executable, "-c", _CLI_ON, *args], capture_output=True,
                              text=True, timeout=60, env=env)

    # Declaring this very host dead is refused, and writes nothing.
    before = sorted(os.listdir(shared))
    refused = cli("host-b", "requeue", shared, "--dead-host", "host-b")
    assert refused.returncode != 0 and "this host" in refused.stderr
    assert sorted(os.listdir(shared)) == before
    # Host B, told that host A is down for good, requeues host A's outstanding work once.
    out = cli("host-b", "requeue", shared, "--dead-host", "host-a", "--json")
    assert out.returncode == 0, out.stderr
    code = _REQUEUE_ON.replace("rep = pickup.requeue(sys.argv[1])",
                               "rep = pickup.requeue(sys.argv[1], dry_run=True)")
    on_b = _run_as(code, shared, "host-b")
    assert on_b["requeued"] == 2 and on_b["items"] == [1, 2]
    # ... and once only: host A, back, finds nothing left (done stays done, G4).
    assert _run_as(_REQUEUE_ON, shared, "host-a")["requeued"] == 0


def _hosts_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "hosts_script", os.path.join(ROOT, "scripts", "hosts.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return mod


def _write_log(path, *recs):
    import json
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_hosts_checker_a_claim_fenced_before_its_read_is_not_a_delivery(tmp_path):
    # The CI run of seed 7: host 0 was cut off holding h1-000029; host 1 took it over,
    # read and acknowledged it; host 0's get() returned after the link came back and its
    # read was fenced.  Nothing was delivered twice.
    hosts = _hosts_module()
    _write_log(tmp_path / "c8-h1.jsonl",
               {"ev": "claim", "name": "h1-000000", "t": 10.0},
               {"ev": "got", "name": "h1-000000", "ok": True, "t": 10.1},
               {"ev": "ack", "name": "h1-000000", "t": 10.2},
               {"ev": "end", "what": "done", "t": 30.0})
    _write_log(tmp_path / "c6-h0.jsonl",
               {"ev": "claim", "name": "h1-000000", "t": 18.0},
               {"ev": "fenced", "name": "h1-000000", "t": 18.01},
               {"ev": "end", "what": "done", "t": 29.0})
    r = hosts.check_logs(str(tmp_path), 2, 1, part_windows=[(0, 5.0, 15.0)])
    assert r["redelivered_done"] == 0 and r["fenced"] == 1
    # ... but a read after the acknowledgement is a redelivery.
    _write_log(tmp_path / "c6-h0.jsonl",
               {"ev": "claim", "name": "h1-000000", "t": 18.0},
               {"ev": "got", "name": "h1-000000", "ok": True, "t": 18.01},
               {"ev": "end", "what": "done", "t": 29.0})
    assert hosts.check_logs(str(tmp_path), 2, 1)["redelivered_done"] == 1


def test_hosts_checker_allows_one_extra_delivery_per_put_in_flight_at_a_producer_kill(
        tmp_path):
    hosts = _hosts_module()
    # Producer of host 0 killed with put 1 in flight (begin, no end), restarted, put 1
    # again: two published copies of h0-000001, both delivered and acknowledged.
    (tmp_path / "p-h0.log").write_text(
        "start 100 0\nbegin 0\nend 0\nbegin 1\nstart 200 1\nbegin 1\nend 1\nclosed\n")
    assert hosts.producer_in_flight(str(tmp_path / "p-h0.log")) == {1: 1}
    recs = [{"ev": "claim", "name": n, "t": t} for n, t in
            (("h0-000000", 1.0), ("h0-000001", 2.0), ("h1-000000", 3.0))]
    acks = [{"ev": "ack", "name": r["name"], "t": r["t"] + 0.5} for r in recs]
    _write_log(tmp_path / "c1-h0.jsonl", *recs, *acks)
    second = [{"ev": "claim", "name": "h0-000001", "t": 9.0},
              {"ev": "ack", "name": "h0-000001", "t": 9.5}]
    _write_log(tmp_path / "c2-h1.jsonl", *second)
    r = hosts.check_logs(str(tmp_path), 2, 1)  # expects h0-000000 and h1-000000
    assert r["producer_redo"] == 1 and r["redelivered_done"] == 0, r
    # A third copy, or a second delivery of a message not in flight, is a violation.
    _write_log(tmp_path / "c3-h1.jsonl", {"ev": "claim", "name": "h0-000001", "t": 12.0},
               {"ev": "claim", "name": "h0-000000", "t": 13.0})
    r = hosts.check_logs(str(tmp_path), 2, 1)
    assert r["producer_redo"] == 1 and r["redelivered_done"] == 2, r


def test_hosts_checker_a_killed_consumers_ack_counts_only_if_the_message_is_gone(tmp_path):
    # A consumer killed inside task_done: sshfs may complete the unlink after the kill.
    hosts = _hosts_module()
    _write_log(tmp_path / "c1-h0.jsonl",
               {"ev": "claim", "name": "h0-000000", "t": 1.0},
               {"ev": "got", "name": "h0-000000", "ok": True, "t": 1.1},
               {"ev": "acking", "name": "h0-000000", "t": 1.2})
    _write_log(tmp_path / "c2-h1.jsonl", {"ev": "claim", "name": "h1-000000", "t": 2.0},
               {"ev": "ack", "name": "h1-000000", "t": 2.1})
    killed = [str(tmp_path / "c1-h0.jsonl")]
    r = hosts.check_logs(str(tmp_path), 2, 1, killed, left={})
    assert r["lost"] == 0 and r["acked_unlogged"] == 1, r
    r = hosts.check_logs(str(tmp_path), 2, 1, killed, left={"h0-000000": ["wip/x"]})
    assert r["lost"] == 1 and r["acked_unlogged"] == 0, r
    r = hosts.check_logs(str(tmp_path), 2, 1, [], left={})  # not killed: really lost
    assert r["lost"] == 1, r


def test_done_waits_for_a_silent_claim_of_another_host_and_delivers_it(
        tmp_path, monkeypatch):
    """A consumer of another host died holding a claim just before the stream ended:
    the last consumer does not return DONE (leaving the message in wip/ for the next
    run); it waits for the claim's lease, recovers it and delivers it."""
    real = _fs.hostname()
    w = WritableFolderQueue(tmp_path)
    w.put_data("m.tsv", b"x")
    w.close()
    as_host(monkeypatch, "host-a")
    a = reader(tmp_path, lease_timeout=1.0, recover_on_start=False)
    held = a.get(timeout=5)  # host A dies now: no heartbeat, no ack
    as_host(monkeypatch, real)
    b = reader(tmp_path, lease_timeout=1.0)
    got = b.get(timeout=30)
    assert got is not DONE and got.endswith("m.tsv")
    with open(got, "rb") as f:
        assert f.read() == b"x"
    b.task_done(got)
    assert b.get(timeout=5) is DONE
    with pytest.raises(FileNotFoundError, match="claim no longer held"):
        a.task_done(held)  # host A back: fenced
    b.close()


def test_done_does_not_wait_for_a_claim_of_another_host_that_heartbeats(
        tmp_path, monkeypatch):
    real = _fs.hostname()
    w = WritableFolderQueue(tmp_path)
    w.put_data("m.tsv", b"x")
    w.close()
    as_host(monkeypatch, "host-a")
    a = reader(tmp_path, lease_timeout=30.0, heartbeat_interval=0.05,
               recover_on_start=False)
    held = a.get(timeout=5)  # host A lives and works on it
    as_host(monkeypatch, real)
    b = reader(tmp_path, lease_timeout=30.0)
    assert b.get(timeout=10) is DONE  # after A's next heartbeat, not after its lease
    a.task_done(held)  # A's claim was left alone
    a.close()
    b.close()


def test_done_stops_waiting_for_a_claim_recovery_cannot_take_over(tmp_path, monkeypatch, caplog):
    """No endless wait: a silent claim of another host that recovery cannot move (here
    its takeover is refused) holds DONE back two leases and a recovery interval, then
    DONE comes with a warning naming the way out."""
    real = _fs.hostname()
    w = WritableFolderQueue(tmp_path)
    w.put_data("m.tsv", b"x")
    w.close()
    as_host(monkeypatch, "host-a")
    a = reader(tmp_path, lease_timeout=0.3, recover_on_start=False)
    a.get(timeout=5)  # host A dies holding it
    as_host(monkeypatch, real)
    b = reader(tmp_path, lease_timeout=0.3, recover_interval=0.1)
    monkeypatch.setattr(type(b), "_take_over", lambda self, path, name: None)
    with caplog.at_level("WARNING", logger="pympx_queues.folder"):
        assert b.get(timeout=30) is DONE
    assert "could not take them over" in caplog.text and "requeue" in caplog.text
    assert len(os.listdir(os.path.join(str(tmp_path), "wip"))) == 1  # left for requeue
    b.close()
