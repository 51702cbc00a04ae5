"""Does an edit survive the next fine-tune? Downstream tasks, retention sets, the run that
fine-tunes an edited model and measures edited vs intrinsic retention (Wen & Zhang)."""

from behemoth_interp.retention.downstream import (
    DOWNSTREAM_TASKS,
    FINE_TUNE,
    Downstream,
    DownstreamConfig,
    DownstreamTask,
    contains,
    downstream,
)
from behemoth_interp.retention.result import RetentionResult
from behemoth_interp.retention.run import load_retention, retention
from behemoth_interp.retention.sets import RetentionSet, retention_set

__all__ = [
    "DOWNSTREAM_TASKS", "FINE_TUNE", "Downstream", "DownstreamConfig", "DownstreamTask", "RetentionResult",
    "RetentionSet", "contains", "downstream", "load_retention", "retention", "retention_set",
]  # fmt: skip
