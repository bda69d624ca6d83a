"""A set of item keys in bounded memory: the keys a run has seen (duplicate check) and the
keys an earlier run finished (P3), as 96-bit fingerprints.

A Python ``set`` of a million short ``str`` keys costs about 85 bytes per key.  Here a key
is its fingerprint (the 64-bit ``hash()`` of the key, SipHash seeded per process, plus
its CRC-32): exact up to a fingerprint collision, a chance of about ``n**2 / 2**97`` for
``n`` keys (1e-17 for a million keys; 1e-11 for a billion).  A false positive would skip
an item, so there is no lossy filter on the answer path: a filter only saves disk reads.

Memory stays within ``budget`` bytes (:data:`DEFAULT_BUDGET`, 8 MB) whatever the number
of keys (P4):

* the newest keys sit in an open-addressing table (12 bytes a slot, at most 3/4 full);
  when it is full its fingerprints are **spilled**: sorted, written to a run file of
  12-byte big-endian records (bytes order = number order), and the table is emptied;
* a run is looked up through its fence, held in memory: where the records of each
  bucket of hash values start (about :data:`BUCKET` records a bucket, at most
  ``2**FENCE_BITS`` buckets a run: a bigger run gets bigger buckets), then one ``pread``
  of that bucket; an empty bucket costs no read.  Reads never map the file (mapped
  pages would count in the process's resident memory);
* a Bloom filter of fixed size over the spilled fingerprints answers most misses (a new
  key) without a read; it only fills up slowly (1 MB: 3 % false positives at a million
  spilled keys, 25 % at three million), and a false positive costs one read per run;
* runs are merged ``FANIN`` at a time when as many of one size class exist (tiered), and
  all together past :data:`MAX_RUNS`, so a lookup reads at most a few runs;
* the done keys of a resume are added in bulk (:meth:`KeySet.load`: known distinct, an
  add does not look in the runs) and then frozen (:meth:`KeySet.freeze`): merged into one
  run, held in memory when it fits the share of a spill's sort (about 100,000 keys at the
  default budget), so a done key found costs one read at most.

Run files live in a private directory (:func:`_fs.make_owned_dir`): in the journal
directory of a durable run, under the system's temporary directory otherwise.  They hold
fingerprints of a hash seeded per process, meaningless to any other process: nothing
ever reads another process's files, :meth:`KeySet.close` (or the garbage collector, or
the interpreter's exit) removes them, and the directory of a process that was killed is
removed by the next one that spills or resumes (:func:`remove_dead`).  Never pickled.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import weakref
import zlib
from array import array
from bisect import bisect_left, bisect_right
from typing import Any, Iterator, List, Optional

from .. import _fs

_MASK64 = (1 << 64) - 1

#: Bytes a key set may hold in memory, whatever the number of keys: its table, the sort
#: of a spill, the Bloom filter, the runs' fences and a merge's buffers.  The
#: environment variable ``PYMPX_QUEUES_KEYS_BUDGET`` (bytes) overrides it.
DEFAULT_BUDGET = 8 << 20
BUDGET_ENV = "PYMPX_QUEUES_KEYS_BUDGET"
#: The smallest budget (a budget this small spills every few hundred keys: for tests).
MIN_BUDGET = 16 << 10
#: Bytes of one spilled fingerprint: hash (8, big-endian) then CRC-32 (4, big-endian).
RECORD = struct.Struct(">QI")
REC = RECORD.size
#: Records a bucket of a run's fence holds on average (one ``pread`` of about
#: ``BUCKET * 12`` bytes per lookup) ...
BUCKET = 64
#: ... up to a fence of 2**FENCE_BITS buckets (8 bytes each; past that, bigger buckets).
FENCE_BITS = 14
#: Runs of one size class merged into one.
FANIN = 4
#: More runs than this are merged into one.
MAX_RUNS = 8
#: Spilled fingerprints sorted in this many slices by their top bits (a spill's sort
#: holds a quarter of the table's keys as Python ints at a time).
_SLICES = 4
#: Name prefix of the private run directories (hidden: never a journal or a message).
DIR_PREFIX = ".pympx-keys"


_crc32 = zlib.crc32


def _fingerprint(key: str) -> "tuple[int, int]":
    return (hash(key) & _MASK64) or 1, _crc32(key.encode("utf-8", "surrogatepass"))


def default_budget() -> int:
    """:data:`DEFAULT_BUDGET`, or ``PYMPX_QUEUES_KEYS_BUDGET`` when set."""
    raw = os.environ.get(BUDGET_ENV)
    if not raw:
        return DEFAULT_BUDGET
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < MIN_BUDGET:
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a number of bytes, at least "
                         f"{MIN_BUDGET}")
    return value


def dir_prefix(name: str) -> str:
    """Name prefix of the run directories of key sets of the pipeline ``name``."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
    return f"{DIR_PREFIX}.{safe}" if safe else DIR_PREFIX


def remove_dead(parent: str, name: str = "") -> int:
    """Remove the run directories in ``parent`` of key sets whose process is gone."""
    return _fs.remove_dead_owned_dirs(parent, dir_prefix(name))


class _Run:
    """One sorted run file of ``count`` records.  ``fence[t]`` is the number of records
    whose hash's top ``bits`` bits are below ``t``: the records with top bits ``t`` are
    ``fence[t]`` to ``fence[t + 1]``, found without a search, read with one ``pread``."""

    __slots__ = ("path", "fd", "count", "shift", "fence", "level", "data")

    def __init__(self, path: str, fd: int, count: int, shift: int, fence: array,
                 level: int) -> None:
        self.path, self.fd, self.count, self.shift = path, fd, count, shift
        self.fence, self.level = fence, level
        self.data: Optional[bytes] = None  # the whole run, when it is held in memory

    def has(self, h: int, rec: bytes) -> bool:
        t = h >> self.shift
        fence = self.fence
        start = fence[t] * REC
        end = fence[t + 1] * REC
        if start == end:
            return False
        data = self.data
        if data is None:
            data = os.pread(self.fd, end - start, start)  # _fs.read_at
            end -= start
            start = 0
        pos = data.find(rec, start, end)
        while pos >= 0 and (pos - start) % REC:
            pos = data.find(rec, pos + 1, end)
        return pos >= 0

    def records(self, chunk: int) -> Iterator[List[bytes]]:
        """The records in order, ``chunk`` at a time, as lists of 12-byte strings."""
        for start in range(0, self.count, chunk):
            data = _fs.read_at(self.fd, min(chunk, self.count - start) * REC, start * REC)
            yield [data[i:i + REC] for i in range(0, len(data), REC)]


def _fence_bits(count: int) -> int:
    """Bits of the fence: about BUCKET records a bucket, at most FENCE_BITS bits."""
    return min(max((count // BUCKET).bit_length() - 1, 0), FENCE_BITS)


class _RunWriter:
    """Writes one run: sorted 12-byte records appended in order, its fence beside."""

    def __init__(self, path: str, count: int, level: int) -> None:
        self.path, self.count, self.level = path, count, level
        self.fd = _fs.create_scratch(path)
        bits = _fence_bits(count)
        self.shift = 64 - bits
        self.fence = array("Q", [0])  # fence[t] for t < len(fence) is known
        self.buckets = 1 << bits
        self.written = 0

    def write(self, recs: List[bytes]) -> None:
        """Append records (12-byte strings, ascending, after every earlier one)."""
        if not recs:
            return
        fence, shift, base = self.fence, self.shift, self.written
        last = int.from_bytes(recs[-1][:8], "big") >> shift
        while len(fence) <= last:  # buckets that start in these records
            t = len(fence)
            fence.append(base + bisect_left(recs, (t << shift).to_bytes(8, "big")))
        _fs.write_all(self.fd, b"".join(recs))
        self.written += len(recs)

    def done(self) -> _Run:
        assert self.written == self.count, (self.written, self.count)
        fence = self.fence
        while len(fence) <= self.buckets:
            fence.append(self.count)
        return _Run(self.path, self.fd, self.count, self.shift, fence, self.level)

    def abandon(self) -> None:
        os.close(self.fd)
        _fs.unlink_quiet(self.path)


def _cleanup(owner: int, state: dict) -> None:
    """Close and remove a key set's run files (only in the process that made them: a
    forked child must not remove its parent's)."""
    if os.getpid() != owner:
        return
    for run in state["runs"]:
        try:
            os.close(run.fd)
        except OSError:
            pass
    state["runs"].clear()
    if state["dir"] is not None:
        _fs.remove_tree(state["dir"])
        state["dir"] = None


class KeySet:
    """``add(key) -> bool`` (True when new), ``key in s``, ``len(s)``.  Keys are str.

    As a mapping of done keys it answers ``s[key]`` / ``s.get(key)`` with ``None`` (the
    value a done key has without ``keep_results``).  It cannot list its keys.
    ``spill_dir``: where the private run directory goes (None: the temporary directory);
    ``name`` goes into that directory's name; ``budget``: bytes of memory (default
    :func:`default_budget`).  :meth:`close` removes the run files.
    """

    __slots__ = ("_h", "_c", "_mask", "_n", "_max_slots", "_bloom", "_bmask", "_runs",
                 "_spilled", "_spill_dir", "_name", "_state", "_final", "_hit", "_seq",
                 "_closed", "_loading", "_held_max", "__weakref__")

    def __init__(self, size: int = 1024, *, budget: Optional[int] = None,
                 spill_dir: Optional[str] = None, name: str = "") -> None:
        if budget is None:
            budget = default_budget()
        elif budget < MIN_BUDGET:
            raise ValueError(f"a key set's budget is at least {MIN_BUDGET} bytes, not "
                             f"{budget}")
        # budget: 1/8 for the Bloom filter, 1/8 for the fences and a merge's buffers,
        # 3/8 for the table and the sort of a spill (12 bytes a slot, plus 3/4 * slots /
        # _SLICES Python ints of ~50 bytes while sorting), 3/8 for the allocator's slack
        # (measured: peak RSS, not only the objects, stays within the budget).
        per_slot = 12 + (3 * 50) // (4 * _SLICES)
        max_slots = 64
        while max_slots * 2 * per_slot <= budget * 3 // 8:
            max_slots *= 2
        self._max_slots = max_slots
        bloom_bits = 1 << 10
        while bloom_bits * 2 // 8 <= budget // 8:
            bloom_bits *= 2
        # a frozen run is held in memory up to the share of a spill's sort (unused then)
        self._held_max = max_slots * 3 * 50 // (4 * _SLICES)
        self._bloom = bytearray()  # allocated at the first spill
        self._bmask = bloom_bits - 1
        n = 64
        while n < min(size, max_slots):
            n *= 2
        self._alloc(n)
        self._n = 0
        self._runs: List[_Run] = []
        self._spilled = 0
        self._spill_dir = spill_dir
        self._name = name
        self._state = {"runs": self._runs, "dir": None}
        self._final = weakref.finalize(self, _cleanup, os.getpid(), self._state)
        self._hit: Optional[str] = None
        self._seq = 0
        self._closed = False
        self._loading = False

    def _alloc(self, n: int) -> None:
        self._h = array("Q", bytes(8 * n))  # 0: empty slot
        self._c = array("I", bytes(4 * n))
        self._mask = n - 1

    # ------------------------------------------------------------------ the verbs
    def add(self, key: str) -> bool:
        if self._closed:
            raise ValueError("this key set is closed")
        h = (hash(key) & _MASK64) or 1  # _fingerprint(key), inline: the hot path
        c = _crc32(key.encode("utf-8", "surrogatepass"))
        hs, cs, mask = self._h, self._c, self._mask
        i = h & mask
        while True:
            v = hs[i]
            if v == 0:
                break
            if v == h and cs[i] == c:
                return False
            i = (i + 1) & mask
        bloom = self._bloom
        if bloom:  # since the first spill: look in the runs, and mark the key
            m = self._bmask
            p1 = h & m
            p2 = (h >> 24) & m
            p3 = ((h >> 48) ^ c) & m
            b1, b2, b3 = 1 << (p1 & 7), 1 << (p2 & 7), 1 << (p3 & 7)
            p1 >>= 3
            p2 >>= 3
            p3 >>= 3
            if (not self._loading and bloom[p1] & b1 and bloom[p2] & b2 and
                    bloom[p3] & b3 and self._runs_have(h, c)):
                return False
            bloom[p1] |= b1
            bloom[p2] |= b2
            bloom[p3] |= b3
        hs[i] = h
        cs[i] = c
        self._n += 1
        if self._n * 4 > (mask + 1) * 3:
            self._grow_or_spill()
        return True

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if self._closed:
            raise ValueError("this key set is closed")
        h = (hash(key) & _MASK64) or 1  # _fingerprint(key), inline: the hot path
        c = _crc32(key.encode("utf-8", "surrogatepass"))
        hs, cs, mask = self._h, self._c, self._mask
        i = h & mask
        while True:
            v = hs[i]
            if v == 0:
                break
            if v == h and cs[i] == c:
                self._hit = key
                return True
            i = (i + 1) & mask
        if self._runs and self._spilled_has(h, c):
            self._hit = key
            return True
        return False

    def _spilled_has(self, h: int, c: int) -> bool:
        m, bloom = self._bmask, self._bloom
        p = h & m
        if not bloom[p >> 3] & (1 << (p & 7)):
            return False
        p = (h >> 24) & m
        if not bloom[p >> 3] & (1 << (p & 7)):
            return False
        p = ((h >> 48) ^ c) & m
        if not bloom[p >> 3] & (1 << (p & 7)):
            return False
        return self._runs_have(h, c)

    def _runs_have(self, h: int, c: int) -> bool:
        rec = RECORD.pack(h, c)
        for run in self._runs:  # largest first: most keys are there
            if run.has(h, rec):
                return True
        return False

    def __len__(self) -> int:
        return self._n + self._spilled

    def __getitem__(self, key: str) -> None:
        if key is self._hit or key in self:  # `k in s` then `s[k]`: one lookup
            return None
        raise KeyError(key)

    def get(self, key: str, default: Optional[object] = None) -> Optional[object]:
        return None if key is self._hit or key in self else default

    def __setitem__(self, key: str, value: object) -> None:
        if value is not None:
            raise TypeError("a KeySet keeps keys only (done keys without keep_results)")
        self.add(key)

    def __iter__(self) -> Iterator[str]:
        raise TypeError("a KeySet holds fingerprints, not keys: it cannot list them")

    @property
    def nbytes(self) -> int:
        """Bytes held in memory now (table, Bloom filter, fences, a run held)."""
        return (self._h.itemsize * len(self._h) + self._c.itemsize * len(self._c) +
                len(self._bloom) + sum(8 * len(r.fence) + len(r.data or b"")
                                       for r in self._runs))

    @property
    def runs(self) -> int:
        """Run files on disk now."""
        return len(self._runs)

    @property
    def directory(self) -> Optional[str]:
        """The private directory of the run files (None before the first spill)."""
        return self._state["dir"]

    def load(self) -> None:
        """Bulk load: the keys added from now on until :meth:`freeze` are known to be
        distinct (the done keys of a journal), so an add checks only the table, not the
        run files.  (A key added twice would still be found, and counted twice.)"""
        self._loading = True

    def freeze(self) -> None:
        """End a bulk load; merge the run files into one: for a set that is only looked
        up from now on (done keys of a resumed run: a key found costs one read)."""
        self._loading = False
        if len(self._runs) > 1:
            self._merge(list(self._runs))
        if self._runs and self._runs[0].count * REC <= self._held_max:
            run = self._runs[0]  # small enough: looked up without a read
            run.data = _fs.read_at(run.fd, run.count * REC, 0)

    def close(self) -> None:
        """Remove the run files; the set cannot be used afterwards."""
        self._closed = True
        self._final()
        self._alloc(64)
        self._n = self._spilled = 0

    # ------------------------------------------------------------------ growth
    def _grow_or_spill(self) -> None:
        if len(self._h) < self._max_slots:
            self._grow()
        else:
            self._spill()

    def _grow(self) -> None:
        old_h, old_c = self._h, self._c
        self._alloc(2 * len(old_h))
        hs, cs, mask = self._h, self._c, self._mask
        for h, c in zip(old_h, old_c):
            if h:
                i = h & mask
                while hs[i]:
                    i = (i + 1) & mask
                hs[i] = h
                cs[i] = c

    def _new_run(self, count: int, level: int) -> _RunWriter:
        d = self._state["dir"]
        if d is None:
            parent = self._spill_dir or tempfile.gettempdir()
            prefix = dir_prefix(self._name)
            _fs.remove_dead_owned_dirs(parent, prefix)
            d = self._state["dir"] = _fs.make_owned_dir(parent, prefix)
        self._seq += 1
        return _RunWriter(os.path.join(d, f"run-{self._seq}"), count, level)

    def _spill(self) -> None:
        """Sort the table's fingerprints into a new run file and empty the table."""
        hs, cs = self._h, self._c
        w = self._new_run(self._n, 0)
        first = not self._bloom  # later keys are marked in the filter by add()
        if first:
            self._bloom = bytearray((self._bmask + 1) // 8)
        try:
            bloom, m = self._bloom, self._bmask
            pack = RECORD.pack
            for part in range(_SLICES):  # by the top 2 bits: ascending slices
                lo, hi = max(part << 62, 1), (part + 1) << 62
                fps = [(h << 32) | c for h, c in zip(hs, cs) if lo <= h < hi]
                fps.sort()
                for fp in (fps if first else ()):
                    h = fp >> 32
                    p = h & m
                    bloom[p >> 3] |= 1 << (p & 7)
                    p = (h >> 24) & m
                    bloom[p >> 3] |= 1 << (p & 7)
                    p = ((h >> 48) ^ (fp & 0xFFFFFFFF)) & m
                    bloom[p >> 3] |= 1 << (p & 7)
                for i in range(0, len(fps), 8192):
                    w.write([pack(fp >> 32, fp & 0xFFFFFFFF) for fp in fps[i:i + 8192]])
                del fps
            run = w.done()
        except BaseException:
            w.abandon()
            raise
        self._runs.append(run)
        self._spilled += self._n
        self._n = 0
        slots = len(hs)
        del hs, cs
        self._h = self._c = array("Q")  # the full table is freed before a new one
        self._alloc(slots)
        self._compact()

    def _compact(self) -> None:
        """Merge FANIN runs of one level into one; all of them past MAX_RUNS."""
        runs = self._runs
        while True:
            runs.sort(key=lambda r: -r.count)  # largest first (lookups, and merges)
            if len(runs) > MAX_RUNS:
                self._merge(list(runs))
                continue
            for level in sorted({r.level for r in runs}):
                same = [r for r in runs if r.level == level]
                if len(same) >= FANIN:
                    self._merge(same)
                    break
            else:
                return

    def _merge(self, group: List[_Run]) -> None:
        """k-way merge of ``group`` into one run, a bounded chunk at a time: take from
        each run the records up to the smallest last record among the chunks of runs
        that have more, and sort them (timsort merges the sorted pieces)."""
        total = sum(r.count for r in group)
        w = self._new_run(total, max(r.level for r in group) + 1)
        chunk = max(512, 8192 // len(group))
        try:
            feeds = [r.records(chunk) for r in group]
            bufs: List[List[bytes]] = [[] for _ in group]
            left = [r.count for r in group]
            while True:
                for k, feed in enumerate(feeds):
                    if not bufs[k] and left[k]:
                        bufs[k] = next(feed)
                        left[k] -= len(bufs[k])
                if not any(bufs):
                    break
                more = [b[-1] for k, b in enumerate(bufs) if b and left[k]]
                bound = min(more) if more else None
                out: List[bytes] = []
                for k, b in enumerate(bufs):
                    if not b:
                        continue
                    n = len(b) if bound is None else bisect_right(b, bound)
                    out.extend(b[:n])
                    bufs[k] = b[n:]
                out.sort()
                w.write(out)
            run = w.done()
        except BaseException:
            w.abandon()
            raise
        for r in group:
            self._runs.remove(r)
            os.close(r.fd)
            _fs.unlink_quiet(r.path)
        self._runs.append(run)


def close_keys(keys: Any) -> None:
    """Close a :class:`KeySet` (anything else: nothing to do)."""
    if isinstance(keys, KeySet):
        keys.close()
