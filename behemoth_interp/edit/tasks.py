"""Edit tasks with exact ground truth: what must change, what must not (Behemoth section 4.7).

Drawn from a World with a seed on one base relation r:
- 'single': one (correctly predicted) tuple (s, r, o) -> a random other object of r;
- 'ten_same': ten tuples with the same r and o -> one other object;
- 'ten_different': ten tuples, same r, ten different o -> ten different new objects;
- 'forget': every tuple of r -> r's first object (object 0).
A task knows its edited tuples, the ones that actually change, their dependents (correlated
partner, nested implied tuple) and every tuple that must keep its object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.evaluate import FactAccuracy, evaluate_facts
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

TaskKind = Literal["single", "ten_same", "ten_different", "forget", "custom"]
TASKS: tuple[str, ...] = ("single", "ten_same", "ten_different", "forget")
"""The paper's four edit tasks (section 4.7); 'custom' tasks are built from given tuples."""


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
