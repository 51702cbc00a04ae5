"""Learning-rate selection by the paper's criterion, on training-time data only (section 4.6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from behemoth_interp.edit.datasets import EditDataConfig, edit_dataset
from behemoth_interp.edit.evaluation import evaluate_edit
from behemoth_interp.edit.report import EditResult
from behemoth_interp.edit.run import edit, resolve_model
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import Diverged, InvalidArgument
from behemoth_interp.evaluate import FactScores
from behemoth_interp.model import hooked_in_world


@dataclass
class LrSearch:
    """Learning rates tried for one edit, scored on training-time data only, and the best edit.

    `success` is top-1 accuracy on the edited tuples the edit trains on (the forgetting
    sample for 'forget'); `remaining` top-1 accuracy on the dataset's unchanged tuples; both
    NaN for a learning rate whose edit diverged.
    """

    lrs: list[float]
    success: list[float]
    remaining: list[float]
    best_lr: float
    best: EditResult

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"lr": self.lrs, "success": self.success, "remaining": self.remaining,
                             "best": [lr == self.best_lr for lr in self.lrs]})  # fmt: skip

    def plot(self):
        """Success and remaining accuracy against the learning rate (log axis)."""
        import plotly.express as px

        long = self.to_dataframe().melt(["lr", "best"], var_name="metric", value_name="accuracy")
        return px.line(long, x="lr", y="accuracy", color="metric", markers=True, log_x=True,
                       range_y=[0, 1.02], title=f"Learning-rate search (best {self.best_lr:g})")  # fmt: skip


CRITERIA = ("success", "forget")


def select_lr(
    model_or_checkpoint, task: EditTask, lrs=(1e-4, 3e-4, 1e-3, 3e-3), *,
    criterion: str = "success", **edit_kwargs,
) -> LrSearch:  # fmt: skip
    """Edit with each learning rate and keep the best by the paper's criterion (section 4.6):
    highest success first, then highest remaining accuracy, both measured on the edit's own
    training data (no held-out tuple is looked at). With criterion='forget' (unlearning
    objectives, which remove the original object rather than teach the new one) "success" is
    the share of the trained tuples whose original object is no longer top-1. `edit_kwargs`
    go to `edit`; the returned best edit carries a full `EditReport`.
    """
    lrs = [float(x) for x in lrs]
    if not lrs or min(lrs) <= 0:
        raise InvalidArgument(f"give at least one learning rate, all > 0: got {lrs}")
    if criterion not in CRITERIA:
        raise InvalidArgument(f"unknown criterion {criterion!r}: choose one of {CRITERIA}")
    hooked = edit_kwargs.pop("hooked", False)
    edit_kwargs.pop("evaluate", None)
    max_remaining = edit_kwargs.get("max_remaining")
    before = resolve_model(model_or_checkpoint, task)
    config = edit_kwargs.get("config")
    data = edit_kwargs.get("data") or (config.data if config else EditDataConfig())
    success, remaining, results = [], [], []
    for lr in lrs:
        try:
            result = edit(before, task, lr=lr, evaluate=False, **edit_kwargs)
            result.scores = FactScores(result.model, task.world)
            scores = training_scores(result.model, task, data, scores=result.scores)
            success.append(scores[criterion])
            remaining.append(scores["remaining"])
        except Diverged:  # recorded as NaN, never selected
            result = None
            success.append(float("nan"))
            remaining.append(float("nan"))
        results.append(result)
    ok = [i for i, r in enumerate(results) if r is not None]
    if not ok:
        raise Diverged(f"the edit diverged at every learning rate of {lrs}: try smaller ones")
    best = max(ok, key=lambda i: (success[i], remaining[i], -i))
    chosen = results[best]
    chosen.report = evaluate_edit(chosen.model, task, before=before, settings=chosen.report.settings,
                                  max_remaining=max_remaining, seed=edit_kwargs.get("seed", 0),
                                  scores=chosen.scores)  # fmt: skip
    if hooked:
        chosen.hooked = hooked_in_world(chosen.model, task.world)
    return LrSearch(lrs, success, remaining, lrs[best], chosen)


@torch.inference_mode()
def training_scores(model, task: EditTask, data: EditDataConfig | None = None, *,
                    scores: FactScores | None = None) -> dict[str, Any]:  # fmt: skip
    """Scores on the edit's own training data (`edit_dataset(task, data)`), what `select_lr`
    ranks by (section 4.6): `success`, top-1 accuracy of the trained edited tuples' new objects
    (the forgetting sample for 'forget'; tuples already at their target say nothing and are
    left out); `forget`, the share of them whose original object is no longer top-1;
    `remaining`, top-1 accuracy on the dataset's unchanged tuples. No held-out tuple is read.
    `scores` (a `FactScores` of `model`, e.g. the one its `evaluate_edit` filled) gives the
    tuples already scored without running them again."""
    rows = edit_dataset(task, data or EditDataConfig())
    trained = rows.part == "edit" if task.kind != "forget" else rows.part == "forget"
    edited = np.unique(rows.facts[trained], axis=0)
    w = task.world
    must = w.objects_of(edited[:, 0], edited[:, 1]) != edited[:, 2]
    edited = edited[must] if must.any() else edited
    kept = np.unique(rows.facts[~trained], axis=0)
    original = edited.copy()
    original[:, 2] = w.objects_of(edited[:, 0], edited[:, 1])
    scores = FactScores.of(model, w, scores)
    scores(np.concatenate([edited, original, kept]))  # one pass: shared subject prefixes
    return {
        "success": scores(edited).accuracy,
        "forget": 1 - scores(original).accuracy,
        "remaining": scores(kept).accuracy if len(kept) else 1.0,
        "n_edited": len(edited), "n_kept": len(kept),
    }  # fmt: skip
