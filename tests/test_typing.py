"""Type checkers see the public names: ``mypy --strict`` on a user script, run against the
installed package (the suite runs from the README's editable install)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

pytest.importorskip("mypy")

CORRECT = '''
from typing import List, Optional

from pympx_queues import (DONE, ConsumerDied, Message, PersistentQueue, QueueClosed,
                          ReadableFolderQueue, WritableFolderQueue)
from pympx_queues.compat import PersistentQueue as PympxPersistentQueue


def run(path: str) -> List[str]:
    q = PersistentQueue("jobs", current_pickup_dir=path, number_of_workers=1)
    mid: Optional[str] = q.put({"row": 1})
    msg = q.get_message(timeout=1.0)
    if isinstance(msg, Message):
        q.task_done(msg)
    finished: bool = q.join(timeout=5.0)
    q.close()
    assert q.get() is DONE and finished
    old = PympxPersistentQueue("old", current_pickup_dir=path)
    old.dispose()
    try:
        q.put(2)
    except (QueueClosed, ConsumerDied):
        pass
    writer = WritableFolderQueue(path)
    reader = ReadableFolderQueue(path)
    del writer, reader
    return [mid or ""]
'''

WRONG = '''
from pympx_queues import PersistentQueue

q = PersistentQueue("jobs", current_pickup_dir="/tmp/x")
count: int = q.put(1)
q.put_all([1, 2])
q.join(timeout="soon")
'''


def test_mypy_strict_sees_the_public_names_of_the_installed_package(tmp_path):
    try:
        metadata.distribution("pympx_queues")
    except metadata.PackageNotFoundError:  # pragma: no cover - not run from an install
        pytest.skip("pympx_queues is not installed (pip install -e .)")
    (tmp_path / "correct.py").write_text(textwrap.dedent(CORRECT))
    (tmp_path / "wrong.py").write_text(textwrap.dedent(WRONG))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    # Run outside the source tree: the package must be found as installed.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "correct.py", "wrong.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    lines = done.stdout.splitlines()
    assert not [line for line in lines if line.startswith("correct.py")], done.stdout
    wrong = "\n".join(line for line in lines if line.startswith("wrong.py"))
    assert 'Incompatible types in assignment (expression has type "str | None"' in wrong \
        or 'Incompatible types in assignment (expression has type "Optional[str]"' in wrong
    assert '"PersistentQueue" has no attribute "put_all"' in wrong
    assert 'Argument "timeout" to "join"' in wrong
    assert "import-not-found" not in done.stdout and "import-untyped" not in done.stdout
    assert done.returncode == 1, done.stdout + done.stderr
