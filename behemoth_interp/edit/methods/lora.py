"""LoRA adapters (peft) on the selected blocks' linear layers, trained and merged back."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import GPTNeoXForCausalLM

from behemoth_interp.edit.methods.finetune import FinetuneConfig, Localizable, train_on_task
from behemoth_interp.edit.registry import Where, register
from behemoth_interp.edit.selection import lora_modules
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, check_int, check_range


@dataclass(frozen=True)
class LoraConfig(FinetuneConfig):
    """Fine-tuning settings plus the adapters' `rank` and `alpha` (the scaling is alpha/rank;
    None: alpha = rank, scaling 1)."""

    lr: float = 1e-3
    rank: int = 32
    alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank, 1)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0, low_open=True)


@register
class Lora(Localizable):
    """peft LoRA on `query_key_value`, `dense` (attention) and `dense_h_to_4h`, `dense_4h_to_h`
    (MLP) of the selected blocks, or of a localization's whole MLPs and attentions; the
    adapters are merged back, so the result is a plain model whose weights moved by a
    rank-`rank` product per adapted matrix."""

    name: ClassVar[str] = "lora"
    Config: ClassVar[type] = LoraConfig

    def where(self, hf: GPTNeoXForCausalLM, blocks, components, config) -> tuple[Where, Any]:
        where, config = super().where(hf, blocks, components, config)
        heads = [] if config is None or config.localization is None else [
            c.name for c in config.localization if c.kind == "head"]  # fmt: skip
        if heads:
            raise InvalidArgument(
                f"LoRA adapts whole linear layers, so it cannot edit single heads {heads}: use "
                "method='finetune' for a head-level localization"
            )
        return where, config

    def apply(self, hf: GPTNeoXForCausalLM, task: EditTask, where: Where, config, *, seed: int,
              memory: dict) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        located = config.localization
        modules = lora_modules(hf, where.blocks, where.components) if located is None else [
            m for c in located for m in lora_modules(hf, [c.layer], c.kind)]  # fmt: skip
        limit = {m: min(hf.get_submodule(m).weight.shape) for m in modules}
        if config.rank > min(limit.values()):
            worst = min(limit, key=limit.get)
            raise InvalidArgument(
                f"LoRA rank {config.rank} is not in 1..{limit[worst]}: {worst} has full rank "
                f"{limit[worst]}, so a larger adapter adds nothing (use method='finetune' for a "
                "full-rank edit)"
            )
        alpha = float(config.rank if config.alpha is None else config.alpha)
        # objectives that read the original model get it before the adapters wrap it
        reference = copy.deepcopy(hf).eval() if config.objective.needs_reference else None
        peft = PeftLora(r=config.rank, lora_alpha=alpha, target_modules=modules,
                        lora_dropout=0.0, bias="none")  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = get_peft_model(hf, peft)
        names = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
        info = train_on_task(wrapped, task, names, config, seed, reference)
        info["adapter_parameters"] = sum(wrapped.get_parameter(n).numel() for n in names)
        info["alpha"] = alpha
        return wrapped.merge_and_unload(), info
