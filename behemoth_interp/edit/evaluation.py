"""Score an edited model on its task against the world's exact ground truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from behemoth_interp.edit.report import EditReport
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.grammar import PARAPHRASES, edit_choices, get_template
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
) -> EditReport:
    """Score an edited model on `task` (a model of the task's world, HF or HookedTransformer).

    With `before` (the unedited model) the report also holds remaining accuracy before the edit
    and the parameters changed. `max_remaining` evaluates a seeded sample of the unchanged
    tuples instead of all of them.
    """
    w = task.world
    tok = WorldTokenizer(w.config)
    settings = dict(settings or {})
    changed = task.changed
    if not changed.any():
        raise InvalidArgument(
            f"{task!r} changes no tuple (every target is already its object): nothing to score"
        )
    edited = evaluate_facts(model, w, tok, task.edited)
    old = evaluate_facts(model, w, tok, task.facts)
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
        remaining=evaluate_facts(model, w, tok, unchanged).accuracy,
        settings=settings,
    )
    # the formats ask the changed tuples only; MCQ lists the original and the new object
    facts, targets = task.facts[changed], task.targets[changed]
    new_facts = task.edited[changed]
    choices = edit_choices(w, facts, targets, seed=seed) if "mcq" in templates else None
    for t in templates:
        ask = {"template": t, "choices": choices if get_template(t).is_choice else None}
        report.template_success[t] = evaluate_facts(model, w, tok, new_facts, **ask).accuracy
        if before is not None:
            report.template_before[t] = evaluate_facts(before, w, tok, facts, **ask).accuracy
    deps, followed = task.dependents()
    if len(deps):
        moved = deps.copy()
        moved[:, 2] = followed
        follows = evaluate_facts(model, w, tok, moved).top(1)
        must = followed != deps[:, 2]
        report.dependent_followed_all = float(follows.mean())
        if must.any():
            report.dependent_kept = evaluate_facts(model, w, tok, deps[must]).accuracy
            report.dependent_followed = float(follows[must].mean())
    if before is not None:
        report.remaining_before = evaluate_facts(before, w, tok, unchanged).accuracy
        if isinstance(before, GPTNeoXForCausalLM) and isinstance(model, GPTNeoXForCausalLM):
            report.changed = changed_parameters(before, model)
    return report
