"""Full-rank fine-tuning of the selected blocks and components (Behemoth section 5), or of a
localization's components down to single attention heads (Mechanistic Unlearning 2.3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.datasets import EditDataConfig, edit_dataset, general_data
from behemoth_interp.edit.fit import finetune
from behemoth_interp.edit.objectives import (
    CrossEntropy,
    Objective,
    objective_from_dict,
    objective_to_dict,
)
from behemoth_interp.edit.registry import Method, Where, register
from behemoth_interp.edit.selection import trainable_parameters
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, check_int, check_range
from behemoth_interp.localize.localization import ComponentSet


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    """AdamW on the task's edit dataset: `lr`, `steps` (None: `epochs` passes over the
    dataset, the paper trains one), `batch_size`, `weight_decay`; the `objective` it minimizes
    and the `data` it trains on. `localization` (a `ComponentSet` or its dict; None: the
    blocks and components of `edit`) restricts training to its components' weights."""

    lr: float = 3e-4
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 16
    weight_decay: float = 0.0
    objective: Objective = field(default_factory=CrossEntropy)
    data: EditDataConfig = field(default_factory=EditDataConfig)
    localization: ComponentSet | None = None

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, low_open=True)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_range("weight_decay", self.weight_decay, 0)
        if not isinstance(self.objective, Objective):
            raise InvalidArgument(f"objective must be an Objective, got {self.objective!r}")
        if isinstance(self.localization, Mapping):
            object.__setattr__(self, "localization", ComponentSet.from_dict(self.localization))
        if self.localization is not None and not isinstance(self.localization, ComponentSet):
            raise InvalidArgument(
                f"localization must be a ComponentSet (bi.ComponentSet, bi.from_trace, ...) or "
                f"its dict, got {type(self.localization).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["objective"] = objective_to_dict(self.objective)
        d["data"] = self.data.to_dict()
        # only when set: configs without one keep their dicts, and sweep runs their keys
        if d.pop("localization") is not None:
            d["localization"] = self.localization.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["objective"] = objective_from_dict(d["objective"])
        d["data"] = EditDataConfig.from_dict(d["data"])
        return super().from_dict(d)


def train_on_task(model, task: EditTask, names: list[str], config: FinetuneConfig, seed: int,
                  reference=None, masks=None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune the parameters `names` of `model` (in place) on `task`'s edit dataset with
    `config`, only the True entries of those in `masks`: the part the fine-tuning methods
    share. Returns the fit's settings."""
    dataset = edit_dataset(task, config.data)
    objective = config.objective
    if objective.needs_forget and not _has_forget_rows(dataset, task):
        raise InvalidArgument(
            f"objective {objective.name!r} unlearns original objects, but this task's dataset has "
            "no tuple whose object changes: use an override or forget task, or objective 'ce'"
        )
    general = general_data(task, config.data) if objective.needs_general else None
    info = finetune(model, dataset, task, names, objective=objective, lr=config.lr,
                    steps=config.steps, epochs=config.epochs, batch_size=config.batch_size,
                    weight_decay=config.weight_decay, seed=seed, general=general,
                    reference=reference, masks=masks)  # fmt: skip
    info["dataset"] = dataset.counts()
    return info


def _has_forget_rows(dataset, task: EditTask) -> bool:
    injected = (dataset.part == "edit") | (dataset.part == "forget")
    facts = dataset.facts[injected]
    return bool((task.world.objects_of(facts[:, 0], facts[:, 1]) != facts[:, 2]).any())


class Localizable(Method):
    """A fine-tuning method that edits either blocks x components or its config's
    `localization`; `where` refuses both at once and checks the localization against `hf`."""

    def where(self, hf: GPTNeoXForCausalLM, blocks, components, config) -> tuple[Where, Any]:
        located = None if config is None else config.localization
        if located is None:
            return super().where(hf, blocks, components, config)
        if blocks is not None or components is not None:
            raise InvalidArgument(
                "blocks=/components= and localization= both say where to edit: pass one of them"
            )
        located.check(hf)
        return Where(located.blocks, located.kinds), config


@register
class Finetune(Localizable):
    """Every weight of the selected components of the selected blocks, at full rank; with a
    localization, every weight its components own (a head: its slices of QKV and W_O)."""

    name: ClassVar[str] = "finetune"
    Config: ClassVar[type] = FinetuneConfig

    def apply(self, hf: GPTNeoXForCausalLM, task: EditTask, where: Where, config, *, seed: int,
              memory: dict) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
        if config.localization is None:
            names = trainable_parameters(hf, where.blocks, where.components)
            return hf, train_on_task(hf, task, names, config, seed)
        masks = config.localization.masks(hf)
        partial = {name: mask for name, mask in masks.items() if mask is not None}
        return hf, train_on_task(hf, task, list(masks), config, seed, masks=partial)
