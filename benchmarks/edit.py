"""Seconds per edit for ROME, MEMIT, AlphaEdit, LoRA and full fine-tuning on a shipped model.

A single override (Behemoth section 4.6) by each method, timed without evaluation, median over
`--repeats` tasks, same machine and run; then one ten_different task (n=10) by MEMIT and
AlphaEdit in one batch against ROME's ten sequential edits. The methods are those of the
results tables (`experiments/edit_table.py`, which makes docs/editing.md's tables), plus ROME
at its own site, which the tables leave out of forgetting.

    python benchmarks/edit.py [--model DIR] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from behemoth_interp import EditTask, edit, load_hf
from behemoth_interp.edit import get_method

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from edit_table import DEFAULT_MODEL, METHODS  # noqa: E402


def _time_edits(hf, world, methods: dict, repeats: int) -> None:
    print(f"{'method':<13} {'s/edit':>8} {'min s':>8} {'params changed':>15}  (single override)")
    for name, kwargs in methods.items():
        times, changed = [], 0
        for seed in range(repeats):
            task = EditTask.draw(world, "single", seed=seed, correct=hf)
            start = time.perf_counter()
            result = edit(hf, task, seed=seed, evaluate=False, **kwargs)
            times.append(time.perf_counter() - start)
            changed = result.report.params_changed
        print(f"{name:<13} {statistics.median(times):8.2f} {min(times):8.2f} {changed:15,}")


def _time_batch(hf, world, methods: dict, n: int = 10) -> None:
    """One ten_different task: MEMIT and AlphaEdit edit it in one batch, ROME tuple after tuple.
    Seconds through `edit()` (whose sequential mode also scores each step) and of the method's
    `apply` alone, against ROME's, same run (covariances already cached)."""
    task = EditTask.draw(world, "ten_different", n=n, correct=hf)
    times = {}
    for name in ("ROME", "MEMIT", "AlphaEdit"):
        if name not in methods:
            continue
        start = time.perf_counter()
        edit(hf, task, evaluate=False, **methods[name])
        total = time.perf_counter() - start
        m = get_method(methods[name]["method"])
        where, config = m.where(hf, None, None, None)
        config = m.config_from(config, {})
        twin = copy.deepcopy(hf)
        start = time.perf_counter()
        m.apply(twin, task, where, config, seed=0, memory={})
        times[name] = (total, time.perf_counter() - start)
    print(f"\n{'method':<13} {'edit() s':>9} {'apply s':>8} {'s/edit':>7} {'vs ROME':>8}  "
          f"(ten_different, n={n}; ROME: {n} sequential edits)")  # fmt: skip
    for name, (total, alone) in times.items():
        ratio = f"{alone / times['ROME'][1]:8.2f}" if "ROME" in times else f"{'':>8}"
        print(f"{name:<13} {total:9.2f} {alone:8.2f} {alone / n:7.2f} {ratio}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="of: " + ", ".join(METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    unknown = set(a.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    methods = {name: METHODS[name] for name in a.methods.split(",")}
    hf, world, _ = load_hf(a.model)
    print(f"model {a.model}: {world!r}, threads {torch.get_num_threads()}")
    _time_edits(hf, world, methods, a.repeats)
    _time_batch(hf, world, methods)


if __name__ == "__main__":
    main()
