"""Linear probes for a relation's objects, fact-lookup (FLU) localization, and latent knowledge.

Objects are drawn at random per (subject, relation), so a probe cannot learn "the object" of a
subject it has not seen; what it can learn is the model's shared code for an object *token*.
The probe task here is: from one activation of a prompt of relation r, predict token
`object_token` of the true object (the classes are token ids: 20 for the first token of the
shipped worlds' 400 objects), the prompt teacher-forced with the object tokens before it as in
`trace`. Probes are scikit-learn logistic regressions (multinomial, or one-vs-rest binary probes with
the highest score winning, as in Guo et al. 2024 section 3.3) fitted per site and layer on a
seeded split of the subjects stratified by class, and scored on the held-out subjects.
Activations come from `hooks.capture`, the one hook layer every analysis uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from behemoth_interp._io import JsonConfig, read_tensor_dir, write_tensor_dir
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import get_template
from behemoth_interp.hooks import (
    SITE_KINDS,
    STREAM_PARTS,
    Inputs,
    Site,
    build_inputs,
    capture,
    stream_after,
)
from behemoth_interp.model import hooked_in_world
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.trace import _object_digits, _token_index, _world_of, check_tuples
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from behemoth_interp.edit.tasks import EditTask

PROBE_FORMAT = "behemoth-probe/1"
PROBE_SITES = ("resid", *SITE_KINDS)
"""'resid' is the residual stream at layers 0..n_layers: entering each block, then after the
last one (TransformerLens' accumulated residual); the hook sites give one entry per block."""
Multiclass = Literal["multinomial", "ovr"]


@dataclass(frozen=True)
class ProbeConfig(JsonConfig):
    """What a probe reads and predicts. `probe` builds one from its keyword arguments.

    relation: the relation id; sites: 'resid' and/or hook site kinds; position: one input
    position (a name such as 'last' or 'last_subject', a token label, or an index, see
    `hooks.Inputs.positions`); object_token: the object token whose id is the class (0: the
    first, -1: the last); test_size: share of each class's subjects held out; multiclass:
    'multinomial' or 'ovr' (one binary probe per class); C: inverse L2 strength; exclude:
    subjects kept out of training and testing (say, the ones an edit will change); seed: of
    the split.
    """

    relation: int
    sites: tuple[str, ...] = ("resid",)
    position: str | int = "last"
    object_token: int = 0
    template: str = "paper"
    test_size: float = 0.25
    multiclass: Multiclass = "multinomial"
    C: float = 1.0
    max_iter: int = 1000
    exclude: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "exclude", tuple(sorted({int(s) for s in self.exclude})))
        if not sites:
            raise InvalidArgument(f"no sites given: choose some of {', '.join(PROBE_SITES)}")
        for kind in sites:
            if kind not in PROBE_SITES:
                raise InvalidArgument(
                    f"unknown site {kind!r}: choose some of {', '.join(PROBE_SITES)}"
                )
        if len(set(sites)) != len(sites):
            raise InvalidArgument(f"sites {sites} name a site twice")
        if not isinstance(self.position, (str, int)) or isinstance(self.position, bool):
            raise InvalidArgument(
                f"position must be one name, token label or index, got {self.position!r}"
            )
        get_template(self.template)
        if not 0 < self.test_size < 1:
            raise InvalidArgument(
                f"test_size is a share of the subjects in (0, 1), got {self.test_size}"
            )
        if self.multiclass not in ("multinomial", "ovr"):
            raise InvalidArgument(
                f"unknown multiclass {self.multiclass!r}: choose 'multinomial' or 'ovr'"
            )
        if self.C <= 0 or self.max_iter < 1:
            raise InvalidArgument(
                f"need C > 0 and max_iter >= 1, got C={self.C}, max_iter={self.max_iter}"
            )


# ---------------------------------------------------------------------------------- results
@dataclass(eq=False)
class ProbeResult:
    """Fitted probes of one relation and how well they decode held-out subjects.

    `accuracy[site]` / `train_accuracy[site]` are [layer] accuracies on the test / training
    subjects; `predictions[site]` the predicted class of every probed tuple [layer, n].
    `facts` [n, 3] are the probed tuples, `labels` [n] their classes (object token ids),
    `classes` the sorted class ids, `train` [n] the split.
    `chance` is the test accuracy of always answering the training set's most frequent class
    (averaged over classes tied for most frequent): what a probe of uninformative features gets.
    The probes themselves are `weights[site]` [layer, class, feature] and `bias[site]`
    [layer, class] on raw activations (standardization folded in): `predict` applies them to
    any model of the same shape.
    """

    config: ProbeConfig
    relation_name: str
    facts: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    classes: np.ndarray
    accuracy: dict[str, np.ndarray]
    train_accuracy: dict[str, np.ndarray]
    predictions: dict[str, np.ndarray]
    weights: dict[str, Tensor]
    bias: dict[str, Tensor]
    chance: float

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.accuracy)

    @property
    def test(self) -> np.ndarray:
        return ~self.train

    def predict(
        self,
        model: HookedTransformer,
        facts: np.ndarray | None = None,
        *,
        world: World | None = None,
    ) -> dict[str, Int[np.ndarray, "layer n"]]:
        """The probes' class for each tuple of `facts` (default: the probed ones) in `model`.

        `model` may be another model of the same shape and world, e.g. an edited copy.
        """
        world, tokenizer = _world_of(model, world)
        facts = self.facts if facts is None else check_tuples(world, facts)
        if (facts[:, 1] != self.config.relation).any():
            raise InvalidArgument(
                f"the probes read relation {self.relation_name}: pass tuples of that relation only"
            )
        feats = _features(model, world, tokenizer, facts, self.config)
        for site, x in feats.items():
            if x.shape[-1] != self.weights[site].shape[-1]:
                raise InvalidArgument(
                    f"the probes read {self.weights[site].shape[-1]} features at {site}, this "
                    f"model has {x.shape[-1]}: apply them to models of the shape they were fit on"
                )
        return {s: _decode(self.weights[s], self.bias[s], feats[s], self.classes) for s in feats}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (site, layer): accuracy, train_accuracy, chance."""
        frames = [
            pd.DataFrame({"site": site, "layer": np.arange(len(acc)), "accuracy": acc,
                          "train_accuracy": self.train_accuracy[site], "chance": self.chance})
            for site, acc in self.accuracy.items()
        ]  # fmt: skip
        return pd.concat(frames, ignore_index=True)

    def plot(self, others: Mapping[str, ProbeResult] | None = None, *, name: str = "model"):
        """Held-out probe accuracy per layer (Guo et al. 2024 Figure 10), chance dotted.

        `others` adds more results by name, e.g. {'random init': probe(random_model, ...)}.
        """
        import plotly.express as px

        results = {name: self, **(others or {})}
        df = pd.concat([r.to_dataframe().assign(model=k) for k, r in results.items()])
        many_sites = df["site"].nunique() > 1
        c = self.config
        fig = px.line(
            df, x="layer", y="accuracy", color="model", line_dash="site" if many_sites else None,
            markers=True, range_y=[0, 1.02],
            title=f"Probes for object token {c.object_token} of {self.relation_name} at "
                  f"'{c.position}' ({len(self.classes)} classes, {int(self.test.sum())} held-out "
                  "subjects)",
        )  # fmt: skip
        for chance in sorted({r.chance for r in results.values()}):
            fig.add_hline(y=chance, line_dash="dot", line_color="gray",
                          annotation_text=f"chance {chance:.2f}")  # fmt: skip
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write `probe.json` (config, accuracies) and `probes.safetensors` into directory `path`."""
        tensors = {f"weights/{s}": w for s, w in self.weights.items()}
        tensors.update({f"bias/{s}": b for s, b in self.bias.items()})
        tensors.update(
            {f"predictions/{s}": torch.as_tensor(p) for s, p in self.predictions.items()}
        )
        for name in ("facts", "labels", "train", "classes"):
            tensors[name] = torch.as_tensor(np.ascontiguousarray(getattr(self, name)))
        meta = {"format": PROBE_FORMAT, "config": self.config.to_dict(),
                "relation_name": self.relation_name, "chance": self.chance,
                "accuracy": {s: a.tolist() for s, a in self.accuracy.items()},
                "train_accuracy": {s: a.tolist() for s, a in self.train_accuracy.items()}}  # fmt: skip
        return write_tensor_dir(path, ("probe.json", meta), ("probes.safetensors", tensors),
                                overwrite=overwrite)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read probes written by `save`."""
        meta, t = read_tensor_dir(path, "probe.json", "probes.safetensors",
                                  what="probe description", format=PROBE_FORMAT)  # fmt: skip
        sites = list(meta["accuracy"])
        return cls(
            config=ProbeConfig.from_dict(meta["config"]), relation_name=meta["relation_name"],
            facts=t["facts"].numpy(), labels=t["labels"].numpy(), train=t["train"].numpy(),
            classes=t["classes"].numpy(),
            accuracy={s: np.asarray(meta["accuracy"][s]) for s in sites},
            train_accuracy={s: np.asarray(meta["train_accuracy"][s]) for s in sites},
            predictions={s: t[f"predictions/{s}"].numpy() for s in sites},
            weights={s: t[f"weights/{s}"] for s in sites}, bias={s: t[f"bias/{s}"] for s in sites},
            chance=float(meta["chance"]),
        )  # fmt: skip

    def __repr__(self) -> str:
        c = self.config
        best = ", ".join(
            f"{s} best {a.max():.2f} at layer {int(a.argmax())}" for s, a in self.accuracy.items()
        )
        return (f"ProbeResult({self.relation_name} at {c.position!r}, object token "
                f"{c.object_token}, {len(self.classes)} classes, {int(self.train.sum())}/"
                f"{int(self.test.sum())} train/test subjects: {best}; chance {self.chance:.2f})")  # fmt: skip


# ---------------------------------------------------------------------------------- probing
def probe(
    model: HookedTransformer,
    relation: int,
    *,
    sites: str | tuple[str, ...] = ("resid",),
    position: str | int = "last",
    object_token: int = 0,
    template: str = "paper",
    test_size: float = 0.25,
    multiclass: Multiclass = "multinomial",
    C: float = 1.0,
    max_iter: int = 1000,
    exclude=(),
    seed: int = 0,
    world: World | None = None,
) -> ProbeResult:
    """Fit a probe per (site, layer) predicting token `object_token` of `relation`'s objects.

    Every subject of the relation except `exclude` is one example: its prompt (plus the object
    tokens before `object_token`) is run through `model` (a HookedTransformer from `load_model`)
    and the activation at `position` is kept. Subjects are split with `seed`, stratified by
    class; accuracy is measured on the held-out subjects. See `ProbeConfig` for the arguments.
    """
    from threadpoolctl import threadpool_limits

    config = ProbeConfig(relation, sites, position, object_token, template, test_size,
                         multiclass, C, max_iter, tuple(exclude), seed)  # fmt: skip
    world, tokenizer = _world_of(model, world)
    world._check_relation(relation)
    facts = world.facts(relation).astype(np.int64)
    unknown = [s for s in config.exclude if not 0 <= s < len(facts)]
    if unknown:
        raise InvalidArgument(
            f"excluded subject {unknown[0]} is not a subject of {world.relation_name(relation)}: "
            f"it has subjects 0..{len(facts) - 1}"
        )
    facts = facts[~np.isin(facts[:, 0], config.exclude)]
    digits = _object_digits(world, tokenizer, facts)
    labels = digits[:, _token_index(config.object_token, digits.shape[1])]
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InvalidArgument(
            f"every object of {world.relation_name(relation)} has the same token "
            f"{config.object_token}: there is nothing to predict; probe another object token "
            "(object_token=-1 for a binarized relation)"
        )
    train = _split(labels, config.test_size, config.seed)
    feats = _features(model, world, tokenizer, facts, config)
    weights, bias, predictions, accuracy, train_accuracy = {}, {}, {}, {}, {}
    for site, x in feats.items():
        # small regressions gain nothing from BLAS threads, and on busy cores their spin-waits
        # made a probe 25x slower (39 s instead of 1.6 s on the 2-core CI machine)
        with threadpool_limits(1, user_api="blas"):
            ws, bs = zip(*(_fit(layer, labels, train, config) for layer in x))
        weights[site] = torch.as_tensor(np.stack(ws))
        bias[site] = torch.as_tensor(np.stack(bs))
        predictions[site] = _decode(weights[site], bias[site], x, classes)
        hit = predictions[site] == labels
        accuracy[site], train_accuracy[site] = hit[:, ~train].mean(1), hit[:, train].mean(1)
    values, counts = np.unique(labels[train], return_counts=True)
    majority = values[counts == counts.max()]
    chance = float((labels[~train, None] == majority).mean(0).mean())
    return ProbeResult(config, world.relation_name(relation), facts, labels, train, classes,
                       accuracy, train_accuracy, predictions, weights, bias, chance)  # fmt: skip


def _split(labels: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Training mask [n]: per class, a seeded round(test_size * count) of its subjects are held
    out, always leaving one to train on."""
    rng = np.random.default_rng(seed)
    train = np.ones(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        train[members[: min(round(test_size * len(members)), len(members) - 1)]] = False
    if train.all():
        raise InvalidArgument(
            f"test_size={test_size} holds out no subject: every class is too small; use a larger "
            "test_size or a relation with more subjects"
        )
    return train


def _position(inputs: Inputs, position: str | int) -> int:
    labels, mask = inputs.positions(position)
    where = mask[0].nonzero().flatten().tolist()
    if len(where) != 1:
        raise InvalidArgument(
            f"position {position!r} covers {len(where)} input positions: a probe reads one, "
            "e.g. 'last', 'last_subject' or a token label"
        )
    return where[0]


def _features(
    model, world: World, tokenizer: WorldTokenizer, facts: np.ndarray, config: ProbeConfig,
    batch_size: int = 512,
) -> dict[str, Float[np.ndarray, "layer n feature"]]:  # fmt: skip
    """Activations at the probed position for every site and layer, via `hooks.capture`."""
    n_layers = model.cfg.n_layers
    device = next(model.parameters()).device
    j = config.object_token % tokenizer.n_tokens(world.object_space(config.relation))
    inputs = build_inputs(world, tokenizer, facts, template=config.template, object_tokens=j,
                          device=device)  # fmt: skip
    pos = _position(inputs, config.position)
    kinds = {k for k in config.sites if k != "resid"}
    if "resid" in config.sites:  # every block's input, and the stream after the last one
        kinds |= {"resid_pre", *(f"{kind}.{n_layers - 1}" for kind in STREAM_PARTS[1:])}
    chunks: dict[str, list[Tensor]] = {s: [] for s in config.sites}
    for start in range(0, len(facts), batch_size):
        cap = capture(model, inputs.tokens[start : start + batch_size], sorted(kinds))
        at = {s: a[:, pos].flatten(1) for s, a in cap.acts.items()}
        for kind in config.sites:
            if kind == "resid":
                streams = [at[Site("resid_pre", layer)] for layer in range(n_layers)]
                streams.append(stream_after(at, n_layers - 1))
            else:
                streams = [at[Site(kind, layer)] for layer in range(n_layers)]
            chunks[kind].append(torch.stack(streams))
    return {k: torch.cat(v, 1).float().cpu().numpy() for k, v in chunks.items()}


def _fit(
    x: Float[np.ndarray, "n feature"], labels: np.ndarray, train: np.ndarray, config: ProbeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One probe on the training rows: scores [class, feature] and [class] on raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    lr = LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=config.seed)
    clf = OneVsRestClassifier(lr) if config.multiclass == "ovr" else lr
    clf.fit(scaler.transform(x[train]), labels[train])
    w, b = _linear(clf)
    w = w / scaler.scale_  # standardization folded in
    return w, b - w @ scaler.mean_


def _linear(clf) -> tuple[np.ndarray, np.ndarray]:
    """A fitted classifier as scores [class, feature] and [class] whose argmax is its answer."""
    if hasattr(clf, "estimators_"):  # one-vs-rest
        w = np.concatenate([e.coef_ for e in clf.estimators_])
        b = np.concatenate([e.intercept_ for e in clf.estimators_])
    else:
        w, b = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2 and len(w) == 1:  # one score for two classes: class 1 iff > 0
        w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([np.zeros_like(b), b])
    return w.astype(np.float64), b.astype(np.float64)


def _decode(weights: Tensor, bias: Tensor, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Predicted classes [layer, n] of features x [layer, n, feature]."""
    scores = (
        np.einsum("lnf,lcf->lnc", x.astype(np.float64), weights.numpy()) + bias.numpy()[:, None]
    )
    return classes[scores.argmax(-1)]


# ---------------------------------------------------------------------------------- FLU
@dataclass(frozen=True, eq=False)
class Localization:
    """Blocks where probe accuracy rises fastest: the fact-lookup (FLU) localization.

    Iterates over its `blocks`, so it is the `blocks=` argument of `edit` as it is (Guo et al.
    2024 edit only the MLPs there: add components='mlp'). `gains` [layer] is each block's rise
    in accuracy (stream after it minus stream before it), `accuracy` [layer + 1] the curve.
    """

    blocks: tuple[int, ...]
    gains: np.ndarray
    accuracy: np.ndarray
    share: float
    site: str = "resid"

    def __iter__(self) -> Iterator[int]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per block: accuracy before and after it, gain, and whether it is chosen."""
        n = len(self.gains)
        return pd.DataFrame({"block": np.arange(n), "accuracy_before": self.accuracy[:-1],
                             "accuracy_after": self.accuracy[1:], "gain": self.gains,
                             "chosen": np.isin(np.arange(n), self.blocks)})  # fmt: skip

    def plot(self):
        """Bars of each block's accuracy gain, the chosen blocks highlighted."""
        import plotly.express as px

        df = self.to_dataframe()
        return px.bar(df, x="block", y="gain", color="chosen",
                      title=f"FLU localization: blocks {list(self.blocks)} make {self.share:.0%} "
                            "of the probe accuracy gain")  # fmt: skip

    def __repr__(self) -> str:
        return f"Localization(blocks={list(self.blocks)}, share={self.share})"


def flu_layers(result: ProbeResult, *, share: float = 0.8, min_rise: float = 0.2) -> Localization:
    """The fewest blocks whose accuracy gains make `share` of all the gains (largest first).

    Reads the 'resid' probes: block l's gain is the accuracy after it minus before it (Guo et
    al. 2024 section 2.2: FLU is where probe accuracy rapidly increases). Refuses a curve that
    never rises `min_rise` above chance: there is no lookup to localize.
    """
    if "resid" not in result.accuracy:
        raise InvalidArgument(
            "FLU localization needs the residual stream before and after every block: "
            "probe with sites including 'resid'"
        )
    if not 0 < share <= 1:
        raise InvalidArgument(f"share must be in (0, 1], got {share}")
    acc = result.accuracy["resid"]
    if acc.max() - result.chance < min_rise:
        raise InvalidArgument(
            f"probe accuracy peaks at {acc.max():.2f}, within {min_rise} of chance "
            f"({result.chance:.2f}): no block looks the object up here (is the model trained? "
            "is the position one where the answer is computed, such as 'last'?)"
        )
    gains = np.diff(acc)
    up = np.clip(gains, 0, None)
    order = np.argsort(-up, kind="stable")
    k = int(np.searchsorted(np.cumsum(up[order]), share * up.sum() - 1e-12)) + 1
    return Localization(tuple(sorted(int(b) for b in order[:k])), gains, acc, share)


# ---------------------------------------------------------------------------------- latent knowledge
@dataclass(eq=False)
class LatentKnowledge:
    """How often probes fitted on the unedited model decode each edited tuple's original object
    token, and how often its new one, per site and layer (Guo et al. 2024 Figure 40).

    `original[site]` / `new[site]` are [layer] fractions over `facts` [n, 3] (original objects),
    whose new objects are `targets` [n]; `predictions[site]` the decoded classes [layer, n].
    """

    original: dict[str, np.ndarray]
    new: dict[str, np.ndarray]
    facts: np.ndarray
    targets: np.ndarray
    predictions: dict[str, np.ndarray]
    config: ProbeConfig

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: site, layer, answer ('original' or 'new'), fraction."""
        frames = [
            pd.DataFrame({"site": site, "layer": np.arange(len(values[site])), "answer": answer,
                          "fraction": values[site]})
            for answer, values in (("original", self.original), ("new", self.new))
            for site in values
        ]  # fmt: skip
        return pd.concat(frames, ignore_index=True)

    def plot(self, others: Mapping[str, LatentKnowledge] | None = None, *, name: str = "edited"):
        """Fractions decoding the original (left) and the new (right) object token per layer.

        `others` adds more results by name, e.g. other localizations of the same edit.
        """
        import plotly.express as px

        results = {name: self, **(others or {})}
        df = pd.concat([r.to_dataframe().assign(model=k) for k, r in results.items()])
        many_sites = df["site"].nunique() > 1
        return px.line(
            df, x="layer", y="fraction", color="model", facet_col="answer",
            line_dash="site" if many_sites else None, markers=True, range_y=[-0.02, 1.02],
            title=f"Latent knowledge of {len(self.facts)} edited tuples: probes decode the "
                  "original or the new object token",
        )  # fmt: skip

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{s}: original {self.original[s][-1]:.2f}, new {self.new[s][-1]:.2f} at the last layer"
            for s in self.original
        )
        return f"LatentKnowledge({len(self.facts)} tuples; {parts})"


def latent_knowledge(probes: ProbeResult, model, task: EditTask) -> LatentKnowledge:
    """Apply `probes` (fitted on the unedited model) to an edited `model` on `task`'s tuples.

    Only tuples the probes never trained on count, and only those whose original and new
    objects agree before the probed token and differ at it (the prompt is then the same and the
    two answers are two classes). `model` is a HookedTransformer or an HF model of the task's
    world. For a 'forget' task the tuples are the probes' held-out subjects; for the other
    tasks fit the probes with exclude=task.facts[:, 0].
    """
    from transformers import GPTNeoXForCausalLM

    c, world = probes.config, task.world
    if task.relation != c.relation:
        raise InvalidArgument(
            f"the probes read relation {probes.relation_name}, the task edits "
            f"{world.relation_name(task.relation)}: fit probes on the edited relation"
        )
    if not np.array_equal(
        world.objects_of(probes.facts[:, 0], probes.facts[:, 1]), probes.facts[:, 2]
    ):
        raise InvalidArgument("the probes were fitted on another world than the task's")
    if isinstance(model, GPTNeoXForCausalLM):
        model = hooked_in_world(model, world)
    tokenizer = WorldTokenizer(world.config)
    old = _object_digits(world, tokenizer, task.facts)
    new = _object_digits(world, tokenizer, task.edited)
    j = c.object_token % old.shape[1]
    seen = probes.facts[probes.train, 0]
    keep = (~np.isin(task.facts[:, 0], seen) & (old[:, :j] == new[:, :j]).all(1)
            & (old[:, j] != new[:, j]))  # fmt: skip
    if not keep.any():
        raise InvalidArgument(
            f"none of the task's {len(task.facts)} tuples can be scored: each was trained on by "
            f"the probes, or its new object does not differ from the old one first at object "
            f"token {j}. Fit the probes with exclude=task.facts[:, 0]"
        )
    facts, targets = task.facts[keep], task.targets[keep]
    predictions = probes.predict(model, facts, world=world)
    o, n = old[keep, j], new[keep, j]
    return LatentKnowledge(
        original={s: (p == o).mean(1) for s, p in predictions.items()},
        new={s: (p == n).mean(1) for s, p in predictions.items()},
        facts=facts, targets=targets, predictions=predictions, config=c,
    )  # fmt: skip
