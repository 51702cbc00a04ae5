"""`run_sweep`: expand a spec, skip what the store holds, run the rest on an executor and write
each record as it comes back; `dry_run`: the same plan, counted and timed, nothing run.

The driver is the store's only writer (it holds the store's `output_lock`): workers return
records, the driver writes each atomically. Killed at any point, the store keeps every
finished run; the next `run_sweep` of the same (or a larger) spec runs only what is missing.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from behemoth_interp._io import output_lock
from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.sweep.local import LocalExecutor
from behemoth_interp.sweep.ray_executor import RayExecutor
from behemoth_interp.sweep.runs import Run, expand
from behemoth_interp.sweep.spec import SweepSpec
from behemoth_interp.sweep.store import Store
from behemoth_interp.sweep.worker import Worker

EXECUTORS = ("ray", "local")


@dataclass
class SweepSummary:
    """What a `run_sweep` did: runs `planned` by the spec (each key once), `done` and `failed`
    now, `skipped` (already in the store), `duplicates` (named twice by the spec), wall time."""

    planned: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    duplicates: int = 0
    wall_s: float = 0.0
    executor: str = "local"
    workers: int = 1
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def runs_per_hour(self) -> float:
        ran = self.done + self.failed
        return 3600 * ran / self.wall_s if self.wall_s > 0 and ran else 0.0

    def __str__(self) -> str:
        lines = [f"{self.planned} runs planned: {self.done} done, {self.failed} failed, "
                 f"{self.skipped} skipped (already in the store)"
                 + (f", {self.duplicates} named twice by the spec" if self.duplicates else ""),
                 f"wall {self.wall_s:.1f} s on {self.workers} {self.executor} worker(s): "
                 f"{self.runs_per_hour:.0f} runs/hour"]  # fmt: skip
        for f in self.failures[:10]:
            lines.append(f"  failed {f['key'][:12]}: {f['type']}: {f['message'][:160]}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more failures")
        return "\n".join(lines)


def make_executor(executor: str, workers: int = 1, *, threads: int = 1, address: str | None = None):
    """An executor by name: 'ray' (`RayExecutor`) or 'local' (`LocalExecutor`, one worker)."""
    check_int("workers", workers, 1)
    if executor not in EXECUTORS:
        raise InvalidArgument(f"--executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "local":
        if workers != 1 or address is not None:
            raise InvalidArgument(
                "the local executor runs in this process with one worker: drop --workers and "
                "--address, or use --executor ray"
            )
        return LocalExecutor(threads=threads)
    return RayExecutor(workers, threads=threads, address=address)


def run_sweep(
    spec: SweepSpec | str | Path,
    out: str | Path,
    *,
    executor: str = "ray",
    workers: int = 1,
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> SweepSummary:
    """Run every run of `spec` that the store at `out` lacks and write its record there.

    The whole spec is validated and expanded first (every model loaded, every task drawn), so a
    bad spec fails before any run. A run that fails is recorded with its error and the others go
    on; `retry_failed` runs recorded failures again. Returns a `SweepSummary`.
    """
    spec = spec if isinstance(spec, SweepSpec) else SweepSpec.load(spec)
    runner = make_executor(executor, workers, threads=spec.threads, address=address)
    started = time.perf_counter()
    with output_lock(out):
        store = Store.open(out)
        store.clear_leftovers()
        plan = expand(spec)
        store.add_spec(spec)
        have = store.status()
        todo = [r for r in plan.runs
                if r.key not in have or (retry_failed and have[r.key] == "failed")]  # fmt: skip
        summary = SweepSummary(len(plan), skipped=len(plan) - len(todo),
                               duplicates=plan.duplicates, executor=executor,
                               workers=runner.workers)  # fmt: skip
        if todo:
            from tqdm.auto import tqdm

            with runner, tqdm(total=len(todo), desc=spec.name, unit="run", file=sys.stderr,
                              disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip
                for record in runner.map(todo):
                    store.write(record)
                    if record["status"] == "ok":
                        summary.done += 1
                    else:
                        summary.failed += 1
                        summary.failures.append({"key": record["key"], **record["error"]})
                    bar.update()
                    bar.set_postfix(failed=summary.failed, refresh=False)
    summary.wall_s = time.perf_counter() - started
    return summary


@dataclass
class DryRun:
    """A spec's plan against a store: runs planned, already stored, to run, and the estimated
    seconds of the runs to run (per-run cost measured on this machine, divided by `workers`)."""

    planned: int
    stored: int
    todo: int
    duplicates: int
    workers: int
    seconds: float | None
    costs: dict[str, dict[str, Any]]

    def __str__(self) -> str:
        lines = [f"{self.planned} runs planned ({self.stored} already in the store, "
                 f"{self.todo} to run" + (f"; {self.duplicates} named twice by the spec)"
                                          if self.duplicates else ")")]  # fmt: skip
        for group, c in self.costs.items():
            lines.append(f"  {group}: {c['todo']} to run at {c['seconds']:.1f} s each "
                         f"({c['source']})")  # fmt: skip
        if self.seconds is not None:
            lines.append(f"estimated {_duration(self.seconds)} on {self.workers} worker(s), "
                         "assuming they scale linearly")  # fmt: skip
        return "\n".join(lines)


def dry_run(spec: SweepSpec | str | Path, out: str | Path | None = None, *, workers: int = 1,
            calibrate: bool = True, retry_failed: bool = False) -> DryRun:  # fmt: skip
    """Count the runs `run_sweep(spec, out)` would run and estimate their time from measured
    per-run cost: the median `run_s` of the store's records of the same model, method and task
    kind; where the store has none, one run of that group timed now in this process (not
    stored; with `calibrate=False`, no estimate). Writes nothing."""
    spec = spec if isinstance(spec, SweepSpec) else SweepSpec.load(spec)
    plan = expand(spec)
    have: dict[str, str] = {}
    measured: dict[tuple, list[float]] = {}
    if out is not None and (Path(out) / "store.json").is_file():
        for record in Store.open(out, create=False).records():
            have[record["key"]] = record["status"]
            if record["status"] == "ok":
                measured.setdefault(_group(record["run"]), []).append(record["timings"]["run_s"])
    todo = [r for r in plan.runs if r.key not in have or (retry_failed and have[r.key] == "failed")]
    groups: dict[tuple, list[Run]] = {}
    for r in todo:
        groups.setdefault(_group(r.describe()), []).append(r)
    costs: dict[str, dict[str, Any]] = {}
    threads = torch.get_num_threads()
    worker = Worker(spec.threads) if calibrate else None
    try:
        total = _estimate(groups, measured, worker, costs)
    finally:
        torch.set_num_threads(threads)
    return DryRun(len(plan), len(plan) - len(todo), len(todo), plan.duplicates, workers,
                  None if total is None else total / workers, costs)  # fmt: skip


def _estimate(groups, measured, worker, costs) -> float | None:
    """Seconds of all the runs in `groups`, from stored timings or one run timed now; None
    if some group has neither. Fills `costs` per group."""
    total: float | None = 0.0
    for group, runs in groups.items():
        name = f"{Path(runs[0].model).name} {group[1]} {group[2]}"
        if group in measured:
            cost, source = (
                statistics.median(measured[group]),
                f"median of {len(measured[group])} stored runs",
            )
        elif worker is not None:
            record = worker.run(runs[0])
            cost, source = record["timings"]["run_s"], "one run timed now"
        else:
            total = None
            continue
        costs[name] = {"todo": len(runs), "seconds": cost, "source": source}
        if total is not None:
            total += cost * len(runs)
    return total


def _group(run: dict[str, Any]) -> tuple:
    return (run["model"], run["method"]["name"], run["task_spec"]["kind"])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
