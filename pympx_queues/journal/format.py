"""The journal record layout and the JSON value codec.

Each record is one UTF-8 line ``{crc32:08x} {seq} {kind} {json}\\n`` (the crc covers
everything after the first space).  Payloads are JSON, never pickle: messages are encoded
with :func:`encode_value`, which keeps tuples, bytes, sets and dicts with any keys.
"""

from __future__ import annotations

import base64
import json
import sys
import zlib
from typing import Any, List, Set, Tuple

# --------------------------------------------------------------------------- records
KIND_HEADER = "H"
KIND_PUT = "P"
KIND_DONE = "D"
KIND_CANCEL = "X"
KIND_KEY = "K"
KIND_CLOSE = "C"
KIND_FAIL = "F"
#: Kinds of the PersistentQueue pickup journals.
QUEUE_KINDS = frozenset("HPDXKCF")
#: Kinds of pipeline journals (pympx_queues.pipeline defines their payloads):
#: A accepted, S stage finished, E attempt failed, L dead letter, Y item done,
#: W kill-switch state, B batch acknowledged, R pending sink side effect, Q reset.
PIPELINE_KINDS = frozenset("HASELYWBRQ")
KINDS = QUEUE_KINDS | PIPELINE_KINDS
#: 2: the journal may end in a reserved tail of NUL bytes (flush-mode writers map it);
#: 1: never does.  Both read the same way.
FORMAT_VERSION = 2
#: ``{crc32:08x} {seq} {kind} {json}\n``; the crc covers everything after the first space.
RECORD_FORMAT = "{crc:08x} {body}\n"
RECORD_BODY_FORMAT = "{seq} {kind} {payload}"
_CRC_LEN = 8


class RecordError(ValueError):
    """One journal line does not parse (bad checksum, bad field)."""


def format_record(seq: int, kind: str, payload: str) -> bytes:
    """One record line; ``payload`` is already JSON text without newlines."""
    body = f"{seq} {kind} {payload}".encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def parse_record(line: bytes) -> Tuple[int, str, Any]:
    """``(seq, kind, payload)`` of one record line (without its newline); RecordError."""
    if len(line) < _CRC_LEN + 6 or line[_CRC_LEN:_CRC_LEN + 1] != b" ":
        raise RecordError("record too short or malformed")
    body = line[_CRC_LEN + 1:]
    try:
        crc = int(line[:_CRC_LEN], 16)
    except ValueError:
        raise RecordError("checksum field is not hex")
    if zlib.crc32(body) != crc:
        raise RecordError("checksum mismatch")
    try:
        seq_text, kind, payload = body.decode("utf-8").split(" ", 2)
        seq = int(seq_text)
        if kind not in KINDS:
            raise RecordError(f"unknown record kind {kind!r}")
        return seq, kind, json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"bad record body: {exc}")


# --------------------------------------------------------------------------- values
# Tagged JSON: a one-key dict whose key is a tag stands for a non-JSON type.
TAG_TUPLE = "__tuple__"
TAG_BYTES = "__bytes__"
TAG_SET = "__set__"
TAG_FROZENSET = "__frozenset__"
TAG_DICT = "__dict__"  # a dict with non-str keys, or one that looks like a tag
TAG_FORMATTED = "__formatted__"  # formatter_list output (decoded by converter_list)
TAGS = frozenset((TAG_TUPLE, TAG_BYTES, TAG_SET, TAG_FROZENSET, TAG_DICT, TAG_FORMATTED))
_SCALARS = (str, int, float, bool, type(None))


def encode_value(obj: Any) -> Any:
    """A JSON-compatible structure for ``obj`` that :func:`decode_value` turns back.

    Supports None, bool, int, float, str, bytes/bytearray, list, tuple, set, frozenset
    and dicts (any encodable keys), nested.  Raises ``TypeError`` for anything else, and
    for a container that contains itself (or nests deeper than Python's recursion limit).

    Floats must be finite: NaN and the infinities have no JSON form, and the journal is
    strict JSON.  They pass through here unchanged and :func:`dumps` refuses them with a
    ``ValueError`` naming the value, before anything is written (replace them, for
    example with None, or journal them as text with ``formatter_list`` hooks).
    Journals written by earlier versions that hold a bare ``NaN`` still read back.
    """
    try:
        return _encode(obj)
    except RecursionError:
        raise _too_deep(obj) from None


def _encode(obj: Any) -> Any:
    t = type(obj)
    if t in _SCALARS:
        return obj
    # Scalars inline (no call per item): the common messages are flat tuples/lists/dicts.
    if t is tuple:
        return {TAG_TUPLE: [x if type(x) in _SCALARS else _encode(x) for x in obj]}
    if t is list:
        return [x if type(x) in _SCALARS else _encode(x) for x in obj]
    if t is dict:
        if all(type(k) is str for k in obj) and not (len(obj) == 1 and next(iter(obj)) in TAGS):
            return {k: v if type(v) in _SCALARS else _encode(v) for k, v in obj.items()}
        return {TAG_DICT: [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if t is bytes or t is bytearray:
        return {TAG_BYTES: base64.b64encode(obj).decode("ascii")}
    if t is set or t is frozenset:
        tag = TAG_SET if t is set else TAG_FROZENSET
        return {tag: [_encode(x) for x in obj]}
    # Subclasses (IntEnum, namedtuple, OrderedDict...) are journaled as their base type.
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    for base in (tuple, list, dict, bytes, set, frozenset):
        if isinstance(obj, base):
            return _encode(base(obj))
    raise TypeError(
        f"cannot journal an object of type {t.__name__}: use JSON-like data (str, numbers, "
        "bytes, lists, tuples, dicts, sets) or formatter_list/converter_list hooks"
    )


def _decode_list(items: Any) -> list:
    if type(items) is not list:
        raise ValueError("tagged value is not a list")
    return [decode_value(x) for x in items]


def decode_value(data: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    t = type(data)
    if t is list:
        return [decode_value(x) for x in data]
    if t is dict:
        if len(data) == 1:
            (tag, inner), = data.items()
            if tag == TAG_TUPLE:
                return tuple(_decode_list(inner))
            if tag == TAG_BYTES:
                return base64.b64decode(inner)
            if tag == TAG_SET:
                return set(_decode_list(inner))
            if tag == TAG_FROZENSET:
                return frozenset(_decode_list(inner))
            if tag == TAG_DICT:
                return {decode_value(k): decode_value(v) for k, v in inner}
        return {k: decode_value(v) for k, v in data.items()}
    return data


def _not_json(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


from json.encoder import encode_basestring as _encode_str  # noqa: E402 (C when built)

try:  # the C encoder, built once (json.dumps builds an encoder per call)
    from json.encoder import c_make_encoder as _c_make_encoder

    _C_ENCODE = _c_make_encoder(None, _not_json, _encode_str, None, ":", ",", False, False,
                                False) if _c_make_encoder is not None else None
except ImportError:  # pragma: no cover
    _C_ENCODE = None


def dumps_value(obj: Any) -> str:
    """``dumps(encode_value(obj))``, with fast paths for the common flat messages (a str,
    an int, a tuple or list of scalars).  Raises TypeError for what :func:`encode_value`
    refuses."""
    t = type(obj)
    if t is str:
        return _encode_str(obj)
    if t is int:
        return int.__repr__(obj)
    if t is tuple or t is list:  # flat rows of scalars: no tagged copy to build
        for x in obj:
            if type(x) not in _SCALARS:
                break
        else:
            if t is list:
                return dumps(obj)
            return '{"' + TAG_TUPLE + '":' + dumps(list(obj)) + "}"
    return dumps(encode_value(obj))


def dumps(data: Any) -> str:
    """Compact JSON text (one line, UTF-8 kept as is).  ``data`` must be plain JSON data
    (the output of :func:`encode_value`); raises TypeError otherwise, and ValueError for
    a NaN or infinite float (strict JSON has neither)."""
    try:
        if _C_ENCODE is not None:
            return "".join(_C_ENCODE(data, 0))
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False,  # pragma: no cover
                          allow_nan=False)
    except ValueError:
        bad = _non_finite(data)
        if bad is None:
            raise
        raise ValueError(
            f"cannot journal the float {bad!r}: NaN and infinities are not JSON; replace "
            "them (for example with None) or journal them as text with "
            "formatter_list/converter_list hooks") from None
    except RecursionError:
        raise _too_deep(data) from None


def _children(obj: Any) -> Any:
    """The values directly inside a container (dict keys and values), else ()."""
    if isinstance(obj, dict):
        return [x for kv in obj.items() for x in kv]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    return ()


def _non_finite(data: Any) -> Any:
    """The first NaN or infinite float in ``data`` (a container of any depth), or None."""
    stack = [data]
    seen = set()
    while stack:
        x = stack.pop()
        if isinstance(x, float):
            if x != x or x in (_INF, -_INF):
                return x
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        stack.extend(_children(x))
    return None


_INF = float("inf")


def _too_deep(obj: Any) -> TypeError:
    """The error for a value that hit the recursion limit: it contains itself (named), or
    it is nested too deeply."""
    # Depth-first with the containers on the current path: a child on the path is a cycle.
    on_path: Set[int] = set()
    done: Set[int] = set()
    stack: List[Tuple[Any, bool]] = [(obj, False)]
    while stack:
        x, leaving = stack.pop()
        if leaving:
            on_path.discard(id(x))
            done.add(id(x))
            continue
        kids = _children(x)
        if not kids and not isinstance(x, (list, tuple, dict, set, frozenset)):
            continue
        if id(x) in on_path:
            return TypeError(
                f"cannot journal a {type(x).__name__} that contains itself (a reference "
                "cycle): JSON has no references; break the cycle or journal an id instead")
        if id(x) in done:
            continue
        on_path.add(id(x))
        stack.append((x, True))
        stack.extend((k, False) for k in kids)
    return TypeError(f"cannot journal this {type(obj).__name__}: it is nested deeper than "
                     f"Python's recursion limit ({sys.getrecursionlimit()})")
