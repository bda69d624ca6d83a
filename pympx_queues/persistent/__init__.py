"""PersistentQueue: a ``multiprocessing.JoinableQueue`` that journals puts and acks.

* :mod:`.queue` - :class:`PersistentQueue` and :class:`Message`;
* :mod:`.pickup` - administration of pickup dirs (inspect, verify, repair, requeue), what
  the ``pympx-queues`` commands run on a pickup dir.

The journal format lives in :mod:`pympx_queues.journal`.
"""

from __future__ import annotations

from .queue import Message, PersistentQueue, return_same

__all__ = ["PersistentQueue", "Message", "return_same"]
