"""Sweep throughput and per-run cost on a shipped model.

A fixed 24-run grid (single overrides by full fine-tuning: 2 learning rates x 4 block subsets x
{MLP, attention, both}, seed 0, the grid of experiments/sweeps/figure4-single-quick.yaml) is run
into a fresh store with 1 and with 2 Ray workers in one process, and runs/hour compared (goal:
2 workers >= 1.8x one, on a machine with two free cores). Then the per-run cost split of the
1-worker sweep: fine-tuning (the method's own time), evaluation (EditReport, training-time
scores, move rank) and overhead (everything else: the task, the model copy, scheduling, the
record), against one direct `bi.edit` call with its full evaluation, timed in the same run. The
overhead is split into what the sweep pays once (the spec's expansion, Ray's start and stop with
the workers' imports, timed alone; the first run's model load and baselines) and each run's own.

    python benchmarks/sweep.py [--model DIR] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import behemoth_interp as bi
from behemoth_interp.sweep import SweepResult, SweepSpec, run_sweep
from behemoth_interp.sweep.ray_executor import RayExecutor
from behemoth_interp.sweep.runs import expand

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "independent"


def grid(model: Path) -> SweepSpec:
    return SweepSpec.from_dict({
        "name": "benchmark", "models": [str(model)], "tasks": ["single"],
        "methods": [{"method": "finetune", "grid": {"lr": [3e-4, 1e-3]}}],
        "blocks": [[0], [5], [4, 5], [0, 1, 2, 3, 4, 5]], "components": ["mlp", "attn", "both"],
        "seeds": [0],
    })  # fmt: skip


def direct_edit_seconds(model: Path) -> float:
    """One full-FT single override through `bi.edit` with its full evaluation (the pre-edit
    accuracy recomputed, as every edit outside a sweep does), one thread."""
    hf, world, _ = bi.load_hf(model)
    task = bi.EditTask.draw(world, "single", seed=0, correct=hf)
    bi.edit(hf, task, lr=1e-3, blocks=[5], components="mlp", evaluate=False)  # warm up
    start = time.perf_counter()
    bi.edit(hf, task, lr=1e-3, blocks=[0, 1, 2, 3, 4, 5], seed=0)
    return time.perf_counter() - start


def startup_seconds(spec: SweepSpec, workers: int) -> tuple[float, float]:
    """What a sweep pays once, timed alone: expanding the spec (models hashed, tasks drawn),
    and Ray's start with `workers` worker processes importing the package, then its stop."""
    start = time.perf_counter()
    expand(spec)
    expand_s = time.perf_counter() - start
    start = time.perf_counter()
    with RayExecutor(workers) as executor:
        executor.ready()
    return expand_s, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. '1,2'")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    spec = grid(a.model)
    counts = [int(w) for w in a.workers.split(",")]
    rates, stores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in counts:
            out = Path(tmp) / f"store-{w}"
            summary = run_sweep(spec, out, executor="ray", workers=w, progress=False)
            assert summary.failed == 0, summary
            rates[w] = summary.runs_per_hour
            stores[w] = SweepResult.load(out).to_dataframe()
            print(f"{w} worker(s): {summary.done} runs in {summary.wall_s:.1f} s, "
                  f"{summary.runs_per_hour:.0f} runs/hour (including Ray start-up and model load)")  # fmt: skip
        base = counts[0]
        for w in counts[1:]:
            print(f"{w} workers / {base}: {rates[w] / rates[base]:.2f}x (goal >= 1.8x for 2)")
        # means, not medians: they add up to the wall time (per run = wall x workers / runs)
        df = stores[base]
        fit = df.fit_s.mean()
        evaluation = (df.evaluate_s + df.train_eval_s + df.move_rank_s).mean()
        per_run = 3600 / rates[base] * base
        overhead = per_run - fit - evaluation
        expand_s, ray_s = startup_seconds(spec, base)
        once = (expand_s + ray_s + df.setup_s.sum()) / len(df) * base
        each = overhead - once
        print(
            f"\nper run ({base} worker, mean over {len(df)} runs; per run = wall x workers / runs):"
        )
        print(f"  fine-tune   {fit:6.2f} s  ({fit / per_run:.0%})")
        print(f"  evaluation  {evaluation:6.2f} s  ({evaluation / per_run:.0%}): EditReport "
              f"{df.evaluate_s.mean():.2f}, training-time scores {df.train_eval_s.mean():.2f}, "
              f"move rank {df.move_rank_s.mean():.2f}")  # fmt: skip
        print(f"  overhead    {overhead:6.2f} s  ({overhead / per_run:.0%}), of which")
        print(f"    once per sweep, spread over its {len(df)} runs: {once:.2f} s "
              f"({once / per_run:.0%}): the spec's expansion {expand_s:.1f} s, Ray's start, the "
              f"worker processes' imports and Ray's stop {ray_s:.1f} s, the first run's model "
              f"load and baselines {df.setup_s.sum():.1f} s")  # fmt: skip
        print(f"    each run's own: {each:.2f} s ({each / per_run:.0%}; goal <= 10%): edit() "
              f"around the fit {(df.edit_s - df.fit_s).mean():.2f} s, the rest scheduling, the "
              f"task and the record")  # fmt: skip
        print(f"  total       {per_run:6.2f} s")
    reference = direct_edit_seconds(a.model)
    print(f"\none direct bi.edit with its full evaluation (all blocks, lr 1e-3): {reference:.2f} s; "
          f"a sweep run: {per_run:.2f} s ({reference / per_run:.2f}x faster)")  # fmt: skip


if __name__ == "__main__":
    main()
