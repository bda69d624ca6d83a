"""Claims: which resources an item locks, folded onto a small grid of cells (P8).

A relationship row locks its start and its end node.  Two batches may run at the same
time only if they lock no common node.  Node ids are folded into ``table_size`` buckets
by a 64-bit mix and a modulo; a row's *cell* is its pair of buckets and its *claims* are
the resources that cell locks:

* bipartite (start and end ids from different node sets): cell ``(r, c)`` claims
  row ``r`` and column ``c``; ``table_size**2`` cells, up to ``table_size`` at once.
* monopartite (one node set): cell ``(a, b)`` with ``a <= b`` claims nodes ``a`` and
  ``b``; ``(x, y)`` and ``(y, x)`` share a cell; ``table_size*(table_size+1)/2`` cells.

The mix is SplitMix64's finaliser for integers (sequential, strided and clustered ids
spread evenly: ids that are all multiples of 10 use every bucket) and an 8-byte BLAKE2b
digest for strings and bytes (stable across processes, unlike ``hash()``).  Two
different ids may share a bucket: that costs parallelism, never correctness.

An extractor is any object with ``cell(item) -> hashable``, ``claims(cell) -> tuple`` and
``cells`` (the number of possible cells, ``None`` if unbounded); :class:`Claims` builds
one from a function returning an item's claims directly.
"""

from __future__ import annotations

import hashlib
import math
import operator
import uuid
from typing import Any, Callable, Hashable, Iterable, Mapping, Optional, Tuple

M64 = (1 << 64) - 1
MEMO_SIZE = 1 << 16  # ids whose bucket an extractor remembers


class ClaimError(ValueError):
    """An item's claims cannot be worked out (a missing field, an id out of range)."""


class ClaimTypeError(ClaimError, TypeError):
    """An id of a type that has no stable 64-bit mix (float, None, list, ...)."""


def mix64(x: int) -> int:
    """SplitMix64's finaliser of ``x``: a bijection of 64-bit values whose output bits
    each depend on every input bit.  Negative ints use their two's complement; ints
    outside 64 bits are folded by BLAKE2b of their bytes first."""
    if not -(1 << 63) <= x <= M64:
        raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
        x = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    x &= M64
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def hash64(value: Any) -> int:
    """A stable 64-bit hash of an id: ints (and int-likes such as numpy ints) by
    :func:`mix64`, ``str``/``bytes`` by BLAKE2b, ``uuid.UUID`` by its integer, tuples of
    those element by element.  Anything else is a :class:`ClaimTypeError`."""
    if isinstance(value, str):
        return int.from_bytes(hashlib.blake2b(value.encode("utf-8", "surrogatepass"),
                                              digest_size=8).digest(), "little")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return int.from_bytes(hashlib.blake2b(bytes(value), digest_size=8).digest(), "little")
    if isinstance(value, bool) or value is None:
        raise ClaimTypeError(f"id {value!r} is not an int, str, bytes or UUID")
    if isinstance(value, int):
        return mix64(value)
    if isinstance(value, uuid.UUID):
        return mix64(value.int)
    if isinstance(value, tuple):
        h = 0x243F6A8885A308D3
        for part in value:
            h = mix64(h ^ hash64(part))
        return h
    try:
        return mix64(operator.index(value))
    except TypeError:
        pass
    raise ClaimTypeError(f"id {value!r} of type {type(value).__name__} has no stable "
                         "64-bit mix: give ints, str, bytes or UUIDs (a float id is "
                         "ambiguous: convert it with int() first)")


def bucket(value: Any, table_size: int) -> int:
    """The bucket ``0 <= b < table_size`` of an id (:func:`hash64` modulo ``table_size``)."""
    return hash64(value) % table_size


def _check_table_size(table_size: Any) -> int:
    if isinstance(table_size, bool) or not isinstance(table_size, int) or table_size < 1:
        raise ClaimError(f"table_size must be an int >= 1, not {table_size!r}")
    return table_size


def _short(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 120 else text[:117] + "..."


def _getter(field: Any, what: str) -> Callable[[Any], Any]:
    """An id getter: a callable as is, an int a tuple index, anything else a mapping key."""
    if callable(field):
        def get(item: Any) -> Any:
            return field(item)
    else:
        def get(item: Any) -> Any:
            try:
                return item[field]
            except (KeyError, IndexError) as exc:
                raise ClaimError(f"item {_short(item)} has no {what} id at "
                                 f"{field!r}") from exc
            except TypeError as exc:
                raise ClaimTypeError(f"item {_short(item)} of type {type(item).__name__} "
                                     f"cannot be indexed by {field!r} for its {what} id"
                                     ) from exc
    get.field = getattr(field, "field", field)  # type: ignore[attr-defined]
    return get


class _Extractor:
    """Common part of the built-in extractors."""

    table_size: int
    monopartite = False

    @property
    def cells(self) -> Optional[int]:
        """How many cells exist (bounds the buffers: one per cell)."""
        t = self.table_size
        return t * (t + 1) // 2 if self.monopartite else t * t

    @property
    def max_parallel(self) -> int:
        """How many batches can run at once at most (cells sharing no claim)."""
        return self.table_size

    def cell(self, item: Any) -> Hashable:  # pragma: no cover - overridden
        raise NotImplementedError

    def claims(self, cell: Any) -> Tuple[Hashable, ...]:
        """The resources a cell locks."""
        r, c = cell
        if self.monopartite:
            return (r,) if r == c else (r, c)
        return (("s", r), ("e", c))

    _memo: Optional[dict] = None

    def _bucket(self, value: Any, item: Any, what: str) -> int:
        # ids repeat (a node has many relationships): remember recent ones
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        kind = type(value)
        if kind is int or kind is str:
            b = memo.get(value)
            if b is not None and type(value) is kind:
                return b
        try:
            b = hash64(value) % self.table_size
        except ClaimTypeError as exc:
            raise ClaimTypeError(f"item {_short(item)}: {what} {exc}") from None
        if kind is int or kind is str:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[value] = b
        return b


class Bipartite(_Extractor):
    """Start and end ids from different node sets: cell ``(bucket(start), bucket(end))``
    claims a row and a column of the grid.

    ``start``/``end``: a callable ``item -> id``, a tuple index or a mapping key.
    """

    monopartite = False

    def __init__(self, start: Any = 0, end: Any = 1, table_size: int = 10) -> None:
        self.table_size = _check_table_size(table_size)
        self._start = _getter(start, "start")
        self._end = _getter(end, "end")

    def cell(self, item: Any) -> Tuple[int, int]:
        return (self._bucket(self._start(item), item, "start"),
                self._bucket(self._end(item), item, "end"))

    def __repr__(self) -> str:
        start, end = getattr(self._start, "field", "?"), getattr(self._end, "field", "?")
        return f"{type(self).__name__}(start={start!r}, end={end!r}, " \
               f"table_size={self.table_size})"


class Monopartite(Bipartite):
    """Start and end ids from one node set: cell ``(min, max)`` of the two buckets claims
    both nodes (a row ``(a, b)`` and a row ``(b, a)`` share a cell and its claims)."""

    monopartite = True

    def cell(self, item: Any) -> Tuple[int, int]:
        r, c = Bipartite.cell(self, item)
        return (r, c) if r <= c else (c, r)


def tuple_claims(table_size: int = 10, start: int = 0, end: int = 1, *,
                 monopartite: bool = False) -> Bipartite:
    """Claims of ``(start, end, ...)`` tuples (or lists): positions ``start`` and ``end``."""
    return (Monopartite if monopartite else Bipartite)(start, end, table_size)


def dict_claims(table_size: int = 10, start: str = "start", end: str = "end", *,
                monopartite: bool = False) -> Bipartite:
    """Claims of mapping rows: keys ``start`` and ``end``."""
    return (Monopartite if monopartite else Bipartite)(start, end, table_size)


def _auto(key: str, pos: int) -> Callable[[Any], Any]:
    def get(item: Any) -> Any:
        if isinstance(item, Mapping):
            if key not in item:
                raise ClaimError(f"item {_short(item)} has no {key} id at {key!r}")
            return item[key]
        try:
            return item[pos]
        except (IndexError, TypeError, KeyError):
            raise ClaimError(f"item {_short(item)} is neither a mapping with {key!r} nor "
                             f"a sequence with a {key} id at position {pos}") from None
    get.field = f"{key!r} or [{pos}]"  # type: ignore[attr-defined]
    return get


def start_end(table_size: int = 10, *, monopartite: bool = False) -> Bipartite:
    """The default claims: ``row["start"]``/``row["end"]`` of mappings, ``row[0]``/``row[1]``
    of tuples and lists."""
    return (Monopartite if monopartite else Bipartite)(_auto("start", 0), _auto("end", 1),
                                                         table_size)


def bipartite(start: Any, end: Any, table_size: int = 10) -> Bipartite:
    """Claims of rows whose start and end ids come from different node sets."""
    return Bipartite(start, end, table_size)


def monopartite(start: Any, end: Any, table_size: int = 10) -> Monopartite:
    """Claims of rows whose start and end ids come from the same node set."""
    return Monopartite(start, end, table_size)


class CellFn(_Extractor):
    """An etl_lib-style extractor ``fn(item) -> (row, col)`` of grid coordinates, checked
    against ``table_size`` (a :class:`ClaimError` names the item and the coordinates)."""

    def __init__(self, fn: Callable[[Any], Tuple[int, int]], table_size: int,
                 monopartite: bool = False) -> None:
        if not callable(fn):
            raise ClaimError(f"an id extractor is a callable item -> (row, col), not {fn!r}")
        self.fn = fn
        self.table_size = _check_table_size(table_size)
        self.monopartite = bool(monopartite)

    def cell(self, item: Any) -> Tuple[int, int]:
        got = self.fn(item)
        try:
            r, c = got
        except (TypeError, ValueError):
            raise ClaimTypeError(f"id extractor {getattr(self.fn, '__name__', self.fn)!r} "
                                 f"returned {got!r} for item {_short(item)}; expected a "
                                 "(row, col) pair of ints") from None
        t = self.table_size
        if not (isinstance(r, int) and isinstance(c, int)) or isinstance(r, bool) \
                or isinstance(c, bool):
            raise ClaimTypeError(f"id extractor returned {got!r} for item {_short(item)}; "
                                 "expected a (row, col) pair of ints")
        if not (0 <= r < t and 0 <= c < t):
            raise ClaimError(f"bucket id out of range: {(r, c)} for table_size={t} "
                             f"(item {_short(item)})")
        if self.monopartite and r > c:
            r, c = c, r
        return (r, c)


class Claims(_Extractor):
    """Custom claims: ``fn(item)`` returns the resources the item locks (an iterable of
    hashable values, or one value).  With ``table_size`` each resource is folded into a
    bucket with :func:`bucket` (``("user", 7)`` and ``7`` are different resources); with
    ``table_size=None`` the resources are used as they are (give few distinct ones: each
    distinct set is its own cell and buffer).
    """

    def __init__(self, fn: Callable[[Any], Any], table_size: Optional[int] = None) -> None:
        if not callable(fn):
            raise ClaimError(f"Claims needs a callable item -> claims, not {fn!r}")
        self.fn = fn
        self.table_size = _check_table_size(table_size) if table_size is not None else 0

    @property
    def cells(self) -> Optional[int]:
        return None  # sets of resources: not a fixed grid

    @property
    def max_parallel(self) -> int:
        return self.table_size or 1 << 30

    def cell(self, item: Any) -> Hashable:
        got = self.fn(item)
        if isinstance(got, (str, bytes)) or not isinstance(got, Iterable):
            got = (got,)
        if self.table_size:
            try:
                keys = {hash64(g) % self.table_size for g in got}
            except ClaimTypeError as exc:
                raise ClaimTypeError(f"item {_short(item)}: claim {exc}") from None
            return tuple(sorted(keys))
        try:
            keys = set(got)
        except TypeError as exc:
            raise ClaimTypeError(f"item {_short(item)}: claims must be hashable ({exc})"
                                 ) from None
        try:
            return tuple(sorted(keys))
        except TypeError:
            return tuple(sorted(keys, key=repr))

    def claims(self, cell: Any) -> Tuple[Hashable, ...]:
        return cell


def as_extractor(claims: Any, table_size: Optional[int] = None) -> Any:
    """An extractor from what a user passed: one of ours, an object with ``cell`` and
    ``claims``, or an etl_lib-style ``fn(item) -> (row, col)`` (with ``table_size`` given
    or carried as ``fn.table_size``; ``fn.monopartite`` honoured); None: :func:`start_end`
    on a ``table_size`` grid (default 10)."""
    if claims is None:
        return start_end(table_size if table_size is not None else 10)
    if hasattr(claims, "cell") and hasattr(claims, "claims"):
        return claims
    if callable(claims):
        size = table_size if table_size is not None else getattr(claims, "table_size", None)
        if size is None:
            raise ClaimError("an id extractor fn(item) -> (row, col) needs table_size (or "
                             "fn.table_size); for claims of any shape use Claims(fn)")
        return CellFn(claims, size, bool(getattr(claims, "monopartite", False)))
    raise ClaimError(f"claims must be an extractor (bipartite(...), monopartite(...), "
                     f"Claims(fn)) or a callable, not {claims!r}")


def skew(counts: Iterable[int]) -> float:
    """How uneven a cell histogram is: the largest count over the mean (1.0 = even)."""
    values = [c for c in counts]
    total = sum(values)
    if not values or not total:
        return 1.0
    return max(values) / (total / len(values))


def expected_skew(rows: int, cells: int) -> float:
    """A generous bound of :func:`skew` for ``rows`` uniformly spread rows over ``cells``
    cells (mean plus four standard deviations, over the mean)."""
    if rows <= 0 or cells <= 1:
        return 1.0
    mean = rows / cells
    return (mean + 4 * math.sqrt(mean) + 1) / mean


# --------------------------------------------------------------------------- main's API
# The first partitions API (``Grid(table_size, ids)``, ``tuple_ids``, ``dict_ids``,
# ``hash_id``) kept working on top of the extractors above.

def hash_id(value: Any) -> int:
    """64 well-mixed bits of a node id (:func:`hash64`)."""
    return hash64(value)


def tuple_ids(start: int = 0, end: int = 1) -> Callable[[Any], Tuple[Any, Any]]:
    """Ids of a tuple/list row: ``(row[start], row[end])``."""
    def ids(row: Any) -> Tuple[Any, Any]:
        try:
            return row[start], row[end]
        except (IndexError, TypeError, KeyError):
            raise ClaimError(f"row {_short(row)} has no start/end ids at positions "
                             f"{start} and {end}") from None
    return ids


def dict_ids(start_key: str = "start", end_key: str = "end") -> Callable[[Any], Tuple[Any, Any]]:
    """Ids of a mapping row: ``(row[start_key], row[end_key])``."""
    def ids(row: Any) -> Tuple[Any, Any]:
        try:
            return row[start_key], row[end_key]
        except (KeyError, TypeError):
            raise ClaimError(f"row {_short(row)} lacks the keys {start_key!r} and "
                             f"{end_key!r}") from None
    return ids


class Grid(_Extractor):
    """Cells of rows on a ``table_size`` grid from ``ids(row) -> (start, end)`` (default
    :func:`tuple_ids`), or from ``cell_of(row) -> (r, c)`` directly (range-checked);
    ``monopartite`` folds ``(a, b)`` and ``(b, a)`` into one cell."""

    def __init__(self, table_size: int = 10, ids: Optional[Callable[[Any], Any]] = None,
                 *, monopartite: bool = False,
                 cell_of: Optional[Callable[[Any], Tuple[int, int]]] = None) -> None:
        if ids is not None and cell_of is not None:
            raise ClaimError("give ids= or cell_of=, not both")
        self.table_size = _check_table_size(table_size)
        self.monopartite = bool(monopartite)
        self._ids = ids if ids is not None or cell_of is not None else tuple_ids()
        self._cells = CellFn(cell_of, table_size, monopartite) if cell_of is not None \
            else None

    def cell(self, item: Any) -> Tuple[int, int]:
        if self._cells is not None:
            return self._cells.cell(item)
        a, b = self._ids(item)  # type: ignore[misc]
        r, c = self._bucket(a, item, "start"), self._bucket(b, item, "end")
        return (c, r) if self.monopartite and r > c else (r, c)
