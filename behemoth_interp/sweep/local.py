"""The in-process executor: runs one after another in this process (for debugging, and the
reference the Ray executor is tested against)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from behemoth_interp.sweep.runs import Run
from behemoth_interp.sweep.worker import Worker


class LocalExecutor:
    """Runs with one `Worker` in this process, with `threads` torch threads (restored after)."""

    name = "local"

    def __init__(self, workers: int = 1, *, threads: int = 1) -> None:
        self.workers = 1
        self.threads = threads

    def __enter__(self) -> LocalExecutor:
        self._threads_before = torch.get_num_threads()
        self._worker = Worker(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._threads_before)
        del self._worker

    def map(self, runs: Iterable[Run]) -> Iterator[dict[str, Any]]:
        """The record of each run, as each finishes."""
        for run in runs:
            yield self._worker.run(run)
