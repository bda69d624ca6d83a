# consumer.py
import sys
import time

from pympx_queues import ReadableFolderQueue

queue = ReadableFolderQueue(sys.argv[1], task_done_directory=sys.argv[1] + "/done")
done = 0
for path in queue:                        # claims one file at a time until DONE
    with open(path) as f:
        f.read()                          # ... the real work ...
    if "--crash" in sys.argv:
        time.sleep(3600)                  # a long task: it is killed in the middle
    queue.task_done(path)
    done += 1
print(f"consumer finished {done} messages")
