"""The relearning attack (Mechanistic Unlearning section 3.2 and A.7.3, after Deeb & Roger 2024):
is an edited or unlearned fact removed, or only hidden from direct retrieval?

The changed tuples are split in two seeded halves; the attacker fine-tunes the edited model with
cross-entropy on one half with its true (pre-edit) objects, mixed with unchanged tuples so the
rest of the world is held (the paper's retain loss), for a stated budget, and the attack is
scored on the other half, which it never saw. In an independent world the halves share no
information, so what comes back there was still in the model. The same attack on a model that
never knew the facts (the edit's exact oracle, `bi.oracle`) measures what the attack data
teaches by itself: the baseline the recovery is read against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.datasets import EditDataset
from behemoth_interp.edit.fit import finetune
from behemoth_interp.edit.objectives import CrossEntropy
from behemoth_interp.edit.selection import trainable_parameters
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, check_int, check_range
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.tokenizer import WorldTokenizer

SPLITS = ("trained", "heldout", "remaining")
"""The attack's tuples (true objects), the changed tuples it never saw, and a sample of the
tuples the edit must not change."""


@dataclass(frozen=True)
class RelearnConfig(JsonConfig):
    """The attack: `fraction` of the changed tuples trained on with their true objects, with
    `retain` unchanged tuples per attack tuple, for `steps` AdamW steps of `batch_size` at `lr`
    on every block (the paper: 20 iterations on half of the forget set, coefficient 1);
    `remaining` unchanged tuples (not trained on) score what the attack costs; `seed` draws
    the halves, the retain rows and the batches."""

    fraction: float = 0.5
    retain: float = 1.0
    steps: int = 20
    batch_size: int = 16
    lr: float = 3e-4
    remaining: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("fraction", self.fraction, 0, 1, low_open=True)
        if self.fraction == 1:
            raise InvalidArgument("fraction must be below 1: the attack is scored on the rest")
        check_range("retain", self.retain, 0)
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0, low_open=True)
        check_int("remaining", self.remaining, 1)

    @property
    def sentences(self) -> int:
        """The attack's compute budget in training sentences."""
        return self.steps * self.batch_size


@dataclass(frozen=True)
class RelearnResult:
    """Top-1 accuracy on the true objects of each split (`SPLITS`) before and after the attack,
    per model attacked (`edited`, and `baseline` when a never-knew model was attacked too);
    `chance` is one over the relation's candidate objects."""

    accuracy: pd.DataFrame
    """Rows (model, split); columns before, after."""
    trained: np.ndarray
    heldout: np.ndarray
    chance: float
    config: RelearnConfig

    def recovered(self, model: str = "edited") -> float:
        """Held-out accuracy the attack brought back on `model`: after minus before."""
        row = self.accuracy.loc[(model, "heldout")]
        return float(row["after"] - row["before"])

    def to_dataframe(self) -> pd.DataFrame:
        return self.accuracy.reset_index()

    def plot(self):
        """Accuracy on the true objects before and after the attack, per split and model."""
        import plotly.express as px

        df = self.to_dataframe().melt(["model", "split"], ["before", "after"], "when", "accuracy")
        return px.bar(df, x="split", y="accuracy", color="when", barmode="group",
                      facet_col="model", range_y=[0, 1],
                      title=f"Relearning attack: {self.config.sentences} sentences on "
                            f"{len(self.trained)} tuples, scored on {len(self.heldout)} others")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.to_dataframe().to_dict("records"),
                "trained": self.trained.tolist(), "heldout": self.heldout.tolist(),
                "chance": self.chance, "config": self.config.to_dict()}  # fmt: skip


def relearn(
    model: GPTNeoXForCausalLM,
    task: EditTask,
    *,
    config: RelearnConfig = RelearnConfig(),
    baseline: GPTNeoXForCausalLM | None = None,
) -> RelearnResult:
    """Attack `model` (an edit of `task`, left unchanged: a copy is trained) by relearning part
    of the task's changed tuples, and score it on the rest; with `baseline` (a model that never
    knew them: the task's oracle) the same attack on it, from the same data and seed."""
    changed = task.facts[task.changed]
    if len(changed) < 2:
        raise InvalidArgument(
            f"the relearning attack trains on some changed tuples and scores the others, and "
            f"this {task.kind} task changes {len(changed)}: use a forget or ten_* task"
        )
    rng = np.random.default_rng([config.seed, 41])
    order = rng.permutation(len(changed))
    k = min(len(changed) - 1, max(1, round(config.fraction * len(changed))))
    trained, heldout = changed[np.sort(order[:k])], changed[np.sort(order[k:])]
    unchanged = task.unchanged()
    picks = rng.permutation(len(unchanged))
    n_retain = round(config.retain * k)
    retain = unchanged[picks[:n_retain]]
    remaining = unchanged[np.sort(picks[n_retain : n_retain + config.remaining])]
    facts = np.concatenate([trained, retain])
    data = EditDataset(facts, np.full(len(facts), "paper"),
                       np.array(["edit"] * k + ["random"] * n_retain))  # fmt: skip
    splits = dict(zip(SPLITS, (trained, heldout, remaining)))
    models = {"edited": model} | ({"baseline": baseline} if baseline is not None else {})
    rows = {}
    for name, m in models.items():
        attacked = copy.deepcopy(m)
        before = _accuracy(attacked, task, splits)
        finetune(attacked, data, task, trainable_parameters(attacked), objective=CrossEntropy(),
                 lr=config.lr, steps=config.steps, epochs=1, batch_size=config.batch_size,
                 weight_decay=0.0, seed=config.seed)  # fmt: skip
        after = _accuracy(attacked, task, splits)
        for split in SPLITS:
            rows[(name, split)] = {"before": before[split], "after": after[split]}
    accuracy = pd.DataFrame.from_dict(rows, orient="index")
    accuracy.index.names = ["model", "split"]
    chance = 1 / len(task.world.candidate_objects(int(task.facts[0, 1])))
    return RelearnResult(accuracy, trained, heldout, chance, config)


def _accuracy(model, task: EditTask, splits: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 on each split's true objects; the model's world is not checked (the baseline is
    an oracle, trained on the world the edit makes)."""
    tok = WorldTokenizer(task.world.config)
    every = np.concatenate(list(splits.values()))
    top = evaluate_facts(model, task.world, tok, every, world_check=False).top(1)
    bounds = np.cumsum([0, *(len(v) for v in splits.values())])
    return {s: float(top[a:b].mean()) for s, a, b in zip(splits, bounds[:-1], bounds[1:])}
