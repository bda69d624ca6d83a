# job.py
import sys
import time

from pympx_queues import PersistentQueue

queue = PersistentQueue("orders", current_pickup_dir=sys.argv[1])
requeued = queue.requeue_unprocessed_work()        # work earlier runs left unfinished
if not requeued:
    for i in range(12):
        queue.put({"order": i})
for n in range(requeued or 12):
    order = queue.get()
    if "--crash" in sys.argv and n == 5:
        time.sleep(3600)                           # killed in the middle of order 5
    queue.task_done(order)
print(f"run finished {n + 1} orders ({requeued} requeued from earlier runs)")
queue.dispose()
