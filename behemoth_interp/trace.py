"""Causal tracing of facts: restore clean activations in a corrupted run, measure the IOI metric.

For each clean tuple (s, r, o) the corrupted run is either another subject's prompt of the same
relation ('swap', Behemoth section 6.1) or the clean prompt with Gaussian noise on the subject
embeddings ('noise', Meng et al. 2022). Objects have two tokens, so by default the partner's
object shares the first token, that token is fed (teacher-forced) and the metric is read on the
second. Clean activations are restored at one site, layer, position group (and head) at a time:

    M = (LD_restored - LD_corrupted) / (LD_clean - LD_corrupted)      (IOI metric, Behemoth eq. 1)

with LD = logit(correct token) - logit(incorrect token). A tuple whose denominator is below
`TraceConfig.min_denominator` (the corruption did not lower its metric, or barely did; noise can
even raise it) has no meaningful score: it is kept in `scores` but excluded from `mean`, `top`
and the maps. Every patch index of every tuple is one row of a stacked batch (`hooks.patch`),
so an exact trace is a few large forward passes; `method="attribution"` estimates all of it
from one forward and backward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from behemoth_interp._io import JsonConfig, read_tensor_dir, write_tensor_dir
from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.grammar import get_template
from behemoth_interp.hooks import (
    SITE_KINDS,
    STREAM_PARTS,
    Capture,
    Inputs,
    Patch,
    Site,
    build_inputs,
    capture,
    patch,
    stream_after,
)
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

TRACE_FORMAT = "behemoth-trace/1"
Corruption = Literal["swap", "noise"]
Metric = Literal["ioi", "logit_diff", "prob"]
Method = Literal["exact", "attribution"]
MIN_DENOMINATOR = {"ioi": 1.0, "prob": 0.1}
"""Default `min_denominator` per metric, in its units: one logit of LD_clean - LD_corrupted for
'ioi' (a corruption that changes the odds of the correct over the incorrect token by less than
a factor e has not removed the fact), 0.1 of probability for 'prob' (which bounds |M| by 10,
since a restoration moves a probability by at most 1). 'logit_diff' has no denominator."""


@dataclass(frozen=True)
class TraceConfig(JsonConfig):
    """What a trace measures. `trace` builds one from its keyword arguments.

    sites: site kinds, each traced at every layer. positions: names ('subject', 'last', 'each',
    ...) or input indices (see `hooks.Inputs.positions`). object_token: which object token the
    metric reads (-1: the last, the paper's choice; 0: the first). metric: 'ioi' (eq. 1),
    'logit_diff' (LD_restored - LD_corrupted, unnormalized) or 'prob' (eq. 1 on the correct
    token's probability). noise: standard deviations of subject embeddings ('noise' corruption).
    min_denominator: tuples whose clean - corrupted metric (eq. 1's denominator) is below it are
    excluded from means; None: the metric's default (`MIN_DENOMINATOR`), -inf: keep every tuple.
    'logit_diff' divides by nothing, so it excludes nothing and takes no threshold.
    """

    sites: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_post")
    positions: tuple[str | int, ...] = ("each",)
    corruption: Corruption = "swap"
    metric: Metric = "ioi"
    method: Method = "exact"
    object_token: int = -1
    template: str = "paper"
    noise: float = 3.0
    seed: int = 0
    min_denominator: float | None = None

    def __post_init__(self) -> None:
        for name in ("sites", "positions"):
            value = getattr(self, name)
            object.__setattr__(
                self, name, (value,) if isinstance(value, (str, int)) else tuple(value)
            )
        if not self.sites:
            raise InvalidArgument(f"no sites given: choose some of {', '.join(SITE_KINDS)}")
        for kind in self.sites:
            if kind not in SITE_KINDS:
                raise InvalidArgument(
                    f"unknown site {kind!r}: choose some of {', '.join(SITE_KINDS)}"
                )
        if len(set(self.sites)) != len(self.sites):
            raise InvalidArgument(f"sites {self.sites} name a site twice")
        choices = {"corruption": ("swap", "noise"), "metric": ("ioi", "logit_diff", "prob"),
                   "method": ("exact", "attribution")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InvalidArgument(
                    f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}"
                )
        get_template(self.template)
        if self.noise <= 0:
            raise InvalidArgument(
                f"noise must be positive (a multiple of the embedding std), got {self.noise}"
            )
        if self.metric == "logit_diff" and self.min_denominator is not None:
            raise InvalidArgument(
                "metric 'logit_diff' has no denominator, so no tuple is excluded: leave "
                f"min_denominator=None (got {self.min_denominator})"
            )
        if self.metric != "logit_diff":
            given = self.min_denominator
            threshold = MIN_DENOMINATOR[self.metric] if given is None else float(given)
            if threshold != threshold:
                raise InvalidArgument(
                    "min_denominator is NaN: give a number (-inf keeps every tuple)"
                )
            object.__setattr__(self, "min_denominator", threshold)

    @property
    def needs_partners(self) -> bool:
        """Swapped subjects need partners; so does a metric that names an incorrect token."""
        return self.corruption == "swap" or self.metric != "prob"


# ---------------------------------------------------------------------------------- results
@dataclass
class TraceResult:
    """Per-tuple restoration scores with their axes.

    `scores[kind]` is [tuple, layer, position] ([tuple, layer, position, head] for 'head');
    `positions` labels the position axis, `tuples` / `partners` are [n, 3] (partners -1 where
    none was needed), `clean` / `corrupted` the raw metric (logit difference, or probability) of
    the two reference runs. `mean[kind]` averages over the tuples not `excluded`: those whose
    `denominator` (clean - corrupted) is below `config.min_denominator`.
    """

    scores: dict[str, Tensor]
    tuples: np.ndarray
    partners: np.ndarray
    positions: tuple[str, ...]
    relation_names: tuple[str, ...]
    clean: np.ndarray
    corrupted: np.ndarray
    config: TraceConfig

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1]

    @property
    def denominator(self) -> np.ndarray | None:
        """Eq. 1's denominator per tuple, clean - corrupted metric; None for 'logit_diff'."""
        return None if self.config.metric == "logit_diff" else self.clean - self.corrupted

    @property
    def excluded(self) -> np.ndarray:
        """Boolean [tuple]: the denominator is below `config.min_denominator`, so the tuple's
        scores are meaningless and left out of `mean`, `top` and the maps."""
        if self.denominator is None:
            return np.zeros(len(self.tuples), dtype=bool)
        return ~(self.denominator >= self.config.min_denominator)

    @property
    def n_excluded(self) -> int:
        return int(self.excluded.sum())

    @property
    def mean(self) -> dict[str, Tensor]:
        """Scores averaged over the tuples not `excluded`."""
        keep = torch.as_tensor(~self.excluded)
        if not keep.any():
            raise _all_excluded(len(self.tuples), self.config)
        return {k: v[keep].mean(0) for k, v in self.scores.items()}

    def subset(self, rows) -> TraceResult:
        """The result for some tuples only (a boolean mask or indices)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if not len(rows):
            raise InvalidArgument("the subset selects no tuples")
        idx = torch.as_tensor(rows)
        return dataclasses.replace(
            self, scores={k: v[idx] for k, v in self.scores.items()}, tuples=self.tuples[rows],
            partners=self.partners[rows], clean=self.clean[rows], corrupted=self.corrupted[rows],
        )  # fmt: skip

    def for_relation(self, relation: int | str) -> TraceResult:
        """The result for the tuples of one relation, given by id or name ('r0', 'r1~', ...)."""
        if isinstance(relation, str) and relation not in self.relation_names:
            raise InvalidArgument(
                f"unknown relation {relation!r}: choose one of {', '.join(self.relation_names)}"
            )
        rel = self.relation_names.index(relation) if isinstance(relation, str) else relation
        rows = self.tuples[:, 1] == rel
        if not rows.any():
            traced = sorted({self.relation_names[r] for r in self.tuples[:, 1]})
            raise InvalidArgument(
                f"no traced tuple has relation {relation!r}: traced {', '.join(traced)}"
            )
        return self.subset(rows)

    def to_dataframe(self, per_tuple: bool = False) -> pd.DataFrame:
        """Long format: site, layer, position, head (NA off 'head'), score (mean over the tuples
        not excluded), n_tuples (how many that is).

        With `per_tuple`, one row per tuple and index, with subject, relation, object,
        relation_name and `excluded` instead of the mean; excluded tuples keep their scores.
        """
        frames = []
        means = None if per_tuple else self.mean
        for kind, t in self.scores.items():
            values = t if per_tuple else means[kind][None]
            grid = np.indices(values.shape).reshape(values.ndim, -1)
            frame = pd.DataFrame({
                "site": kind,
                "layer": grid[1],
                "position": np.asarray(self.positions, dtype=object)[grid[2]],
                "head": pd.array(grid[3] if t.ndim == 4 else [pd.NA] * len(grid[0]), "Int64"),
                "score": values.reshape(-1).cpu().numpy(),
            })  # fmt: skip
            if per_tuple:
                rows = self.tuples[grid[0]]
                names = np.asarray(self.relation_names, dtype=object)[rows[:, 1]]
                frame.insert(0, "relation_name", names)
                for i, col in enumerate(("subject", "relation", "object")):
                    frame.insert(i, col, rows[:, i])
                frame["excluded"] = self.excluded[grid[0]]
            else:
                frame["n_tuples"] = len(self.tuples) - self.n_excluded
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def by_relation(self) -> pd.DataFrame:
        """Mean score per relation, in long format with `relation` and `relation_name` columns."""
        frames = []
        for rel in np.unique(self.tuples[:, 1]):
            sub = self.subset(self.tuples[:, 1] == rel).to_dataframe()
            sub.insert(0, "relation_name", self.relation_names[rel])
            sub.insert(0, "relation", int(rel))
            frames.append(sub)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10, site: str | None = None) -> pd.DataFrame:
        """The `k` (site, layer, position, head) indices with the highest mean score (over the
        tuples not excluded)."""
        df = self.to_dataframe()
        if site is not None:
            df = df[df["site"] == site]
        return (
            df.sort_values("score", ascending=False, kind="stable").head(k).reset_index(drop=True)
        )

    def heatmap(
        self,
        sites: list[str] | None = None,
        *,
        relation: int | str | None = None,
        title: str | None = None,
    ):
        """Plotly heatmaps of the mean score, one panel per site: layers x token positions.

        The 'head' panel has one row per (layer, head). Layer 0 is at the top, as in the paper.
        The title counts the tuples averaged and the excluded ones, with the threshold.
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        res = self if relation is None else self.for_relation(relation)
        sites = list(sites or self.sites)
        for kind in sites:
            if kind not in self.scores:
                raise InvalidArgument(
                    f"site {kind!r} was not traced: traced {', '.join(self.sites)}"
                )
        fig = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, horizontal_spacing=0.08)
        for col, kind in enumerate(sites, start=1):
            m = res.mean[kind].cpu()
            if m.ndim == 3:
                n_heads = m.shape[2]
                z = m.permute(0, 2, 1).reshape(-1, m.shape[1])
                y = [f"L{layer}.H{h}" for layer in range(m.shape[0]) for h in range(n_heads)]
            else:
                z, y = m, [f"L{layer}" for layer in range(m.shape[0])]
            hover = "%{y} %{x}: %{z:.3f}<extra></extra>"
            heat = go.Heatmap(z=z.numpy(), x=list(res.positions), y=y, coloraxis="coloraxis",
                              hovertemplate=hover)  # fmt: skip
            fig.add_trace(heat, 1, col)
            fig.update_yaxes(autorange="reversed", row=1, col=col)
        cfg = self.config
        what = f"{cfg.method} {cfg.corruption} trace, {cfg.metric} metric, {res.counted()}"
        if relation is not None:
            what += f", relation {relation}"
        rows = max(len(trace.y) for trace in fig.data)
        fig.update_layout(title=title or what, coloraxis={"colorscale": "RdBu", "cmid": 0},
                          height=max(350, 22 * rows))  # fmt: skip
        return fig

    plot = heatmap

    def counted(self) -> str:
        """'n=24 tuples', or with exclusions 'n=21 of 24 tuples (3 excluded: clean − corrupted
        < 1)'."""
        n, k = len(self.tuples), self.n_excluded
        if not k:
            return f"n={n} tuples"
        return (f"n={n - k} of {n} tuples ({k} excluded: clean − corrupted < "
                f"{self.config.min_denominator:g})")  # fmt: skip

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write `trace.json` (config, axes) and `scores.safetensors` into directory `path`."""
        tensors = {f"scores/{k}": v for k, v in self.scores.items()}
        for name in ("tuples", "partners", "clean", "corrupted"):
            tensors[name] = torch.as_tensor(np.ascontiguousarray(getattr(self, name)))
        meta = {"format": TRACE_FORMAT, "config": self.config.to_dict(), "sites": list(self.sites),
                "positions": list(self.positions),
                "relation_names": list(self.relation_names)}  # fmt: skip
        return write_tensor_dir(path, ("trace.json", meta), ("scores.safetensors", tensors),
                                overwrite=overwrite)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        """Read a trace written by `save`. One saved before `min_denominator` existed gets the
        metric's default threshold (its clean and corrupted metrics are stored)."""
        meta, t = read_tensor_dir(path, "trace.json", "scores.safetensors",
                                  what="trace description", format=TRACE_FORMAT)  # fmt: skip
        return cls(
            scores={k: t[f"scores/{k}"] for k in meta["sites"]},
            tuples=t["tuples"].numpy(), partners=t["partners"].numpy(),
            positions=tuple(meta["positions"]), relation_names=tuple(meta["relation_names"]),
            clean=t["clean"].numpy(), corrupted=t["corrupted"].numpy(),
            config=TraceConfig.from_dict(meta["config"]),
        )  # fmt: skip

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape[1:])}" for k, v in self.scores.items())
        c = self.config
        what = f"{c.method} {c.corruption}/{c.metric}"
        return f"TraceResult({self.counted()}, {what}: {shapes})"


# ---------------------------------------------------------------------------------- tuples
def check_tuples(world: World, tuples) -> np.ndarray:
    """Tuples as an int64 array [n, 3], raising if one is not a fact of `world`."""
    facts = np.asarray(tuples)
    if facts.ndim == 1 and facts.shape == (3,):
        facts = facts[None]
    if facts.ndim != 2 or facts.shape[1] != 3 or not len(facts):
        raise InvalidArgument(
            "tuples must be a non-empty array [n, 3] of (subject, relation, object), "
            f"got shape {facts.shape}"
        )
    facts = facts.astype(np.int64)
    truth = world.objects_of(facts[:, 0], facts[:, 1])
    bad = np.flatnonzero(truth != facts[:, 2])
    if len(bad):
        s, r, o = (int(x) for x in facts[bad[0]])
        raise InvalidArgument(
            f"tuple (s={s}, r={r}, o={o}) is not in this world: "
            f"({s}, {world.relation_name(r)}) has object {int(truth[bad[0]])} "
            f"({len(bad)} of {len(facts)} tuples are not facts)"
        )
    return facts


def _object_digits(world: World, tokenizer: WorldTokenizer, facts: np.ndarray) -> np.ndarray:
    """Object token ids [n, k] of tuples (relations may differ in object space)."""
    spaces = np.array([world.object_space(int(r)) for r in facts[:, 1]], dtype=object)
    k = {tokenizer.n_tokens(s) for s in set(spaces)}
    if len(k) > 1:
        raise InvalidArgument(
            "these tuples' objects have different token counts: trace one relation kind at a time"
        )
    out = np.empty((len(facts), k.pop()), dtype=np.int64)
    for space in set(spaces):
        rows = spaces == space
        out[rows] = tokenizer.entity_tokens(space, facts[rows, 2])
    return out


def _token_index(object_token: int, k: int) -> int:
    if not -k <= object_token < k:
        raise InvalidArgument(
            f"object_token={object_token}, but objects have {k} tokens: use 0..{k - 1} or -{k}..-1"
        )
    return object_token % k


def find_partners(world: World, tuples, *, object_token: int = -1, seed: int = 0) -> np.ndarray:
    """A corruption partner for each tuple: same relation, another subject, and an object that
    shares the object tokens before `object_token` and differs at it (Behemoth section 6.1).

    Drawn uniformly with `seed` among all such tuples of the world; rows are -1 where a tuple
    has none. Returns [n, 3].
    """
    facts = check_tuples(world, tuples)
    tokenizer = WorldTokenizer(world.config)
    u = np.random.default_rng(seed).random(len(facts))
    out = np.full_like(facts, -1)
    for r in np.unique(facts[:, 1]):
        rows = np.flatnonzero(facts[:, 1] == r)
        subjects = np.arange(world.n_subjects_of(int(r)))
        objects = world.objects_of(subjects, np.full_like(subjects, r))
        toks = tokenizer.entity_tokens(world.object_space(int(r)), objects).astype(np.int64)
        j = _token_index(object_token, toks.shape[1])
        prefix = (
            np.unique(toks[:, :j], axis=0, return_inverse=True)[1].ravel()
            if j
            else np.zeros(len(toks), np.int64)
        )
        key = prefix * (int(toks[:, j].max()) + 1) + toks[:, j]
        order = np.argsort(key, kind="stable")
        # subjects sorted by (prefix, token j): a tuple's candidates are its prefix block minus
        # its own token-j block, so a uniform draw over that count picks one without a loop
        q = facts[rows, 0]
        g0, g1 = (np.searchsorted(prefix[order], prefix[q], side=s) for s in ("left", "right"))
        b0, b1 = (np.searchsorted(key[order], key[q], side=s) for s in ("left", "right"))
        count = (g1 - g0) - (b1 - b0)
        pick = np.floor(u[rows] * count).astype(np.int64)
        idx = np.where(pick < b0 - g0, g0 + pick, b1 + pick - (b0 - g0))
        ok = count > 0
        partner = order[np.minimum(idx, len(order) - 1)][ok]
        out[rows[ok]] = np.stack([partner, np.full_like(partner, r), objects[partner]], axis=1)
    return out


def sample_tuples(
    world: World,
    n_per_relation: int,
    *,
    relations: list[int] | None = None,
    object_token: int = -1,
    seed: int = 0,
) -> np.ndarray:
    """Up to `n_per_relation` tuples of each relation that have a corruption partner, seeded."""
    check_int("n_per_relation", n_per_relation, 1, option="--n")
    facts = world.facts(relations)
    facts = facts[find_partners(world, facts, object_token=object_token, seed=seed)[:, 0] >= 0]
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.flatnonzero(facts[:, 1] == r))[:n_per_relation]
        for r in np.unique(facts[:, 1])
    ]
    return facts[np.sort(np.concatenate(keep))] if keep else facts


def _check_partners(
    world: World, tokenizer: WorldTokenizer, facts: np.ndarray, partners, j: int
) -> np.ndarray:
    partners = check_tuples(world, partners)
    if partners.shape != facts.shape:
        raise InvalidArgument(
            f"partners must match the tuples row for row: got {len(partners)} "
            f"for {len(facts)} tuples"
        )
    a, b = _object_digits(world, tokenizer, facts), _object_digits(world, tokenizer, partners)
    bad = (
        (partners[:, 1] != facts[:, 1])
        | (partners[:, 0] == facts[:, 0])
        | (a[:, :j] != b[:, :j]).any(1)
        | (a[:, j] == b[:, j])
    )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(
            f"partner {tuple(partners[i].tolist())} of tuple {tuple(facts[i].tolist())} is not "
            "a valid corruption: it needs the same relation, another subject, and an object that "
            f"shares the tokens before object token {j} and differs at it (see find_partners)"
        )
    return partners


def _world_of(model: HookedTransformer, world: World | None) -> tuple[World, WorldTokenizer]:
    world = world if world is not None else getattr(model, "world", None)
    if world is None:
        raise InvalidArgument(
            "the model carries no world: load it with bi.load_model(checkpoint) or pass world="
        )
    tokenizer = WorldTokenizer(world.config)
    attached = getattr(model, "world_tokenizer", None)
    # equal vocabulary sizes can still partition the tokens differently: compare the layouts
    layout = attached.config.token_spaces() if attached is not None else None
    if model.cfg.d_vocab != tokenizer.vocab_size or layout not in (
        None,
        world.config.token_spaces(),
    ):
        raise InvalidArgument(
            f"the model's tokenizer is not this world's: the model has {model.cfg.d_vocab} tokens "
            f"laid out for {layout}, the world needs {tokenizer.vocab_size} laid out for "
            f"{world.config.token_spaces()} (entities, tokens each). Trace a model with the world "
            "it was trained on (bi.load_model attaches it)"
        )
    return world, tokenizer


# ---------------------------------------------------------------------------------- trace
def trace(
    model: HookedTransformer,
    tuples: Int[np.ndarray, "n 3"],
    *,
    sites: tuple[str, ...] | str = ("resid_pre", "attn_out", "mlp_post"),
    positions: str | int | tuple[str | int, ...] = "each",
    corruption: Corruption = "swap",
    metric: Metric = "ioi",
    method: Method = "exact",
    object_token: int = -1,
    template: str = "paper",
    partners: np.ndarray | None = None,
    noise: float = 3.0,
    seed: int = 0,
    min_denominator: float | None = None,
    batch_size: int = 1024,
    world: World | None = None,
) -> TraceResult:
    """Causal tracing of `tuples` [n, 3] in `model` (a HookedTransformer from `load_model`).

    Restores clean activations at every layer of each site kind and each position group in a
    corrupted run and scores the recovery with `metric` (see `TraceConfig`). `partners` [n, 3]
    overrides the seeded choice of `find_partners`; `method="attribution"` replaces the patched
    runs by a first-order estimate. Tuples whose clean - corrupted metric is below
    `min_denominator` are left out of the means (raises if that is all of them). `batch_size` is
    rows per forward pass. Returns a TraceResult.
    """
    config = TraceConfig(sites, positions, corruption, metric, method, object_token, template,
                         noise, seed, min_denominator)  # fmt: skip
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}")
    run = _Runs.build(model, tuples, config, partners, world)
    labels, groups = run.clean.positions(config.positions)
    all_sites = [Site(kind, layer) for kind in config.sites for layer in range(model.cfg.n_layers)]
    clean = capture(model, run.clean.tokens, [*all_sites, Site("resid_pre", 0)])
    v_clean = run.value(clean.logits)
    noised = _noise_patches(model, run, clean, config) if config.corruption == "noise" else []
    streams = [Site("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    grad_of = run.value if method == "attribution" else None
    if method == "exact":  # the stream after the last block, for rows that resume there
        streams += [Site(kind, model.cfg.n_layers - 1) for kind in STREAM_PARTS]
    corrupt = capture(model, run.corrupted, [*all_sites, *streams], patches=noised, grad_of=grad_of,
                      keep_kv=method == "exact")  # fmt: skip
    v_corrupt = run.value(corrupt.logits)
    if metric != "logit_diff" and not bool((v_clean - v_corrupt >= config.min_denominator).any()):
        raise _all_excluded(len(v_clean), config)
    scale = v_clean - v_corrupt if metric != "logit_diff" else torch.ones_like(v_clean)
    if method == "exact":
        scores = _exact(
            model, run, clean, corrupt, groups, config.sites, v_corrupt, scale, batch_size
        )
    else:
        scores = _attribution(clean, corrupt, groups, config.sites, scale)
    return TraceResult(
        scores=scores, tuples=run.clean.facts, partners=run.partners, positions=labels,
        relation_names=tuple(run.world.relation_name(r) for r in range(run.world.n_relations)),
        clean=v_clean.cpu().numpy(), corrupted=v_corrupt.cpu().numpy(), config=config,
    )  # fmt: skip


def _all_excluded(n: int, config: TraceConfig) -> ValueError:
    what = "LD_clean − LD_corrupted" if config.metric == "ioi" else "p_clean − p_corrupted"
    return ValueError(
        f"all {n} tuples are excluded: their {what} (the denominator of eq. 1) is below "
        f"min_denominator={config.min_denominator:g}: the corruption did not lower the metric by "
        "that much, so no score means anything. Use swap corruption or more noise, tuples the "
        "model knows, or a lower min_denominator (-inf keeps every tuple)"
    )


@dataclass
class _Runs:
    """The inputs of a trace: clean and corrupted tokens, partners, the two answer tokens."""

    world: World
    tokenizer: WorldTokenizer
    clean: Inputs
    corrupted: Int[Tensor, "batch pos"]
    partners: np.ndarray
    correct: Int[Tensor, " batch"]
    incorrect: Int[Tensor, " batch"]
    metric: Metric

    @classmethod
    def build(cls, model, tuples, config: TraceConfig, partners, world) -> _Runs:
        world, tokenizer = _world_of(model, world)
        facts = check_tuples(world, tuples)
        digits = _object_digits(world, tokenizer, facts)
        j = _token_index(config.object_token, digits.shape[1])
        if partners is not None:
            partners = _check_partners(world, tokenizer, facts, partners, j)
        elif config.needs_partners:
            partners = find_partners(world, facts, object_token=j, seed=config.seed)
            missing = np.flatnonzero(partners[:, 0] < 0)
            if len(missing):
                raise InvalidArgument(
                    f"{len(missing)} of {len(facts)} tuples have no corruption partner (first "
                    f"{tuple(facts[missing[0]].tolist())}): no other subject of the relation has "
                    f"an object sharing the tokens before object token {j} and differing at it. "
                    "Drop them (keep = bi.find_partners(world, tuples)[:, 0] >= 0) or measure "
                    "the first object token (object_token=0)"
                )
        else:
            partners = np.full_like(facts, -1)
        device = next(model.parameters()).device
        inputs = dict(template=config.template, object_tokens=j, device=device)
        clean = build_inputs(world, tokenizer, facts, **inputs)
        swap = config.corruption == "swap"
        corrupted = (
            build_inputs(world, tokenizer, partners, **inputs).tokens if swap else clean.tokens
        )
        wrong = (
            _object_digits(world, tokenizer, partners)[:, j]
            if (partners >= 0).all()
            else digits[:, j]
        )
        right, wrong = (torch.as_tensor(d, device=device) for d in (digits[:, j], wrong))
        return cls(world, tokenizer, clean, corrupted, partners, right, wrong, config.metric)

    def value(self, logits: Float[Tensor, "batch pos vocab"], rows: Tensor | None = None) -> Tensor:
        """The raw metric at the last position: logit difference, or the correct probability."""
        correct = self.correct if rows is None else self.correct[rows]
        last = logits[:, -1].float()
        if self.metric == "prob":
            return last.softmax(-1).gather(1, correct[:, None])[:, 0]
        incorrect = self.incorrect if rows is None else self.incorrect[rows]
        return (last.gather(1, correct[:, None]) - last.gather(1, incorrect[:, None]))[:, 0]


def _noise_patches(model, run: _Runs, clean: Capture, config: TraceConfig) -> list[Patch]:
    """Subject embeddings plus Gaussian noise of `config.noise` times their std (Meng et al.)."""
    spaces = sorted({run.world.subject_space(int(r)) for r in run.clean.facts[:, 1]})
    ids = np.concatenate([np.concatenate(run.tokenizer.positions[s]) for s in spaces])
    sigma = model.W_E[torch.as_tensor(ids, device=model.W_E.device)].std().item()
    subject = run.clean.positions("subject")[1][0]
    embed = clean["resid_pre.0"]
    noise = torch.randn(embed.shape, generator=torch.Generator().manual_seed(config.seed))
    noise = noise.to(embed.device) * (config.noise * sigma) * subject[:, None]
    return [Patch(Site("resid_pre", 0), embed + noise, subject)]


def _exact(
    model, run: _Runs, clean: Capture, corrupt: Capture, groups, kinds, v_corrupt, scale, batch_size
):
    """Every (tuple, layer, group, head) of every site kind is one row of a stacked batch.

    Each row is the corrupted run resumed from a residual stream with the clean activation put
    back: a 'resid_pre' row replaces the stream entering its block at its positions. The other
    sites add to the stream, and GPT-NeoX blocks are parallel (the MLP reads the block's input,
    not the attention output), so restoring one at layer l adds clean − corrupted (through W_O
    for a head, W_out for coefficients) to the stream leaving block l, and the row resumes at
    block l + 1; after the last block only the last position is read, so a row there that
    misses it scores exactly 0 without a run. A row also starts at its first patched position,
    attending to the positions before through the corrupted run's keys and values (nothing
    before a patch changes), and a row whose clean activations equal the corrupted ones at its
    positions scores exactly 0 without a run.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not model.cfg.parallel_attn_mlp:
        raise InvalidArgument("exact tracing assumes parallel attention and MLP (GPT-NeoX blocks)")
    scores, todo = {}, []
    for ki, kind in enumerate(kinds):
        heads = (n_heads,) if kind == "head" else ()
        scores[kind] = torch.zeros(len(run.corrupted), n_layers, len(groups), *heads)
        for layer in range(n_layers):
            site = Site(kind, layer)
            same = (clean[site] == corrupt[site]).flatten(2 + len(heads)).all(-1)  # [t pos (head)]
            outside = ~groups.reshape(1, *groups.shape, *[1] * len(heads))
            active = ~(same[:, None] | outside).all(2)  # [t group (head)]
            if kind != "resid_pre" and layer == n_layers - 1:
                active &= groups[:, -1].reshape(1, -1, *[1] * len(heads))
            index = F.pad(active.nonzero(), (0, 1 - len(heads)))  # t, group, head
            todo.append(F.pad(F.pad(index, (1, 0), value=layer), (1, 0), value=ki))
    todo = torch.cat(todo)  # columns: kind, layer, tuple, group, head
    adds = torch.as_tensor([k != "resid_pre" for k in kinds], device=todo.device)
    resume = todo[:, 1] + adds[todo[:, 0]]  # the block each row resumes at
    first = groups.int().argmax(1)[todo[:, 3]]  # the group's first position
    streams = [corrupt[Site("resid_pre", layer)] for layer in range(n_layers)]
    streams.append(stream_after(corrupt, n_layers - 1))
    written: dict[Site, Tensor] = {}  # per tuple (and head), not per row: rows share them
    for block, start in torch.stack([resume, first], 1).unique(dim=0).tolist():
        for chunk in todo[(resume == block) & (first == start)].split(batch_size):
            kind_i, layer, t, g, h = chunk.unbind(1)
            resid = streams[block][t].clone()
            for ki in kind_i.unique().tolist():
                rows = kind_i == ki
                mask = groups[g[rows]]
                site = Site(kinds[ki], block - int(adds[ki]))
                if kinds[ki] == "resid_pre":
                    resid[rows] = torch.where(mask[..., None], clean[site][t[rows]], resid[rows])
                    continue
                if site not in written:
                    written[site] = _written(model, site, clean[site] - corrupt[site])
                added = (
                    written[site][t[rows], :, h[rows]] if site.has_heads else written[site][t[rows]]
                )
                resid[rows] += added * mask[..., None]
            kv = [(k[t], v[t]) for k, v in corrupt.kv]
            logits = patch(model, run.corrupted[t], [], start_layer=block, resid=resid,
                           last_only=True, start_pos=start, kv=kv)  # fmt: skip
            values = ((run.value(logits, t) - v_corrupt[t]) / scale[t]).cpu()
            kind_i, layer, t, g, h = (x.cpu() for x in (kind_i, layer, t, g, h))
            for ki in kind_i.unique().tolist():
                rows = kind_i == ki
                at = (t[rows], layer[rows], g[rows], h[rows])[: scores[kinds[ki]].ndim]
                scores[kinds[ki]][at] = values[rows]
    return scores


def _written(model, site: Site, diff: Tensor) -> Float[Tensor, "tuple pos *head d_model"]:
    """What the difference `diff` of a site's activations [tuple, pos, ...] adds to the
    residual stream: through W_out for coefficients, through each head's W_O for heads."""
    if site.kind == "mlp_post":
        return diff @ model.blocks[site.layer].mlp.W_out
    if site.kind == "head":
        return torch.einsum("tphe,hed->tphd", diff, model.blocks[site.layer].attn.W_O)
    return diff


def _attribution(clean: Capture, corrupt: Capture, groups, kinds, scale) -> dict[str, Tensor]:
    """First-order estimate: (clean - corrupted) . d metric / d activation, summed per group."""
    out: dict[str, Tensor] = {}
    for kind in kinds:
        layers = []
        for site in sorted(s for s in corrupt.acts if s.kind == kind):
            per_pos = ((clean[site] - corrupt[site]) * corrupt.grads[site]).sum(-1)
            layers.append(torch.einsum("tp...,gp->tg...", per_pos, groups.float()))
        scores = torch.stack(layers, 1)
        out[kind] = (scores / scale.reshape(-1, *[1] * (scores.ndim - 1))).cpu()
    return out
