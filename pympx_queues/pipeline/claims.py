"""Claims: which resources an item locks, and a grid of cells that spreads them evenly.

Loading relationships in parallel deadlocks when two running batches touch the same node
(each write locks both endpoints).  An item's *claims* are the resources it locks; two
batches with a common claim never run at the same time (DESIGN.md P8).

Items are placed in a ``table_size x table_size`` grid of cells by their start and end
ids.  Every id is first mixed to 64 well-spread bits (:func:`hash_id`: SplitMix64 on
integers, BLAKE2b on strings and bytes), then reduced modulo ``table_size``: sequential,
strided (all multiples of 10) and string ids land evenly, where a last-digit rule puts
every multiple of 10 in one bucket.

* **bipartite** (start and end ids from different node sets): a cell ``(r, c)`` claims
  its row ``("row", r)`` and its column ``("col", c)``;
* **monopartite** (one node set): both ids are node claims, ``(a, b)`` and ``(b, a)``
  fall in the same cell (the grid is folded to ``r <= c``) and claim ``("node", r)`` and
  ``("node", c)``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Hashable, Optional, Tuple

MASK64 = (1 << 64) - 1

Cell = Tuple[int, int]
IdPair = Tuple[Any, Any]


def mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers whose every output bit
    depends on every input bit (sequential and strided ids spread evenly)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash_id(value: Any) -> int:
    """64 well-mixed bits of a node id: ints (any size, negatives included), str, bytes.

    Raises ``TypeError`` naming the type for anything else (``bool`` and ``float`` too: a
    float id is almost always a parsing accident)."""
    t = type(value)
    if t is int or (isinstance(value, int) and t is not bool):
        return mix64(int(value) & MASK64 ^ (int(value) >> 64 & MASK64))
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(hashlib.blake2b(bytes(value), digest_size=8).digest(), "big")
    raise TypeError(f"node ids must be int, str or bytes, got {t.__name__}: {value!r}")


def tuple_ids(start: int = 0, end: int = 1) -> Callable[[Any], IdPair]:
    """Ids of a tuple/list row: ``(row[start], row[end])``."""
    def ids(row: Any) -> IdPair:
        try:
            return row[start], row[end]
        except (IndexError, TypeError, KeyError):
            raise ValueError(f"row {row!r} has no start/end ids at positions "
                             f"{start} and {end}") from None
    return ids


def dict_ids(start_key: str = "start", end_key: str = "end") -> Callable[[Any], IdPair]:
    """Ids of a dict row: ``(row[start_key], row[end_key])``."""
    def ids(row: Any) -> IdPair:
        try:
            return row[start_key], row[end_key]
        except (KeyError, TypeError):
            raise ValueError(f"row {row!r} lacks the keys {start_key!r} and "
                             f"{end_key!r}") from None
    return ids


class Grid:
    """Cells and claims of rows: ``cell(row) -> (r, c)``, ``claims(cell) -> tuple``.

    ``ids``: a function from a row to its ``(start, end)`` ids (:func:`tuple_ids`,
    :func:`dict_ids` or your own).  ``cell_of``: instead of ``ids``, a custom function from
    a row straight to its ``(r, c)`` cell (range-checked).  ``monopartite``: see the module
    docstring.
    """

    def __init__(self, table_size: int = 10, ids: Optional[Callable[[Any], IdPair]] = None,
                 *, monopartite: bool = False,
                 cell_of: Optional[Callable[[Any], Cell]] = None) -> None:
        if type(table_size) is not int or table_size < 1:
            raise ValueError(f"table_size must be a positive int, got {table_size!r}")
        if ids is not None and cell_of is not None:
            raise ValueError("give ids= or cell_of=, not both")
        self.table_size = table_size
        self.monopartite = bool(monopartite)
        self._ids = ids if ids is not None or cell_of is not None else tuple_ids()
        self._cell_of = cell_of

    def cell(self, row: Any) -> Cell:
        """The row's cell; ``ValueError``/``TypeError`` naming the row when it has none."""
        n = self.table_size
        if self._cell_of is not None:
            r, c = self._cell_of(row)
            if not (type(r) is int and type(c) is int and 0 <= r < n and 0 <= c < n):
                raise ValueError(f"cell {(r, c)!r} of row {row!r} is outside the "
                                 f"{n}x{n} grid")
        else:
            a, b = self._ids(row)  # type: ignore[misc]
            try:
                r, c = hash_id(a) % n, hash_id(b) % n
            except TypeError as exc:
                raise TypeError(f"row {row!r}: {exc}") from None
        if self.monopartite and r > c:
            r, c = c, r
        return r, c

    def claims(self, cell: Cell) -> Tuple[Hashable, ...]:
        r, c = cell
        if self.monopartite:
            return (("node", r),) if r == c else (("node", r), ("node", c))
        return ("row", r), ("col", c)
