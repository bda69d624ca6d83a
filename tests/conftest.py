"""Shared test helpers: deadlines instead of sleeps."""

from __future__ import annotations

import logging
import time
from typing import Callable

import pytest


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.01,
             message: str = "condition") -> object:
    """Poll ``condition`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def deadline_wait():
    return wait_for


@pytest.fixture(autouse=True)
def _restore_library_logger():
    """The CLI (run in-process by CliRunner) and the torture script configure the
    ``pympx_queues`` logger as a program would; put it back after every test so that
    ``caplog`` in later tests sees the library's warnings."""
    logger = logging.getLogger("pympx_queues")
    saved = (logger.level, list(logger.handlers), logger.propagate, logger.disabled)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]
    logger.disabled = saved[3]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self):
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def folder_log():
    """Records of the ``pympx_queues.folder`` logger, captured on that logger itself."""
    logger = logging.getLogger("pympx_queues.folder")
    handler = _Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
