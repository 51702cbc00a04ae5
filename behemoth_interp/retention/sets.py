"""The facts retention is measured on: the edited tuples and a matched set of intrinsic ones.

The retention paper (section 3, appendix B) keeps only facts the model predicts with a margin
(p(target) - p(next best) >= 0.1) and compares the edited facts with intrinsic facts that share
nothing with them. Here the intrinsic facts are of the edited tuples' relations (as the issue
asks: the same relation), of other subjects, with objects that are neither an edited tuple's
old nor its new object, and matched to the edited facts by their margin on the model about to
be fine-tuned: for each edited fact, the `per_edit` candidates whose margin is nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, check_int, check_range
from behemoth_interp.evaluate import evaluate_facts, object_distribution
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

# the most probable objects a retention record keeps per fact and evaluation
TOP = 3


@dataclass(frozen=True)
class RetentionSet:
    """`edited` [n, 3] (edited tuples with their new objects) and `original` [n] (their objects
    before the edit); `intrinsic` [m, 3] (true tuples the edit did not touch); each with its
    margin on the model the set was drawn on; `dropped`: edited tuples left out because the
    edit did not reach `min_margin` on them."""

    world: World
    edited: np.ndarray
    original: np.ndarray
    intrinsic: np.ndarray
    edited_margin: np.ndarray
    intrinsic_margin: np.ndarray
    min_margin: float
    dropped: int

    def score(self, model) -> dict[str, Any]:
        """`model`'s per-fact answers, JSON-able: for the edited facts the rank and log-probability
        of the new object and the log-probability of the original one, for the intrinsic facts
        the rank and log-probability of the true object; for both, `p_related` (the probability
        of the relation's other candidate objects: the paper's related-term tokens) and `top`
        (the `TOP` most probable objects as [object, probability]: its Table 2). What a downstream fine-tune
        tracks; the model's world is not checked (a fine-tune records its downstream world)."""
        n, m = len(self.edited), len(self.intrinsic)
        tok = WorldTokenizer(self.world.config)
        facts = np.concatenate([self.edited, self.intrinsic])
        # one batched pass over both sets for the ranks (their prompts share prefixes); every
        # object's log-probability, the original objects' included, comes from the distribution
        acc = evaluate_facts(model, self.world, tok, facts, world_check=False)
        rank, logp = acc.rank.tolist(), acc.logp.tolist()
        dist = object_distribution(model, self.world, tok, facts)
        p = np.exp(dist)
        related = np.zeros_like(p, dtype=bool)
        for r in np.unique(facts[:, 1]):
            rows = np.flatnonzero(facts[:, 1] == r)
            related[np.ix_(rows, self.world.candidate_objects(int(r)))] = True
        related[np.arange(n + m), facts[:, 2]] = False
        related[np.arange(n), self.original] = False
        mass = np.where(related, p, 0.0).sum(1).tolist()
        top = np.argsort(-dist, axis=1, kind="stable")[:, :TOP]
        best = [[[int(o), float(p[i, o])] for o in row] for i, row in enumerate(top)]
        original = dist[np.arange(n), self.original].tolist()
        return {"edited": {"rank": rank[:n], "logp": logp[:n], "logp_original": original,
                           "p_related": mass[:n], "top": best[:n]},
                "intrinsic": {"rank": rank[n : n + m], "logp": logp[n : n + m],
                              "p_related": mass[n:], "top": best[n:]}}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"edited": self.edited.tolist(), "original": self.original.tolist(),
                "intrinsic": self.intrinsic.tolist(), "edited_margin": self.edited_margin.tolist(),
                "intrinsic_margin": self.intrinsic_margin.tolist(), "min_margin": self.min_margin,
                "dropped": self.dropped}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], world: World) -> RetentionSet:
        facts = {k: np.asarray(d[k], np.int64).reshape(-1, 3) for k in ("edited", "intrinsic")}
        return cls(world, facts["edited"], np.asarray(d["original"], np.int64), facts["intrinsic"],
                   np.asarray(d["edited_margin"], float), np.asarray(d["intrinsic_margin"], float),
                   float(d["min_margin"]), int(d["dropped"]))  # fmt: skip


def retention_set(
    model, task: EditTask, *, per_edit: int = 2, min_margin: float = 0.1, seed: int = 0
) -> RetentionSet:
    """The edited facts of `task` that `model` (the edited model) predicts with a margin of at
    least `min_margin`, and `per_edit` intrinsic facts per kept edited fact, matched by margin
    (see the module docstring; the paper samples 2 intrinsic facts per edited one). Ties in
    margin are broken by a permutation drawn with `seed`."""
    check_int("per_edit", per_edit, 1)
    check_range("min_margin", min_margin, 0, 1)
    world = task.world
    tok = WorldTokenizer(world.config)
    edited = task.edited[task.changed]
    if not len(edited):
        raise InvalidArgument("retention is measured on changed objects, and this task changes "
                              "none (a forget task keeps object 0 where it was): use an override")  # fmt: skip
    margin = evaluate_facts(model, world, tok, edited, world_check=False).margin
    keep = margin >= min_margin
    if not keep.any():
        raise InvalidArgument(
            f"the edit did not take: none of its {len(edited)} changed tuples is predicted with a "
            f"margin of {min_margin} or more (best {margin.max():.3f}), so there is no edited "
            "knowledge to retain; retention is undefined"
        )
    rng = np.random.default_rng(seed)
    touched_objects = np.concatenate([task.facts[:, 2], task.targets])
    chosen_facts, chosen_margins = [], []
    for r in np.unique(edited[keep, 1]):
        pool = world.facts(int(r))
        pool = pool[~np.isin(pool[:, 0], task.facts[:, 0]) & ~np.isin(pool[:, 2], touched_objects)]
        pool = pool[rng.permutation(len(pool))]
        m = evaluate_facts(model, world, tok, pool, world_check=False).margin
        ok = m >= min_margin
        pool, m = pool[ok], m[ok]
        taken = np.zeros(len(pool), dtype=bool)
        for target in margin[keep & (edited[:, 1] == r)]:
            free = np.flatnonzero(~taken)
            if len(free) < per_edit:
                raise InvalidArgument(
                    f"relation {world.relation_name(int(r))} has too few intrinsic facts with a "
                    f"margin of {min_margin} or more to match {per_edit} per edited tuple: lower "
                    "per_edit or min_margin"
                )
            near = free[np.argsort(np.abs(m[free] - target), kind="stable")[:per_edit]]
            taken[near] = True
            chosen_facts.append(pool[near])
            chosen_margins.append(m[near])
    return RetentionSet(
        world, edited[keep].astype(np.int64), task.facts[task.changed][keep, 2].astype(np.int64),
        np.concatenate(chosen_facts).astype(np.int64), margin[keep], np.concatenate(chosen_margins),
        float(min_margin), int((~keep).sum()),
    )  # fmt: skip
