"""A stage on a dask.distributed cluster: the client's executor as a stage executor, while
the coordinator keeps the journal."""

from __future__ import annotations

import pytest

from pympx_queues.pipeline import Pipeline, Retry, Stage

distributed = pytest.importorskip("distributed")


def square(x, ctx):
    if x == 4 and ctx.attempt == 1:
        raise ConnectionError("flaky worker")
    return x * x


def test_a_dask_local_cluster_executor_runs_a_stage_with_retries_and_a_journal(tmp_path):
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        ex = client.get_executor(pure=False)
        p = Pipeline(range(12), [Stage("cpu", square, executor=ex, workers=4,
                                       retry=Retry(max_attempts=2, backoff=0.01)),
                                 Stage("after", lambda y: y + 1)],
                     journal_dir=str(tmp_path), progress=False)
        res = {r.key: r for r in p.run()}
    assert all(r.ok for r in res.values())
    assert {k: r.value for k, r in res.items()} == {str(i): i * i + 1 for i in range(12)}
    assert p.report.stages["cpu"].retried == 1
