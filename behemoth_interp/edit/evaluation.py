"""Score an edited model on its task against the world's exact ground truth."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from behemoth_interp.edit.report import EditReport
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import CheckpointMismatch, InvalidArgument
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.grammar import PARAPHRASES, edit_choices, get_template, render
from behemoth_interp.model import describe, logits_of, model_device, model_world
from behemoth_interp.tokenizer import WorldTokenizer


def changed_parameters(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, int]:
    """For every parameter tensor that differs, the number of its elements that changed."""
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    if a.keys() != b.keys():
        raise InvalidArgument(
            "the models have different parameters: compare a model with its edited copy"
        )
    out = {}
    for name, p in a.items():
        n = int((p.detach() != b[name].detach().to(p.device)).sum())
        if n:
            out[name] = n
    return out


@torch.inference_mode()
def evaluate_edit(
    model: GPTNeoXForCausalLM,
    task: EditTask,
    *,
    before: GPTNeoXForCausalLM | None = None,
    method: str | None = None,
    settings: dict[str, Any] | None = None,
    max_remaining: int | None = None,
    seed: int = 0,
    templates: tuple[str, ...] = (*PARAPHRASES, "mcq"),
    oracle: GPTNeoXForCausalLM | None = None,
) -> EditReport:
    """Score an edited model on `task` (a model of the task's world, HF or HookedTransformer).

    With `before` (the unedited model) the report also holds remaining accuracy before the edit
    and the parameters changed; with `oracle` (`bi.oracle`: the model trained on the world as
    the edit says it should be) the distance to it on every tuple (`oracle_distance`).
    `max_remaining` evaluates a seeded sample of the unchanged tuples instead of all of them.
    """
    w = task.world
    tok = WorldTokenizer(w.config)
    settings = dict(settings or {})
    changed = task.changed
    _check_edited_world(model, task)
    score = partial(evaluate_facts, model, w, tok, world_check=False)
    if not changed.any():
        raise InvalidArgument(
            f"{task!r} changes no tuple (every target is already its object): nothing to score"
        )
    edited = score(task.edited)
    old = score(task.facts)
    unchanged = task.unchanged()
    if max_remaining is not None and len(unchanged) > max_remaining:
        rows = np.random.default_rng([seed, 13]).choice(
            len(unchanged), max_remaining, replace=False
        )
        unchanged = unchanged[np.sort(rows)]
    report = EditReport(
        task.kind,
        method or settings.get("method", "unknown"),
        success_top1=float(edited.top(1)[changed].mean()),
        success_top2=float(edited.top(2)[changed].mean()),
        success_top1_all=float(edited.top(1).mean()),
        forget_rate=float((~old.top(1))[changed].mean()),
        remaining=score(unchanged).accuracy,
        settings=settings,
    )
    # the formats ask the changed tuples only; MCQ lists the original and the new object
    facts, targets = task.facts[changed], task.targets[changed]
    new_facts = task.edited[changed]
    choices = edit_choices(w, facts, targets, seed=seed) if "mcq" in templates else None
    for t in templates:
        ask = {"template": t, "choices": choices if get_template(t).is_choice else None}
        report.template_success[t] = score(new_facts, **ask).accuracy
        if before is not None:
            report.template_before[t] = evaluate_facts(before, w, tok, facts, **ask).accuracy
    deps, followed = task.dependents()
    if len(deps):
        moved = deps.copy()
        moved[:, 2] = followed
        follows = score(moved).top(1)
        must = followed != deps[:, 2]
        report.dependent_followed_all = float(follows.mean())
        if must.any():
            report.dependent_kept = score(deps[must]).accuracy
            report.dependent_followed = float(follows[must].mean())
    if before is not None:
        report.remaining_before = evaluate_facts(before, w, tok, unchanged).accuracy
        if isinstance(before, GPTNeoXForCausalLM) and isinstance(model, GPTNeoXForCausalLM):
            report.changed = changed_parameters(before, model)
    if oracle is not None:
        distance = oracle_distance(model, oracle, task)
        report.oracle_agreement, report.oracle_kl = distance["agreement"], distance["kl"]
    return report


def _check_edited_world(model, task: EditTask) -> None:
    """An edited model belongs to the task's world; its oracle to the world the task makes."""
    recorded = model_world(model)
    allowed = {
        task.world.fingerprint,
        task.world.with_objects(task.facts, task.targets).fingerprint,
    }
    if recorded is not None and recorded not in allowed:
        raise CheckpointMismatch(
            f"{describe(model)} was trained on another world than the task's: score it on a "
            "task drawn from its own world"
        )


@torch.inference_mode()
def oracle_distance(model, oracle, task: EditTask, *, batch_size: int = 512) -> dict[str, Any]:
    """How far `model` is from the task's `oracle` on every tuple of the world as the edit says
    it should be (the paper template, the oracle world's objects teacher-forced): `agreement`,
    the share of tuples where both models' argmax agree at every object token, and `kl`, the
    mean KL(oracle || model) of the next-token distributions at the object positions; also the
    per-tuple values (`per_tuple_agreement`, `per_tuple_kl`). The oracle belongs to the changed
    world, so the two are compared by their logits, with the task world's vocabulary."""
    world = task.world.with_objects(task.facts, task.targets)
    tok = WorldTokenizer(world.config)
    facts = world.facts()
    sent = render(world, tok, facts, "paper")
    obj = sent.spans["object"]
    start, end = int(obj[0, 0]), int(obj[:, 1].max())
    inputs = np.concatenate([np.full((len(facts), 1), tok.eot_id), sent.tokens[:, :end]], 1)
    # logits at input position p predict token p: object token j is predicted at start + j
    at = torch.arange(start, end)
    lengths = torch.as_tensor(obj[:, 1] - obj[:, 0])
    valid = at[None, :] - start < lengths[:, None]
    agree, kl = np.empty(len(facts)), np.empty(len(facts))
    device = model_device(model)
    for first in range(0, len(facts), batch_size):
        rows = slice(first, first + batch_size)
        x = torch.as_tensor(inputs[rows], dtype=torch.long, device=device)
        a = logits_of(model, x)[:, at].float().log_softmax(-1).cpu()
        b = logits_of(oracle, x.to(model_device(oracle)))[:, at].float().log_softmax(-1).cpu()
        v = valid[rows]
        same = (a.argmax(-1) == b.argmax(-1)) | ~v
        agree[rows] = same.all(1).numpy()
        per = (b.exp() * (b - a)).sum(-1) * v
        kl[rows] = (per.sum(1) / v.sum(1)).numpy()
    return {"agreement": float(agree.mean()), "kl": float(kl.mean()),
            "per_tuple_agreement": agree, "per_tuple_kl": kl}  # fmt: skip
