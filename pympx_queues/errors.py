"""Exceptions raised by pympx_queues.  ``queue.Empty`` and ``queue.Full`` are reused as is."""

from __future__ import annotations

from queue import Empty, Full

__all__ = [
    "Empty", "Full", "PympxQueueError", "QueueFailed", "QueueClosed",
    "JournalCorruptError", "IncompleteGroupsError", "NotAQueueError", "ConsumerDied",
]


class PympxQueueError(Exception):
    """Base class of every error this library raises on purpose."""


class QueueFailed(PympxQueueError):
    """A producer failed the run (a FAILED sentinel was seen); consumers should stop."""


class QueueClosed(PympxQueueError, ValueError):
    """An operation (such as ``put``) was attempted after ``close()`` or ``fail()``."""


class ConsumerDied(PympxQueueError):
    """``join()`` found consumer processes that died holding unacknowledged messages.

    Those messages can never be acknowledged in this run, so ``join()`` would wait
    forever; they are in the journal and the next run requeues them.  ``pids`` lists the
    dead consumers' process ids.
    """

    def __init__(self, message: str, pids: "tuple[int, ...]" = ()) -> None:
        super().__init__(message)
        self.pids = tuple(pids)

    def __reduce__(self):
        return (type(self), (str(self), self.pids))


class NotAQueueError(PympxQueueError):
    """A path given to the library or CLI is neither a folder queue nor a pickup dir."""


class JournalCorruptError(PympxQueueError):
    """A journal record failed its checksum and good records follow it.

    That is real corruption, not a torn tail: recovery fails closed rather than guess.
    ``path`` and ``offset`` name the first bad byte; ``pympx-queues repair`` quarantines it.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"corrupt journal record in {path} at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.path, self.offset, self.reason))


class IncompleteGroupsError(PympxQueueError):
    """The stream ended (DONE) while some file groups were still incomplete.

    ``groups`` maps each group key to the list of file names present.
    """

    def __init__(self, groups: dict) -> None:
        names = ", ".join(sorted(map(str, groups))[:10])
        super().__init__(f"{len(groups)} incomplete group(s) at end of stream: {names}")
        self.groups = groups

    def __reduce__(self):
        return (type(self), (self.groups,))
