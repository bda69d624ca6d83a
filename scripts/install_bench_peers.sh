#!/usr/bin/env bash
# Install the queues scripts/bench.py compares against (issue 6).
#
# The pip extra 'bench' brings dirq, diskcache, litequeue, persist-queue, queuelib and
# python-dateutil.  The original pympx is installed separately with --no-deps: its declared
# dependencies include pywin32, which does not install on Linux, and its queuing module
# needs only python-dateutil (in the extra).  py-spy is optional, for profiling.
#
#   bash scripts/install_bench_peers.sh            # from the project root
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e '.[bench]'
python -m pip install --no-deps pympx
