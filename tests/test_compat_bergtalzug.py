"""pympx_queues.compat.bergtalzug against bergtalzug 0.2.0's README.

The tests are written from bergtalzug's README examples: the Quick Start pipeline, its
handler signature table, the monitoring loop, completion callbacks, error handling.  The
same module runs against real bergtalzug (Python 3.14) when ``BERGTALZUG_MODULE=bergtalzug``
(scripts/bench_pipeline.py --compat-check does it): the ``ours_only`` tests (durability,
retries) are skipped there, and the ``readme_promise`` tests show where bergtalzug 0.2.0
does not do what its README says (they fail there, by design).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BZ = importlib.import_module(os.environ.get("BERGTALZUG_MODULE", "pympx_queues.compat.bergtalzug"))
REAL = BZ.__name__ == "bergtalzug"
ETLPipeline, ETLPipelineConfig = BZ.ETLPipeline, BZ.ETLPipelineConfig
StageConfig, ExecutionType, WorkItem = BZ.StageConfig, BZ.ExecutionType, BZ.WorkItem

ROOT = Path(__file__).resolve().parent.parent
ours_only = pytest.mark.skipif(REAL, reason="a pympx_queues extension")
#: bergtalzug 0.2.0 documents this but does not do it; fails against the real thing.
readme_promise = pytest.mark.timeout(60)


# -- the README's handlers (module level: the process stage pickles them) ------------------

async def fetch_data(item):
    item.data["raw_data"] = {"value": item.data["id"] * item.data["id"]}
    return item


def parse_data(item):
    item.data["parsed"] = item.data["raw_data"]
    return item


def compute_data(job_id, data):
    import math

    data["computed"] = math.sqrt(data["parsed"]["value"])
    data["computed_by"] = job_id
    return data


async def store_data(item):
    item.data["stored"] = True
    return item


def exit_on_job_2(job_id, data):
    if job_id == "2":
        os._exit(3)  # the worker process dies
    return data


def quick_start_config(**extra):
    return ETLPipelineConfig(
        pipeline_name="my_pipeline",
        stages=[
            StageConfig(name="fetch", execution_type=ExecutionType.ASYNC, workers=10,
                        queue_size=100),
            StageConfig(name="parse", execution_type=ExecutionType.THREAD, workers=5,
                        queue_size=50),
            StageConfig(name="compute", execution_type=ExecutionType.PROCESS, workers=2,
                        queue_size=20),
            StageConfig(name="store", execution_type=ExecutionType.ASYNC, workers=10,
                        queue_size=100),
        ],
        queue_refresh_rate=0.01,
        stats_interval_seconds=0,
        enable_tracking=True,
        **extra,
    )


class MyPipeline(ETLPipeline):
    """The README's refill: ``items_to_process`` items, then an empty list."""

    def __init__(self, config, items_to_process=100, job_ids=None, endless=False):
        super().__init__(config)
        self.items_to_process = items_to_process
        self.items_generated = 0
        self.job_ids = job_ids
        self.endless = endless

    async def refill_queue(self, count):
        items = []
        for _ in range(count):
            if self.items_generated >= self.items_to_process and not self.endless:
                break
            n = self.items_generated
            job_id = self.job_ids[n] if self.job_ids else str(n)
            items.append(WorkItem(data={"id": n, "url": f"https://api.example.com/item/{n}"},
                                  job_id=job_id))
            self.items_generated += 1
        return items


def simple_config(*kinds, **extra):
    stages = [StageConfig(name=f"s{i}", execution_type=k, workers=2, queue_size=10)
              for i, k in enumerate(kinds)]
    return ETLPipelineConfig(pipeline_name="t", stages=stages, queue_refresh_rate=0.01,
                             stats_interval_seconds=0, **extra)


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- README: Quick Start ----------------------------------------------------------------------

def test_quick_start_runs_every_item_through_the_four_stages_and_calls_back():
    pipeline = MyPipeline(quick_start_config(), items_to_process=100)
    pipeline.register_stage_handler("fetch", fetch_data)
    pipeline.register_stage_handler("parse", parse_data)
    pipeline.register_stage_handler("compute", compute_data)
    pipeline.register_stage_handler("store", store_data)
    seen = []
    pipeline.add_completion_callback(seen.append)

    results = run(pipeline.run())

    assert sorted(int(r.job_id) for r in results) == list(range(100))
    assert all(r.success and r.error is None for r in results)
    assert sorted(r.job_id for r in seen) == sorted(r.job_id for r in results)
    for r in results:
        assert r.total_duration is not None and r.total_duration >= 0
        for stage in ("fetch", "parse", "compute", "store"):
            assert r.metadata.get_stage_duration(stage) is not None
        assert r.metadata.get_stage_duration("no-such-stage") is None


def test_process_stage_gets_job_id_and_data_and_its_return_becomes_the_items_data():
    done = {}
    p = MyPipeline(quick_start_config(), items_to_process=10)
    for name, fn in (("fetch", fetch_data), ("parse", parse_data), ("compute", compute_data)):
        p.register_stage_handler(name, fn)

    async def store(item):
        done[item.job_id] = dict(item.data)
        return item

    p.register_stage_handler("store", store)
    run(p.run())
    assert set(done) == {str(i) for i in range(10)}
    for job_id, data in done.items():
        assert data["computed_by"] == job_id
        assert data["computed"] == float(data["id"])


def test_an_empty_refill_ends_the_run():
    p = MyPipeline(simple_config(ExecutionType.ASYNC), items_to_process=0)
    p.register_stage_handler("s0", store_data)
    assert run(p.run()) == []


def test_a_failing_item_is_reported_with_its_exception_and_the_others_go_on():
    def parse(item):
        if item.job_id == "3":
            raise ValueError("bad record 3")
        return item

    p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.THREAD), items_to_process=10)
    p.register_stage_handler("s0", fetch_data)
    p.register_stage_handler("s1", parse)
    results = {r.job_id: r for r in run(p.run())}
    assert len(results) == 10
    bad = results.pop("3")
    assert not bad.success and isinstance(bad.error, ValueError) and "bad record 3" in str(bad.error)
    assert all(r.success for r in results.values())
    stats = run(p.get_pipeline_stats())
    assert stats["completed_items"] == 10 and stats["success_rate"] == pytest.approx(0.9)


# -- README: handler signatures and config validation ----------------------------------------

async def _async_one(item):
    return item


def _sync_one(item):
    return item


def _sync_two(job_id, data):
    return data


async def _async_two(job_id, data):
    return data


@pytest.mark.parametrize("kind, handler, fragment", [
    (ExecutionType.ASYNC, _sync_one, "is not async"),
    (ExecutionType.THREAD, _async_one, "handler is async"),
    (ExecutionType.THREAD, _sync_two, "exactly 1 parameter"),
    (ExecutionType.ASYNC, _async_two, "exactly 1 parameter"),
    (ExecutionType.PROCESS, _sync_one, "exactly 2 parameters"),
    (ExecutionType.PROCESS, _async_two, "handler is async"),
    (ExecutionType.INTERPRETER, _sync_one, "exactly 2 parameters"),
])
def test_a_handler_that_does_not_fit_its_execution_type_is_a_type_error_naming_the_stage(
        kind, handler, fragment):
    p = MyPipeline(simple_config(kind))
    with pytest.raises(TypeError, match=fragment) as info:
        p.register_stage_handler("s0", handler)
    assert "'s0'" in str(info.value)


@pytest.mark.parametrize("kind, handler", [
    (ExecutionType.ASYNC, _async_one), (ExecutionType.THREAD, _sync_one),
    (ExecutionType.PROCESS, _sync_two), (ExecutionType.INTERPRETER, _sync_two),
])
def test_handlers_of_the_readme_table_are_accepted(kind, handler):
    MyPipeline(simple_config(kind)).register_stage_handler("s0", handler)


def test_an_unknown_stage_name_is_a_value_error():
    p = MyPipeline(simple_config(ExecutionType.ASYNC))
    with pytest.raises(ValueError, match="not found"):
        p.register_stage_handler("nope", _async_one)


@pytest.mark.parametrize("name", ["created", "completed", "error"])
def test_reserved_stage_names_are_refused(name):
    with pytest.raises(ValueError, match="reserved"):
        ETLPipelineConfig(stages=[StageConfig(name=name)])


def test_duplicate_stage_names_and_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="unique"):
        ETLPipelineConfig(stages=[StageConfig(name="a"), StageConfig(name="a")])
    with pytest.raises(ValueError):
        ETLPipelineConfig(stages=[])
    with pytest.raises(ValueError):
        StageConfig(name="a", workers=0)
    with pytest.raises(ValueError):
        StageConfig(name="a", queue_size=-1)
    with pytest.raises(ValueError):
        ETLPipelineConfig(stages=[StageConfig(name="a")], queue_refresh_rate=-1.0)


def test_defaults_are_bergtalzugs():
    s = StageConfig(name="a")
    assert (s.execution_type, s.workers, s.queue_size) == (ExecutionType.ASYNC, 5, 1000)
    c = ETLPipelineConfig(stages=[s])
    assert (c.pipeline_name, c.queue_refresh_rate, c.stats_interval_seconds,
            c.enable_tracking) == ("etl_pipeline", 1.0, 10.0, True)
    assert ExecutionType("thread") is ExecutionType.THREAD and ExecutionType.PROCESS == "process"
    item = WorkItem(data=1)
    assert item.job_id and item.metadata.current_stage == "created"


def test_running_without_a_handler_for_every_stage_is_a_runtime_error():
    p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.THREAD))
    p.register_stage_handler("s0", _async_one)
    with pytest.raises(RuntimeError, match="No handler registered for stage 's1'"):
        run(p.run())


# -- README promises bergtalzug 0.2.0 does not keep ------------------------------------------

@readme_promise
def test_start_then_monitor_while_is_running_then_run_returns_the_results():
    async def main():
        p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.THREAD),
                       items_to_process=30)
        p.register_stage_handler("s0", fetch_data)
        p.register_stage_handler("s1", parse_data)
        await p.start()
        polls = 0
        while p.is_running():                      # the README's monitoring loop
            stats = await p.get_pipeline_stats()
            assert {"active_items", "completed_items", "success_rate"} <= set(stats)
            polls += 1
            await asyncio.sleep(0.01)
        return await p.run(), polls

    results, polls = run(main(), timeout=30)
    assert len(results) == 30 and polls >= 1


@readme_promise
def test_stop_then_run_finishes_the_items_in_flight_and_returns_their_results():
    async def main():
        p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.THREAD), endless=True)
        done = []
        p.add_completion_callback(done.append)
        p.register_stage_handler("s0", fetch_data)
        p.register_stage_handler("s1", parse_data)
        await p.start()
        while len(done) < 5:
            await asyncio.sleep(0.005)
        await p.stop()
        results = await p.run()
        return p, results

    p, results = run(main(), timeout=30)
    assert len(results) >= 5 and all(r.success for r in results)
    assert not p.is_running


@readme_promise
def test_duplicate_job_ids_from_the_refill_do_not_break_the_run():
    # "1" and "3" twice in one refill batch: both copies are in flight at once
    ids = ["0", "1", "1", "2", "3", "3"] + [str(i) for i in range(4, 15)]
    p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.THREAD),
                   items_to_process=len(ids), job_ids=ids)
    p.register_stage_handler("s0", fetch_data)
    p.register_stage_handler("s1", parse_data)
    results = run(p.run(), timeout=30)
    assert sorted(int(r.job_id) for r in results) == list(range(15))
    assert all(r.success for r in results)


@readme_promise
def test_a_process_worker_that_dies_fails_its_item_only_and_the_stage_goes_on():
    p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.PROCESS),
                   items_to_process=12)
    p.register_stage_handler("s0", fetch_data)
    p.register_stage_handler("s1", exit_on_job_2)
    results = {r.job_id: r for r in run(p.run(), timeout=60)}
    assert len(results) == 12
    assert not results.pop("2").success
    assert all(r.success for r in results.values()), [j for j, r in results.items()
                                                      if not r.success]


# -- this library's additions -----------------------------------------------------------------

@ours_only
def test_is_running_works_as_property_and_as_call():
    p = MyPipeline(simple_config(ExecutionType.ASYNC))
    assert not p.is_running and p.is_running() is False and p.is_running == False  # noqa: E712


@ours_only
def test_a_stage_retry_in_the_config_retries_failed_attempts():
    from pympx_queues.pipeline import Retry

    attempts = {}

    def flaky(item):
        attempts[item.job_id] = attempts.get(item.job_id, 0) + 1
        if attempts[item.job_id] == 1:
            raise ConnectionError("first attempt fails")
        return item

    cfg = ETLPipelineConfig(stages=[StageConfig(
        name="s0", execution_type=ExecutionType.THREAD, workers=2, queue_size=10,
        retry=Retry(max_attempts=2, backoff=0.0, jitter=0.0))],
        queue_refresh_rate=0.01, stats_interval_seconds=0)
    p = MyPipeline(cfg, items_to_process=8)
    p.register_stage_handler("s0", flaky)
    results = run(p.run())
    assert len(results) == 8 and all(r.success for r in results)
    assert set(attempts.values()) == {2}


@ours_only
def test_with_end_on_empty_off_an_empty_refill_is_nothing_now_and_end_ends():
    class Slow(ETLPipeline):
        calls = 0

        async def refill_queue(self, count):
            self.calls += 1
            if self.calls <= 3:
                return []                               # nothing yet: not the end
            if self.calls == 4:
                return [WorkItem(data={"id": i}, job_id=str(i)) for i in range(5)]
            return ETLPipeline.END

    p = Slow(simple_config(ExecutionType.ASYNC, end_on_empty=False))
    p.register_stage_handler("s0", _async_one)
    assert sorted(r.job_id for r in run(p.run())) == [str(i) for i in range(5)]


@ours_only
def test_collect_results_off_keeps_no_list_but_calls_back_for_every_item():
    p = MyPipeline(simple_config(ExecutionType.ASYNC, collect_results=False),
                   items_to_process=50)
    seen = []
    p.add_completion_callback(seen.append)
    p.register_stage_handler("s0", _async_one)
    assert run(p.run()) == []
    assert len(seen) == 50


@ours_only
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="interpreters exist here")
def test_an_interpreter_stage_before_python_314_is_a_clear_error():
    p = MyPipeline(simple_config(ExecutionType.INTERPRETER))
    p.register_stage_handler("s0", _sync_two)
    with pytest.raises(Exception, match="3.14"):
        run(p.run())


@ours_only
def test_a_durable_rerun_skips_the_job_ids_done_before(tmp_path):
    calls = []

    def parse(item):
        calls.append(item.job_id)
        return item

    def make():
        p = MyPipeline(simple_config(ExecutionType.ASYNC, ExecutionType.THREAD,
                                     journal_dir=str(tmp_path / "journal")),
                       items_to_process=20)
        p.register_stage_handler("s0", fetch_data)
        p.register_stage_handler("s1", parse)
        return p

    first = run(make().run())
    assert len(first) == 20 and sorted(calls) == sorted(str(i) for i in range(20))
    calls.clear()
    run(make().run())
    assert calls == []


KILLED_PROGRAM = textwrap.dedent("""
    import asyncio, sys, time
    from pympx_queues.compat.bergtalzug import (
        ETLPipeline, ETLPipelineConfig, StageConfig, ExecutionType, WorkItem)

    journal, log, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def note(what, job_id):
        with open(log, "a") as f:
            f.write(f"{what} {job_id}\\n")

    class Job(ETLPipeline):
        made = 0
        async def refill_queue(self, count):
            start, self.made = self.made, min(n, self.made + count)
            return [WorkItem(data={"n": i}, job_id=f"job-{i}") for i in range(start, self.made)]

    async def fetch(item):
        note("fetch", item.job_id)
        item.data["fetched"] = item.data["n"] * 2
        return item

    def parse(item):
        note("parse", item.job_id)
        time.sleep(0.01)
        item.data["parsed"] = item.data["fetched"] + 1
        note("parsed", item.job_id)
        return item

    config = ETLPipelineConfig(
        stages=[StageConfig(name="fetch", execution_type=ExecutionType.ASYNC, workers=2,
                            queue_size=4),
                StageConfig(name="parse", execution_type=ExecutionType.THREAD, workers=2,
                            queue_size=4)],
        queue_refresh_rate=0.01, stats_interval_seconds=0, journal_dir=journal)
    p = Job(config)
    p.register_stage_handler("fetch", fetch)
    p.register_stage_handler("parse", parse)
    p.add_completion_callback(
        lambda r: note("done" if r.success else "dead", r.job_id))
    asyncio.run(p.run())
    note("finished", "-")
""")


@ours_only
@pytest.mark.timeout(120)
def test_a_durable_pipeline_killed_with_sigkill_resumes_and_loses_nothing(tmp_path):
    from conftest import wait_for

    prog = tmp_path / "job.py"
    prog.write_text(KILLED_PROGRAM)
    log = tmp_path / "log"
    n = 60
    cmd = [sys.executable, str(prog), str(tmp_path / "journal"), str(log), str(n)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def lines():
        return log.read_text().splitlines() if log.exists() else []

    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_for(lambda: sum(x.startswith("done") for x in lines()) >= 15, timeout=60,
                 message="15 items done before the kill")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = lines()
    assert "finished -" not in before
    out = subprocess.run(cmd, env=env, timeout=90)
    assert out.returncode == 0
    after = lines()
    assert after[-1] == "finished -"
    parsed = {x.split()[1] for x in after if x.startswith("parsed ")}
    assert parsed == {f"job-{i}" for i in range(n)}                # every item went through
    assert not [x for x in after if x.startswith("dead ")]
    # Done before the kill: not run again.  In flight at the kill: at most the stages'
    # workers + queues (2 + 4 each) run a second time.
    done_before = {x.split()[1] for x in before if x.startswith("done ")}
    rerun_parse = [x for x in after[len(before):] if x.startswith("parse ")
                   and x.split()[1] in done_before]
    assert rerun_parse == []
    parse_count = sum(x.startswith("parse ") for x in after)
    assert n <= parse_count <= n + 12
    # A third run on the same journal finds every job id done (lost = 0): nothing runs.
    out = subprocess.run(cmd, env=env, timeout=90)
    assert out.returncode == 0
    assert lines()[len(after):] == ["finished -"]


SINK_PROGRAM = textwrap.dedent("""
    import asyncio, os, sys
    from pympx_queues.compat.bergtalzug import (
        ETLPipeline, ETLPipelineConfig, StageConfig, ExecutionType, WorkItem)

    journal, log = sys.argv[1], sys.argv[2]

    class Jobs(ETLPipeline):
        made = False

        async def refill_queue(self, count):
            if self.made:
                return []
            self.made = True
            return [WorkItem(data=i, job_id=f"job-{i}") for i in range(3)]

    def store(item):  # an idempotent sink keyed by job_id
        pending = item.metadata.custom_metadata.get("pending", False)
        with open(log, "a") as f:
            f.write(f"{item.job_id} {pending}\\n")
        if item.job_id == "job-1" and not pending:
            os._exit(3)  # the coordinator dies in the middle of the side effect
        return item

    config = ETLPipelineConfig(
        pipeline_name="sink", journal_dir=journal, queue_refresh_rate=0.01,
        stats_interval_seconds=0,
        stages=[StageConfig(name="store", execution_type=ExecutionType.THREAD, workers=1,
                            queue_size=1, sink=True)])
    p = Jobs(config)
    p.register_stage_handler("store", store)
    asyncio.run(p.run())
""")


@ours_only
@pytest.mark.timeout(120)
def test_a_sink_stage_tells_the_handler_that_a_crash_may_have_left_its_effect(tmp_path):
    prog = tmp_path / "sink.py"
    prog.write_text(SINK_PROGRAM)
    log = tmp_path / "log"
    cmd = [sys.executable, str(prog), str(tmp_path / "journal"), str(log)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    assert subprocess.run(cmd, env=env, timeout=60).returncode == 3
    assert subprocess.run(cmd, env=env, timeout=60).returncode == 0
    lines = log.read_text().splitlines()
    assert lines[:2] == ["job-0 False", "job-1 False"]
    # The second run: job-1 was pending (its effect may have happened), job-0 is done.
    assert "job-1 True" in lines[2:] and "job-0 False" not in lines[2:]
    assert "job-2 False" in lines[2:]
