"""Full-rank fine-tuning of the selected blocks and components (Behemoth section 5)."""

from __future__ import annotations

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


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    """AdamW on the task's edit dataset: `lr`, `steps` (None: `epochs` passes over the
    dataset, the paper trains one), `batch_size`, `weight_decay`; the `objective` it minimizes
    and the `data` it trains on."""

    lr: float = 3e-4
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 16
    weight_decay: float = 0.0
    objective: Objective = field(default_factory=CrossEntropy)
    data: EditDataConfig = field(default_factory=EditDataConfig)

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0, low_open=True)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_range("weight_decay", self.weight_decay, 0)
        if not isinstance(self.objective, Objective):
            raise InvalidArgument(f"objective must be an Objective, got {self.objective!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["objective"] = objective_to_dict(self.objective)
        d["data"] = self.data.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["objective"] = objective_from_dict(d["objective"])
        d["data"] = EditDataConfig.from_dict(d["data"])
        return super().from_dict(d)


def train_on_task(model, task: EditTask, names: list[str], config: FinetuneConfig, seed: int,
                  reference=None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune the parameters `names` of `model` (in place) on `task`'s edit dataset with
    `config`: the part the fine-tuning methods share. Returns the fit's settings."""
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
                    reference=reference)  # fmt: skip
    info["dataset"] = dataset.counts()
    return info


def _has_forget_rows(dataset, task: EditTask) -> bool:
    injected = (dataset.part == "edit") | (dataset.part == "forget")
    facts = dataset.facts[injected]
    return bool((task.world.objects_of(facts[:, 0], facts[:, 1]) != facts[:, 2]).any())


@register
class Finetune(Method):
    """Every weight of the selected components of the selected blocks, at full rank."""

    name: ClassVar[str] = "finetune"
    Config: ClassVar[type] = FinetuneConfig

    def apply(self, hf: GPTNeoXForCausalLM, task: EditTask, where: Where, config, *, seed: int,
              memory: dict) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
        names = trainable_parameters(hf, where.blocks, where.components)
        return hf, train_on_task(hf, task, names, config, seed)
