"""Does an edit survive the next fine-tune? Downstream tasks, retention sets, the run that
fine-tunes an edited model and measures edited vs intrinsic retention (Wen & Zhang)."""

from behemoth_interp.retention.downstream import (
    DOWNSTREAM_TASKS,
    Downstream,
    DownstreamConfig,
    DownstreamTask,
    contains,
    downstream,
)
from behemoth_interp.retention.result import RetentionResult
from behemoth_interp.retention.run import load_retention, retention, weights_sha256
from behemoth_interp.retention.sets import RetentionSet, retention_set

__all__ = [
    "DOWNSTREAM_TASKS", "Downstream", "DownstreamConfig", "DownstreamTask", "RetentionResult",
    "RetentionSet", "contains", "downstream", "load_retention", "retention", "retention_set",
    "weights_sha256",
]  # fmt: skip
