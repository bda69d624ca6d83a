"""``scripts/hosts.py --nfs``: the several-hosts workload over real NFS, in a QEMU guest.

The machine running this has no NFS client or server in its kernel, so the script boots
Debian bookworm's own 6.1 kernel in QEMU (software emulation, ``-accel tcg``) and does the
NFS part in there:

* **Host side** (``main_nfs``): downloads ``linux-image-6.1.0-*-amd64`` and
  ``busybox-static`` with ``apt-get download`` into a cache folder (default
  ``/var/cache/pympx-nfs-guest``, or ``$PYMPX_NFS_CACHE``), unpacks them with
  ``dpkg-deb -x``, runs ``depmod`` on the unpacked modules and writes a small initramfs
  (busybox, the virtio and 9p modules, an ``/init`` shell script).  It then boots QEMU with
  the host's root file system shared read-only into the guest over 9p
  (``-virtfs local,path=/,...,readonly=on``), reads the serial console and prints the
  guest's result lines.  No guest disk image is built: the guest runs the host's
  ``python3``, this worktree's ``.venv`` and the host's ``nfs-kernel-server``/``nfs-common``
  binaries (installed on the host with apt, never started there).
* **Guest side** (``guest_main``, run by the initramfs as
  ``chroot /hostroot .venv/bin/python scripts/_nfs_guest.py --guest JOB``): loads the
  NFS modules, puts tmpfs on the writable folders, starts ``rpcbind``, ``rpc.statd``,
  ``rpc.nfsd`` and ``rpc.mountd``, and for every configuration (NFS version x mount
  options) exports a tmpfs folder, builds N "hosts" as network namespaces with a veth pair
  and their own UTS host name, mounts the export once per host from inside its namespace
  (separate NFS clients, separate caches), records NFS facts with a probe, and runs
  ``hosts.run_config`` (the same producers, consumers and kills as the sshfs set-up) with
  the NFS mounts as the hosts' folders.  It prints one ``PQNFS {json}`` line per result and
  powers off.

Every wait has a deadline: the host kills QEMU (by pid) when the guest does not finish in
time and says how far it got.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import gzip
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKTREE = os.path.dirname(HERE)
DEFAULT_CACHE = os.environ.get("PYMPX_NFS_CACHE", "/var/cache/pympx-nfs-guest")
MARK = "PQNFS "
# Modules the initramfs loads before the host's root is reachable (9p over virtio-pci).
EARLY = ["virtio_pci", "9pnet_virtio", "9p"]
# Modules the guest loads from the unpacked package once the host's root is mounted.
LATE = ["sunrpc", "nfsd", "nfsv3", "nfsv4", "veth"]
# Binaries the guest runs from the host's root (installed on the host, never run there).
GUEST_TOOLS = {
    "rpcbind": "rpcbind", "rpc.statd": "nfs-common", "mount.nfs": "nfs-common",
    "rpc.nfsd": "nfs-kernel-server", "rpc.mountd": "nfs-kernel-server",
    "exportfs": "nfs-kernel-server", "ip": "iproute2", "nsenter": "util-linux",
    "unshare": "util-linux", "insmod": "kmod", "rpcinfo": "rpcbind",
}
HOST_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "depmod": "kmod", "apt-get": "apt",
              "apt-cache": "apt", "dpkg-deb": "dpkg"}
APT_HINT = ("apt-get install qemu-system-x86 nfs-kernel-server nfs-common rpcbind "
            "iproute2 kmod")
SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _which(tool: str):
    return shutil.which(tool, path=SBIN)


# ====================================================================== host side
def missing_tools() -> list:
    """Debian packages to install before ``--nfs`` can run (empty when all is there)."""
    need = {**HOST_TOOLS, **GUEST_TOOLS}
    return sorted({pkg for tool, pkg in need.items() if not _which(tool)})


def ready_info(cache: str = DEFAULT_CACHE):
    """The prepared cache's description, or None when ``prepare`` has not run there."""
    try:
        with open(os.path.join(cache, "ready.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if all(os.path.exists(info[k]) for k in ("kernel", "initrd")):
        return info
    return None


def _sh(cmd, **kw):
    kw.setdefault("timeout", 600)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _kernel_package() -> str:
    """The bookworm kernel package ``linux-image-amd64`` points at (linux-image-6.1...)."""
    out = _sh(["apt-cache", "depends", "linux-image-amd64"]).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            name = line.split()[1]
            if name.startswith("linux-image-6.1."):
                return name
            raise RuntimeError(f"linux-image-amd64 points at {name}, not a 6.1 (bookworm) "
                               "kernel; run on Debian bookworm")
    raise RuntimeError("apt-cache knows no linux-image-amd64 (run apt-get update)")


def _download(pkg: str, debs: str) -> str:
    for fn in os.listdir(debs):
        if fn.startswith(pkg + "_") and fn.endswith(".deb"):
            return os.path.join(debs, fn)
    _sh(["apt-get", "download", pkg], cwd=debs)
    for fn in os.listdir(debs):
        if fn.startswith(pkg + "_") and fn.endswith(".deb"):
            return os.path.join(debs, fn)
    raise RuntimeError(f"apt-get download {pkg} left no .deb in {debs}")


def _cpio_newc(entries) -> bytes:
    """A newc cpio archive from (name, mode, data) entries (data None for a folder)."""
    out, ino = [], 1
    for name, mode, data in entries:
        nlink = 2 if data is None else 1
        data = data or b""
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out.append(head + b"\0" * (-len(head) % 4))
        out.append(data + b"\0" * (-len(data) % 4))
        ino += 1
    trailer = b"070701" + b"".join(b"%08X" % f for f in [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0])
    trailer += b"TRAILER!!!\0"
    out.append(trailer + b"\0" * (-len(trailer) % 4))
    return b"".join(out)


_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "PQNFS-STAGE initramfs $(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/early/order); do insmod /lib/early/$m || echo "PQNFS-STAGE insmod $m failed"; done
for x in $(cat /proc/cmdline); do
  case $x in pqjob=*) JOB=${x#pqjob=};; pqpy=*) PY=${x#pqpy=};; pqscript=*) SCRIPT=${x#pqscript=};; esac
done
R=/newroot
ok=
for i in 1 2 3 4 5 6 7 8 9 10; do
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot $R; then ok=1; break; fi
  sleep 0.5
done
if [ -z "$ok" ]; then echo "PQNFS-FATAL cannot mount the host root over 9p"; poweroff -f; fi
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t devpts devpts $R/dev/pts
for d in tmp run var/tmp var/lib/nfs; do mount -t tmpfs -o mode=0755 tmp $R/$d; done
chmod 1777 $R/tmp $R/var/tmp
echo "PQNFS-STAGE userspace $(cut -d' ' -f1 /proc/uptime)"
chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp LANG=C.UTF-8 PYTHONUNBUFFERED=1 $PY $SCRIPT --guest $JOB
echo "PQNFS-EXIT $?"
sync
poweroff -f
"""


def prepare(cache: str = DEFAULT_CACHE, log=print) -> dict:
    """Download and unpack the kernel and busybox, build the initramfs (once per cache)."""
    info = ready_info(cache)
    if info:
        return info
    debs, root = os.path.join(cache, "debs"), os.path.join(cache, "root")
    os.makedirs(debs, exist_ok=True)
    kpkg = _kernel_package()
    kver = kpkg[len("linux-image-"):]
    for pkg in (kpkg, "busybox-static"):
        log(f"nfs guest: apt-get download {pkg} into {debs}")
        deb = _download(pkg, debs)
        log(f"nfs guest: dpkg-deb -x {os.path.basename(deb)} {root}")
        _sh(["dpkg-deb", "-x", deb, root])
    _sh(["depmod", "-b", root, kver])
    moddir = os.path.join(root, "lib", "modules", kver)

    def depends(mods):
        paths = []
        for m in mods:
            out = _sh(["modprobe", "-d", root, "-S", kver, "--show-depends", m]).stdout
            for line in out.splitlines():
                parts = line.split()
                if parts and parts[0] == "insmod" and parts[1] not in paths:
                    paths.append(parts[1])
        return paths

    early = depends(EARLY)
    late = [p for p in depends(LATE) if p not in early]
    busybox = os.path.join(root, "bin", "busybox")
    entries = [(d, 0o040755, None) for d in ("bin", "lib", "lib/early", "proc", "sys", "dev",
                                             "newroot")]
    with open(busybox, "rb") as f:
        entries.append(("bin/busybox", 0o100755, f.read()))
    entries.append(("init", 0o100755, _INIT.encode()))
    names = []
    for p in early:
        with open(p, "rb") as f:
            entries.append(("lib/early/" + os.path.basename(p), 0o100644, f.read()))
        names.append(os.path.basename(p))
    entries.append(("lib/early/order", 0o100644, ("\n".join(names) + "\n").encode()))
    initrd = os.path.join(cache, "initrd.gz")
    with gzip.open(initrd + ".tmp", "wb", compresslevel=6) as f:
        f.write(_cpio_newc(entries))
    os.replace(initrd + ".tmp", initrd)
    info = dict(kver=kver, package=kpkg, kernel=os.path.join(root, "boot", f"vmlinuz-{kver}"),
                initrd=initrd, modules=late, moddir=moddir)
    with open(os.path.join(cache, "ready.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(cache, "ready.json.tmp"), os.path.join(cache, "ready.json"))
    return info


def run_guest(job: dict, cache: str = DEFAULT_CACHE, timeout: float = 900.0,
              echo=None, memory_mb: int = 2048, cpus: int = 2) -> dict:
    """Boot the guest on ``job``; returns {"results": [...], "exit": rc, "log": path, ...}.

    ``echo(line)`` sees every console line as it arrives.  On timeout QEMU is killed (by
    pid) and ``timed_out`` is True; the console log stays in the cache folder.
    """
    info = prepare(cache)
    jobs = os.path.join(cache, "jobs")
    os.makedirs(jobs, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    # PQNFS_WORKTREE: run another checkout's scripts/hosts.py and pympx_queues in the
    # guest (to try a branch's workload before merging); this worktree's venv is used.
    job = dict(job, modules=info["modules"],
               worktree=os.path.abspath(os.environ.get("PQNFS_WORKTREE", WORKTREE)))
    job_path = os.path.join(jobs, f"job-{stamp}.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    log_path = os.path.join(jobs, f"console-{stamp}.log")
    py = os.path.join(WORKTREE, ".venv", "bin", "python")
    if not os.path.exists(py):
        py = sys.executable
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
           "-m", str(memory_mb), "-smp", str(cpus), "-nodefaults", "-display", "none",
           "-serial", "stdio", "-monitor", "none", "-no-reboot",
           "-kernel", info["kernel"], "-initrd", info["initrd"],
           "-append", (f"console=ttyS0 quiet loglevel=4 panic=-1 pqjob={job_path} "
                       f"pqpy={py} pqscript={os.path.abspath(__file__)}"),
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                      "multidevs=remap"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines, results, stages = [], [], {}
    state = {"exit": None}

    def reader():
        with open(log_path, "w") as logf:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                logf.write(line + "\n")
                logf.flush()
                lines.append(line)
                if line.startswith(MARK):
                    try:
                        results.append(json.loads(line[len(MARK):]))
                    except ValueError:
                        pass
                elif line.startswith("PQNFS-STAGE "):
                    stages[line.split()[1]] = round(time.monotonic() - t0, 1)
                elif line.startswith("PQNFS-EXIT "):
                    state["exit"] = int(line.split()[1])
                if echo:
                    echo(line)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise
    th.join(timeout=10)
    return dict(results=results, exit=state["exit"], timed_out=timed_out, log=log_path,
                secs=round(time.monotonic() - t0, 1), stages=stages, tail=lines[-25:],
                qemu_rc=proc.returncode)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``--nfs`` options of scripts/hosts.py."""
    g = ap.add_argument_group("--nfs (real NFS in a QEMU guest, scripts/_nfs_guest.py)")
    g.add_argument("--nfs", action="store_true",
                   help="run the workload over real NFS inside a QEMU guest (slow)")
    g.add_argument("--nfs-vers", nargs="+", default=["3", "4.2"], metavar="V",
                   help="NFS versions (default: 3 4.2)")
    g.add_argument("--nfs-opts", nargs="+", default=["default", "actimeo=0"], metavar="O",
                   help="mount options per configuration, 'default' for none "
                        "(default: default actimeo=0)")
    g.add_argument("--nfs-cache", default=DEFAULT_CACHE,
                   help=f"download and build folder (default {DEFAULT_CACHE})")
    g.add_argument("--nfs-timeout", type=float, default=None,
                   help="seconds before the guest is killed (default: from the sizes)")
    g.add_argument("--nfs-no-probe", action="store_true", help="skip the NFS facts probe")
    g.add_argument("--nfs-no-workload", action="store_true",
                   help="only boot, mount and probe")
    g.add_argument("--nfs-verbose", action="store_true", help="echo the guest's console")


VIOLATIONS = ("lost", "corrupt", "redelivered_done", "dup_beyond_lease", "early_done")


def main_nfs(a) -> int:
    """Entry point of ``hosts.py --nfs``; prints ``mode=hosts fs=nfs...`` lines."""
    miss = missing_tools()
    if miss:
        print(f"mode=hosts fs=nfs skipped: missing packages {miss} ({APT_HINT})")
        return 2
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    configs = [dict(vers=v, opts="" if o == "default" else o)
               for v in a.nfs_vers for o in a.nfs_opts]
    job = dict(rpcdebug=os.environ.get("PQNFS_RPCDEBUG", ""), configs=configs, hosts=a.hosts, size=a.size, consumers=a.consumers, seed=seed, skew=getattr(a, "skew", 0.0),
               probe=not a.nfs_no_probe, workload=not a.nfs_no_workload)
    timeout = a.nfs_timeout or (180 + len(configs) * (
        (120 if job["probe"] else 0) + (len(a.hosts) * (120 + 120 * a.size)
                                        if job["workload"] else 20)))
    t0 = time.monotonic()
    try:
        info = prepare(a.nfs_cache)
    except (subprocess.SubprocessError, OSError, RuntimeError) as e:
        err = getattr(e, "stderr", "") or ""
        print(f"mode=hosts fs=nfs error: preparing the guest failed: {e} {err.strip()}")
        return 2
    prep = time.monotonic() - t0
    print(f"nfs guest: kernel {info['package']} (cache {a.nfs_cache}, ready in {prep:.1f}s); "
          f"booting QEMU (tcg), timeout {timeout:.0f}s", flush=True)

    def echo(line):
        if a.nfs_verbose:
            print("  guest| " + line, flush=True)

    r = run_guest(job, a.nfs_cache, timeout=timeout, echo=echo)
    bad = False
    seen_workload = 0
    for res in r["results"]:
        kind = res.pop("kind", "")
        if kind == "hosts":
            seen_workload += 1
            print("mode=hosts " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
            if any(res.get(k) for k in VIOLATIONS) or res.get("error"):
                bad = True
        elif kind == "probe":
            print("nfs probe " + json.dumps(res, sort_keys=True), flush=True)
        elif kind == "boot":
            print("nfs guest: " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
        elif kind == "error":
            print("nfs guest error: " + json.dumps(res), flush=True)
            bad = True
        else:
            print(f"nfs guest {kind}: " + json.dumps(res), flush=True)
    print(f"nfs guest: stages (s after QEMU start) {r['stages']}, total {r['secs']}s, "
          f"console log {r['log']}", flush=True)
    expected = len(configs) * len(a.hosts) if job["workload"] else 0
    if r["timed_out"]:
        print(f"mode=hosts fs=nfs error: the guest did not finish within {timeout:.0f}s "
              f"(killed). Last console lines:\n    " + "\n    ".join(r["tail"]), flush=True)
        return 1
    if r["exit"] != 0 or seen_workload < expected:
        print(f"mode=hosts fs=nfs error: guest program exit={r['exit']} with "
              f"{seen_workload}/{expected} workload results. Last console lines:\n    "
              + "\n    ".join(r["tail"]), flush=True)
        return 1
    return 1 if bad else 0


# ===================================================================== guest side
def _emit(kind: str, **rec) -> None:
    rec = {"kind": kind, **rec}
    sys.stdout.write(MARK + json.dumps(rec) + "\n")
    sys.stdout.flush()


def _step(msg: str) -> None:
    """A progress line on the console (the host shows the last ones when it times out)."""
    sys.stdout.write(f"PQNFS-STEP {_uptime():.1f} {msg}\n")
    sys.stdout.flush()


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _g(cmd, check=True, timeout=60):
    _step("$ " + " ".join(cmd)[:160])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


def guest_server(job: dict) -> None:
    """Modules, /proc/fs/nfsd, rpcbind, statd, nfsd (short grace), mountd."""
    for path in job["modules"]:
        r = _g(["insmod", path], check=False)
        if r.returncode != 0 and "File exists" not in r.stderr:
            raise RuntimeError(f"insmod {path}: {r.stderr.strip()}")
    _g(["ip", "link", "set", "lo", "up"])
    _g(["mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd"])
    os.makedirs("/var/lib/nfs/sm", exist_ok=True)
    os.makedirs("/var/lib/nfs/sm.bak", exist_ok=True)
    os.makedirs("/var/lib/nfs/v4recovery", exist_ok=True)
    for fn in ("etab", "rmtab"):
        open(os.path.join("/var/lib/nfs", fn), "a").close()
    os.makedirs("/run/rpcbind", exist_ok=True)
    _g(["rpcbind", "-w"])
    _g(["rpc.statd", "--no-notify"])
    _g(["rpc.nfsd", "--lease-time", "10", "--grace-time", "10", "8"])
    _g(["rpc.mountd"])
    # The kernel registers a network namespace's lockd with rpcbind through the AF_LOCAL
    # socket /run/rpcbind.sock, found by path, not per namespace: a client's lockd in a
    # host namespace would overwrite the server's nlockmgr port in this rpcbind and every
    # NFSv3 lock would hang.  Without the socket file the kernel (and libtirpc) fall back
    # to 127.0.0.1 of the caller's own namespace, where each host runs its own rpcbind.
    for sock in ("/run/rpcbind.sock",):
        if os.path.exists(sock):
            os.unlink(sock)
    # The NFSv4 pseudo root: /tmp (a tmpfs; the guest's "/" is the read-only 9p share,
    # which knfsd cannot export).  Every configuration exports a folder below it.
    _g(["exportfs", "-o", "rw,sync,no_root_squash,no_subtree_check,insecure,fsid=0",
        f"*:{V4ROOT}"])
    job["_grace_until"] = time.monotonic() + 11
    for mod in filter(None, job.get("rpcdebug", "").split(",")):  # e.g. PQNFS_RPCDEBUG=nlm
        _g(["rpcdebug", "-m", mod, "-s", "all"], check=False)


_STATD = ("mount -t tmpfs t /run && mount -t tmpfs t /var/lib/nfs && "
          "mkdir -p /run/rpcbind /var/lib/nfs/sm /var/lib/nfs/sm.bak && "
          "rpcbind -f & "
          "until rpcinfo -p 127.0.0.1 >/dev/null 2>&1; do sleep 0.1; done; "
          "rpc.statd -F --no-notify & wait")


V4ROOT = "/tmp"


class _Nfs:
    """Builds N hosts (namespace, veth, own host name, own NFS mount) for one config."""

    def __init__(self, n: int, base: str, vers: str, opts: str, fsid: int) -> None:
        import hosts  # scripts/hosts.py: the workload

        self.hosts_mod = hosts
        self.n, self.base, self.vers, self.opts, self.fsid = n, base, vers, opts, fsid
        self.export = os.path.join(base, "export")
        os.makedirs(self.export, mode=0o700)
        self.tag = f"nfs{fsid}"
        self.netns, self.links, self.mounts, self.procs = [], [], [], []

    def start(self) -> None:
        _g(["exportfs", "-o", f"rw,sync,no_root_squash,no_subtree_check,insecure,fsid={self.fsid}",
            f"*:{self.export}"])
        opts = ",".join(x for x in (f"vers={self.vers}", self.opts) if x)
        for i in range(self.n):
            ns, veth = f"{self.tag}h{i}", f"{self.tag}v{i}"
            net = f"10.{100 + self.fsid}.{i}"
            _g(["ip", "netns", "add", ns])
            self.netns.append(ns)
            _g(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "n"])
            self.links.append(veth)
            _g(["ip", "link", "set", veth + "n", "netns", ns])
            _g(["ip", "addr", "add", f"{net}.1/24", "dev", veth])
            _g(["ip", "link", "set", veth, "up"])
            nse = ["ip", "netns", "exec", ns]
            _g(nse + ["ip", "addr", "add", f"{net}.2/24", "dev", veth + "n"])
            _g(nse + ["ip", "link", "set", veth + "n", "up"])
            _g(nse + ["ip", "link", "set", "lo", "up"])
            # NFSv3 locking: the client's lockd asks rpc.statd on 127.0.0.1 of its own
            # network namespace, so every host gets its own rpcbind and statd (in a private
            # mount namespace with its own /run and /var/lib/nfs), ended by process group.
            self.procs.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--propagation",
                 "private", "sh", "-c", _STATD], start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if not _wait_until(lambda ns=ns: "status" in _g(
                    ["ip", "netns", "exec", ns, "rpcinfo", "-p", "127.0.0.1"],
                    check=False).stdout, 30, 0.2):
                raise RuntimeError(f"rpc.statd did not register in namespace {ns} in 30 s")
            mnt = os.path.join(self.base, f"mnt{i}")
            os.makedirs(mnt)
            # The mount is made in the guest's one mount namespace, by a process in host
            # i's network namespace with host i's name: its own NFS client (v4 client id).
            _g(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "sh", "-c",
                f'hostname host{i} && exec mount -t nfs -o "$1" "$2" "$3"', "sh",
                opts, f"{net}.1:{self.remote_path()}", mnt], timeout=120)
            self.mounts.append(mnt)

    def remote_path(self) -> str:
        if self.vers.startswith("4"):  # relative to the v4 pseudo root (fsid=0)
            return "/" + os.path.relpath(self.export, V4ROOT)
        return self.export

    def spawn(self, i: int, args: list) -> subprocess.Popen:
        cmd = ["nsenter", f"--net=/run/netns/{self.netns[i]}", "unshare", "--uts", "sh", "-c",
               f'hostname host{i} && exec "$@"', "sh", sys.executable,
               self.hosts_mod.__file__] + args
        p = subprocess.Popen(cmd, start_new_session=True)
        self.procs.append(p)
        return p

    def partition(self, i: int, down: bool) -> None:
        """Cut host ``i`` off the file server (its veth link down), or heal it (used by
        hosts.py's workload where it partitions hosts)."""
        _g(["ip", "link", "set", self.links[i], "down" if down else "up"])

    def close(self) -> None:
        self.hosts_mod.end_processes(self.procs)
        for m in self.mounts:
            _g(["umount", "-f", "-l", m], check=False)
        for link in self.links:
            _g(["ip", "link", "del", link], check=False)
        for ns in self.netns:
            _g(["ip", "netns", "del", ns], check=False)
        _g(["exportfs", "-u", f"*:{self.export}"], check=False)


# ------------------------------------------------------------------------- the probe
def _wait_until(cond, limit: float, step: float = 0.05):
    """Seconds until ``cond()`` is true, or None after ``limit`` seconds."""
    t0 = time.monotonic()
    while True:
        if cond():
            return round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > limit:
            return None
        time.sleep(step)


def _errname(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _lock_check(kind: str, path_a: str, path_b: str, limit: float):
    """True when a lock held through ``path_a`` stops a try through ``path_b``; False
    when both get it; else what went wrong ("hang > Ns", an errno name)."""
    lock = fcntl.flock if kind == "flock" else fcntl.lockf
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # holder (through a), then the other host's try in a grandchild
        os.close(r)
        code = 3
        try:
            fa = open(path_a, "r+")
            lock(fa, fcntl.LOCK_EX | fcntl.LOCK_NB)
            gpid = os.fork()
            if gpid == 0:
                try:
                    lock(open(path_b, "r+"), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os._exit(0)
                except OSError as e:
                    os._exit(100 + e.errno)
            code = os.waitstatus_to_exitcode(os.waitpid(gpid, 0)[1])
        except OSError as e:
            code = 100 + e.errno
        finally:
            os.write(w, b"%d\n" % code)
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], limit)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.close(r)
        os.waitpid(pid, 0)
        return f"hang > {limit:.0f}s"
    code = int(os.read(r, 16) or b"3")
    os.close(r)
    os.waitpid(pid, 0)
    if code == 0:
        return False
    if code in (100 + errno.EAGAIN, 100 + errno.EACCES):
        return True
    return f"error {errno.errorcode.get(code - 100, code)}"


def probe(a: str, b: str, limit: float = 65.0) -> dict:
    """NFS facts between two mounts ``a`` and ``b`` of one export (two clients)."""
    from pympx_queues import _fs

    facts = {}
    da, db = os.path.join(a, "probe"), os.path.join(b, "probe")
    os.mkdir(da)
    _wait_until(lambda: os.path.isdir(db), limit)
    facts["network_fs_kind"] = _fs.network_fs_kind(a)
    facts["statfs_type"] = hex(_fs.statfs_type(a) or 0)

    _step("probe: rename race")
    # rename race: both clients rename the same name at once; count winners and errors.
    winners, loser_errs = [], {}
    for k in range(10):
        name = f"r{k}"
        with open(os.path.join(da, name), "w") as f:
            f.write("x")
        _wait_until(lambda n=name: os.path.exists(os.path.join(db, n)), limit)
        r, w = os.pipe()
        pids = []
        for side, d in (("a", da), ("b", db)):
            pid = os.fork()
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                try:
                    os.rename(os.path.join(d, name), os.path.join(d, f"{name}.{side}"))
                    os._exit(0)
                except OSError as e:
                    os._exit(100 + e.errno)
            pids.append(pid)
        os.close(r)
        time.sleep(0.05)
        os.write(w, b"go")
        os.close(w)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        winners.append(sum(1 for c in codes if c == 0))
        for c in codes:
            if c >= 100:
                n = errno.errorcode.get(c - 100, str(c - 100))
                loser_errs[n] = loser_errs.get(n, 0) + 1
    facts["rename_race_winners"] = sorted(set(winners))
    facts["rename_race_loser_errors"] = loser_errs

    _step("probe: link() and O_EXCL")
    # link() and O_EXCL create losers.
    for side, d in (("a", da), ("b", db)):
        with open(os.path.join(d, f"t.{side}"), "w") as f:
            f.write(side)
    _wait_until(lambda: os.path.exists(os.path.join(db, "t.a")), limit)
    os.link(os.path.join(da, "t.a"), os.path.join(da, "l"))
    facts["link_loser"] = _errname(lambda: os.link(os.path.join(db, "t.b"), os.path.join(db, "l")))
    os.close(os.open(os.path.join(da, "e"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    facts["o_excl_loser"] = _errname(
        lambda: os.close(os.open(os.path.join(db, "e"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)))

    _step("probe: renameat2(RENAME_NOREPLACE)")
    # renameat2(RENAME_NOREPLACE)
    libc = ctypes.CDLL(None, use_errno=True)

    def noreplace():
        rc = libc.syscall(316, -100, os.path.join(da, "t.a").encode(), -100,
                          os.path.join(da, "nr").encode(), 1)
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    facts["rename_noreplace"] = _errname(noreplace)

    _step("probe: locks across mounts")
    # locks across mounts: mount a holds, a child on mount b tries without waiting.  The
    # whole check runs in a child with a deadline (an NLM request can hang for minutes).
    for kind in ("flock", "lockf"):
        facts[f"{kind}_coherent"] = _lock_check(kind, os.path.join(da, "t.a"),
                                                os.path.join(db, "t.a"), 20.0)

    _step("probe: Visibility delays")
    # Visibility delays with this mount's caching.
    os.listdir(db)
    os.stat(db)
    _errname(lambda: os.stat(os.path.join(db, "neg")))  # a negative lookup on b
    with open(os.path.join(da, "neg"), "w") as f:
        f.write("n")
    facts["stat_after_negative_lookup_s"] = _wait_until(
        lambda: os.path.exists(os.path.join(db, "neg")), limit)
    with open(os.path.join(da, "fresh"), "w") as f:
        f.write("n")
    facts["listing_shows_new_file_s"] = _wait_until(
        lambda: "fresh" in os.listdir(db), limit)
    os.listdir(db)
    os.unlink(os.path.join(da, "fresh"))
    facts["listing_drops_deleted_file_s"] = _wait_until(
        lambda: "fresh" not in os.listdir(db), limit)

    _step("probe: A file held open")
    # A file held open on b while a deletes it.
    with open(os.path.join(da, "big"), "wb") as f:
        f.write(os.urandom(1 << 20))
    _wait_until(lambda: os.path.exists(os.path.join(db, "big")), limit)
    fd = os.open(os.path.join(db, "big"), os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    os.unlink(os.path.join(da, "big"))
    time.sleep(0.2)
    buf = ctypes.create_string_buffer(8192)
    aligned = ctypes.addressof(buf) + (-ctypes.addressof(buf) % 4096)

    def read_held():
        n = libc.pread(fd, ctypes.c_void_p(aligned), 4096, ctypes.c_long(512 * 1024))
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    facts["read_of_open_file_deleted_by_other"] = _errname(read_held)
    facts["fstat_of_open_file_deleted_by_other"] = _errname(lambda: os.fstat(fd))
    os.close(fd)
    shutil.rmtree(da, ignore_errors=True)
    return facts


def _lock_debug(nh: "_Nfs") -> dict:
    """What the RPC side looks like when an NFS lock hangs (for the docs and a bug hunt)."""
    out = {"dmesg": _g(["dmesg"], check=False).stdout.splitlines()[-60:],
           "rpcinfo_server": _g(["rpcinfo", "-p", "127.0.0.1"], check=False).stdout.split("\n")}
    for ns in nh.netns:
        out[f"rpcinfo_{ns}"] = _g(["ip", "netns", "exec", ns, "rpcinfo", "-p", "127.0.0.1"],
                                  check=False).stdout.split("\n")
    return out


def _workload(nh: "_Nfs", n: int, job: dict, rng) -> dict:
    hosts = nh.hosts_mod
    stop = threading.Event()

    def progress():  # one console line every 30 s: how far the workload has got
        q, logs = os.path.join(nh.export, "q"), os.path.join(nh.base, "logs")
        while not stop.wait(30):
            try:
                ready = sum(1 for e in os.scandir(q) if e.name.endswith(".tsv"))
                wip = len(os.listdir(os.path.join(q, "wip")))
                acks = ends = 0
                for fn in os.listdir(logs):
                    with open(os.path.join(logs, fn), "rb") as f:
                        text = f.read()
                    acks += text.count(b'"ack"')
                    ends += text.count(b'"end"')
                _step(f"workload: ready={ready} wip={wip} acks={acks} ends={ends} "
                      f"processes={sum(1 for p in nh.procs if p.poll() is None)}")
            except OSError as e:
                _step(f"workload: progress unknown ({e})")

    th = threading.Thread(target=progress, daemon=True)
    th.start()
    try:
        return hosts.run_config(nh, n, 100 * job["size"], job["consumers"], rng,
                                skew=job.get("skew", 0.0))
    finally:
        stop.set()


def guest_main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    tree = job.get("worktree", WORKTREE)
    sys.path[:0] = [os.path.join(tree, "scripts"), tree]
    os.environ["PYTHONPATH"] = tree  # the workers import the same pympx_queues
    import faulthandler

    faulthandler.dump_traceback_later(job.get("stack_dump_every", 120), repeat=True)
    t0 = _uptime()
    try:
        guest_server(job)
    except Exception as e:  # noqa: BLE001 - reported to the host, then power off
        _emit("error", stage="server", error=f"{type(e).__name__}: {e}")
        return 1
    with open("/proc/version") as f:
        kernel = f.read().split()[2]
    _emit("boot", kernel=kernel, nfs_server_up_s=round(_uptime(), 1),
          server_start_s=round(_uptime() - t0, 1))
    wait = job["_grace_until"] - time.monotonic()
    if wait > 0:
        time.sleep(wait)  # the NFSv4 grace period (set to 10 s) refuses new opens until over
    rng = random.Random(job["seed"])
    fsid, rc = 0, 0
    for cfg in job["configs"]:
        label = dict(fs="nfs", vers=cfg["vers"], opts=cfg["opts"] or "default")
        if job["probe"]:
            fsid += 1
            nh = _Nfs(2, f"/tmp/pq/c{fsid}", cfg["vers"], cfg["opts"], fsid)
            try:
                t = time.monotonic()
                nh.start()
                mount_s = round(time.monotonic() - t, 2)
                facts = probe(nh.mounts[0], nh.mounts[1])
                _emit("probe", **label, mount_s=mount_s, **facts)
                if any("hang" in str(v) for v in facts.values()):
                    _emit("lock-debug", **label, **_lock_debug(nh))
            except Exception as e:  # noqa: BLE001
                _emit("error", stage="probe", **label, error=f"{type(e).__name__}: {e}")
                rc = 1
            finally:
                nh.close()
        if not job["workload"]:
            continue
        for n in job["hosts"]:
            fsid += 1
            nh = _Nfs(n, f"/tmp/pq/c{fsid}", cfg["vers"], cfg["opts"], fsid)
            try:
                nh.start()
                r = _workload(nh, n, job, rng)
                _emit("hosts", **label, **r, seed=job["seed"])
            except Exception as e:  # noqa: BLE001
                _emit("hosts", **label, hosts=n, error=f"{type(e).__name__}: {e}"[:300],
                      seed=job["seed"])
                rc = 1
            finally:
                nh.close()
    return rc


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--guest":
        sys.exit(guest_main(sys.argv[2]))
    sys.exit("scripts/_nfs_guest.py is run by scripts/hosts.py --nfs (or inside the guest)")
