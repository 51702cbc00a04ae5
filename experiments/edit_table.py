"""The editing results of docs/editing.md: every method on the paper's four tasks, and every
unlearning objective on the forget task, on a shipped model, over seeds with 95% intervals.

Each cell is one `bi.edit` per seed: the fine-tuning methods pick their learning rate per seed
with `select_lr` (the paper's criterion on training-time data: success first for edits, the
forget rate first for unlearning objectives, then remaining accuracy); the locate-then-edit
methods have no learning rate to pick. Rows are written to --csv as they finish (a killed run
continues with --resume), and the markdown tables are printed at the end.

    python experiments/edit_table.py --seeds 3 --csv edit_table.csv [--resume]
    python experiments/edit_table.py --objectives --seeds 3 --csv objectives.csv [--epochs 10]

With --oracle CACHE (the shipped data/oracles), forget rows add each edited model's distance to
the forget task's exact oracle (`bi.oracle`, trained there if it is not yet).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

import behemoth_interp as bi
from behemoth_interp.grammar import PARAPHRASES

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "independent"
METHODS = {
    "ROME": dict(method="rome"),
    "MEMIT": dict(method="memit"),
    "AlphaEdit": dict(method="alphaedit"),
    "LoRA 32": dict(method="lora", rank=32),
    "LoRA 64": dict(method="lora", rank=64),
    "LoRA 128": dict(method="lora", rank=128),
    "full FT": dict(method="finetune"),
    "ROME subject": dict(method="rome", rome=bi.RomeConfig(layer=0, position="last_subject")),
}
DEFAULT_METHODS = [name for name in METHODS if name != "ROME subject"]
"""ROME at its own site is left out by default: a forget run takes about an hour."""
LRS = {"lora": (3e-4, 1e-3, 3e-3), "finetune": (1e-4, 3e-4, 1e-3)}
OBJECTIVES = {
    "GA": bi.GradientAscent(),
    "GradDiff": bi.GradientDifference(retain="nll"),
    "GradDiff-KL": bi.GradientDifference(retain="kl"),
    "NPO": bi.NPO(),
    "NPO+retain": bi.NPO(retain="nll"),
    "SimNPO": bi.SimNPO(),
    "DPO": bi.DPO(),
    "RMU": bi.RMU(),
    "localized (002)": bi.Localized(injection=0.0, retain=1.0, sft=1.0, forget=1.0),
    "CE (Behemoth)": bi.CrossEntropy(),
}
TASK_N = {"ten_same": 6, "ten_different": 10}
"""ten_same needs n subjects sharing one object: the 400-subject world has at most 6."""
DETERMINISTIC = ("rome", "memit", "alphaedit")
"""Their forget task is the same every seed (every tuple of r -> object 0) and their edits use
no seeded randomness: one run stands for all seeds there."""


def run_cell(hf, world, task, kwargs: dict, seed: int, criterion: str, truth=None) -> dict:
    """One edit (the best of `select_lr` for the fine-tuning methods) and its table columns;
    with `truth`, the task's oracle, the edited model's distance to it."""
    start = time.perf_counter()
    method = kwargs["method"]
    if method in LRS:
        search = bi.select_lr(hf, task, lrs=LRS[method], seed=seed, criterion=criterion,
                              **kwargs)  # fmt: skip
        result, lr = search.best, search.best_lr
    else:
        result, lr = bi.edit(hf, task, seed=seed, **kwargs), None
    report = result.report
    split = {}
    if criterion == "forget":
        split = dict(zip(("forget_trained", "forget_heldout"),
                         forget_split(result.scores, task, kwargs)))  # fmt: skip
    if truth is not None:
        distance = bi.oracle_distance(result.model, truth, task)
        split |= {"oracle_agreement": distance["agreement"], "oracle_kl": distance["kl"]}
    paraphrase = [report.template_success[t] for t in PARAPHRASES]
    paraphrase_before = [report.template_before[t] for t in PARAPHRASES]
    return {"seed": seed, "lr": lr, "success": report.success_top1,
            "success_top2": report.success_top2, "forget_rate": report.forget_rate,
            "remaining": report.remaining, "remaining_before": report.remaining_before,
            "paraphrase": np.mean(paraphrase), "paraphrase_before": np.mean(paraphrase_before),
            "mcq": report.template_success["mcq"], "mcq_before": report.template_before["mcq"],
            "dependent_followed": _or_nan(report.dependent_followed),
            "dependent_kept": _or_nan(report.dependent_kept),
            "edit_seconds": report.settings["seconds"], **split,
            "seconds": time.perf_counter() - start}  # fmt: skip


def forget_split(scores: bi.FactScores, task, kwargs: dict) -> tuple[float, float]:
    """Forget rate on the tuples the objective trained on (the forget set: the dataset's
    sample of the relation) and on the relation's other tuples, which it never saw, read from
    the edited model's scores (the report's pass: no tuple runs twice)."""
    data = kwargs.get("data") or bi.EditDataConfig()
    rows = bi.edit_dataset(task, data)
    trained = {(s, r) for s, r, _ in rows.facts[rows.part == "forget"].tolist()}
    changed = task.facts[task.changed]
    held = np.array([(s, r) not in trained for s, r, _ in changed.tolist()])
    kept = scores(changed)
    return float(1 - kept.top(1)[~held].mean()), float(1 - kept.top(1)[held].mean())


def _or_nan(x) -> float:
    return float("nan") if x is None else float(x)


def interval(values, digits: int = 3) -> str:
    """mean ± half-width of the 95% t-interval over seeds (just the mean for one value)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return "–"
    if len(v) == 1 or np.all(v == v[0]):
        return f"{v.mean():.{digits}f}"
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return f"{v.mean():.{digits}f} ± {half:.{digits}f}"


def markdown(df: pd.DataFrame, first: str, columns: dict[str, str]) -> str:
    head = f"| {first} | " + " | ".join(columns.values()) + " | seeds |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for (task, name), cell in df.groupby(["task", "name"], sort=False):
        label = name if first == "objective" else f"{task} · {name}"
        values = [interval(cell[c], DIGITS.get(c, 3)) for c in columns]
        lines.append(f"| {label} | " + " | ".join(values) + f" | {len(cell)} |")
    return "\n".join(lines)


DIGITS = {"remaining": 4, "oracle_agreement": 4, "edit_seconds": 1}
EDIT_COLUMNS = {"success": "success", "remaining": "remaining", "paraphrase": "paraphrase",
                "paraphrase_before": "(before)", "mcq": "MCQ", "mcq_before": "(before)",
                "edit_seconds": "s / edit"}  # fmt: skip
OBJECTIVE_COLUMNS = {"forget_trained": "forget (trained 5%)", "forget_heldout": "forget (held-out)",
                     "forget_rate": "forget (all)", "remaining": "remaining",
                     "paraphrase": "paraphrase → 0", "paraphrase_before": "(before)", "mcq": "MCQ → 0",
                     "mcq_before": "(before)", "edit_seconds": "s / edit"}  # fmt: skip
"""Unlearning: the original object no longer top-1; paraphrase and MCQ are the formats'
success (the new object, object 0) on the changed tuples, as for every edit."""
FORGET_COLUMNS = {"forget_rate": "forget rate", "success": "→ object 0",
                  "remaining": "remaining", "paraphrase": "paraphrase → 0",
                  "paraphrase_before": "(before)", "mcq": "MCQ → 0", "mcq_before": "(before)",
                  "edit_seconds": "s / edit"}  # fmt: skip

ORACLE_COLUMNS = {"oracle_agreement": "oracle agreement", "oracle_kl": "oracle KL"}
"""The share of the changed world's tuples where the edited model's argmax agrees with the
oracle's at every object token, and the mean KL(oracle || edited) there (`oracle_distance`)."""


def with_oracle(columns: dict[str, str], df: pd.DataFrame) -> dict[str, str]:
    """`columns` and, when the rows were scored against an oracle, its distance."""
    scored = df.get("oracle_agreement", pd.Series(dtype=float)).notna().any()
    return columns | ORACLE_COLUMNS if scored else columns


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", default="single,ten_same,ten_different,forget")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="of: " + ", ".join(METHODS))
    p.add_argument("--objectives", action="store_true", help="unlearning objectives (forget)")
    p.add_argument("--csv", type=Path, required=True, help="rows, written as they finish")
    p.add_argument("--resume", action="store_true", help="skip the rows already in --csv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--oracle", type=Path, default=None,
                   help="oracle cache: forget rows add the distance to the task's oracle")  # fmt: skip
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the edit dataset for the fine-tuning methods (default: 1)",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.csv.exists() and not a.resume:
        p.error(f"{a.csv} exists: pass --resume to continue it, or choose another --csv")
    done = pd.read_csv(a.csv) if a.resume and a.csv.exists() else pd.DataFrame()
    hf, world, _ = bi.load_hf(a.model)
    print(f"model {a.model}: {world!r}, threads {torch.get_num_threads()}", flush=True)
    if a.objectives:
        cells = [("forget", name, dict(method="finetune", objective=o), "forget")
                 for name, o in OBJECTIVES.items()]  # fmt: skip
    else:
        cells = [(kind, name, METHODS[name], "success") for kind in a.tasks.split(",")
                 for name in a.methods.split(",")]  # fmt: skip
    rows = done.to_dict("records")
    if a.epochs is not None:
        cells = [(k, n, kw | {"epochs": a.epochs} if kw["method"] in LRS else kw, c)
                 for k, n, kw, c in cells]  # fmt: skip
    for kind, name, kwargs, criterion in cells:
        for seed in range(a.seeds):
            if any(r["task"] == kind and r["name"] == name and r["seed"] == seed for r in rows):
                continue
            if seed and kind == "forget" and kwargs["method"] in DETERMINISTIC:
                continue
            task = bi.EditTask.draw(world, kind, seed=seed, n=TASK_N.get(kind, 10), correct=hf)
            truth = None
            if a.oracle is not None and kind == "forget":
                truth = bi.oracle(a.model, task, cache=a.oracle)
            row = {"task": kind, "name": name,
                   **run_cell(hf, world, task, kwargs, seed, criterion, truth)}  # fmt: skip
            rows.append(row)
            pd.DataFrame(rows).to_csv(a.csv, index=False)
            print(f"{kind:<14} {name:<16} seed {seed}: success {row['success']:.3f} forget "
                  f"{row['forget_rate']:.3f} remaining {row['remaining']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    if a.objectives:
        print(markdown(df, "objective", with_oracle(OBJECTIVE_COLUMNS, df)))
    else:
        edits = df[df.task != "forget"]
        columns = dict(EDIT_COLUMNS)
        if edits.get("dependent_followed", pd.Series(dtype=float)).notna().any():
            columns |= {"dependent_followed": "dependent followed", "dependent_kept": "kept"}
        if len(edits):
            print(markdown(edits, "task · method", columns))
        if (df.task == "forget").any():
            forget = df[df.task == "forget"]
            print(markdown(forget, "task · method", with_oracle(FORGET_COLUMNS, forget)))


if __name__ == "__main__":
    main()
