"""Kill switches: rules for giving up on a map (DESIGN.md P7, issue 12).

A switch sees every finished call as an :class:`Outcome` and says whether the map must
stop.  The protocol is prefecto's: ``should_flip_switch(state) -> bool`` (update the
counters with one outcome, return True when the switch trips) and
``raise_if_triggered(state)`` (the same, raising :class:`KillSwitchError`).  An
:class:`Outcome` answers ``is_failed()`` / ``is_crashed()`` / ``is_completed()`` like a
Prefect ``State``, so a switch written for prefecto works unchanged.

Built in: :class:`AnyFailed`, :class:`Count`, :class:`Rate` (prefecto's three, same
thresholds: ``>=``), :class:`Consecutive`, :class:`Windowed` (a failure rate over the last
N completions or the last T seconds) and :class:`AnyOf` (also spelled ``a | b``).

Classification: every built-in switch takes ``ignore=`` and ``counts=``: exception type
names, exception classes (matched by name: results of process workers carry only the
name) or a predicate ``f(outcome) -> bool``.  A failure that is ignored (or not matched
by ``counts``) is treated as a success by the counters, except by :class:`Consecutive`,
for which it is neutral (neither counts nor breaks the run of failures).

State: ``to_state()`` gives a JSON dict of the counters (the map journals it after every
completion), ``from_state()`` restores it, ``reset()`` zeroes it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

__all__ = ["Outcome", "KillSwitch", "AnyFailed", "Count", "Rate", "Consecutive",
           "Windowed", "AnyOf", "KillSwitchError", "Failure"]

CRASH_TYPES = frozenset({"WorkerDied"})

Classifier = Union[None, str, type, Sequence[Union[str, type]], Callable[["Outcome"], bool]]


class Outcome:
    """One finished call, as a switch sees it (duck-compatible with a Prefect State)."""

    __slots__ = ("index", "ok", "error_type", "message", "traceback", "args", "time")

    def __init__(self, index: int, ok: bool, error_type: Optional[str] = None,
                 message: str = "", traceback: str = "", args: str = "",
                 time_: Optional[float] = None) -> None:
        self.index = index
        self.ok = bool(ok)
        self.error_type = error_type
        self.message = message
        self.traceback = traceback
        self.args = args
        self.time = time.time() if time_ is None else time_

    def is_failed(self) -> bool:
        return not self.ok and self.error_type not in CRASH_TYPES

    def is_crashed(self) -> bool:
        return not self.ok and self.error_type in CRASH_TYPES

    def is_completed(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        if self.ok:
            return f"Outcome(index={self.index}, ok)"
        return f"Outcome(index={self.index}, {self.error_type}: {self.message})"


class Failure(dict):
    """A failed call as recorded in :class:`KillSwitchError` (a JSON-able dict with
    ``index``, ``args``, ``type``, ``message``, ``traceback``, ``time``)."""

    @classmethod
    def of(cls, o: Outcome) -> "Failure":
        return cls(index=o.index, args=o.args, type=o.error_type, message=o.message,
                   traceback=o.traceback, time=o.time)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class KillSwitchError(Exception):
    """A kill switch tripped.  ``ks`` is the switch (prefecto's name), ``counts`` the
    map's counters when it tripped (completed, failed, counted), ``failures`` the
    failed calls (index, args summary, exception type, message, traceback text, time),
    ``tripped_at`` the wall-clock time (epoch seconds) and ``reason`` a sentence."""

    def __init__(self, message: str, ks: Any = None, *, counts: Optional[Dict] = None,
                 failures: Iterable[Dict] = (), tripped_at: Optional[float] = None,
                 reason: str = "", run_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.ks = ks
        self.counts = dict(counts or {})
        self.failures: List[Failure] = [Failure(f) for f in failures]
        self.tripped_at = tripped_at
        self.reason = reason or message
        self.run_id = run_id

    @property
    def switch(self) -> Any:
        return self.ks


def _matcher(spec: Classifier) -> Optional[Callable[[Outcome], bool]]:
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, type):
        return spec
    items = [spec] if isinstance(spec, (str, type)) else list(spec)
    names = set()
    for it in items:
        if isinstance(it, type):
            names.add(it.__name__)
        elif isinstance(it, str):
            names.add(it)
        else:
            raise TypeError(f"ignore=/counts= take exception types, type names or a "
                            f"predicate, not {it!r}")
    return lambda o: o.error_type in names


class KillSwitch:
    """Base of the switches.  Subclasses implement :meth:`_observe` (update counters with
    one outcome, ``failed`` already classified; return True to trip) and list their
    counter attributes in ``_fields`` (for :meth:`to_state`).  A user switch may instead
    override :meth:`should_flip_switch` directly (prefecto's protocol)."""

    _fields: Sequence[str] = ()

    def __init__(self, *, ignore: Classifier = None, counts: Classifier = None) -> None:
        self._ignore = _matcher(ignore)
        self._counts = _matcher(counts)
        self.tripped_at: Optional[float] = None

    # -- classification
    def counts_as_failure(self, outcome: Any) -> bool:
        """True when ``outcome`` is a failure this switch counts."""
        failed = outcome.is_failed() or outcome.is_crashed()
        if not failed:
            return False
        if self._counts is not None and not self._counts(outcome):
            return False
        if self._ignore is not None and self._ignore(outcome):
            return False
        return True

    # -- prefecto's protocol
    def should_flip_switch(self, state: Any) -> bool:
        """Count one outcome; True when the switch is (now or already) tripped."""
        if self.tripped_at is not None:
            return True
        if self._observe(state, self.counts_as_failure(state)):
            self.tripped_at = time.time()
            return True
        return False

    def raise_if_triggered(self, state: Any) -> None:
        if self.should_flip_switch(state):
            raise KillSwitchError(self.describe(), self, tripped_at=self.tripped_at)

    # -- to implement
    def _observe(self, outcome: Any, failed: bool) -> bool:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """Why the switch trips, in a sentence."""
        return f"{type(self).__name__} tripped"

    # -- state
    @property
    def tripped(self) -> bool:
        return self.tripped_at is not None

    def to_state(self) -> Dict[str, Any]:
        st: Dict[str, Any] = {"type": type(self).__name__, "tripped_at": self.tripped_at}
        for f in self._fields:
            v = getattr(self, f)
            st[f] = [list(x) for x in v] if isinstance(v, deque) else v
        return st

    def from_state(self, state: Optional[Dict[str, Any]]) -> "KillSwitch":
        if not state:
            return self
        if state.get("type") != type(self).__name__:
            raise ValueError(f"journaled switch state is for a {state.get('type')}, "
                             f"not a {type(self).__name__}")
        self.tripped_at = state.get("tripped_at")
        for f in self._fields:
            if f in state:
                cur = getattr(self, f)
                v = state[f]
                if isinstance(cur, deque):
                    cur.clear()
                    cur.extend(tuple(x) for x in v)
                else:
                    setattr(self, f, v)
        return self

    def reset(self) -> None:
        self.tripped_at = None
        for f in self._fields:
            cur = getattr(self, f)
            if isinstance(cur, deque):
                cur.clear()
            else:
                setattr(self, f, 0)

    def __or__(self, other: "KillSwitch") -> "AnyOf":
        return AnyOf(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


class AnyFailed(KillSwitch):
    """Trips on the first counted failure."""

    _fields = ("failed",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.failed = 0

    def _observe(self, outcome: Any, failed: bool) -> bool:
        if failed:
            self.failed += 1
        return self.failed >= 1

    def describe(self) -> str:
        return "a call failed"


class Count(KillSwitch):
    """Trips when ``max_count`` failures have been counted (prefecto's CountSwitch)."""

    _fields = ("failed",)

    def __init__(self, max_count: int, **kw: Any) -> None:
        super().__init__(**kw)
        if not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be an int >= 1, not {max_count!r}")
        self.max_count = max_count
        self.failed = 0

    def _observe(self, outcome: Any, failed: bool) -> bool:
        if failed:
            self.failed += 1
        return self.failed >= self.max_count

    def describe(self) -> str:
        return f"{self.max_count} calls failed"


def _check_rate(min_sample: int, max_fail_rate: float) -> None:
    if not isinstance(min_sample, int) or min_sample < 1:
        raise ValueError(f"min_sample must be an int >= 1, not {min_sample!r}")
    if not (0 < max_fail_rate <= 1):
        raise ValueError(f"max_fail_rate must be in (0, 1], not {max_fail_rate!r}")


class Rate(KillSwitch):
    """Trips when at least ``min_sample`` calls finished and the failed fraction of all
    of them is ``>= max_fail_rate`` (prefecto's RateSwitch)."""

    _fields = ("completed", "failed")

    def __init__(self, min_sample: int, max_fail_rate: float, **kw: Any) -> None:
        super().__init__(**kw)
        _check_rate(min_sample, max_fail_rate)
        self.min_sample = min_sample
        self.max_fail_rate = max_fail_rate
        self.completed = 0
        self.failed = 0

    def _observe(self, outcome: Any, failed: bool) -> bool:
        self.completed += 1
        if failed:
            self.failed += 1
        return (self.completed >= self.min_sample
                and self.failed / self.completed >= self.max_fail_rate)

    def describe(self) -> str:
        return (f"failure rate reached {self.max_fail_rate:.0%} after at least "
                f"{self.min_sample} calls")


class Consecutive(KillSwitch):
    """Trips after ``n`` counted failures in a row (a success breaks the run; an ignored
    failure neither counts nor breaks it)."""

    _fields = ("streak",)

    def __init__(self, n: int, **kw: Any) -> None:
        super().__init__(**kw)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, not {n!r}")
        self.n = n
        self.streak = 0

    def _observe(self, outcome: Any, failed: bool) -> bool:
        if failed:
            self.streak += 1
        elif outcome.is_completed():
            self.streak = 0
        return self.streak >= self.n

    def describe(self) -> str:
        return f"{self.n} calls failed in a row"


class Windowed(KillSwitch):
    """Trips when, over the last ``last`` completions or the last ``seconds`` seconds
    (wall clock, so a restart continues the window), at least ``min_sample`` calls
    finished and the failed fraction is ``>= max_fail_rate``."""

    _fields = ("window",)

    def __init__(self, max_fail_rate: float, *, last: Optional[int] = None,
                 seconds: Optional[float] = None, min_sample: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        _check_rate(min_sample, max_fail_rate)
        if (last is None) == (seconds is None):
            raise ValueError("Windowed needs exactly one of last= (completions) or "
                             "seconds=")
        if last is not None and (not isinstance(last, int) or last < min_sample):
            raise ValueError(f"last must be an int >= min_sample, not {last!r}")
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be > 0, not {seconds!r}")
        self.max_fail_rate = max_fail_rate
        self.last = last
        self.seconds = seconds
        self.min_sample = min_sample
        self.window: deque = deque()  # (time, failed 0/1)

    def _observe(self, outcome: Any, failed: bool) -> bool:
        w = self.window
        t = getattr(outcome, "time", None) or time.time()
        w.append((t, 1 if failed else 0))
        if self.last is not None:
            while len(w) > self.last:
                w.popleft()
        else:
            while w and w[0][0] < t - self.seconds:
                w.popleft()
        n = len(w)
        return n >= self.min_sample and sum(f for _t, f in w) / n >= self.max_fail_rate

    def describe(self) -> str:
        span = f"the last {self.last} calls" if self.last is not None else \
            f"the last {self.seconds:g} s"
        return f"failure rate over {span} reached {self.max_fail_rate:.0%}"


class AnyOf(KillSwitch):
    """Trips when any of its switches trips (every switch sees every outcome)."""

    def __init__(self, *switches: KillSwitch) -> None:
        super().__init__()
        flat: List[Any] = []
        for s in switches:
            if not hasattr(s, "should_flip_switch"):
                raise TypeError(f"AnyOf takes kill switches, not {s!r}")
            flat.extend(s.switches if isinstance(s, AnyOf) else [s])
        if not flat:
            raise ValueError("AnyOf needs at least one switch")
        self.switches = flat
        self.which: Optional[Any] = None

    def should_flip_switch(self, state: Any) -> bool:
        if self.tripped_at is not None:
            return True
        hit = None
        for s in self.switches:
            if s.should_flip_switch(state) and hit is None:
                hit = s
        if hit is not None:
            self.which = hit
            self.tripped_at = time.time()
            return True
        return False

    def describe(self) -> str:
        if self.which is not None:
            return self.which.describe() if hasattr(self.which, "describe") else \
                f"{type(self.which).__name__} tripped"
        return " or ".join(s.describe() if hasattr(s, "describe") else type(s).__name__
                           for s in self.switches)

    def to_state(self) -> Dict[str, Any]:
        return {"type": "AnyOf", "tripped_at": self.tripped_at,
                "which": None if self.which is None else self.switches.index(self.which),
                "switches": [s.to_state() if hasattr(s, "to_state") else None
                             for s in self.switches]}

    def from_state(self, state: Optional[Dict[str, Any]]) -> "AnyOf":
        if not state:
            return self
        subs = state.get("switches") or []
        if state.get("type") != "AnyOf" or len(subs) != len(self.switches):
            raise ValueError("journaled switch state does not match this AnyOf")
        for s, st in zip(self.switches, subs):
            if hasattr(s, "from_state"):
                s.from_state(st)
        self.tripped_at = state.get("tripped_at")
        w = state.get("which")
        self.which = None if w is None else self.switches[w]
        return self

    def reset(self) -> None:
        self.tripped_at = None
        self.which = None
        for s in self.switches:
            if hasattr(s, "reset"):
                s.reset()
