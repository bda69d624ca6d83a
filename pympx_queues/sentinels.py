"""End-of-stream sentinels shared by every queue kind.

``DONE`` and ``FAILED`` are singletons of dedicated classes.  They survive pickling (a
child process unpickles the *same* object, so ``item is DONE`` holds across processes),
and no user value (``0``, ``False``, ``-1``, ``None``, ``"DONE"``) ever compares equal to
one.  Test with ``is``.
"""

from __future__ import annotations

from typing import Any


class _Sentinel:
    __slots__ = ("_name",)
    _registry: "dict[str, _Sentinel]" = {}

    def __new__(cls, name: str) -> "_Sentinel":
        existing = cls._registry.get(name)
        if existing is not None:
            return existing
        self = object.__new__(cls)
        self._name = name
        cls._registry[name] = self
        return self

    def __reduce__(self) -> Any:
        # Unpickles by looking the singleton up again: identity survives processes.
        return (_Sentinel, (self._name,))

    def __repr__(self) -> str:
        return f"pympx_queues.{self._name}"

    def __bool__(self) -> bool:
        # Neither sentinel is "a falsy value": guard against `if not item:` confusion.
        return True

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return hash(("pympx_queues.sentinel", self._name))

    def __copy__(self) -> "_Sentinel":
        return self

    def __deepcopy__(self, memo: Any) -> "_Sentinel":
        return self


#: Returned by ``get()`` / ends iteration when every producer has closed the stream.
DONE = _Sentinel("DONE")
#: Returned by ``get()`` (or raised as :class:`~pympx_queues.errors.QueueFailed` by
#: iteration) when a producer has failed the run.
FAILED = _Sentinel("FAILED")


def is_sentinel(obj: object) -> bool:
    """True only for ``DONE`` and ``FAILED`` themselves."""
    return obj is DONE or obj is FAILED
