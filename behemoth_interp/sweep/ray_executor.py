"""The Ray executor: one `Worker` actor per worker, each loading its models and pre-edit
baselines once, fed one run at a time.

`ray.init()` starts an embedded cluster on this machine unless an `address` names an existing
one (`ray start --head` there; every node needs behemoth-interp installed and the models at the
same paths). A Ray session that was already running is used as it is and left running.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.sweep.runs import Run
from behemoth_interp.sweep.worker import Worker, failed_record

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""The workers' environment: nothing is ever downloaded (Ray sets OMP_NUM_THREADS to each
actor's CPUs itself). An embedded cluster's workers inherit it from this process; on an existing
cluster it travels as the actors' runtime environment, with which Ray starts a fresh process for
each worker instead of one it has ready, so the embedded case does without."""


class RayExecutor:
    """`workers` Ray actors of `threads` CPUs each; `address` of a running cluster (None: an
    embedded one of workers x threads CPUs); `init_options` go to `ray.init`."""

    name = "ray"

    def __init__(self, workers: int = 1, *, threads: int = 1, address: str | None = None,
                 init_options: dict[str, Any] | None = None) -> None:  # fmt: skip
        check_int("workers", workers, 1)
        check_int("threads", threads, 1)
        self.workers, self.threads, self.address = workers, threads, address
        self.init_options = dict(init_options or {})

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise InvalidArgument(
                "the ray executor needs ray: pip install ray, or use --executor local"
            ) from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            options = {"include_dashboard": False, "log_to_driver": False,
                       "logging_level": "warning", **self.init_options}  # fmt: skip
            if self.address is None:
                options.setdefault("num_cpus", self.workers * self.threads)
            with _environment(OFFLINE if self.address is None else {}):
                ray.init(address=self.address, **options)
        self._actor = ray.remote(num_cpus=self.threads, max_restarts=0)(Worker)
        if not (self._started and self.address is None):
            self._actor = self._actor.options(runtime_env={"env_vars": OFFLINE})
        self._actors = [self._actor.remote(self.threads) for _ in range(self.workers)]
        return self

    def ready(self) -> None:
        """Block until every worker process has started and imported the package (the
        executor's start-up, which `benchmarks/sweep.py` times apart from the runs)."""
        self._ray.get([a.__ray_ready__.remote() for a in self._actors])

    def __exit__(self, *exc) -> None:
        for a in self._actors:
            self._ray.kill(a)
        if self._started:
            self._ray.shutdown()

    def map(self, runs: Iterable[Run]) -> Iterator[dict[str, Any]]:
        """The record of each run, in the order they finish. A worker that dies (killed, out of
        memory) fails only the run it held, which is recorded; a new worker takes its place."""
        ray = self._ray
        queue = list(runs)[::-1]
        pending: dict[Any, tuple[int, Run]] = {}

        def submit(i: int) -> None:
            if queue:
                run = queue.pop()
                pending[self._actors[i].run.remote(run)] = (i, run)

        for i in range(len(self._actors)):
            submit(i)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i, run = pending.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                record = failed_record(run, err)
                self._actors[i] = self._actor.remote(self.threads)
            except ray.exceptions.RayError as err:
                record = failed_record(run, err)
            submit(i)
            yield record


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in this process's environment while the block runs (the embedded
    cluster's processes, started then, keep them), the caller's own values back after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
