"""Durable pipelines: a source, stages and a sink on the journal (DESIGN.md section 7).

Vocabulary: items, stages, executors, a journal.  See ``docs/pipelines.md``.
"""

from ._model import (EncodeError, ErrorInfo, ItemContext, ItemResult, PipelineError,
                     PipelineStalled, Refill, Retry, RunReport, Scheduler, Stage,
                     StageSignatureError, StageStats, StageTimeout, WorkerDied)
from .engine import Pipeline
from .batch_map import batch_map, batch_map_iter, reset_kill_switch, unmapped
from .partitions import ClaimScheduler, PartitionError, PartitionReport, run_partitioned
from .switches import (AnyFailed, AnyOf, Consecutive, Count, KillSwitch, KillSwitchError, Rate,
                       Windowed)

__all__ = [
    "Pipeline", "Stage", "Retry", "Refill", "ItemContext", "ItemResult", "ErrorInfo",
    "RunReport", "StageStats", "PipelineError", "StageSignatureError", "Scheduler",
    "WorkerDied", "StageTimeout", "EncodeError", "PipelineStalled",
    "batch_map", "batch_map_iter", "unmapped", "reset_kill_switch",
    "KillSwitch", "KillSwitchError", "AnyFailed", "Count", "Rate", "Consecutive", "Windowed",
    "AnyOf", "run_partitioned", "ClaimScheduler", "PartitionReport", "PartitionError",
]
