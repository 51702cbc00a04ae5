"""`edit()`: the single entry point that applies any registered method to a task and scores it."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers import GPTNeoXForCausalLM

from behemoth_interp.edit.evaluation import changed_parameters, evaluate_edit
from behemoth_interp.edit.objectives import Localized, get_objective
from behemoth_interp.edit.registry import MODES, Method, get_method
from behemoth_interp.edit.report import EditReport, EditResult
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import CheckpointMismatch, InvalidArgument, WrongType, check_int
from behemoth_interp.evaluate import FactScores, evaluate_facts
from behemoth_interp.localize.localization import ComponentSet
from behemoth_interp.model import check_world, hooked_in_world, load_hf
from behemoth_interp.tokenizer import WorldTokenizer


def edit(
    model_or_checkpoint,
    task: EditTask,
    *,
    method: str = "finetune",
    blocks=None,
    components: str | tuple[str, ...] | None = None,
    localization: ComponentSet | None = None,
    config=None,
    mode: str | None = None,
    objective=None,
    seed: int = 0,
    hooked: bool = False,
    evaluate: bool = True,
    max_remaining: int | None = None,
    rome=None,
    weights: tuple[float, float, float] | None = None,
    **options: Any,
) -> EditResult:
    """Apply `task` to a copy of an HF GPT-NeoX model (or a checkpoint directory) with a
    registered method (`bi.METHODS`: 'finetune', 'lora', 'rome', 'memit', 'alphaedit').

    blocks, components: where the method may edit (None: its default; Behemoth section 5).
    localization: instead, the components the fine-tuning methods may edit (a `ComponentSet`,
    down to single heads for 'finetune'); recorded with its parameter count in the settings.
    config: the method's config (`FinetuneConfig`, `LoraConfig`, `RomeConfig`, ...; `rome=` is
    the same for 'rome'); `options` override its fields by name (lr=, steps=, rank=, v_lr=,
    ...), and for the fine-tuning methods the fields of the objective (beta=, alpha=, ...).
    objective: the fine-tuning methods' loss, a name in `bi.OBJECTIVES` or an objective
    config (`bi.NPO(beta=0.05)`); weights=(injection, retain, forget) is the older spelling
    of `Localized(injection, retain, sft=0, forget)`.
    mode: 'batched' (every tuple in one edit) or 'sequential' (one edit per changed tuple in
    order, scored after each in `settings["sequence"]`); default: batched where the method
    allows it. The input model is left unchanged. Returns an `EditResult`.
    """
    m = get_method(method)
    if max_remaining is not None:
        check_int("max_remaining", max_remaining, 1)
    if rome is not None:
        if method != "rome":
            raise InvalidArgument(f"rome= configures method='rome', not {method!r}: leave it out")
        config = rome if config is None else config
    mode = _mode(m, mode, task)
    _check_options(m, config, objective, options)
    before = resolve_model(model_or_checkpoint, task)
    fields = {f.name for f in dataclasses.fields(m.Config)}
    # options naming where to edit (ROME's layer=, MEMIT's layers=) reach `where` with the
    # config; with no blocks= the others may too (where then sees the config the user means)
    early = {k: v for k, v in options.items() if k in m.where_fields or (
        blocks is None and k in fields and k not in ("objective", "data"))}  # fmt: skip
    if early:
        config = m.config_from(config, early)
    if localization is not None:
        if "localization" not in fields:
            raise InvalidArgument(
                f"method {method!r} edits where its own settings say: localization= is for "
                "'finetune' and 'lora'"
            )
        config = m.config_from(config, {"localization": localization})
    where, config = m.where(before, blocks, components, config)
    config = _configure(m, config, objective, weights, options)
    after = copy.deepcopy(before)
    started = time.perf_counter()
    if mode == "batched":
        after, info = m.apply(after, task, where, config, seed=seed, memory={})
    else:
        after, info = _sequential(m, after, task, where, config, seed, max_remaining)
    settings = {"method": method, "mode": mode, **where.to_dict(), "config": config.to_dict(),
                "seed": seed, **info, "seconds": time.perf_counter() - started}  # fmt: skip
    located = config.localization if "localization" in fields else None
    if located is not None:
        settings["localization_parameters"] = located.n_parameters(before)
    scores = None
    if evaluate:
        scores = FactScores(after, task.world, world_check=False)
        report = evaluate_edit(after, task, before=before, settings=settings,
                               max_remaining=max_remaining, seed=seed, scores=scores)  # fmt: skip
    else:
        report = EditReport(task.kind, method, settings=settings,
                            changed=changed_parameters(before, after))  # fmt: skip
    twin = hooked_in_world(after, task.world) if hooked else None
    return EditResult(after, report, twin, task, scores)


def _mode(m: Method, mode: str | None, task: EditTask) -> str:
    if mode is None:
        return "batched" if "batched" in m.modes else "sequential"
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode not in m.modes:
        raise InvalidArgument(
            f"method {m.name!r} edits {' or '.join(m.modes)} only, not {mode}: "
            "MEMIT and AlphaEdit edit a batch at once"
        )
    return mode


def _check_options(m: Method, config, objective, options: dict[str, Any]) -> None:
    """Every option must name a field of the method's config, or of its objective's."""
    fields = {f.name for f in dataclasses.fields(m.Config)}
    allowed = set(fields)
    if "objective" in fields:
        chosen = objective if objective is not None else (
            config.objective if config is not None else m.Config().objective
        )  # fmt: skip
        allowed |= {f.name for f in dataclasses.fields(get_objective(chosen))}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidArgument(
            f"method {m.name!r} has no setting {unknown}: it takes {sorted(allowed)}"
        )


def _configure(m: Method, config, objective, weights, options: dict[str, Any]):
    """The method's config with `options` applied; the objective's own fields among the options
    go to the objective (fine-tuning methods)."""
    fields = {f.name for f in dataclasses.fields(m.Config)}
    own = {k: v for k, v in options.items() if k in fields}
    rest = {k: v for k, v in options.items() if k not in fields}
    if "objective" in fields:
        base = m.config_from(config, own)
        if weights is not None:
            if objective not in (None, "localized"):
                raise InvalidArgument("weights= is the localized objective's: leave it out")
            injection, retain, forget = (float(w) for w in weights)
            objective = Localized(injection=injection, retain=retain, sft=0.0, forget=forget)
        chosen = get_objective(base.objective if objective is None else objective, **rest)
        return dataclasses.replace(base, objective=chosen)
    if objective is not None or weights is not None:
        raise InvalidArgument(
            f"method {m.name!r} has no training objective: objective= is for 'finetune' and 'lora'"
        )
    return m.config_from(config, options)


def _sequential(m: Method, hf, task: EditTask, where, config, seed: int,
                max_remaining: int | None) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
    """One edit per changed tuple, in order; after each (after 20 evenly spaced ones for longer
    tasks), the success on every tuple edited so far and the remaining accuracy on a fixed
    sample of the unchanged tuples."""
    w = task.world
    tok = WorldTokenizer(w.config)
    changed = np.flatnonzero(task.changed)
    scored = set(np.unique(np.linspace(1, len(changed), min(len(changed), 20)).round()).astype(int))
    unchanged = task.unchanged()
    sample = unchanged[np.sort(np.random.default_rng([seed, 29]).choice(
        len(unchanged), min(len(unchanged), max_remaining or 500), replace=False))]  # fmt: skip
    memory: dict = {}
    steps, infos = [], []
    for i, row in enumerate(changed):
        one = EditTask(w, task.facts[[row]], task.targets[[row]], "custom", task.seed)
        hf, info = m.apply(hf, one, where, config, seed=seed + i, memory=memory)
        infos.append(info)
        if i + 1 not in scored:
            continue
        done = task.edited[changed[: i + 1]]
        steps.append({"edits": i + 1, "success": evaluate_facts(hf, w, tok, done).accuracy,
                      "remaining": evaluate_facts(hf, w, tok, sample).accuracy})  # fmt: skip
    return hf, {"sequence": steps, "steps": infos, "skipped": int((~task.changed).sum())}


def resolve_model(model_or_checkpoint, task: EditTask) -> GPTNeoXForCausalLM:
    """The HF model to edit: `model_or_checkpoint` itself or loaded from its directory, checked
    to belong to the task's world."""
    if isinstance(model_or_checkpoint, str | Path):
        hf, world, _ = load_hf(model_or_checkpoint)
        if world != task.world:
            raise CheckpointMismatch(
                f"{model_or_checkpoint} was trained on another world than the task's: "
                "draw the task from the checkpoint's world (load_hf(path)[1])"
            )
        return hf
    if isinstance(model_or_checkpoint, GPTNeoXForCausalLM):
        check_world(model_or_checkpoint, task.world)
        return model_or_checkpoint
    raise WrongType(
        f"edit takes an HF GPT-NeoX model or a checkpoint directory, got "
        f"{type(model_or_checkpoint).__name__}: load one with bi.load_hf(path)[0]"
    )
