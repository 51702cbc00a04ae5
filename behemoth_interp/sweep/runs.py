"""A sweep spec expanded into runs, each with its content-addressed key.

A run is one `bi.edit` of one drawn task: a model, a task and seed, a method with its full
config, blocks and components. Its key is the sha256 of the model's weights (as the
checkpoint records them), the task (`EditTask.to_dict()`: the world, the edited tuples and
their targets), the method's name and config dict, where it edits, the seed and what is
evaluated — so the same run always has the same key, whichever spec asked for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from behemoth_interp.edit.registry import get_method
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import BehemothError, CheckpointMismatch, InvalidArgument
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.model import load_hf, weights_sha256
from behemoth_interp.sweep.battery import run_oracle
from behemoth_interp.sweep.localizations import build_localizations
from behemoth_interp.sweep.spec import (
    SweepSpec,
    block_subsets,
    canonical_json,
    localizable,
    method_config,
    spec_error,
)
from behemoth_interp.tokenizer import WorldTokenizer

RUN_FORMAT = "behemoth-sweep-run/1"
"""Part of every key: a change of what a run means changes every key."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: everything a worker needs, and the `key` it is stored under.

    `task` is `EditTask.to_dict()` of the drawn task (the worker rebuilds it exactly),
    `task_sha256` the hash of its canonical JSON, `task_spec` how it was drawn (kind, relation, n, seed); `config` the method's full config
    dict (with its localization's components, when it edits one); `blocks` and `components` as
    the method resolves them (`Method.where`); `localization` the spec's name of it."""

    model: str
    model_sha256: str
    task: dict[str, Any] = field(repr=False)
    task_sha256: str
    task_spec: dict[str, Any]
    method: str
    config: dict[str, Any] = field(repr=False)
    blocks: tuple[int, ...]
    components: tuple[str, ...]
    mode: str | None
    seed: int
    max_remaining: int | None = None
    move_rank: float | None = 0.95
    n_layers: int = 0
    distribution: str = ""
    retention: dict[str, Any] | None = None
    localization: str | None = None
    battery: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """What the key hashes (the model's path is not part of it: its weights are)."""
        return {
            "format": RUN_FORMAT, "model": self.model_sha256,
            "task": self.task_sha256,
            "method": {"name": self.method, "config": self.config, "mode": self.mode,
                       "blocks": list(self.blocks), "components": list(self.components)},
            "seed": self.seed,
            "evaluation": {"max_remaining": self.max_remaining, "move_rank": self.move_rank,
                           # only when asked for: older runs keep their keys
                           **({} if self.retention is None else {"retention": self.retention}),
                           **({} if self.battery is None else {"battery": self.battery})},
        }  # fmt: skip

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The run as its record stores it (without the task's tuples, which its key pins)."""
        return {**self.identity(), "model_path": self.model, "model": self.model_sha256,
                "task_spec": self.task_spec, "n_layers": self.n_layers,
                "distribution": self.distribution, "localization": self.localization,
                "key": self.key}  # fmt: skip


@dataclass
class Plan:
    """The runs of a spec in their fixed order, each key once; `duplicates` counts the runs
    the spec named more than once (e.g. a subset in both 'singletons' and 'prefixes')."""

    spec: SweepSpec
    runs: list[Run]
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)


def expand(spec: SweepSpec) -> Plan:
    """Every run of `spec`, deterministically: for each model, task, seed, method, grid point,
    component setting and block subset, in that order. Loads each model once to draw its tasks
    (among the tuples it predicts correctly, as `behemoth-interp edit` does) and to check every
    block subset and selection against it; any error names the spec field, before any run."""
    runs: list[Run] = []
    seen: set[str] = set()
    duplicates = 0
    for model in spec.models:
        for run in _model_runs(spec, model):
            if run.key in seen:
                duplicates += 1
            else:
                seen.add(run.key)
                runs.append(run)
    return Plan(spec, runs, duplicates)


def _model_runs(spec: SweepSpec, model: str) -> Iterator[Run]:
    try:
        hf, world, _ = load_hf(model)
    except BehemothError as err:
        raise type(err)(f"sweep spec models: {err}") from None
    sha, n_layers = weights_sha256(model), hf.config.num_hidden_layers
    resolved: dict[tuple, tuple] = {}  # (relation, setting index) -> where it edits, its config
    settings: dict[int, list[tuple]] = {}  # relation -> the spec's settings for it
    correct: dict[int, Any] = {}
    for ti, t in enumerate(spec.tasks):
        if t.relation not in correct:
            if not 0 <= t.relation < world.config.n_relations:
                raise spec_error(f"tasks[{ti}].relation", f"{model} has base relations "
                                 f"0..{world.config.n_relations - 1}, got {t.relation}")  # fmt: skip
            facts = world.facts(t.relation)
            correct[t.relation] = evaluate_facts(hf, world, WorldTokenizer(world.config), facts)
            located = None
            if spec.localizations is not None:
                located = build_localizations(spec.localizations, hf, world, t.relation,
                                              correct[t.relation])  # fmt: skip
            settings[t.relation] = list(_settings(spec, n_layers, located))
        for seed in spec.seeds:
            try:
                task = EditTask.draw(world, t.kind, seed=seed, relation=t.relation, n=t.n,
                                     correct=correct[t.relation])  # fmt: skip
            except BehemothError as err:
                raise spec_error(f"tasks[{ti}]", f"{model}, seed {seed}: {err}") from None
            task_dict = task.to_dict()
            task_sha = hashlib.sha256(canonical_json(task_dict).encode()).hexdigest()
            battery = None
            if spec.battery is not None:
                found = run_oracle(model, task, spec.battery.oracle)
                battery = {**spec.battery.to_dict(), "oracle": found}
            for k, (mi, method, config, components, blocks, name) in enumerate(
                settings[t.relation]
            ):
                if (t.relation, k) not in resolved:
                    resolved[t.relation, k] = _resolve(hf, method.method, blocks, components,
                                                       config, mi)  # fmt: skip
                chosen, comps, final = resolved[t.relation, k]
                yield Run(model, sha, task_dict, task_sha, {**t.to_dict(), "seed": seed},
                          method.method, final.to_dict(), chosen, comps, method.mode, seed,
                          spec.max_remaining, spec.move_rank, n_layers, world.config.distribution,
                          None if spec.retention is None else spec.retention.to_dict(),
                          name, battery)  # fmt: skip


def _settings(spec: SweepSpec, n_layers: int, located: dict | None = None) -> Iterator[tuple]:
    """(method index, MethodSpec, config, components, blocks, localization name) of every
    method, grid point and either localization (`located`: name -> ComponentSet, for the
    methods that take one) or component setting and block subset of the spec, in order."""
    for mi, m in enumerate(spec.methods):
        where = f"methods[{mi}].blocks" if m.blocks is not None else "blocks"
        subsets = block_subsets(spec.blocks if m.blocks is None else m.blocks, n_layers, where)
        for point in m.points():
            config = method_config(m.method, m.objective, m.options(point))
            if located is not None and localizable(m.method):
                for name, components in located.items():
                    yield (
                        mi,
                        m,
                        dataclasses.replace(config, localization=components),
                        None,
                        None,
                        name,
                    )
                continue
            for c in spec.components if m.components is None else m.components:
                for blocks in subsets:
                    yield mi, m, config, None if c == "default" else c, blocks, None


def _resolve(hf, method: str, blocks, components, config, i: int):
    """Where the method edits for this selection, as it resolves it (None: its default), and
    its config after that (ROME's layer from the block): (blocks, components, config). Two
    selections that resolve alike are the same run, with one key. A selection the method
    refuses (e.g. ROME on two blocks) is an error naming the spec field."""
    try:
        where, final = get_method(method).where(
            hf, None if blocks is None else list(blocks), components, config
        )
    except BehemothError as err:
        raise spec_error(f"methods[{i}] (blocks {None if blocks is None else list(blocks)}, "
                         f"components {components})", str(err)) from None  # fmt: skip
    return tuple(where.blocks), tuple(where.components), final or config


def task_of(run: Run, world) -> EditTask:
    """The run's task, rebuilt exactly from its record in `world` (the model's)."""
    if run.task["world"] != world.config.to_dict():
        raise CheckpointMismatch(
            f"{run.model} holds another world than the one the sweep drew its task from: "
            "the path must name the same checkpoint on every worker"
        )
    return EditTask.from_dict(run.task, world)


def check_weights(run: Run) -> None:
    """The model at `run.model` on this worker has the weights the run's key names."""
    found = weights_sha256(run.model)
    if found != run.model_sha256:
        raise InvalidArgument(
            f"{run.model} on this worker has weights {found[:12]}, but the sweep planned "
            f"{run.model_sha256[:12]}: give every worker the same checkpoint at that path"
        )
