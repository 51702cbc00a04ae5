"""Exact fact accuracy: does the model predict every object token of (s, r), teacher-forced?

A tuple counts as correct (top-1) when, fed `<|endoftext|>` + the prompt + the true object
tokens, the model's argmax at each object position is the true token. Top-k asks the same with
each true token among the k largest logits. Batched over tuples; works on a HookedTransformer
or the HF model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import DynamicCache, GPTNeoXForCausalLM

from behemoth_interp.errors import CheckpointMismatch, Diverged, InvalidArgument
from behemoth_interp.grammar import TEMPLATES, render
from behemoth_interp.model import check_world, describe, logits_of, model_device
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World


@dataclass
class FactAccuracy:
    """Per-tuple results: `facts` [n, 3] and `rank` [n] (worst rank of the true object tokens).

    `rank == 0` means every object token was the argmax (top-1 correct); rank < k is top-k.
    `evaluate_facts` also gives `logp` [n], the log-probability of the whole object
    (teacher-forced, summed over its tokens), and `margin` [n], the least over the object's
    tokens of p(true token) - p(best other token): positive exactly when top-1 correct, the
    confidence margin the retention paper filters facts by (its section B, on the first token).
    """

    world: World
    facts: np.ndarray
    rank: np.ndarray
    template: str
    logp: np.ndarray | None = None
    margin: np.ndarray | None = None

    def top(self, k: int = 1) -> np.ndarray:
        """Boolean [n]: every object token of the tuple is within the top k."""
        return self.rank < k

    @property
    def accuracy(self) -> float:
        return float(self.top(1).mean()) if len(self.rank) else float("nan")

    def per_relation(self, k: int = 1) -> pd.Series:
        """Top-k accuracy per relation name."""
        return (
            self.to_dataframe()
            .assign(ok=self.top(k))
            .groupby("relation_name", sort=False)["ok"]
            .mean()
        )

    def per_kind(self) -> pd.Series:
        return self.to_dataframe().groupby("kind", sort=False)["top1"].mean()

    def to_dataframe(self) -> pd.DataFrame:
        """One row per tuple: subject, relation, object, relation_name, kind, rank, top1, top2."""
        w = self.world
        rel = self.facts[:, 1]
        names = np.array([w.relation_name(r) for r in range(w.n_relations)], dtype=object)
        kinds = np.array([w.relation_kind(r) for r in range(w.n_relations)], dtype=object)
        kind = kinds[rel]
        if w.config.distribution == "correlated":
            kind = np.where(np.isin(rel, w.config.correlated), "correlated", kind)
        return pd.DataFrame(
            {
                "subject": self.facts[:, 0],
                "relation": rel,
                "object": self.facts[:, 2],
                "relation_name": names[rel],
                "kind": kind,
                "rank": self.rank,
                "top1": self.top(1),
                "top2": self.top(2),
            }
        )

    def summary(self) -> dict[str, float]:
        """Overall top-1/top-2 and top-1 per relation, as a flat dict (for logs)."""
        out = {"top1": self.accuracy, "top2": float(self.top(2).mean())}
        out.update({f"top1/{k}": float(v) for k, v in self.per_relation().items()})
        return out

    def plot(self):
        """Bar chart of top-1 and top-2 accuracy per relation."""
        import plotly.express as px

        df = self.to_dataframe().groupby("relation_name", sort=False)[["top1", "top2"]].mean()
        long = df.reset_index().melt("relation_name", var_name="metric", value_name="accuracy")
        return px.bar(long, x="relation_name", y="accuracy", color="metric", barmode="group",
                      range_y=[0, 1], title=f"Fact accuracy ({self.template} template)")  # fmt: skip


class FactScores:
    """One fixed model's per-tuple ranks in the paper template, each tuple scored once however
    many callers ask: `scores(facts)` is `evaluate_facts(model, world, tokenizer, facts)`,
    running only the tuples not asked before. An edit's report and the scores on its training
    data share one (`evaluate_edit(scores=)`, `training_scores(scores=)`); the model must not
    change while it is in use."""

    def __init__(self, model, world: World, tokenizer: WorldTokenizer | None = None, *,
                 world_check: bool = True) -> None:  # fmt: skip
        self.model, self.world = model, world
        self.tokenizer = tokenizer or WorldTokenizer(world.config)
        if world_check:
            check_world(model, world)
        self._rank: dict[tuple[int, int, int], int] = {}

    @classmethod
    def of(cls, model, world: World, scores: FactScores | None = None, *,
           world_check: bool = True) -> FactScores:  # fmt: skip
        """`scores` checked to be `model`'s in `world`, or a new memo when it is None."""
        if scores is None:
            return cls(model, world, world_check=world_check)
        if scores.model is not model or scores.world != world:
            raise InvalidArgument("scores= must be a FactScores of the model being scored and "
                                  "its task's world: pass FactScores(model, task.world)")  # fmt: skip
        return scores

    def __call__(self, facts: np.ndarray | None = None) -> FactAccuracy:
        facts = self.world.facts() if facts is None else np.asarray(facts).reshape(-1, 3)
        keys = list(map(tuple, facts.tolist()))
        new = list(dict.fromkeys(k for k in keys if k not in self._rank))
        if new:
            got = evaluate_facts(self.model, self.world, self.tokenizer, np.array(new),
                                 world_check=False)  # fmt: skip
            self._rank.update(zip(new, got.rank.tolist()))
        rank = np.array([self._rank[k] for k in keys], dtype=np.int64)
        return FactAccuracy(self.world, facts, rank, "paper")


@torch.inference_mode()
def evaluate_facts(
    model,
    world: World,
    tokenizer: WorldTokenizer,
    facts: np.ndarray | None = None,
    *,
    template: str = "paper",
    choices: np.ndarray | None = None,
    batch_size: int = 512,
    world_check: bool = True,
) -> FactAccuracy:
    """Teacher-forced exact accuracy on `facts` [n, 3] (default: every tuple of the world).

    A true token tied with another counts as beaten (rank = tokens with a logit >= its own,
    minus itself). Non-finite logits raise `Diverged`; a model or tokenizer of another world
    raises `CheckpointMismatch`. `choices` [n, k]: the candidate objects of the
    multiple-choice format per tuple (see `render`). `world_check=False` is for callers that
    checked the model's world themselves (an edit's oracle scored on its task)."""
    if tokenizer.config != world.config:
        raise CheckpointMismatch(
            "the tokenizer is another world's: pass WorldTokenizer(world.config) (or "
            "model.world_tokenizer) with the world"
        )
    if world_check:
        check_world(model, world)
    facts = world.facts() if facts is None else np.asarray(facts).reshape(-1, 3)
    sent = render(world, tokenizer, facts, template, choices=choices)
    obj = sent.spans["object"]
    k = int((obj[:, 1] - obj[:, 0]).max()) if len(facts) else 0
    width = int(obj[:, 1].max()) if len(facts) else 0
    # <|endoftext|> + tokens up to the object's end; logits at p-1 predict token p, so the
    # model reads every column but the last
    inputs = np.concatenate([np.full((len(facts), 1), tokenizer.eot_id), sent.tokens[:, :width]], 1)
    device = model_device(model)
    ranks = np.empty(len(facts), dtype=np.int64)
    logp, margin = np.empty(len(facts)), np.empty(len(facts))
    for rows, logits in _logits_in_batches(model, inputs, batch_size):
        _check_finite(model, logits, facts[rows])
        # object token j sits at input position 1 + start + j (after the leading <|endoftext|>)
        pos = torch.as_tensor(obj[rows, :1] + 1 + np.arange(k)[None, :], device=device).clamp(
            max=width
        )
        target = torch.as_tensor(inputs[rows], device=device).gather(1, pos)
        step = logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1]))
        true = step.gather(2, target[..., None])
        # [b, k]: tokens that beat or tie the true one; a tie counts against it, so a model
        # whose logits are all equal ranks every true token last, not first
        rank = (step >= true).sum(-1) - 1
        span = torch.as_tensor(
            (obj[rows, 1] - obj[rows, 0])[:, None] > np.arange(k)[None, :], device=device
        )
        ranks[rows] = torch.where(span, rank, 0).amax(1).cpu().numpy()
        logp[rows], margin[rows] = (t.cpu().numpy() for t in _confidence(step, target, span))
    return FactAccuracy(world, facts, ranks, template, logp, margin)


@torch.inference_mode()
def object_distribution(
    model,
    world: World,
    tokenizer: WorldTokenizer,
    facts: np.ndarray,
    *,
    template: str = "paper",
    batch_size: int = 512,
) -> Float[np.ndarray, "n entities"]:
    """log p(o | prompt) [n, N] of every entity o of the facts' object space (N of them), each
    the exact product over its tokens, for the prompts of `facts` [n, 3] in `template`: the
    whole distribution over objects, not just the true one's probability (what a fine-tune
    moves the mass to). 1 - sum(exp) is the mass on tokens that start no object. One forward
    row per fact and distinct object prefix (20 for the shipped worlds' 400 two-token objects),
    not one per object. The facts' relations must share one object space."""
    facts = np.asarray(facts, dtype=np.int64).reshape(-1, 3)
    spaces = {world.object_space(int(r)) for r in np.unique(facts[:, 1])}
    if len(spaces) != 1:
        raise InvalidArgument(f"the facts' relations answer in {len(spaces)} object spaces "
                              f"({sorted(spaces)}): ask one space per call")  # fmt: skip
    (space,) = spaces
    objects = tokenizer.entity_tokens(space, np.arange(tokenizer.config.token_spaces()[space][0]))
    k = objects.shape[1]
    prefixes, which = np.unique(objects[:, : k - 1], axis=0, return_inverse=True)
    which = which.reshape(-1)
    sent = render(world, tokenizer, facts, template)
    start = sent.spans["object"][:, 0]
    out = np.empty((len(facts), len(objects)))
    for s in np.unique(start):
        group = np.flatnonzero(start == s)
        # a row per (fact, object prefix): <|endoftext|>, the prompt, the prefix, and a last
        # column the model does not read; logits at 1 + s + j - 1 predict object token j
        prompt = np.repeat(sent.tokens[group, :s], len(prefixes), axis=0)
        inputs = np.concatenate([np.full((len(prompt), 1), tokenizer.eot_id), prompt,
                                 np.tile(prefixes, (len(group), 1)),
                                 np.full((len(prompt), 1), tokenizer.pad_id)], 1)  # fmt: skip
        logp = np.empty((len(inputs), k, tokenizer.vocab_size))
        for rows, logits in _logits_in_batches(model, inputs, batch_size):
            _check_finite(model, logits, facts[group[rows // len(prefixes)]])
            logp[rows] = logits[:, s : s + k].log_softmax(-1).cpu().numpy()
        logp = logp.reshape(len(group), len(prefixes), k, -1)
        # object o: its prefix's row, token j's log-probability at object position j
        out[group] = logp[:, which[:, None], np.arange(k), objects].sum(-1)
    return out


def _check_finite(model, logits: Float[Tensor, "batch pos vocab"], facts: np.ndarray) -> None:
    """Raise `Diverged` when a row of `logits` (of tuples `facts`) is not finite."""
    broken = ~torch.isfinite(logits).flatten(1).all(1)
    if broken.any():
        first = facts[int(broken.nonzero()[0, 0])]
        raise Diverged(
            f"{describe(model)} gives non-finite logits (NaN or inf), first on tuple "
            f"{tuple(first.tolist())}: its weights are broken (a diverged training or edit?), "
            "so it cannot be scored"
        )


def accuracy_by_format(
    model, world: World, tokenizer: WorldTokenizer, templates: list[str] | None = None
) -> pd.DataFrame:
    """Top-1 accuracy on every tuple per relation (rows, then 'all') in each grammar template
    (columns; default: every template): whether a model knows its facts in every format."""
    columns = {}
    for name in list(TEMPLATES) if templates is None else templates:
        acc = evaluate_facts(model, world, tokenizer, template=name)
        columns[name] = pd.concat([acc.per_relation(), pd.Series({"all": acc.accuracy})])
    return pd.DataFrame(columns)


def _confidence(
    step: Float[Tensor, "batch k vocab"],
    target: Int[Tensor, "batch k"],
    span: Bool[Tensor, "batch k"],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Per row: the object's log-probability (over its `span` tokens) and its margin, the
    least p(true) - p(best other) over those tokens."""
    logsm = step.log_softmax(-1)
    true = logsm.gather(2, target[..., None]).squeeze(-1)
    other = logsm.exp().scatter(2, target[..., None], 0.0).amax(-1)
    gap = torch.where(span, true.exp() - other, torch.inf)
    return torch.where(span, true, 0.0).sum(1), gap.amin(1)


def _logits_in_batches(
    model, inputs: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, Float[Tensor, "batch pos vocab"]]]:
    """(rows, float logits of `inputs[rows, :-1]`) over batches covering every row once.

    Rows that start with the same tokens (a subject's tuples in one template) share that
    prefix's forward pass on an HF model: the prefix runs once per distinct prefix and the rest
    of each row continues from its key-value cache, the same causal computation on fewer tokens
    (logits equal to float rounding). The split is the column that minimizes the tokens run."""
    x_all = inputs[:, :-1]
    n = len(x_all)
    device = model_device(model)
    split = _prefix_split(x_all) if isinstance(model, GPTNeoXForCausalLM) else 0
    if not split:
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            yield rows, logits_of(model, torch.as_tensor(x_all[rows], device=device)).float()
        return
    prefixes, which = np.unique(x_all[:, :split], axis=0, return_inverse=True)
    which = which.reshape(-1)  # numpy 2 keeps the inverse's axis
    order = np.argsort(which, kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        own, index = np.unique(which[rows], return_inverse=True)
        head = model(input_ids=torch.as_tensor(prefixes[own], device=device), use_cache=True)
        idx = torch.as_tensor(index.reshape(-1), device=device)
        cache = DynamicCache(ddp_cache_data=[(layer.keys[idx], layer.values[idx])
                                             for layer in head.cache.layers])  # fmt: skip
        tail = model(input_ids=torch.as_tensor(x_all[rows, split:], device=device), cache=cache)
        yield rows, torch.cat([head.logits[idx], tail.logits], 1).float()


def _prefix_split(x: np.ndarray) -> int:
    """The column at which to split rows into a shared prefix and their own rest (0: run the
    rows whole), chosen to minimize the tokens run: distinct prefixes · split + rows · rest,
    when that saves at least a quarter of running every row whole."""
    n, length = x.shape
    best, best_cost = 0, 0.75 * n * length
    for split in range(1, length):
        cost = len(np.unique(x[:, :split], axis=0)) * split + n * (length - split)
        if cost < best_cost:
            best, best_cost = split, cost
    return best
