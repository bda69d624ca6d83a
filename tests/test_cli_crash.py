"""After a crash, with real processes: consumers are SIGKILLed while they hold work,
``pympx-queues status`` shows it, ``pympx-queues requeue`` returns it, a new consumer
finishes it and ``status`` shows nothing outstanding.  The CLI runs as a subprocess, exactly
as the README's "After a crash" section shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import wait_for

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "pympx_queues.cli"]


def cli(*args, timeout=30):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=10)
        p.stdout.close()
        p.stderr.close()


# A consumer that claims one message, says so, and then "works" on it until killed.
HOLDING_CONSUMER = """
    import os, sys, time
    from pympx_queues.folder import ReadableFolderQueue
    queue, markers = sys.argv[1:3]
    q = ReadableFolderQueue(queue, wakeups="poll", poll_interval=0.02)
    path = q.get(timeout=20)
    with open(os.path.join(markers, f"claimed-{os.getpid()}"), "w") as f:
        f.write(path)
    while True:
        time.sleep(1)  # the work that SIGKILL interrupts
"""

# A consumer that processes everything until the stream ends, printing the count.
FINISHING_CONSUMER = """
    import os, sys
    from pympx_queues.folder import ReadableFolderQueue
    queue = sys.argv[1]
    q = ReadableFolderQueue(queue, task_done_directory=os.path.join(queue, "done"),
                            wakeups="poll", poll_interval=0.02)
    n = 0
    for path in q:
        q.task_done(path)
        n += 1
    q.close()
    print(n)
"""


def test_folder_queue_recovery_after_consumers_are_killed(tmp_path):
    from pympx_queues.folder import WritableFolderQueue

    queue, markers = tmp_path / "orders", tmp_path / "markers"
    markers.mkdir()
    producer = WritableFolderQueue(queue)
    for i in range(20):
        producer.put_data(f"order-{i:03d}.tsv", f"order\t{i}\n")
    producer.close()

    consumers = [spawn(HOLDING_CONSUMER, queue, markers) for _ in range(3)]
    try:
        wait_for(lambda: len(os.listdir(markers)) == 3, timeout=30,
                 message="3 consumers holding a claim")
    finally:
        kill_all(consumers)  # SIGKILL: no task_done, no cleanup

    r = cli("status", queue, "--check")
    assert r.returncode == 1, r.stderr
    assert "(0 live, 3 stale)" in r.stdout and "3 stale claims" in r.stdout
    report = json.loads(cli("status", queue, "--json").stdout)
    assert report["counts"]["wip_stale"] == 3 and report["counts"]["ready"] == 17
    assert report["outstanding"] == 20

    r = cli("requeue", queue, "--dry-run")
    assert r.returncode == 0 and "3 messages would be requeued" in r.stdout
    r = cli("requeue", queue)
    assert r.returncode == 0, r.stderr
    assert "3 messages requeued" in r.stdout and r.stderr == ""
    r = cli("requeue", queue)  # idempotent (G5)
    assert r.returncode == 0 and "0 messages requeued" in r.stdout
    report = json.loads(cli("status", queue, "--json").stdout)
    assert report["counts"]["ready"] == 20 and report["counts"]["wip"] == 0

    finisher = subprocess.run([sys.executable, "-c", textwrap.dedent(FINISHING_CONSUMER),
                               str(queue)], capture_output=True, text=True, timeout=60)
    assert finisher.returncode == 0, finisher.stderr
    assert finisher.stdout.strip() == "20"  # nothing lost, nothing done twice

    r = cli("status", queue, "--check")
    assert r.returncode == 0, r.stdout
    report = json.loads(cli("status", queue, "--json").stdout)
    assert report["outstanding"] == 0 and report["counts"]["done"] == 20
    assert report["problems"] == []


# A PersistentQueue run that puts work, finishes part of it, then is killed.
CRASHING_RUN = """
    import os, sys, time
    from pympx_queues.persistent import PersistentQueue
    pickup, total, finish, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    q = PersistentQueue("orders", current_pickup_dir=pickup)
    for i in range(total):
        q.put({"order": i})
    for _ in range(finish):
        q.task_done(q.get(timeout=10))
    open(marker, "w").close()
    while True:
        time.sleep(1)  # still "working" when SIGKILL arrives
"""

# The next run: requeue what earlier runs left, finish it, print how many.
NEXT_RUN = """
    import sys
    from pympx_queues.persistent import PersistentQueue
    q = PersistentQueue("orders", current_pickup_dir=sys.argv[1])
    n = q.requeue_unprocessed_work()
    for _ in range(n):
        q.task_done(q.get(timeout=10))
    q.close()
    q.dispose()
    print(n)
"""


def test_pickup_dir_recovery_after_the_run_is_killed(tmp_path):
    pickup, marker = tmp_path / "pickup", tmp_path / "half-done"
    run = spawn(CRASHING_RUN, pickup, 12, 5, marker)
    try:
        wait_for(marker.exists, timeout=30, message="first run half done")
    finally:
        kill_all([run])

    r = cli("status", pickup, "--check")
    assert r.returncode == 1, r.stderr
    assert "PersistentQueue pickup dir" in r.stdout
    assert "7 messages outstanding from runs that are not running" in r.stdout
    report = json.loads(cli("status", pickup, "--json").stdout)
    assert report["counts"] == {"requested": 12, "completed": 5, "outstanding": 7}

    r = cli("ls", pickup, "--json")
    assert sorted(m["body"]["order"] for m in json.loads(r.stdout)) == list(range(5, 12))

    r = cli("requeue", pickup)
    assert r.returncode == 0, r.stderr
    assert "7 messages ready for the next run" in r.stdout

    nxt = subprocess.run([sys.executable, "-c", textwrap.dedent(NEXT_RUN), str(pickup)],
                         capture_output=True, text=True, timeout=60)
    assert nxt.returncode == 0, nxt.stderr
    assert nxt.stdout.strip() == "7"

    r = cli("status", pickup, "--check")
    assert r.returncode == 0, r.stdout
    report = json.loads(cli("status", pickup, "--json").stdout)
    assert report["outstanding"] == 0 and report["problems"] == []
    assert cli("verify", pickup).returncode == 0
