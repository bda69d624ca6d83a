"""Durable pipelines: a source, stages and a sink on the journal (DESIGN.md section 7).

Vocabulary: items, stages, executors, a journal.  See ``docs/pipelines.md``.
"""

from ._model import (EncodeError, ErrorInfo, ItemContext, ItemResult, PipelineError,
                     Refill, Retry, RunReport, Scheduler, Stage, StageSignatureError,
                     StageStats, StageTimeout, WorkerDied)
from .engine import Pipeline

__all__ = [
    "Pipeline", "Stage", "Retry", "Refill", "ItemContext", "ItemResult", "ErrorInfo",
    "RunReport", "StageStats", "PipelineError", "StageSignatureError", "Scheduler",
    "WorkerDied", "StageTimeout", "EncodeError",
]
