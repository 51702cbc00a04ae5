"""Seconds per edit for ROME, LoRA and full fine-tuning on a shipped model, side by side.

Default: a single override (Behemoth section 4.6) by each method, timed without evaluation,
median over `--repeats` tasks, same machine and run. With `--table`: the paper's four tasks
(Figure 1) by every method, each with its learning rate picked by `select_lr` on training-time
data (ROME has no learning rate to pick), averaged over `--seeds` draws, printed as the
markdown table docs/editing.md shows.

    python benchmarks/edit.py [--model DIR] [--repeats 3] [--threads 1]
    python benchmarks/edit.py --table [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from behemoth_interp import EditTask, RomeConfig, edit, load_hf, select_lr

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "independent"
METHODS = {
    "ROME": dict(method="rome"),
    "ROME subject": dict(method="rome", rome=RomeConfig(layer=0, position="last_subject")),
    "LoRA 32": dict(method="lora", rank=32),
    "LoRA 64": dict(method="lora", rank=64),
    "LoRA 128": dict(method="lora", rank=128),
    "full FT": dict(method="finetune"),
}
LRS = {"lora": (3e-4, 1e-3, 3e-3), "finetune": (1e-4, 3e-4, 1e-3)}
TASK_N = {"ten_same": 6, "ten_different": 10}
"""ten_same needs n subjects sharing one object: the 400-subject world has at most 6."""


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


def _table(hf, world, methods: dict, seeds: range, tasks: list[str]) -> pd.DataFrame:
    rows = []
    for kind in tasks:
        for seed in seeds:
            task = EditTask.draw(world, kind, seed=seed, n=TASK_N.get(kind, 10), correct=hf)
            for name, kwargs in methods.items():
                start = time.perf_counter()
                if kwargs["method"] == "rome":
                    report = edit(hf, task, seed=seed, **kwargs).report
                    lr = None
                else:
                    search = select_lr(hf, task, lrs=LRS[kwargs["method"]], seed=seed, **kwargs)
                    report, lr = search.best.report, search.best_lr
                rows.append({"task": kind, "method": name, "seed": seed, "lr": lr,
                             "success": report.success_top1, "success_top2": report.success_top2,
                             "remaining": report.remaining, "before": report.remaining_before,
                             "seconds": time.perf_counter() - start})  # fmt: skip
                print(f"{kind:<14} {name:<12} seed {seed}: success {report.success_top1:.3f} "
                      f"top-2 {report.success_top2:.3f} remaining {report.remaining:.4f} "
                      f"(lr {lr}, {rows[-1]['seconds']:.0f} s)", flush=True)  # fmt: skip
    return pd.DataFrame(rows)


def _markdown(df: pd.DataFrame) -> str:
    mean = df.groupby(["task", "method"], sort=False)[["success", "success_top2", "remaining"]]
    cells = mean.mean().round(3).reset_index()
    lines = ["| task | method | success top-1 | top-2 | remaining |", "|---|---|---|---|---|"]
    for r in cells.itertuples():
        lines.append(f"| {r.task} | {r.method} | {r.success:.3f} | {r.success_top2:.3f} | "
                     f"{r.remaining:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--table", action="store_true", help="the four tasks by every method")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed.. first+seeds-1")
    p.add_argument("--tasks", default="single,ten_same,ten_different,forget")
    p.add_argument("--methods", default=",".join(METHODS), help="of: " + ", ".join(METHODS))
    p.add_argument("--csv", type=Path, default=None, help="also write the table's rows here")
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
    if not a.table:
        _time_edits(hf, world, methods, a.repeats)
        return
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    df = _table(hf, world, methods, seeds, a.tasks.split(","))
    if a.csv:
        df.to_csv(a.csv, index=False)
    print(_markdown(df))


if __name__ == "__main__":
    main()
