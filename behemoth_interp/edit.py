"""Knowledge edits with exact ground truth: the paper's four edit tasks, their datasets, methods.

Tasks (Behemoth section 4.7), drawn from a World with a seed on one base relation r:
- 'single': one (correctly predicted) tuple (s, r, o) -> a random other object of r;
- 'ten_same': ten tuples with the same r and o -> one other object;
- 'ten_different': ten tuples, same r, ten different o -> ten different new objects;
- 'forget': every tuple of r -> r's first object (object 0).
Edit datasets follow section 4.7: repeats of the edited tuples with their new objects, unchanged
tuples sharing the old object, and random other tuples (2:1:4); forgetting uses a 5% sample of
r's tuples plus other relations' tuples (1:1). `edit` applies a method (full-rank fine-tuning or
LoRA on any subset of blocks and components, or ROME on one MLP, `rome.py`) to an HF GPT-NeoX
model and scores it in an `EditReport`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig, read_json, write_dir, write_json
from behemoth_interp.errors import Diverged, InvalidArgument, WrongType, check_int
from behemoth_interp.evaluate import FactAccuracy, evaluate_facts
from behemoth_interp.grammar import OBJECT, PARAPHRASES, edit_choices, get_template, render
from behemoth_interp.model import check_world, hooked_in_world, load_hf, write_checkpoint
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from behemoth_interp.rome import RomeConfig

TaskKind = Literal["single", "ten_same", "ten_different", "forget", "custom"]
TASKS: tuple[str, ...] = ("single", "ten_same", "ten_different", "forget")
"""The paper's four edit tasks (section 4.7); 'custom' tasks are built from given tuples."""
COMPONENT_CHOICES = ("mlp", "attn")
METHODS = ("finetune", "lora", "rome")
OBJECTIVES = ("ce", "localized", "gradient_ascent", "gradient_difference")
DEFAULT_LR = {"finetune": 3e-4, "lora": 1e-3}
"""Learning rates that edit the micro test model in one epoch (pass lr= for other models)."""
_LORA_MODULES = {"attn": ("attention.query_key_value", "attention.dense"),
                 "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}  # fmt: skip


# ============================================================================ tasks
@dataclass(frozen=True, eq=False)
class EditTask:
    """Edited tuples `facts` [n, 3] (with their true objects) and their new `targets` [n].

    Build the paper's tasks with `EditTask.draw`; any other edit with `EditTask(world, facts,
    targets)`. Validation rejects tuples that are not in the world, non-base relations and
    targets outside the relation's objects.
    """

    world: World
    facts: np.ndarray
    targets: np.ndarray
    kind: TaskKind = "custom"
    seed: int | None = None

    def __post_init__(self) -> None:
        w = self.world
        facts = np.asarray(self.facts, dtype=np.int64).reshape(-1, 3)
        targets = np.asarray(self.targets, dtype=np.int64).reshape(-1)
        if len(facts) == 0:
            raise InvalidArgument("an edit task needs at least one tuple to edit")
        if len(targets) != len(facts):
            raise InvalidArgument(
                f"{len(facts)} tuples but {len(targets)} targets: give one new object per tuple"
            )
        if self.kind not in (*TASKS, "custom"):
            raise InvalidArgument(
                f"unknown task kind {self.kind!r}: choose one of {TASKS} or 'custom'"
            )
        for r in np.unique(facts[:, 1]):
            w._check_relation(int(r))
            if w.relation_kind(int(r)) != "base":
                raise InvalidArgument(
                    f"relation {w.relation_name(int(r))} is not a base relation: edit tasks change "
                    f"base tuples (relations 0..{w.config.n_relations - 1}); their dependents follow"
                )
        true = w.objects_of(facts[:, 0], facts[:, 1])
        wrong = np.flatnonzero(true != facts[:, 2])
        if len(wrong):
            s, r, o = facts[wrong[0]]
            raise InvalidArgument(
                f"tuple (s={s}, r={r}, o={o}) is not in this world: ({s}, {w.relation_name(int(r))}) "
                f"has object {true[wrong[0]]}"
            )
        keys = facts[:, 0] * w.n_relations + facts[:, 1]
        if len(np.unique(keys)) != len(keys):
            raise InvalidArgument(
                "a (subject, relation) pair is edited twice: give each tuple once"
            )
        for (s, r, _), t in zip(facts, targets):
            n = len(w.candidate_objects(int(r)))
            if not 0 <= t < n:
                raise InvalidArgument(
                    f"edit target {t} for (s={s}, r={w.relation_name(int(r))}) is outside the "
                    f"relation's objects 0..{n - 1}"
                )
        if self.kind != "forget" and (targets == facts[:, 2]).any():
            i = int(np.flatnonzero(targets == facts[:, 2])[0])
            raise InvalidArgument(
                f"edit target of tuple {tuple(facts[i].tolist())} is its current object: "
                "an override must change the object"
            )
        facts.setflags(write=False)
        targets.setflags(write=False)
        object.__setattr__(self, "facts", facts)
        object.__setattr__(self, "targets", targets)

    # ------------------------------------------------------------------ drawing the paper's tasks
    @classmethod
    def draw(
        cls,
        world: World,
        kind: str,
        *,
        seed: int = 0,
        relation: int = 0,
        n: int = 10,
        correct: np.ndarray | FactAccuracy | Any | None = None,
    ) -> EditTask:
        """Draw one of the paper's tasks on base `relation` (the paper always uses the first).

        `n` is the number of tuples of 'ten_same' / 'ten_different'. `correct` limits the
        drawn tuples to correctly predicted ones: a boolean mask over the relation's subjects,
        a `FactAccuracy` covering them, or a model (HookedTransformer from `load_model`, or
        an HF model) that is evaluated on the relation first.
        """
        if kind not in TASKS:
            raise InvalidArgument(f"unknown edit task {kind!r}: choose one of {TASKS}")
        check_int("n", n, 1)
        world._check_relation(relation)
        if world.relation_kind(relation) != "base":
            raise InvalidArgument(
                f"relation {world.relation_name(relation)} is not a base relation: "
                f"draw tasks on relations 0..{world.config.n_relations - 1}"
            )
        rng = np.random.default_rng([seed, TASKS.index(kind)])
        facts = world.facts(relation)
        candidates = world.candidate_objects(relation)
        if kind == "forget":
            return cls(world, facts, np.full(len(facts), candidates[0]), "forget", seed)
        ok = _correct_mask(world, relation, correct)
        pool = facts[ok]
        if len(pool) == 0:
            raise InvalidArgument(
                f"no tuple of relation {world.relation_name(relation)} is predicted correctly: "
                "train the model further or pass correct=None"
            )
        if kind == "single":
            chosen = pool[[rng.integers(len(pool))]]
            targets = _other_objects(rng, chosen[:, 2], candidates, distinct=False)
            return cls(world, chosen, targets, kind, seed)
        which = "" if correct is None else " correctly predicted"
        if kind == "ten_same":
            values, counts = np.unique(pool[:, 2], return_counts=True)
            enough = values[counts >= n]
            if len(enough) == 0:
                raise InvalidArgument(
                    f"no object of relation {world.relation_name(relation)} is shared by {n}"
                    f"{which} subjects, the most is {counts.max()}: use a smaller n "
                    "or a world with more subjects"
                )
            o = rng.choice(enough)
            holders = pool[pool[:, 2] == o]
            chosen = holders[np.sort(rng.choice(len(holders), n, replace=False))]
            targets = np.full(n, _other_objects(rng, np.array([o]), candidates, False)[0])
        else:  # ten_different
            values = np.unique(pool[:, 2])
            if len(values) < n or len(candidates) < max(n, 2):
                raise InvalidArgument(
                    f"'ten_different' needs {n} tuples with different objects and {n} different "
                    f"new ones, but relation {world.relation_name(relation)} has {len(values)}"
                    f"{which} objects of {len(candidates)}: use a smaller n"
                )
            objs = np.sort(rng.choice(values, n, replace=False))
            chosen = np.stack([pool[rng.choice(np.flatnonzero(pool[:, 2] == o))] for o in objs])
            targets = _other_objects(rng, chosen[:, 2], candidates, distinct=True)
        return cls(world, chosen, targets, kind, seed)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ what the edit means
    @property
    def relation(self) -> int:
        return int(self.facts[0, 1])

    @property
    def edited(self) -> np.ndarray:
        """The edited tuples with their new objects [n, 3]: what the model should now say."""
        out = self.facts.copy()
        out[:, 2] = self.targets
        return out

    @property
    def changed(self) -> np.ndarray:
        """Boolean [n]: the edit changes this tuple's object (forgetting leaves object 0 as is)."""
        return self.targets != self.facts[:, 2]

    def dependents(self) -> tuple[np.ndarray, np.ndarray]:
        """Tuples tied to the edited ones [m, 3] (true objects) and the objects they would
        take if they followed the edit [m]: the correlated partner, or the nested implied tuple.
        Empty for independent worlds."""
        w, c = self.world, self.world.config
        s, r = self.facts[:, 0], self.facts[:, 1]
        if c.distribution == "correlated":
            r1, r2 = c.correlated
            m = np.isin(r, c.correlated)
            partner = np.where(r == r1, r2, r1)[m]
            deps = np.stack([s[m], partner, w.objects_of(s[m], partner)], axis=1)
            return deps, self.targets[m].copy()
        if c.distribution == "nested":
            implied = r + 2 * c.n_relations
            deps = np.stack([s, implied, w.objects_of(s, implied)], axis=1)
            return deps, w.nested_map[r, self.targets].astype(np.int64)
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)

    def unchanged(self) -> np.ndarray:
        """Every tuple of the world the edit must not change [n, 3]: all but the edited tuples
        and their dependents."""
        w = self.world
        every = w.facts()
        touched = np.concatenate([self.facts, self.dependents()[0]])
        out = ~np.isin(_keys(w, every), _keys(w, touched))
        return every[out]

    def to_dict(self) -> dict[str, Any]:
        """The task without its world (pass the world back to `from_dict`)."""
        return {"kind": self.kind, "seed": self.seed, "facts": self.facts.tolist(),
                "targets": self.targets.tolist(), "world": self.world.config.to_dict()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], world: World) -> EditTask:
        if d["world"] != world.config.to_dict():
            raise InvalidArgument(
                "this task was drawn from another world: pass the world it came from"
            )
        return cls(world, np.array(d["facts"]), np.array(d["targets"]), d["kind"], d["seed"])

    def __repr__(self) -> str:
        w = self.world
        return (f"EditTask({self.kind}, relation={w.relation_name(self.relation)}, "
                f"tuples={len(self.facts)}, seed={self.seed})")  # fmt: skip


def _keys(world: World, facts: np.ndarray) -> np.ndarray:
    return facts[:, 0].astype(np.int64) * world.n_relations + facts[:, 1]


def _other_objects(rng, old: np.ndarray, candidates: np.ndarray, distinct: bool) -> np.ndarray:
    """A random other object for each old one; with `distinct`, all new objects differ."""
    k = len(candidates)
    if k < 2:
        raise InvalidArgument(
            "the relation has a single possible object: there is nothing to edit to"
        )
    if not distinct:
        return (old + rng.integers(1, k, size=len(old))) % k
    while True:  # rejection: a random injection with no fixed point (k >= n, k >= 2)
        new = rng.choice(k, size=len(old), replace=False)
        if (new != old).all():
            return new


def _correct_mask(world: World, relation: int, correct) -> np.ndarray:
    """Boolean mask over the relation's subjects: which tuples may be drawn."""
    n = world.n_subjects_of(relation)
    if correct is None:
        return np.ones(n, dtype=bool)
    if isinstance(correct, np.ndarray):
        if correct.shape != (n,) or correct.dtype != bool:
            raise InvalidArgument(
                f"correct must be a boolean mask over relation {world.relation_name(relation)}'s "
                f"{n} subjects, got {correct.dtype} {correct.shape}"
            )
        return correct
    if not isinstance(correct, FactAccuracy):
        correct = evaluate_facts(
            correct, world, WorldTokenizer(world.config), world.facts(relation)
        )
    rows = correct.facts[:, 1] == relation
    mask = np.zeros(n, dtype=bool)
    mask[correct.facts[rows, 0]] = correct.top(1)[rows]
    if rows.sum() != n:
        raise InvalidArgument(
            f"the FactAccuracy covers {rows.sum()} of relation {world.relation_name(relation)}'s "
            f"{n} tuples: evaluate all of them (world.facts(relation))"
        )
    return mask


# ============================================================================ datasets
@dataclass(frozen=True)
class EditDataConfig(JsonConfig):
    """How an edit dataset is assembled (Behemoth section 4.7).

    repeats: copies of each edited tuple (with its new object); ratio: edited : sharing :
    random sentences (sharing = unchanged tuples with an edited tuple's old object);
    forget_fraction: share of the relation's tuples in a forgetting dataset; forget_ratio:
    those : tuples of other relations; grammar_mix: (template, weight) pairs.
    """

    repeats: int = 250
    ratio: tuple[float, float, float] = (2.0, 1.0, 4.0)
    forget_fraction: float = 0.05
    forget_ratio: tuple[float, float] = (1.0, 1.0)
    grammar_mix: tuple[tuple[str, float], ...] = (("paper", 1.0),)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        object.__setattr__(self, "forget_ratio", tuple(float(x) for x in self.forget_ratio))
        object.__setattr__(
            self, "grammar_mix", tuple((str(n), float(w)) for n, w in self.grammar_mix)
        )
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
        if not self.grammar_mix or any(w < 0 for _, w in self.grammar_mix):
            raise InvalidArgument("grammar_mix needs (template, weight) pairs with weights >= 0")
        if sum(w for _, w in self.grammar_mix) <= 0:
            raise InvalidArgument(
                "grammar_mix weights sum to 0: give at least one template weight > 0"
            )
        for name, _ in self.grammar_mix:
            get_template(name)


PARTS = ("edit", "sharing", "random", "forget", "other")


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
    names, weights = zip(*config.grammar_mix)
    p = np.asarray(weights) / sum(weights)
    template = np.asarray(names, dtype=object)[rng.choice(len(names), size=len(facts), p=p)]
    order = rng.permutation(len(facts))
    return EditDataset(facts[order], template[order], part[order])


def _sample(rng, pool: np.ndarray, n: int) -> np.ndarray:
    if len(pool) == 0 or n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    return pool[rng.choice(len(pool), n, replace=len(pool) < n)]


# ============================================================================ methods
def trainable_parameters(
    hf: GPTNeoXForCausalLM, blocks=None, components: str | tuple[str, ...] = ("mlp", "attn")
) -> list[str]:
    """Names of the HF parameters that a block/component selection trains.

    `blocks`: block indices (None: every block); `components`: 'mlp', 'attn', 'both' or a
    tuple of them. A block's attention is its `attention.*` (fused QKV and output), its MLP
    `mlp.*`; layer norms, embeddings and unembedding stay frozen.
    """
    blocks, comps = _selection(hf, blocks, components)
    module = {"mlp": "mlp", "attn": "attention"}
    prefixes = tuple(f"gpt_neox.layers.{b}.{module[c]}." for b in blocks for c in comps)
    return [name for name, _ in hf.named_parameters() if name.startswith(prefixes)]


def lora_modules(
    hf: GPTNeoXForCausalLM, blocks=None, components: str | tuple[str, ...] = ("mlp", "attn")
) -> list[str]:
    """Full names of the linear modules LoRA adapts for a block/component selection: a block's
    attention is `query_key_value` and `dense`, its MLP `dense_h_to_4h` and `dense_4h_to_h`."""
    blocks, comps = _selection(hf, blocks, components)
    return [f"gpt_neox.layers.{b}.{m}" for b in blocks for c in comps for m in _LORA_MODULES[c]]


def _block_list(blocks) -> list[int]:
    """Block indices from a list, an array or a `Localization`: sorted, each once."""
    values = np.atleast_1d(np.asarray(list(blocks)))
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise InvalidArgument(f"blocks must be integer block indices, got {list(blocks)}")
    return sorted({int(b) for b in values})


def _selection(hf, blocks, components) -> tuple[list[int], tuple[str, ...]]:
    n = hf.config.num_hidden_layers
    if blocks is None:
        blocks = range(n)
    blocks = _block_list(blocks)
    if not blocks:
        raise InvalidArgument(
            f"the block set is empty: name at least one block of 0..{n - 1}, or None for all"
        )
    if blocks[0] < 0 or blocks[-1] >= n:
        raise InvalidArgument(
            f"blocks {blocks} are not all in this model: it has blocks 0..{n - 1}"
        )
    comps = ("mlp", "attn") if components == "both" else (
        (components,) if isinstance(components, str) else tuple(components)
    )  # fmt: skip
    if not comps or any(c not in COMPONENT_CHOICES for c in comps):
        raise InvalidArgument(
            f"components must be 'mlp', 'attn', 'both' or a tuple of them, got {components!r}"
        )
    return blocks, comps


def _resolve(model_or_checkpoint, task: EditTask) -> GPTNeoXForCausalLM:
    if isinstance(model_or_checkpoint, str | Path):
        hf, world, _ = load_hf(model_or_checkpoint)
        if world != task.world:
            raise InvalidArgument(
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


def _finetune(
    model: torch.nn.Module, data: EditDataset, task: EditTask, names: list[str], *,
    lr: float, steps: int | None, epochs: int, batch_size: int, weight_decay: float, seed: int,
    objective: str = "ce", weights: tuple[float, float, float] = (1.0, 1.0, 0.0),
) -> dict[str, Any]:  # fmt: skip
    """AdamW on the object tokens of `data`, training only the parameters `names` of `model`
    (an HF model, or its peft wrapper) to minimize `objective` (see `edit`); in place."""
    tok = WorldTokenizer(task.world.config)
    device = next(model.parameters()).device
    x_all, target_all = _object_inputs(task.world, tok, data.facts, data.template, seed, device)
    old_facts = data.facts.copy()
    old_facts[:, 2] = task.world.objects_of(data.facts[:, 0], data.facts[:, 1])
    x_old, _ = _object_inputs(task.world, tok, old_facts, data.template, seed, device)
    injected = np.isin(data.part, ("edit", "forget"))
    inj = torch.as_tensor(injected, device=device)
    differs = torch.as_tensor(injected & (old_facts[:, 2] != data.facts[:, 2]), device=device)
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=weight_decay)
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
        x, mask = x_all[rows], target_all[rows]
        if objective == "ce":
            logits = model(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.float()[mask], x[:, 1:][mask])
        else:
            loss = _objective(model, objective, weights, x, x_old[rows], mask, inj[rows],
                              differs[rows])  # fmt: skip
        if not torch.isfinite(loss):
            raise Diverged(
                f"the edit diverged: its loss is {loss.item()} at step {step + 1} of {total} "
                f"(lr {lr:g}); no edited model is returned. Lower lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if not all(torch.isfinite(params[n]).all() for n in names):
        raise Diverged(
            f"the edit diverged: trained weights are NaN or infinite (lr {lr:g}): lower lr"
        )
    return {"steps": total, "final_loss": float(np.mean(losses[-max(1, per_epoch // 10) :]))}


def _lora(
    hf: GPTNeoXForCausalLM, data: EditDataset, task: EditTask, modules: list[str], *,
    rank: int, alpha: float | None, **fit,
) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
    """Train peft LoRA adapters of rank `rank` on `modules` of `hf`, then merge them back."""
    from peft import LoraConfig, get_peft_model

    limit = {m: min(hf.get_submodule(m).weight.shape) for m in modules}
    if rank < 1 or rank > min(limit.values()):
        worst = min(limit, key=limit.get)
        raise InvalidArgument(
            f"LoRA rank {rank} is not in 1..{limit[worst]}: {worst} has full rank {limit[worst]}, "
            "so a larger adapter adds nothing (use method='finetune' for a full-rank edit)"
        )
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                        target_modules=modules, lora_dropout=0.0, bias="none")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit["seed"])
        wrapped = get_peft_model(hf, config)
    names = [n for n, p in wrapped.named_parameters() if "lora_" in n]
    info = _finetune(wrapped, data, task, names, **fit)
    info["adapter_parameters"] = sum(wrapped.get_parameter(n).numel() for n in names)
    return wrapped.merge_and_unload(), info


def _object_inputs(world, tok, facts, template, seed, device):
    """`<|endoftext|>` + rendered sentences [n, 1 + pos], and the object-token mask aligned with
    the next-token targets x[:, 1:]."""
    sent = render(world, tok, facts, template, seed=seed)
    eot = np.full((len(sent), 1), tok.eot_id)
    x = torch.as_tensor(np.concatenate([eot, sent.tokens], 1).astype(np.int64), device=device)
    return x, torch.as_tensor(sent.roles == OBJECT, device=device)


def _row_logp(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [batch, pos] of each next token (0 outside the object tokens)."""
    logp = model(input_ids=x[:, :-1]).logits.float().log_softmax(-1)
    return logp.gather(-1, x[:, 1:, None])[..., 0] * mask


def _mean_rows(values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the object tokens of the selected rows (0 when none are)."""
    m = mask & rows[:, None]
    return (values * m).sum() / m.sum().clamp(min=1)


def _objective(model, objective, weights, x, x_old, mask, inj, differs) -> torch.Tensor:
    """The localized and unlearning losses of one batch (Guo et al. 2024, section 2.3):
    injection = NLL of the new objects of edited rows, retain = NLL of the other rows,
    forget = -log(1 - p(old object)) on edited rows whose object changes."""
    l1, l2, l3 = weights
    loss = torch.zeros((), device=x.device)
    if objective in ("localized", "gradient_difference") and l2:
        loss = loss + l2 * _mean_rows(-_row_logp(model, x, mask), mask, ~inj)
    if objective == "localized" and l1:
        loss = loss + l1 * _mean_rows(-_row_logp(model, x, mask), mask, inj)
    if objective in ("gradient_ascent", "gradient_difference"):
        loss = loss - l1 * _mean_rows(-_row_logp(model, x_old, mask), mask, differs)
    elif l3:
        p_old = _row_logp(model, x_old, mask).exp().clamp(max=1 - 1e-6)
        loss = loss + l3 * _mean_rows(-torch.log1p(-p_old), mask, differs)
    return loss


EDIT_REPORT = "edit_report.json"
EDIT_TASK = "edit_task.json"


@dataclass
class EditResult:
    """An applied edit: the edited HF `model`, its HookedTransformer twin (when asked), the
    `report` and the `task`."""

    model: GPTNeoXForCausalLM
    report: EditReport
    hooked: Any = None
    task: EditTask | None = None

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the edited model as a checkpoint directory (`load_model` and `load_hf` read it,
        so every analysis runs on it) with `edit_report.json` and `edit_task.json`; atomic."""
        if self.task is None:
            raise InvalidArgument(
                "this result has no task: build it with edit(), which records one"
            )

        def fill(tmp: Path) -> None:
            write_checkpoint(tmp, self.model, self.task.world)
            self.report.save(tmp / EDIT_REPORT)
            write_json(tmp / EDIT_TASK, _jsonable({"format": "behemoth-edit-task/1",
                                                   **self.task.to_dict()}))  # fmt: skip

        return write_dir(Path(out), fill, overwrite=overwrite)


def edit(
    model_or_checkpoint,
    task: EditTask,
    *,
    method: str = "finetune",
    blocks=None,
    components: str | tuple[str, ...] | None = None,
    lr: float | None = None,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    rank: int = 32,
    alpha: float | None = None,
    objective: str = "ce",
    weights: tuple[float, float, float] = (1.0, 1.0, 0.0),
    data: EditDataConfig = EditDataConfig(),
    seed: int = 0,
    hooked: bool = False,
    evaluate: bool = True,
    max_remaining: int | None = None,
    rome: RomeConfig | None = None,
) -> EditResult:
    """Apply `task` to a copy of an HF GPT-NeoX model (or a checkpoint directory).

    'finetune' and 'lora' train with AdamW on the object tokens of the task's `edit_dataset`,
    only in `components` ('mlp', 'attn', 'both'; None: both) of `blocks` (None: all; Behemoth
    section 5): 'finetune' trains those weights at full rank; 'lora' trains rank-`rank`
    adapters (peft, scaling alpha/rank, alpha defaults to rank) on their linear layers and
    merges them back. 'rome' makes one rank-one update of one block's MLP output weights per
    edited tuple, sequentially (`rome.apply_rome`; blocks: that one block, default
    `rome.layer`; components: 'mlp'), configured by `rome` (a `RomeConfig`), not by the
    training arguments.
    `steps` overrides `epochs` (the paper trains one epoch); lr defaults to `DEFAULT_LR`.
    objective: 'ce' (Behemoth: cross-entropy on every object token of the dataset);
    'localized' (Guo et al. 2024: w1·injection + w2·retain + w3·forget, forget = -log(1-p_old));
    'gradient_ascent' (-w1·NLL of the old objects); 'gradient_difference' (that + w2·retain),
    with `weights` = (w1, w2, w3).
    The input model is left unchanged. Returns an `EditResult` (edited model and report).
    """
    if method not in METHODS:
        raise InvalidArgument(f"unknown edit method {method!r}: choose one of {METHODS}")
    if max_remaining is not None:
        check_int("max_remaining", max_remaining, 1)
    if method == "rome":
        if lr is not None or steps is not None:
            raise InvalidArgument(
                "ROME takes no lr or steps: set them as rome=RomeConfig(v_lr=..., v_steps=...)"
            )
        return _rome(model_or_checkpoint, task, blocks, components, rome, seed=seed,
                     hooked=hooked, evaluate=evaluate, max_remaining=max_remaining)  # fmt: skip
    if rome is not None:
        raise InvalidArgument(f"rome= configures method='rome', not {method!r}: leave it out")
    components = ("mlp", "attn") if components is None else components
    lr = DEFAULT_LR[method] if lr is None else lr
    if objective not in OBJECTIVES:
        raise InvalidArgument(f"unknown objective {objective!r}: choose one of {OBJECTIVES}")
    weights = tuple(float(w) for w in weights)
    if len(weights) != 3 or min(weights) < 0:
        raise InvalidArgument(
            f"weights are (injection, retain, forget), three numbers >= 0, got {weights}"
        )
    if lr <= 0 or batch_size < 1 or epochs < 1 or (steps is not None and steps < 1):
        raise InvalidArgument(
            f"need lr > 0, batch_size >= 1, epochs >= 1 and steps >= 1 or None "
            f"(lr={lr}, batch_size={batch_size}, epochs={epochs}, steps={steps})"
        )
    before = _resolve(model_or_checkpoint, task)
    chosen, _ = _selection(before, blocks, components)
    after = copy.deepcopy(before)
    dataset = edit_dataset(task, data)
    fit = dict(lr=lr, steps=steps, epochs=epochs, batch_size=batch_size,
               weight_decay=weight_decay, seed=seed, objective=objective, weights=weights)  # fmt: skip
    started = time.perf_counter()
    if method == "finetune":
        names = trainable_parameters(before, blocks, components)
        info = _finetune(after, dataset, task, names, **fit)
    else:
        after, info = _lora(after, dataset, task, lora_modules(before, blocks, components),
                            rank=rank, alpha=alpha, **fit)  # fmt: skip
    settings = {"method": method, "blocks": chosen,
                "components": [components] if isinstance(components, str) else list(components),
                "objective": objective, "weights": list(weights), "lr": lr, "epochs": epochs,
                "batch_size": batch_size, "weight_decay": weight_decay,
                "seed": seed, "data": data.to_dict(), "dataset": dataset.counts(),
                "seconds": time.perf_counter() - started, **info}  # fmt: skip
    if method == "lora":
        settings.update(rank=rank, alpha=float(rank if alpha is None else alpha))
    report = _report(after, task, before, settings, evaluate, max_remaining, seed)
    return EditResult(after, report, hooked_in_world(after, task.world) if hooked else None, task)


def _report(after, task: EditTask, before, settings: dict[str, Any], evaluate: bool,
            max_remaining: int | None, seed: int) -> EditReport:  # fmt: skip
    """The edit's full `evaluate_edit` report, or (evaluate=False) its settings and changes."""
    if evaluate:
        return evaluate_edit(after, task, before=before, settings=settings,
                             max_remaining=max_remaining, seed=seed)  # fmt: skip
    return EditReport(task.kind, settings["method"], settings=settings,
                      changed=changed_parameters(before, after))  # fmt: skip


def _rome(before, task: EditTask, blocks, components, config: RomeConfig | None, *, seed: int,
          hooked: bool, evaluate: bool, max_remaining: int | None) -> EditResult:  # fmt: skip
    """`edit(method="rome")`: ROME on the twin HookedTransformer, W_out copied back to HF."""
    from behemoth_interp.rome import RomeConfig, apply_rome

    before = _resolve(before, task)
    n = before.config.num_hidden_layers
    if blocks is not None:
        blocks = _block_list(blocks)
        if len(blocks) != 1:
            raise InvalidArgument(
                f"ROME edits the MLP of exactly one block, got blocks={blocks}: pass one block "
                f"of 0..{n - 1}, e.g. blocks=[0], or None for rome.layer"
            )
        if config is not None and config.layer != blocks[0]:
            raise InvalidArgument(
                f"blocks={blocks} and rome.layer={config.layer} disagree: give the layer once"
            )
        config = RomeConfig(layer=blocks[0]) if config is None else config
    config = RomeConfig() if config is None else config
    layer, comps = _selection(before, [config.layer], "mlp" if components is None else components)
    if comps != ("mlp",):
        raise InvalidArgument(
            f"ROME edits MLP output weights only, got components={components!r}: "
            "pass components='mlp' or leave it out"
        )
    started = time.perf_counter()
    after = copy.deepcopy(before)
    twin = hooked_in_world(after, task.world)
    updates = apply_rome(twin, task, config)
    weight = after.gpt_neox.layers[config.layer].mlp.dense_4h_to_h.weight
    with torch.no_grad():
        weight.copy_(twin.blocks[config.layer].mlp.W_out.T)
    settings = {"method": "rome", "blocks": layer, "components": ["mlp"],
                "mode": "sequential" if len(task.facts) > 1 else "single",
                "rome": config.to_dict(), "seed": seed, "edits": [u.to_dict() for u in updates],
                "skipped": int((~task.changed).sum()),
                "seconds": time.perf_counter() - started}  # fmt: skip
    report = _report(after, task, before, settings, evaluate, max_remaining, seed)
    return EditResult(after, report, twin if hooked else None, task)


# ============================================================================ evaluation
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


RATE_METRICS = ("success_top1", "success_top2", "success_top1_all", "forget_rate",
                "remaining_before", "remaining", "dependent_kept", "dependent_followed",
                "dependent_followed_all")  # fmt: skip


@dataclass
class EditReport:
    """How an edit went (Behemoth sections 4.7-4.10), every rate over exact ground truth.

    Rates over edited tuples count only the tuples the edit changes (forgetting leaves the
    tuples already at object 0 as they are: counting them would credit the edit with them);
    the `_all` variants count every tuple of the task.
    success_top1/2: changed tuples whose new object is top-1 / within top-2; forget_rate:
    changed tuples whose old object is no longer top-1; remaining (remaining_before): top-1
    accuracy on every tuple the edit must not change, after (before) the edit;
    dependent_kept / dependent_followed: dependents (correlated partner, nested implied tuple)
    whose implied object changes, still predicting their old object / the object implied by
    the edit (None without such dependents); template_success: success_top1 in each paraphrase
    and the 'mcq' format (its choices always list the original and the new object);
    template_before: the unedited model's accuracy on the same tuples with their original
    objects in the same formats (was the format learned at all?); changed: parameter name ->
    number of elements changed.
    """

    task: str
    method: str
    success_top1: float = float("nan")
    success_top2: float = float("nan")
    success_top1_all: float = float("nan")
    forget_rate: float = float("nan")
    remaining: float = float("nan")
    remaining_before: float | None = None
    dependent_kept: float | None = None
    dependent_followed: float | None = None
    dependent_followed_all: float | None = None
    template_success: dict[str, float] = field(default_factory=dict)
    template_before: dict[str, float] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def params_changed(self) -> int:
        return sum(self.changed.values())

    def metrics(self) -> dict[str, float]:
        """Every scalar of the report (rates, per-template success, parameters changed)."""
        out = {m: getattr(self, m) for m in RATE_METRICS if getattr(self, m) is not None}
        out.update({f"success/{t}": v for t, v in self.template_success.items()})
        out.update({f"before/{t}": v for t, v in self.template_before.items()})
        out["params_changed"] = self.params_changed
        out["tensors_changed"] = len(self.changed)
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per metric: task, method, metric, value."""
        m = self.metrics()
        return pd.DataFrame({"task": self.task, "method": self.method,
                             "metric": list(m), "value": list(m.values())})  # fmt: skip

    def plot(self):
        """Bars of the rates (success, forgetting, remaining and dependent accuracy)."""
        import plotly.express as px

        df = self.to_dataframe()
        df = df[~df.metric.isin(["params_changed", "tensors_changed"])]
        return px.bar(df, x="metric", y="value", range_y=[0, 1],
                      title=f"Edit '{self.task}' by {self.method}: "
                            f"{self.params_changed:,} parameters changed")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"format": "behemoth-edit-report/1", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditReport:
        d = {k: v for k, v in d.items() if k != "format"}
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, _jsonable(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EditReport:
        d = read_json(
            path, what="edit report written by EditReport.save", format="behemoth-edit-report/1"
        )
        return cls.from_dict(d)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


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


# ============================================================================ learning rate
@dataclass
class LrSearch:
    """Learning rates tried for one edit, scored on training-time data only, and the best edit.

    `success` is top-1 accuracy on the edited tuples the edit trains on (the forgetting
    sample for 'forget'); `remaining` top-1 accuracy on the dataset's unchanged tuples; both
    NaN for a learning rate whose edit diverged.
    """

    lrs: list[float]
    success: list[float]
    remaining: list[float]
    best_lr: float
    best: EditResult

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"lr": self.lrs, "success": self.success, "remaining": self.remaining,
                             "best": [lr == self.best_lr for lr in self.lrs]})  # fmt: skip

    def plot(self):
        """Success and remaining accuracy against the learning rate (log axis)."""
        import plotly.express as px

        long = self.to_dataframe().melt(["lr", "best"], var_name="metric", value_name="accuracy")
        return px.line(long, x="lr", y="accuracy", color="metric", markers=True, log_x=True,
                       range_y=[0, 1.02], title=f"Learning-rate search (best {self.best_lr:g})")  # fmt: skip


def select_lr(
    model_or_checkpoint, task: EditTask, lrs=(1e-4, 3e-4, 1e-3, 3e-3), **edit_kwargs
) -> LrSearch:
    """Edit with each learning rate and keep the best by the paper's criterion (section 4.6):
    highest success first, then highest remaining accuracy, both measured on the edit's own
    training data (no held-out tuple is looked at). `edit_kwargs` go to `edit`; the returned
    best edit carries a full `EditReport`.
    """
    lrs = [float(x) for x in lrs]
    if not lrs or min(lrs) <= 0:
        raise InvalidArgument(f"give at least one learning rate, all > 0: got {lrs}")
    hooked = edit_kwargs.pop("hooked", False)
    edit_kwargs.pop("evaluate", None)
    max_remaining = edit_kwargs.get("max_remaining")
    before = _resolve(model_or_checkpoint, task)
    data = edit_dataset(task, edit_kwargs.get("data", EditDataConfig()))
    trained = data.part == "edit" if task.kind != "forget" else data.part == "forget"
    edited = np.unique(data.facts[trained], axis=0)
    w = task.world
    must = w.objects_of(edited[:, 0], edited[:, 1]) != edited[:, 2]
    edited = edited[must] if must.any() else edited  # tuples already at their target say nothing
    kept = np.unique(data.facts[~trained], axis=0)
    tok = WorldTokenizer(w.config)
    success, remaining, results = [], [], []
    for lr in lrs:
        try:
            result = edit(before, task, lr=lr, evaluate=False, **edit_kwargs)
            success.append(evaluate_facts(result.model, w, tok, edited).accuracy)
            remaining.append(
                evaluate_facts(result.model, w, tok, kept).accuracy if len(kept) else 1.0
            )
        except Diverged:  # recorded as NaN, never selected
            result = None
            success.append(float("nan"))
            remaining.append(float("nan"))
        results.append(result)
    ok = [i for i, r in enumerate(results) if r is not None]
    if not ok:
        raise Diverged(f"the edit diverged at every learning rate of {lrs}: try smaller ones")
    best = max(ok, key=lambda i: (success[i], remaining[i], -i))
    chosen = results[best]
    chosen.report = evaluate_edit(chosen.model, task, before=before, settings=chosen.report.settings,
                                  max_remaining=max_remaining, seed=edit_kwargs.get("seed", 0))  # fmt: skip
    if hooked:
        chosen.hooked = hooked_in_world(chosen.model, w)
    return LrSearch(lrs, success, remaining, lrs[best], chosen)
