#!/usr/bin/env python3
"""Several hosts, one queue folder: the issue-14 proof (root only).

Builds N "hosts" on one machine: a network namespace each (``ip netns``), a veth pair to
the root namespace, an ``sshfs -o directport=PORT`` mount of one export folder made from
inside the namespace (``nsenter --net=...``; the mount itself is shared), served by a small
TCP wrapper around ``/usr/lib/openssh/sftp-server`` in the root namespace (no sshd, no
keys).  sshfs keeps its default caching (listings and attributes up to 20 s old), which
is the hard case.  Every worker runs inside its host's namespace with its own UTS host
name, so the folder queue judges the other hosts' claims by lease, not by pid.

Runs one producer and ``--consumers`` consumers per host (lease ``--lease`` seconds,
heartbeats every lease/5), SIGKILLs single consumers and whole hosts (every process of
one host: its consumers and its producer, which is restarted, resumes at the first put
its log does not show ended and takes its registration over by ``producer_key``; at
least ``--host-kills`` of them while the producer runs) at random, cuts ``--partitions`` hosts off the file server for two leases each
(their veth link down: their consumers hang, their claims expire and are taken over, and
when the link comes back their acknowledgements of those claims are fenced), then checks
the consumers' local logs and prints one line per configuration:

    mode=hosts fs=sshfs hosts=2 messages=... acked=... lost=0 corrupt=0 \
redelivered_done=0 dup_beyond_lease=0 early_done=0 fenced=... kills=... host_kills=... \
partitions=... secs=... seed=...

(plus ``producer_redo``, ``producer_kills`` and, with ``--skew S``, ``skew``: host 0's
workers then see their wall clock moved by S seconds).

and exits 1 on any violation (2: skipped, with the reason: not root, no FUSE, a tool
missing).  The workload itself is :func:`run_workload` (folders, a spawn function, a log
folder): ``--folders A B`` runs it on mounts someone else made (no set-up, no
partitions), and scripts/_nfs_guest.py (``--nfs``) runs it over real NFS.

Everything started is ended by pid and every mount, veth and namespace removed at the end,
also on error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
_real_time = time.time  # before --skew patches time.time in a worker
SUBNET = "10.231"
LEASE = 5.0

_SERVER = """
import socket, subprocess, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    subprocess.Popen([sys.argv[1]], stdin=c.fileno(), stdout=c.fileno())
    c.close()
"""


def _run(cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def end_processes(procs: list) -> None:
    """SIGKILL every process group we started that still runs, and reap each (30 s at
    most per process: a process stuck in the kernel on a dead mount is left behind)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


class Hosts:
    """The set-up: namespaces, links, server, mounts; ``close`` undoes all of it."""

    def __init__(self, n: int, base: str) -> None:
        self.n, self.base = n, base
        self.export = os.path.join(base, "export")
        os.makedirs(self.export, mode=0o700)
        self.tag = f"pq{os.getpid() % 100000}"
        self.subnet = f"10.{200 + os.getpid() % 50}"  # two runs at once do not collide
        self.netns, self.links, self.mounts, self.procs = [], [], [], []
        self.server = None

    def start(self) -> None:
        self.server = subprocess.Popen([sys.executable, "-c", _SERVER, SFTP_SERVER],
                                       stdout=subprocess.PIPE, text=True)
        self.procs.append(self.server)
        port = self.server.stdout.readline().strip()
        for i in range(self.n):
            ns, veth = f"{self.tag}h{i}", f"{self.tag}v{i}"
            _run(["ip", "netns", "add", ns])
            self.netns.append(ns)
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "n"])
            self.links.append(veth)
            _run(["ip", "link", "set", veth + "n", "netns", ns])
            _run(["ip", "addr", "add", f"{self.subnet}.{i}.1/24", "dev", veth])
            _run(["ip", "link", "set", veth, "up"])
            nse = ["ip", "netns", "exec", ns]
            _run(nse + ["ip", "addr", "add", f"{self.subnet}.{i}.2/24", "dev", veth + "n"])
            _run(nse + ["ip", "link", "set", veth + "n", "up"])
            _run(nse + ["ip", "link", "set", "lo", "up"])
            mnt = os.path.join(self.base, f"mnt{i}")
            os.makedirs(mnt)
            _run(["nsenter", f"--net=/run/netns/{ns}", "sshfs", "-o", f"directport={port}",
                  f"{self.subnet}.{i}.1:{self.export}", mnt])
            self.mounts.append(mnt)

    def spawn(self, i: int, args: list) -> subprocess.Popen:
        """A worker process inside host ``i`` (its network namespace and host name)."""
        cmd = ["nsenter", f"--net=/run/netns/{self.netns[i]}", "unshare", "--uts", "sh", "-c",
               f'hostname host{i} && exec "$@"', "sh", sys.executable, __file__] + args
        p = subprocess.Popen(cmd, start_new_session=True)
        self.procs.append(p)
        return p

    def partition(self, i: int, down: bool) -> None:
        """Cut host ``i`` off the file server (its veth link down), or heal it."""
        _run(["ip", "link", "set", self.links[i], "down" if down else "up"])

    def close(self) -> None:
        end_processes(self.procs)
        fusermount = shutil.which("fusermount3") or "fusermount"
        for m in self.mounts:
            _run([fusermount, "-u", "-z", m], check=False)
        for link in self.links:
            _run(["ip", "link", "del", link], check=False)
        for ns in self.netns:
            _run(["ip", "netns", "del", ns], check=False)


# ------------------------------------------------------------------ workers (in a host)
def skew_clock(seconds: float) -> None:
    """Move this process's wall clock by ``seconds``: ``time.time`` and ``time.time_ns``
    are patched before pympx_queues is imported, so every lease computation of the
    library sees the skewed clock (as on a host whose clock is wrong).  File times the
    server sets are not moved, nor are C-level clocks (this is not libfaketime).  The
    logs keep the real clock (``_real_time``): the checker orders events across hosts."""
    if not seconds:
        return
    real, real_ns = time.time, time.time_ns
    time.time = lambda: real() + seconds
    time.time_ns = lambda: real_ns() + int(seconds * 1e9)
    if os.environ.get("PYMPX_HOSTS_NO_SERVER_CLOCK"):
        # The negative control: leases on this host's own (skewed) clock, as before
        # ServerClock; the run should then show violations.
        from pympx_queues import _fs

        _fs.ServerClock.offset = lambda self: 0.0

def _payload(name: str) -> bytes:
    body = (name * 8).encode()
    return b"%08x " % zlib.crc32(body) + body


def producer(folder: str, name: str, count: int, lease: float = LEASE,
             run_id: str = "", log_path: str = "", pace: float = 0.0) -> None:
    """Put ``name-000000`` .. ``name-<count-1>``, logging ``begin k`` before and ``end k``
    after each put (``log_path``), and close.

    A producer restarted after its host was killed resumes at the first ``k`` without
    ``end`` (the put in flight at the kill may have been published: it is put again, under
    a unique name if the first copy still waits: ``if_exists="rename"``), and takes over
    its predecessor's registration by its ``producer_key`` (the host's name), so that
    consumers wait for it and not for ever (G6)."""
    from pympx_queues import WritableFolderQueue

    start = 0
    if log_path and os.path.exists(log_path):
        ended = set()
        for line in open(log_path, errors="replace"):
            parts = line.split()
            if len(parts) == 2 and parts[0] == "end" and parts[1].isdigit():
                ended.add(int(parts[1]))
        while start in ended:
            start += 1
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"start {os.getpid()} {start}\n".encode())
    q = WritableFolderQueue(folder, lease_timeout=lease, run_id=run_id or None,
                            producer_key=name, if_exists="rename")
    if q.superseded:
        os.write(fd, f"took-over {' '.join(q.superseded)}\n".encode())
    for k in range(start, count):
        msg = f"{name}-{k:06d}"
        os.write(fd, f"begin {k}\n".encode())
        try:
            q.put_data(msg + ".tsv", _payload(msg))
        except OSError as e:
            tmp = os.path.join(folder, "tmp")
            print(f"producer {name}: put of {msg} failed: {e!r}; tmp/ holds "
                  f"{sorted(os.listdir(tmp))[:20]}", file=sys.stderr, flush=True)
            raise
        os.write(fd, f"end {k}\n".encode())
        if pace:
            time.sleep(pace)  # a producer that runs as long as the consumers
    q.close()
    os.write(fd, b"closed\n")


def producer_in_flight(log_path: str) -> dict:
    """``{k: n}``: how many killed instances of a producer had put ``k`` in flight (a
    ``begin k`` with no ``end k`` before the next ``start``; a torn last line counts as
    nothing)."""
    out: dict = {}
    open_k = None
    lines = open(log_path, errors="replace").read().split("\n") if os.path.exists(log_path) \
        else []
    for line in lines + ["start"]:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "start":
            if open_k is not None:
                out[open_k] = out.get(open_k, 0) + 1
            open_k = None
        elif parts[0] == "begin" and len(parts) == 2 and parts[1].isdigit():
            open_k = int(parts[1])
        elif parts[0] == "end":
            open_k = None
    return out


def consumer(folder: str, log_path: str, producers: int, lease: float = LEASE,
             deadline: float = 0.0, run_id: str = "", work: float = 0.0) -> None:
    """Consume until DONE, logging every claim, acknowledgement and fenced ack.

    A ``task_done`` that raises ``FileNotFoundError`` is a fenced acknowledgement: the
    lease ran out (this host was partitioned) and another host took the claim over; the
    message is not counted as acknowledged here."""
    from pympx_queues import ReadableFolderQueue
    from pympx_queues.errors import Empty
    from pympx_queues.sentinels import DONE, FAILED

    # run_id: a consumer started after the run ended (a replacement for a killed one)
    # still follows it; without it that run would be history to it (G6).
    q = ReadableFolderQueue(folder, expected_producers=producers, run_id=run_id or None,
                            lease_timeout=lease, heartbeat_interval=lease / 5,
                            wakeups="poll", poll_interval=0.2, recover_interval=lease / 4)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(**rec):
        rec["t"] = _real_time()  # the driver's clock, whatever --skew did to this host
        os.write(fd, (json.dumps(rec) + "\n").encode())

    while True:
        try:
            path = q.get(timeout=5)
        except Empty:
            if deadline and _real_time() > deadline:
                note(ev="end", what="gave-up")
                break
            continue
        if path is DONE or path is FAILED:
            note(ev="end", what="done" if path is DONE else "failed")
            break
        # The claim, logged before anything touches the network again: the order of
        # deliveries is the order of claims (a host cut off while reading logs "got"
        # only after it comes back, long after another host took the claim over).
        claimed = os.path.basename(path).split("__", 1)[-1][:-len(".tsv")]
        claimed = re.sub(r"~[0-9a-f]{8}$", "", claimed)  # requeued under a unique name
        note(ev="claim", name=claimed)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # fenced before we could read it
            note(ev="fenced", name=claimed)
            continue
        body = data[9:]
        name = body[:len(body) // 8].decode("ascii", "replace")
        ok = data == _payload(name) and name == claimed
        if ok:
            note(ev="got", name=name, ok=ok, host=socket.gethostname())
        else:
            note(ev="got", name=name, ok=ok, host=socket.gethostname(), claimed=claimed,
                 size=len(data), head=data[:40].decode("ascii", "replace"))
        if work:
            time.sleep(work)  # the task: a cut-off host is caught holding claims
        note(ev="acking", name=name)  # killed from here on: the ack may have happened
        try:
            q.task_done(path)
        except FileNotFoundError:
            note(ev="fenced", name=name)
            continue
        note(ev="ack", name=name)
    q.close()


# ------------------------------------------------------------------------- the driver
class Faults:
    """What the driver may do to a host: ``partition(i, down)`` cuts host ``i`` off the
    file server (or heals it); None where the set-up cannot (then no partitions)."""

    def __init__(self, partition=None):
        self.partition = partition


def run_workload(folders, spawn, logs, per_host, consumers, rng, *, lease=LEASE,
                 kills=6, partitions=1, faults=None, timeout=600.0, work=0.05,
                 skew=0.0, host_kills_min=1, pace=None) -> dict:
    """The several-hosts workload, for any set-up that gives each host a folder.

    ``folders[i]``: the queue folder as host ``i`` sees it (its mount of the shared
    folder); ``spawn(i, argv)``: start ``hosts.py argv`` inside host ``i`` and return the
    ``subprocess.Popen`` (its own process group); ``logs``: a local folder for the
    consumers' logs.  Runs one producer and ``consumers`` consumers per host, SIGKILLs
    single consumers and whole hosts (all of a host's consumers) at random up to
    ``kills`` times, cuts ``partitions`` hosts off for two leases each (when
    ``faults.partition`` exists), then checks the logs; returns the summary dict.
    Used by the sshfs set-up below and by the NFS set-up (scripts/_nfs_guest.py).
    """
    n_hosts = len(folders)
    os.makedirs(logs, exist_ok=True)
    run_id = f"hosts-{os.getpid()}-{rng.randrange(1 << 30):08x}"  # one run, all producers
    t0 = time.time()
    stop_at = t0 + timeout
    cons, seq = [], 0

    def host_skew(i):
        return str(skew if i == 0 else 0.0)

    def start_consumer(i):
        nonlocal seq
        seq += 1
        log = os.path.join(logs, f"c{seq}-h{i}.jsonl")
        argv = ["consumer", folders[i], log, str(n_hosts), str(lease), str(stop_at), run_id,
                str(work), host_skew(i)]
        cons.append((i, spawn(i, argv), log))

    pace_s = work / max(consumers, 1) if pace is None else pace

    def start_producer(i):
        return spawn(i, ["producer", folders[i], f"h{i}", str(per_host), str(lease), run_id,
                         os.path.join(logs, f"p-h{i}.log"), str(pace_s), host_skew(i)])

    for i in range(n_hosts):
        for _ in range(consumers):
            start_consumer(i)
    prods = [start_producer(i) for i in range(n_hosts)]
    n_kills = host_kills = n_parts = producer_kills = 0
    killed_logs = set()

    def kill(victims, prod_host):
        """SIGKILL consumers ``victims`` (and the producer of ``prod_host``) at once;
        start replacements; a producer restarted resumes and takes its registration over."""
        nonlocal n_kills, producer_kills
        for p in ([prods[prod_host]] if prod_host is not None else []) + [
                c[1] for c in victims]:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended just now
        for i, p, log in victims:
            p.wait(timeout=30)
            killed_logs.add(log)
            n_kills += 1
            start_consumer(i)
        if prod_host is not None:
            prods[prod_host].wait(timeout=30)
            producer_kills += 1
            prods[prod_host] = start_producer(prod_host)

    def kill_host(h, live):
        """Every process of host ``h`` (not while it is cut off)."""
        nonlocal host_kills
        if h in cut:
            return
        victims = [c for c in live if c[0] == h]
        prod_host = h if prods[h].poll() is None else None
        if victims or prod_host is not None:
            host_kills += 1
            kill(victims, prod_host)

    host_kill_left = host_kills_min
    next_host_kill = t0 + rng.uniform(0.5, 2.0)
    cut = {}  # host -> (monotonic time to heal, wall time of the cut)
    part_windows = []  # (host, wall start, wall end)
    can_cut = faults is not None and faults.partition is not None
    next_cut = t0 + rng.uniform(1.5, 3)  # while messages flow, so claims are held
    while time.time() < stop_at:
        if any(p.poll() not in (None, 0) for p in prods):
            break  # a producer failed: reported below
        live = [c for c in cons if c[1].poll() is None]
        if all(p.poll() is not None for p in prods) and not live and not cut:
            break
        time.sleep(0.3)
        for h, (heal, started) in list(cut.items()):
            if time.monotonic() >= heal:
                faults.partition(h, False)
                part_windows.append((h, started, time.time()))
                del cut[h]
        if can_cut and n_parts < partitions and not cut and live \
                and time.time() >= next_cut:
            h = rng.randrange(n_hosts)
            next_cut = time.time() + 3 * lease + rng.uniform(0, 3)
            faults.partition(h, True)
            cut[h] = (time.monotonic() + 2 * lease, time.time())
            n_parts += 1
        if host_kill_left and time.time() >= next_host_kill:
            # A whole host while its producer runs: the producer is killed mid-stream
            up = [h for h in range(n_hosts) if h not in cut and prods[h].poll() is None]
            if up:
                kill_host(rng.choice(up), live)
                host_kill_left -= 1
                next_host_kill = time.time() + rng.uniform(1.0, 3.0)
                continue
        if live and rng.random() < 0.1 and n_kills < kills:
            if rng.random() < 0.3:  # a whole host: all its consumers and its producer
                kill_host(rng.randrange(n_hosts), live)
            else:
                kill([c for c in [rng.choice(live)] if c[0] not in cut], None)
    for h, (_, started) in cut.items():
        faults.partition(h, False)
        part_windows.append((h, started, time.time()))
    for p in prods:
        if p.poll() is None or p.returncode != 0:
            raise RuntimeError(f"producer {p.pid} did not finish cleanly (rc={p.poll()})")
    for _, p, _ in cons:
        if p.poll() is None:
            raise RuntimeError(f"consumer {p.pid} still running after {timeout} s")
    r = check_logs(logs, n_hosts, per_host, killed_logs, part_windows,
                   leftovers(folders[0]))
    r.update(kills=n_kills, host_kills=host_kills, producer_kills=producer_kills,
             partitions=n_parts, secs=round(time.time() - t0, 1))
    if skew:
        r["skew"] = skew
    return r


def run_config(hosts, n_hosts: int, per_host: int, consumers: int, rng, **kw) -> dict:
    """Run the workload on a set-up object with ``mounts``, ``base`` and ``spawn`` (and
    optionally ``partition(i, down)``): the sshfs :class:`Hosts` or the NFS guest's."""
    folders = [os.path.join(m, "q") for m in hosts.mounts[:n_hosts]]
    os.makedirs(folders[0], mode=0o700, exist_ok=True)
    faults = Faults(getattr(hosts, "partition", None))
    return run_workload(folders, hosts.spawn, os.path.join(hosts.base, "logs"), per_host,
                        consumers, rng, faults=faults, **kw)


def leftovers(folder: str) -> dict:
    """``{message: [where]}`` for every message still in the queue folder at the end
    (ready, ``wip/``, ``failed/``, ``tmp/``), from fresh listings."""
    from pympx_queues import _fs

    out: dict = {}
    for sub in ("", "wip", "failed", "tmp"):
        d = os.path.join(folder, sub) if sub else folder
        _fs.refresh_listing(d)
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if not n.endswith(".tsv"):
                continue
            base = re.sub(r"~[0-9a-f]{8}$", "", n.split("__", 1)[-1][:-len(".tsv")])
            out.setdefault(base, []).append(os.path.join(sub, n))
    return out


def check_logs(logs, n_hosts, per_host, killed_logs=(), part_windows=(),
               left=None) -> dict:
    """Read the consumers' logs; count every violation of G1..G6 across hosts.

    * lost: a message never acknowledged (G1).
    * corrupt: a delivery whose bytes are not what was put (G2).
    Deliveries are ordered by their claims (logged right after ``get`` returned); a claim
    fenced before the consumer read the message (taken over while its host was cut off)
    is not a delivery.
    * redelivered_done: a delivery after an acknowledgement of the same message (G4).
    * dup_beyond_lease: a second delivery although the earlier holder was neither
      killed nor on a host cut off at the time (G3 with leases).
    * early_done: a message first delivered after some consumer had seen DONE, or never
      delivered although one had (G6).
    * acked_unlogged (allowed, not a violation): a message whose ``task_done`` was under
      way (``acking`` logged) when its consumer was killed, that no log shows acknowledged
      and that is nowhere in the folder at the end (``left``: :func:`leftovers`): the
      acknowledgement reached the file server (sshfs completes a request after the
      process that made it was killed).  Without ``left`` it counts as lost.
    * producer_redo (allowed, not a violation): a second delivery of a message whose put
      was in flight when its producer was killed (``begin k`` without ``end k`` in the
      producer's log ``p-h<i>.log``); at most one per kill with that put in flight.
      Any further extra delivery of it counts as a violation above.
    """
    expected = {f"h{i}-{k:06d}" for i in range(n_hosts) for k in range(per_host)}
    gets, acked, acking = {}, {}, {}
    corrupt = fenced = 0
    corrupt_names = set()
    first_done = None
    # Puts in flight when a producer was killed: such a message may have been published
    # before the kill and again by the restarted producer (two copies, two deliveries).
    redo_allowed = {}
    for i in range(n_hosts):
        for k, n in producer_in_flight(os.path.join(logs, f"p-h{i}.log")).items():
            redo_allowed[f"h{i}-{k:06d}"] = n
    consumer_logs = sorted(fn for fn in os.listdir(logs) if fn.startswith("c"))
    for fn in consumer_logs:
        host = int(fn.rsplit("-h", 1)[1].split(".")[0]) if "-h" in fn else -1
        unread = None  # this consumer's last claim, until it reads the message
        for line in open(os.path.join(logs, fn)):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a killed consumer's torn last line
            if rec["ev"] == "got":
                if not rec["ok"]:
                    corrupt += 1
                    corrupt_names.add(rec.get("claimed", rec["name"]))
            elif rec["ev"] == "claim":
                unread = (rec["name"], (rec["t"], fn, host))
                gets.setdefault(rec["name"], []).append(unread[1])
            elif rec["ev"] == "ack":
                acked[rec["name"]] = min(acked.get(rec["name"], rec["t"]), rec["t"])
            elif rec["ev"] == "acking":
                acking.setdefault(rec["name"], set()).add(fn)
            elif rec["ev"] == "fenced":
                fenced += 1
                if unread is not None and unread[0] == rec["name"]:
                    # Fenced before it read a byte: get() returned a claim that another
                    # host had already taken over while this one was cut off (its lease
                    # expired).  Nothing was delivered; the claim is not a delivery.
                    gets[rec["name"]].remove(unread[1])
                    if not gets[rec["name"]]:
                        del gets[rec["name"]]
            if rec["ev"] in ("got", "fenced"):
                unread = None
            elif rec["ev"] == "end" and rec.get("what") == "done":
                first_done = rec["t"] if first_done is None else min(first_done, rec["t"])
    killed = {os.path.basename(k) for k in killed_logs}
    redelivered_done = dup = early = redo = 0
    bad = set()
    for name, gl in gets.items():
        gl.sort()
        allowed = redo_allowed.get(name, 0)  # one extra copy per kill with it in flight
        for k, (t, _fn, _host) in enumerate(gl):
            if name in acked and acked[name] < t:
                kind = "redelivered_done"
            elif k:
                _, pfn, phost = gl[k - 1]
                cut_off = any(h == phost and s <= t for h, s, _ in part_windows)
                if pfn in killed or cut_off:
                    continue
                kind = "dup"
            else:
                continue
            if allowed:
                allowed -= 1
                redo += 1  # the second copy of a put in flight at a producer kill
            elif kind == "dup":
                dup += 1
                bad.add(name)
            else:
                redelivered_done += 1
                bad.add(name)
        if first_done is not None and gl[0][0] > first_done:
            early += 1
            bad.add(name)
    unlogged = set()
    if left is not None:
        killed_acks = {n for n, fns in acking.items() if fns & killed}
        unlogged = (expected - set(acked)) & killed_acks - set(left)
    lost_names = expected - set(acked) - unlogged
    lost = len(lost_names)
    bad |= lost_names
    for name in sorted(lost_names):
        if left and name in left:
            print(f"  lost {name}: still in the folder as {left[name]}", file=sys.stderr)
    bad |= corrupt_names
    if first_done is not None:
        early += len(expected - set(gets))
    if bad:  # the story of each message involved, for the report
        for fn in consumer_logs:
            for line in open(os.path.join(logs, fn)):
                if any(f'"{n}"' in line for n in bad) or '"end"' in line:
                    print(f"  {fn}{' (killed)' if fn in killed else ''}: {line.strip()}",
                          file=sys.stderr)
    return dict(hosts=n_hosts, messages=len(expected),
                acked=len((set(acked) | unlogged) & expected),
                lost=lost, corrupt=corrupt, redelivered_done=redelivered_done,
                dup_beyond_lease=dup, early_done=early, fenced=fenced, producer_redo=redo,
                acked_unlogged=len(unlogged))


def _local_spawn(i: int, argv: list) -> subprocess.Popen:
    """``workload`` mode: host ``i`` is a process with its own UTS host name where
    ``unshare`` is permitted (root), else just a process (same host name)."""
    cmd = [sys.executable, os.path.abspath(__file__)] + argv
    if os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname host{i} && exec "$@"', "sh"] + cmd
    return subprocess.Popen(cmd, start_new_session=True)


def _summary(r: dict, seed: int, extra: str = "") -> str:
    return "mode=hosts " + extra + " ".join(f"{k}={v}" for k, v in r.items()) + f" seed={seed}"


VIOLATIONS = ("lost", "corrupt", "redelivered_done", "dup_beyond_lease", "early_done")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("producer", "consumer"):
        skew_clock(float(sys.argv[-1]))  # before pympx_queues is imported
        if sys.argv[1] == "producer":
            producer(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]),
                     sys.argv[6], sys.argv[7], float(sys.argv[8]))
        else:
            consumer(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]),
                     float(sys.argv[6]), sys.argv[7], float(sys.argv[8]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1, help="scale: messages per host = 100 * size")
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--consumers", type=int, default=2, help="consumers per host")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--lease", type=float, default=LEASE, help="lease_timeout in seconds")
    ap.add_argument("--kills", type=int, default=6, help="consumer SIGKILLs per configuration")
    ap.add_argument("--work", type=float, default=0.05, help="seconds of work per message")
    ap.add_argument("--partitions", type=int, default=1,
                    help="hosts cut off (veth link down for two leases) per configuration")
    ap.add_argument("--host-kills", type=int, default=1,
                    help="whole hosts (consumers and producer) killed while their producer "
                    "runs, besides the random kills")
    ap.add_argument("--pace", type=float, default=None,
                    help="seconds between a producer's puts (default work / consumers)")
    ap.add_argument("--skew", type=float, default=0.0,
                    help="seconds added to the wall clock (time.time) of host 0's workers; "
                    "leases must still hold (they are measured on the file server's clock)")
    ap.add_argument("--folders", nargs="+", default=None,
                    help="workload only: run it on these folders, one per host (mounts of "
                    "one shared folder made by someone else, e.g. NFS), no set-up")
    import _nfs_guest  # the --nfs options: real NFS in a QEMU guest

    _nfs_guest.add_arguments(ap)
    a = ap.parse_args()
    if a.nfs:
        return _nfs_guest.main_nfs(a)
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    if a.folders:
        logs = tempfile.mkdtemp(prefix="pympx-hosts-logs-")
        try:
            r = run_workload(a.folders, _local_spawn, logs, 100 * a.size, a.consumers, rng,
                             lease=a.lease, kills=a.kills, partitions=0, work=a.work,
                             skew=a.skew, host_kills_min=a.host_kills, pace=a.pace)
        finally:
            shutil.rmtree(logs, ignore_errors=True)
        print(_summary(r, seed, "fs=given "), flush=True)
        return 1 if any(r[k] for k in VIOLATIONS) else 0
    missing = [t for t in ("sshfs", "ip", "nsenter", "unshare") if not shutil.which(t)]
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        missing.append("fusermount")
    if missing or not os.path.exists(SFTP_SERVER):
        print(f"mode=hosts skipped: missing {missing or [SFTP_SERVER]} "
              "(apt-get install sshfs openssh-sftp-server iproute2)")
        return 2
    if os.geteuid() != 0:
        print("mode=hosts skipped: needs root (network namespaces)")
        return 2
    if not os.path.exists("/dev/fuse"):
        print("mode=hosts skipped: no /dev/fuse (FUSE not permitted)")
        return 2
    bad = False
    for n in a.hosts:
        base = tempfile.mkdtemp(prefix="pympx-hosts-")
        hosts = Hosts(n, base)
        try:
            try:
                hosts.start()
            except subprocess.CalledProcessError as e:
                print(f"mode=hosts skipped: set-up failed ({' '.join(e.cmd)}: "
                      f"{(e.stderr or '').strip()})")
                return 2
            r = run_config(hosts, n, 100 * a.size, a.consumers, rng, lease=a.lease,
                           kills=a.kills, partitions=a.partitions, work=a.work,
                           skew=a.skew, host_kills_min=a.host_kills, pace=a.pace)
        finally:
            hosts.close()
            shutil.rmtree(base, ignore_errors=True)
        print(_summary(r, seed, "fs=sshfs "), flush=True)
        if any(r[k] for k in VIOLATIONS):
            bad = True
    return 1 if bad else 0


def _term(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _term)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
