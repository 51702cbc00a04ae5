"""Score an edited model on its task against the world's exact ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from behemoth_interp.edit.report import EditReport
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import CheckpointMismatch, InvalidArgument
from behemoth_interp.evaluate import FactScores, evaluate_facts
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
    baseline: EditBaseline | None = None,
    scores: FactScores | None = None,
) -> EditReport:
    """Score an edited model on `task` (a model of the task's world, HF or HookedTransformer).

    With `before` (the unedited model) the report also holds remaining accuracy before the edit
    and the parameters changed; with `oracle` (`bi.oracle`: the model trained on the world as
    the edit says it should be) the distance to it on every tuple (`oracle_distance`).
    `max_remaining` evaluates a seeded sample of the unchanged tuples instead of all of them.
    `baseline` is `edit_baseline(before, task, ...)` computed once for many edits of one task
    (a sweep): the same numbers, not recomputed; it must match the task and settings.
    `scores` (a `FactScores` of `model`) keeps the per-tuple ranks for the caller, who may
    read other tuples from it without running them twice (`training_scores(scores=)`).
    """
    w = task.world
    tok = WorldTokenizer(w.config)
    settings = dict(settings or {})
    changed = task.changed
    _check_edited_world(model, task)
    scores = FactScores.of(model, w, scores, world_check=False)
    if not changed.any():
        raise InvalidArgument(
            f"{task!r} changes no tuple (every target is already its object): nothing to score"
        )
    unchanged = _unchanged_sample(task, max_remaining, seed)
    deps, followed = task.dependents()
    moved = deps.copy()
    moved[:, 2] = followed
    # every paper-template tuple in one pass, so tuples of a subject share their prefix
    scores(np.concatenate([task.edited, task.facts, unchanged, deps, moved]))
    score = partial(evaluate_facts, model, w, tok, world_check=False)
    edited = scores(task.edited)
    old = scores(task.facts)
    if baseline is not None and before is None:
        raise InvalidArgument("baseline= is the unedited model's side: pass before= with it")
    if before is not None:
        if baseline is None:
            baseline = edit_baseline(before, task, max_remaining=max_remaining, seed=seed,
                                     templates=templates)  # fmt: skip
        baseline.check(task, max_remaining, seed, templates)
    report = EditReport(
        task.kind,
        method or settings.get("method", "unknown"),
        success_top1=float(edited.top(1)[changed].mean()),
        success_top2=float(edited.top(2)[changed].mean()),
        success_top1_all=float(edited.top(1).mean()),
        forget_rate=float((~old.top(1))[changed].mean()),
        remaining=scores(unchanged).accuracy,
        settings=settings,
    )
    # the formats ask the changed tuples only; MCQ lists the original and the new object
    new_facts = task.edited[changed]
    for t, ask in _format_questions(task, templates, seed):
        report.template_success[t] = score(new_facts, **ask).accuracy
        if baseline is not None:
            report.template_before[t] = baseline.template_before[t]
    if len(deps):
        follows = scores(moved).top(1)
        must = followed != deps[:, 2]
        report.dependent_followed_all = float(follows.mean())
        if must.any():
            report.dependent_kept = scores(deps[must]).accuracy
            report.dependent_followed = float(follows[must].mean())
    if before is not None:
        report.remaining_before = baseline.remaining_before
        if isinstance(before, GPTNeoXForCausalLM) and isinstance(model, GPTNeoXForCausalLM):
            report.changed = changed_parameters(before, model)
    if oracle is not None:
        distance = oracle_distance(model, oracle, task)
        report.oracle_agreement, report.oracle_kl = distance["agreement"], distance["kl"]
    return report


@dataclass(frozen=True)
class EditBaseline:
    """What `evaluate_edit` measures on the unedited model: `remaining_before` (top-1 accuracy
    on the unchanged tuples it scores) and `template_before` (its accuracy on the changed tuples,
    original objects, in each format), for one task, `max_remaining`, seed and templates."""

    remaining_before: float
    template_before: dict[str, float]
    facts: np.ndarray
    targets: np.ndarray
    max_remaining: int | None
    seed: int
    templates: tuple[str, ...]

    def check(self, task: EditTask, max_remaining, seed: int, templates) -> None:
        same = (np.array_equal(self.facts, task.facts) and np.array_equal(self.targets, task.targets)
                and (self.max_remaining, self.seed, self.templates)
                == (max_remaining, seed, tuple(templates)))  # fmt: skip
        if not same:
            raise InvalidArgument(
                "baseline= was computed for another task, max_remaining, seed or templates: "
                "compute it with edit_baseline(before, task, ...) and the same settings"
            )


@torch.inference_mode()
def edit_baseline(
    before: GPTNeoXForCausalLM,
    task: EditTask,
    *,
    max_remaining: int | None = None,
    seed: int = 0,
    templates: tuple[str, ...] = (*PARAPHRASES, "mcq"),
) -> EditBaseline:
    """The unedited model's side of `evaluate_edit(model, task, before=before, ...)` with the
    same settings, computed once: many edits of one task share it (`baseline=`)."""
    w = task.world
    tok = WorldTokenizer(w.config)
    facts = task.facts[task.changed]
    template_before = {t: evaluate_facts(before, w, tok, facts, **ask).accuracy
                       for t, ask in _format_questions(task, templates, seed)}  # fmt: skip
    remaining = evaluate_facts(before, w, tok, _unchanged_sample(task, max_remaining, seed))
    return EditBaseline(remaining.accuracy, template_before, task.facts, task.targets,
                        max_remaining, seed, tuple(templates))  # fmt: skip


def _unchanged_sample(task: EditTask, max_remaining: int | None, seed: int) -> np.ndarray:
    """The unchanged tuples remaining accuracy is scored on: all, or a seeded sample."""
    unchanged = task.unchanged()
    if max_remaining is not None and len(unchanged) > max_remaining:
        rows = np.random.default_rng([seed, 13]).choice(
            len(unchanged), max_remaining, replace=False
        )
        unchanged = unchanged[np.sort(rows)]
    return unchanged


def _format_questions(task: EditTask, templates, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(template, evaluate_facts options) for asking the changed tuples in each format; the
    multiple-choice lists hold the original and the new object."""
    changed = task.changed
    needs = any(get_template(t).is_choice for t in templates)
    choices = edit_choices(task.world, task.facts[changed], task.targets[changed],
                           seed=seed) if needs else None  # fmt: skip
    return [(t, {"template": t, "choices": choices if get_template(t).is_choice else None})
            for t in templates]  # fmt: skip


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
