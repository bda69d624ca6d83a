"""A compact set of item keys: the keys a run has seen (duplicate check) and the keys an
earlier run finished (P3), as 96-bit fingerprints in two flat arrays.

A Python ``set`` of a million short ``str`` keys costs about 85 bytes per key; this costs
12 bytes per slot, 16 to 32 bytes per key (open addressing, load factor 3/8 to 3/4).  It
still grows with the number of distinct keys: a duplicate check over an unbounded
source cannot be bounded without false positives, and a false positive here would skip
an item, so this stays exact up to a fingerprint collision: the 64-bit ``hash()`` of the
key (SipHash, seeded per process) plus its CRC-32, a chance of about ``n**2 / 2**97``
for ``n`` keys (1e-17 for a million keys; 1e-11 for a billion).
"""

from __future__ import annotations

import zlib
from array import array
from typing import Iterator, Optional

_MASK64 = (1 << 64) - 1


class KeySet:
    """``add(key) -> bool`` (True when new), ``key in s``, ``len(s)``.  Keys are str.

    As a mapping of done keys it answers ``s[key]`` / ``s.get(key)`` with ``None`` (the
    value a done key has without ``keep_results``).  It cannot list its keys.
    """

    __slots__ = ("_h", "_c", "_mask", "_n")

    def __init__(self, size: int = 1024) -> None:
        n = 1024
        while n < size:
            n *= 2
        self._alloc(n)
        self._n = 0

    def _alloc(self, n: int) -> None:
        self._h = array("Q", bytes(8 * n))  # 0: empty slot
        self._c = array("I", bytes(4 * n))
        self._mask = n - 1

    @staticmethod
    def _fingerprint(key: str) -> "tuple[int, int]":
        return (hash(key) & _MASK64) or 1, zlib.crc32(key.encode("utf-8", "surrogatepass"))

    def add(self, key: str) -> bool:
        h, c = self._fingerprint(key)
        hs, cs, mask = self._h, self._c, self._mask
        i = h & mask
        while True:
            v = hs[i]
            if v == 0:
                hs[i] = h
                cs[i] = c
                self._n += 1
                if self._n * 4 > (mask + 1) * 3:
                    self._grow()
                return True
            if v == h and cs[i] == c:
                return False
            i = (i + 1) & mask

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h, c = self._fingerprint(key)
        hs, cs, mask = self._h, self._c, self._mask
        i = h & mask
        while True:
            v = hs[i]
            if v == 0:
                return False
            if v == h and cs[i] == c:
                return True
            i = (i + 1) & mask

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

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: str) -> None:
        if key in self:
            return None
        raise KeyError(key)

    def get(self, key: str, default: Optional[object] = None) -> Optional[object]:
        return None if key in self else default

    def __setitem__(self, key: str, value: object) -> None:
        if value is not None:
            raise TypeError("a KeySet keeps keys only (done keys without keep_results)")
        self.add(key)

    def __iter__(self) -> Iterator[str]:
        raise TypeError("a KeySet holds fingerprints, not keys: it cannot list them")

    @property
    def nbytes(self) -> int:
        return self._h.itemsize * len(self._h) + self._c.itemsize * len(self._c)
