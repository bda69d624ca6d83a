# producer.py
import sys

from pympx_queues import WritableFolderQueue

with WritableFolderQueue(sys.argv[1]) as queue:   # closes with DONE on exit
    for i in range(20):
        queue.put_data(f"order-{i:03d}.tsv", f"order\t{i}\n")
