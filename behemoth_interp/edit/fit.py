"""The fine-tuning loop every gradient method shares: AdamW on an edit dataset, only the named
parameters trainable, minimizing a registered objective (`objectives.py`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from behemoth_interp.edit.datasets import EditDataset
from behemoth_interp.edit.objectives import Batch, Objective
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import Diverged, InvalidArgument
from behemoth_interp.grammar import OBJECT, render
from behemoth_interp.tokenizer import WorldTokenizer


def finetune(
    model: torch.nn.Module, data: EditDataset, task: EditTask, names: list[str], *,
    objective: Objective, lr: float, steps: int | None, epochs: int, batch_size: int,
    weight_decay: float, seed: int, general: EditDataset | None = None,
    reference: torch.nn.Module | None = None,
    masks: Mapping[str, Bool[Tensor, "..."]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """AdamW on `data`, training only the parameters `names` of `model` (an HF model, or its peft
    wrapper) to minimize `objective`; in place. `general` is the general data of objectives
    with an SFT term (one batch of it per step, cycled), `reference` the frozen unedited model
    for objectives that need one (a copy of `model` as it is now when not given). `masks`
    limits some of `names` to their True entries (a head's slices of a fused matrix). A
    non-finite loss or weight raises `Diverged`. Returns the steps taken and the final loss."""
    tok = WorldTokenizer(task.world.config)
    device = next(model.parameters()).device
    x_all, mask_all = object_inputs(task.world, tok, data.facts, data.template, seed, device)
    old_facts = data.facts.copy()
    old_facts[:, 2] = task.world.objects_of(data.facts[:, 0], data.facts[:, 1])
    x_old, _ = object_inputs(task.world, tok, old_facts, data.template, seed, device)
    injected = np.isin(data.part, ("edit", "forget"))
    inj = torch.as_tensor(injected, device=device)
    forget = torch.as_tensor(injected & (old_facts[:, 2] != data.facts[:, 2]), device=device)
    if objective.needs_reference and reference is None:
        reference = copy.deepcopy(model).eval()
    if reference is not None:
        reference.requires_grad_(False)
    general_inputs = None
    if objective.needs_general and general is not None and len(general):
        general_inputs = object_inputs(task.world, tok, general.facts, general.template, seed,
                                       device)  # fmt: skip
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=weight_decay)
    frozen = _frozen_entries(params, names, masks or {})
    per_epoch = math.ceil(len(data) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    rng = np.random.default_rng([seed, 11])
    losses: list[float] = []
    model.train()
    order = rng.permutation(len(data))
    for step in range(total):
        i = step % per_epoch
        if i == 0 and step:
            order = rng.permutation(len(data))
        rows = torch.as_tensor(order[i * batch_size : (i + 1) * batch_size], device=device)
        batch = Batch(model, x_all[rows], x_old[rows], mask_all[rows], inj[rows], forget[rows],
                      reference, _general_batch(general_inputs, step, batch_size))  # fmt: skip
        loss = objective.loss(batch)
        if not torch.isfinite(loss):
            raise Diverged(
                f"the edit diverged: its loss is {loss.item()} at step {step + 1} of {total} "
                f"(lr {lr:g}); no edited model is returned. Lower lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, keep, original in frozen:
                p.copy_(torch.where(keep, p, original))
        losses.append(loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if not all(torch.isfinite(params[n]).all() for n in names):
        raise Diverged(
            f"the edit diverged: trained weights are NaN or infinite (lr {lr:g}): lower lr"
        )
    return {"steps": total, "final_loss": float(np.mean(losses[-max(1, per_epoch // 10) :]))}


def _frozen_entries(
    params: dict[str, Tensor], names: list[str], masks: Mapping[str, Tensor]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(parameter, mask, its values now) of every masked parameter: what each step puts back
    outside the mask, since AdamW's decoupled weight decay moves every entry of a trained
    tensor, even those whose gradient is zero."""
    out = []
    for name, mask in masks.items():
        if name not in names or mask.shape != params[name].shape:
            raise InvalidArgument(
                f"mask for {name!r} must be over a trained parameter of its shape "
                f"{tuple(params[name].shape) if name in params else '(none)'}, got "
                f"{tuple(mask.shape)}: mask only parameters in `names`"
            )
        p = params[name]
        out.append((p, mask.to(p.device), p.detach().clone()))
    return out


def _general_batch(inputs, step: int, batch_size: int):
    if inputs is None:
        return None
    x, mask = inputs
    start = (step * batch_size) % len(x)
    rows = torch.arange(start, start + batch_size, device=x.device) % len(x)
    return x[rows], mask[rows]


def object_inputs(world, tok, facts, template, seed, device):
    """`<|endoftext|>` + rendered sentences [n, 1 + pos], and the object-token mask aligned with
    the next-token targets x[:, 1:]. The columns after the last object token are cut: every
    objective reads the objects and the prompt before them, which a causal model computes
    without the tokens that follow."""
    sent = render(world, tok, facts, template, seed=seed)
    is_object = sent.roles == OBJECT
    width = int(np.flatnonzero(is_object.any(0)).max()) + 1
    eot = np.full((len(sent), 1), tok.eot_id)
    x = np.concatenate([eot, sent.tokens[:, :width]], 1).astype(np.int64)
    return torch.as_tensor(x, device=device), torch.as_tensor(is_object[:, :width], device=device)
