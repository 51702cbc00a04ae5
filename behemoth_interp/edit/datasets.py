"""Edit datasets (Behemoth section 4.7): what the fine-tuning methods train on.

Overrides: repeats of the edited tuples with their new objects, unchanged tuples sharing the
old object, and random other tuples (2:1:4); forgetting: a 5% sample of the relation's tuples
plus other relations' tuples (1:1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.grammar import augment_templates, get_template


@dataclass(frozen=True)
class EditDataConfig(JsonConfig):
    """How an edit dataset is assembled (Behemoth section 4.7).

    repeats: copies of each edited tuple (with its new object); ratio: edited : sharing :
    random sentences (sharing = unchanged tuples with an edited tuple's old object);
    forget_fraction: share of the relation's tuples in a forgetting dataset; forget_ratio:
    those : tuples of other relations; grammar_mix: (template, weight) pairs. general, general_mix:
    how many general-data sentences objectives with an SFT term train on (the world's
    unchanged tuples, seeded), in which templates. paraphrases: k, paraphrase-augmented
    overrides (Retention paper, section 5.1): each edited tuple's repeats are stated in equal
    shares in its `grammar_mix` template and in each of the first k `AUGMENT_PARAPHRASES`.
    """

    repeats: int = 250
    ratio: tuple[float, float, float] = (2.0, 1.0, 4.0)
    forget_fraction: float = 0.05
    forget_ratio: tuple[float, float] = (1.0, 1.0)
    grammar_mix: tuple[tuple[str, float], ...] = (("paper", 1.0),)
    general: int = 1000
    general_mix: tuple[tuple[str, float], ...] = (("paper", 1.0),)
    seed: int = 0
    paraphrases: int = 0

    def __post_init__(self) -> None:
        augment_templates(self.paraphrases)
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        object.__setattr__(self, "forget_ratio", tuple(float(x) for x in self.forget_ratio))
        for name in ("grammar_mix", "general_mix"):
            object.__setattr__(self, name, _mix(name, getattr(self, name)))
        check_int("general", self.general, 1)
        if self.repeats < 1:
            raise InvalidArgument(f"repeats must be at least 1, got {self.repeats}")
        if len(self.ratio) != 3 or min(self.ratio) < 0 or self.ratio[0] <= 0:
            raise InvalidArgument(
                f"ratio is edited : sharing : random, three non-negative numbers with edited > 0, "
                f"got {self.ratio}"
            )
        if len(self.forget_ratio) != 2 or min(self.forget_ratio) < 0 or self.forget_ratio[0] <= 0:
            raise InvalidArgument(
                f"forget_ratio is forgotten : other, e.g. (1, 1), got {self.forget_ratio}"
            )
        if not 0 < self.forget_fraction <= 1:
            raise InvalidArgument(f"forget_fraction must be in (0, 1], got {self.forget_fraction}")


def _mix(name: str, mix) -> tuple[tuple[str, float], ...]:
    """A validated (template, weight) mix: known templates, weights >= 0 summing above 0."""
    mix = tuple((str(n), float(w)) for n, w in mix)
    if not mix or any(w < 0 for _, w in mix):
        raise InvalidArgument(f"{name} needs (template, weight) pairs with weights >= 0")
    if sum(w for _, w in mix) <= 0:
        raise InvalidArgument(f"{name} weights sum to 0: give at least one template weight > 0")
    for template, _ in mix:
        get_template(template)
    return mix


def _templates(rng, mix, n: int) -> np.ndarray:
    names, weights = zip(*mix)
    p = np.asarray(weights) / sum(weights)
    return np.asarray(names, dtype=object)[rng.choice(len(names), size=n, p=p)]


PARTS = ("edit", "sharing", "random", "forget", "other", "general")


@dataclass
class EditDataset:
    """Training sentences of an edit: `facts` [n, 3] as the model should learn them (edited
    tuples carry their new objects), the `template` of each and the `part` it comes from."""

    facts: np.ndarray
    template: np.ndarray
    part: np.ndarray

    def __len__(self) -> int:
        return len(self.facts)

    def counts(self) -> dict[str, int]:
        return {p: int((self.part == p).sum()) for p in PARTS if (self.part == p).any()}

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"subject": self.facts[:, 0], "relation": self.facts[:, 1],
                             "object": self.facts[:, 2], "template": self.template, "part": self.part})  # fmt: skip


def edit_dataset(task: EditTask, config: EditDataConfig = EditDataConfig()) -> EditDataset:
    """Assemble the fine-tuning data of `task`, shuffled with `config.seed`.

    Overrides: each edited tuple `repeats` times with its new object, then sharing and random
    tuples in `ratio` to those (sampled with replacement; an empty pool contributes nothing).
    Forgetting: `forget_fraction` of the relation's tuples (new object) and other relations'
    tuples in `forget_ratio`. Random and other tuples exclude the edited tuples and their
    dependents, whose truth the edit puts in question.
    """
    rng = np.random.default_rng([config.seed, 7])
    unchanged = task.unchanged()
    parts: list[tuple[str, np.ndarray]] = []
    if task.kind == "forget":
        n_forget = max(1, math.ceil(config.forget_fraction * len(task.facts)))
        rows = np.sort(rng.choice(len(task.facts), n_forget, replace=False))
        parts.append(("forget", task.edited[rows]))
        others = unchanged[unchanged[:, 1] != task.relation]
        n_other = round(n_forget * config.forget_ratio[1] / config.forget_ratio[0])
        parts.append(("other", _sample(rng, others, n_other)))
    else:
        edit = np.repeat(task.edited, config.repeats, axis=0)
        parts.append(("edit", edit))
        same = (unchanged[:, 1] == task.relation) & np.isin(unchanged[:, 2], task.facts[:, 2])
        sharing = unchanged[same]
        unit = len(edit) / config.ratio[0]
        parts.append(("sharing", _sample(rng, sharing, round(unit * config.ratio[1]))))
        parts.append(("random", _sample(rng, unchanged, round(unit * config.ratio[2]))))
    facts = np.concatenate([p for _, p in parts]).astype(np.int64)
    part = np.concatenate([np.full(len(p), name, dtype=object) for name, p in parts])
    template = _templates(rng, config.grammar_mix, len(facts))
    if config.paraphrases:
        if task.kind == "forget":
            raise InvalidArgument(
                "paraphrases augment the statements of overrides; a forgetting dataset states "
                "each forgotten tuple once: set paraphrases=0"
            )
        _augment(template, part, config.paraphrases, config.repeats)
    order = rng.permutation(len(facts))
    return EditDataset(facts[order], template[order], part[order])


def _augment(template: np.ndarray, part: np.ndarray, k: int, repeats: int) -> None:
    """Give each edited tuple's `repeats` rows (consecutive in `part == 'edit'`) its template
    and the first `k` augmentation paraphrases in turn: equal shares, within one row."""
    rows = np.flatnonzero(part == "edit")
    turn = np.arange(len(rows)) % repeats % (k + 1)
    names = np.asarray(augment_templates(k), dtype=object)
    template[rows[turn > 0]] = names[turn[turn > 0] - 1]


def general_data(task: EditTask, config: EditDataConfig = EditDataConfig()) -> EditDataset:
    """General data for objectives with an SFT term (Mechanistic Unlearning's Pile term): a
    seeded sample of `config.general` tuples the edit must not change, in `general_mix`."""
    rng = np.random.default_rng([config.seed, 19])
    facts = _sample(rng, task.unchanged(), config.general).astype(np.int64)
    part = np.full(len(facts), "general", dtype=object)
    return EditDataset(facts, _templates(rng, config.general_mix, len(facts)), part)


def _sample(rng, pool: np.ndarray, n: int) -> np.ndarray:
    if len(pool) == 0 or n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    return pool[rng.choice(len(pool), n, replace=len(pool) < n)]
