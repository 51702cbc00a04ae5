"""The neighbourhood of an edit (CounterFact's neighbourhood prompts, Mechanistic Unlearning
section 3.1): facts near the edited ones that the edit must leave alone, exact in a synthetic
world.

Two kinds: the edited subjects' other facts (`same_subject`: other relations answering in the
same object space), and the edited relation's facts of other subjects that share a subject
token with an edited one (`shared_tokens`: what an edit keyed on a token rather than the
subject would also move). Each neighbour has a *lure*, the new object of the edit it neighbours;
the neighbourhood edit error is the share of neighbours that now answer it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.tokenizer import WorldTokenizer

NEIGHBOURHOODS = ("same_subject", "shared_tokens")


def neighbours(
    task: EditTask, *, limit: int = 500, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kind (`NEIGHBOURHOODS`), neighbour facts [n, 3] with their true objects, all among
    the tuples the edit must not change, and each one's lure [n]; a neighbour whose true object
    is its lure is left out (it cannot tell), and at most `limit` are kept (a seeded sample)."""
    w = task.world
    tok = WorldTokenizer(w.config)
    keep = task.unchanged()
    changed = task.edited[task.changed]
    spaces = {int(r): w.object_space(int(r)) for r in np.unique(w.facts()[:, 1])}
    row_space = np.array([spaces[r] for r in keep[:, 1].tolist()])
    tokens = tok.entity_tokens("subject", np.arange(w.config.n_subjects))
    kept_tokens = tokens[keep[:, 0]]
    rng = np.random.default_rng([seed, 43])
    out = {}
    for kind in NEIGHBOURHOODS:
        rows, lures = [], []
        for s, r, new in changed.tolist():
            if kind == "same_subject":
                near = (keep[:, 0] == s) & (keep[:, 1] != r) & (row_space == spaces[r])
            else:
                shares = np.isin(kept_tokens, tokens[s]).any(1)
                near = (keep[:, 1] == r) & (keep[:, 0] != s) & shares
            near &= keep[:, 2] != new
            rows.append(np.flatnonzero(near))
            lures.append(np.full(int(near.sum()), new))
        index, first = np.unique(np.concatenate(rows).astype(np.int64), return_index=True)
        lure = np.concatenate(lures).astype(np.int64)[first]
        pick = np.sort(rng.permutation(len(index))[:limit])
        out[kind] = keep[index[pick]], lure[pick]
    return out


def neighbourhood_scores(
    model, task: EditTask, *, before=None, limit: int = 500, seed: int = 0
) -> pd.DataFrame:
    """One row per non-empty neighbourhood: its size, `accuracy` (top-1 on the true objects)
    and `edit_error` (the lure top-1 at every object token) of `model`, and of `before` (the
    unedited model) when given, in columns `accuracy_before` and `edit_error_before`."""
    near = {k: v for k, v in neighbours(task, limit=limit, seed=seed).items() if len(v[0])}
    if not near:
        return pd.DataFrame.from_records([])
    # one pass per model over every neighbour and its lure, split by kind afterwards
    rows = []
    for facts, lure in near.values():
        lured = facts.copy()
        lured[:, 2] = lure
        rows += [facts, lured]
    ends = np.cumsum([len(r) for r in rows])[:-1]
    records = [{"neighbourhood": kind, "n": len(facts)} for kind, (facts, _) in near.items()]
    tok = WorldTokenizer(task.world.config)
    for suffix, m in (("", model), ("_before", before)):
        if m is None:
            continue
        top = np.split(evaluate_facts(m, task.world, tok, np.concatenate(rows)).top(1), ends)
        for row, right, lured in zip(records, top[::2], top[1::2]):
            row |= {f"accuracy{suffix}": float(right.mean()),
                    f"edit_error{suffix}": float(lured.mean())}  # fmt: skip
    return pd.DataFrame.from_records(records)
