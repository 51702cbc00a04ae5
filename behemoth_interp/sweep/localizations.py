"""Localizations as a sweep axis (Mechanistic Unlearning section 2.2): each fine-tuning method
of a sweep edits the components each localization names, instead of blocks x components.

A spec's `localizations` lists them by source (`bi.LOCALIZATIONS`); each is built once per
model and task relation when the spec is expanded, and one may be matched to another's
trainable-parameter count, as the paper matches its baselines:

    localizations:
      - {source: flu}                                  # the MLPs where probe accuracy rises
      - {source: trace, match: flu}                    # OT: top heads / MLPs, FLU's size
      - {source: random, match: flu, seed: 0}          # random heads and MLPs, FLU's size
      - {source: all_mlps}
      - {source: nonlocalized}

Methods without a `localization` setting (ROME, MEMIT) keep the spec's blocks and components.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from behemoth_interp.errors import BehemothError, InvalidArgument, check_int
from behemoth_interp.localize import LOCALIZATIONS, ComponentSet
from behemoth_interp.localize import sources as src

SIZED = ("trace", "random", "random_mlps")
"""Sources that need a size: `k` components, `n_parameters` weights, or `match`."""
TRACE_METHODS = ("exact", "attribution")


def _error(where: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"sweep spec localizations{where}: {message}")


@dataclass(frozen=True)
class LocalizationSpec:
    """One localization of the axis: its `source`, the `name` runs are labelled with (default:
    the source), and its size — `k` components, `n_parameters` weights, or `match` another
    localization's parameter count (grown or shrunk with `seed`). `trace` ('exact' causal
    tracing or 'attribution' patching) scores the OT components on `tuples` of the relation
    the model knows; `components` is what FLU takes of its blocks ('mlp', 'attn', 'both');
    `granularity` the attention unit of 'random' ('head' or 'attn')."""

    source: str
    name: str = ""
    k: int | None = None
    n_parameters: int | None = None
    match: str | None = None
    seed: int = 0
    trace: str = "exact"
    tuples: int = 64
    components: str = "mlp"
    granularity: str = "head"

    def __post_init__(self) -> None:
        if self.source not in LOCALIZATIONS:
            raise _error(
                ".source", f"unknown source {self.source!r}: choose of {sorted(LOCALIZATIONS)}"
            )
        object.__setattr__(self, "name", self.name or self.source)
        sizes = [n for n in ("k", "n_parameters", "match") if getattr(self, n) is not None]
        where = f" ({self.name})"
        if len(sizes) > 1:
            raise _error(where, f"give one size of k, n_parameters, match; got {sizes}")
        if self.source in SIZED and not sizes:
            raise _error(where, f"{self.source!r} needs a size: k (components), n_parameters "
                         "or match (another localization's name)")  # fmt: skip
        if self.source not in SIZED and self.k is not None:
            raise _error(where, f"{self.source!r} chooses its own components: drop k (match or "
                         "n_parameters resize it)")  # fmt: skip
        try:
            for name, low in (("k", 1), ("n_parameters", 1)):
                if getattr(self, name) is not None:
                    check_int(name, getattr(self, name), low)
            check_int("seed", self.seed, 0)
            check_int("tuples", self.tuples, 1)
        except InvalidArgument as err:
            raise _error(where, str(err)) from None
        if self.trace not in TRACE_METHODS:
            raise _error(f"{where}.trace", f"is one of {TRACE_METHODS}, got {self.trace!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> LocalizationSpec:
        if isinstance(d, str):
            return cls(d)
        if not isinstance(d, Mapping) or "source" not in d:
            raise _error("", f"an entry is a source name or {{source: ..., ...}}, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise _error(f".{unknown[0]}", f"is not a field: a localization has {sorted(known)}")
        return cls(**d)


def check_localizations(specs: tuple[LocalizationSpec, ...]) -> None:
    """Names are unique and every `match` names another localization, with no cycle."""
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _error("", f"name {twice[0]!r} is used twice: give each a distinct name")
    by_name = {s.name: s for s in specs}
    for s in specs:
        seen, at = {s.name}, s
        while at.match is not None:
            if at.match not in by_name:
                raise _error(f" ({at.name}).match", f"names no localization: choose of {names}")
            at = by_name[at.match]
            if at.name in seen:
                raise _error(f" ({s.name}).match", "is circular: one localization must have a size")
            seen.add(at.name)


def build_localizations(
    specs: tuple[LocalizationSpec, ...], hf, world, relation: int, correct
) -> dict[str, ComponentSet]:
    """Every localization of `specs` for `hf` on `relation` (`correct`: `evaluate_facts` of the
    relation's facts, so OT traces only facts `hf` knows), matched ones after their targets."""
    from behemoth_interp.model import hooked_in_world

    hooked = None
    built: dict[str, ComponentSet] = {}
    pending = list(specs)
    while pending:
        spec = next(s for s in pending if s.match is None or s.match in built)
        pending.remove(spec)
        if spec.source in ("trace", "flu") and hooked is None:
            hooked = hooked_in_world(hf, world)
        target = spec.n_parameters
        if spec.match is not None:
            target = built[spec.match].n_parameters(hf)
        try:
            located = _build(spec, hf, hooked, world, relation, correct)
            if target is not None:
                located = located.match(hf, target, seed=spec.seed)
        except BehemothError as err:
            raise _error(f" ({spec.name})", f"relation {relation}: {err}") from None
        built[spec.name] = located
    return {s.name: built[s.name] for s in specs}


def _build(spec: LocalizationSpec, hf, hooked, world, relation: int, correct) -> ComponentSet:
    """The localization before matching: trace and random at `k` (default 1, grown by match)."""
    k = spec.k or 1
    if spec.source == "trace":
        from behemoth_interp.trace import trace

        facts = correct.facts[correct.top(1)]
        if not len(facts):
            raise InvalidArgument("the model knows none of its facts: there is nothing to trace")
        rng = np.random.default_rng([spec.seed, relation, 17])
        chosen = facts[np.sort(rng.choice(len(facts), min(spec.tuples, len(facts)), replace=False))]
        result = trace(hooked, chosen, sites=("mlp_post", "head"), method=spec.trace,
                       seed=spec.seed)  # fmt: skip
        return src.from_trace(hf, result, k=k)
    if spec.source == "flu":
        from behemoth_interp.probe import flu_layers, probe

        return src.from_flu(hf, flu_layers(probe(hooked, relation, seed=spec.seed)),
                            components=spec.components)  # fmt: skip
    if spec.source == "random":
        return src.random_components(hf, n=k, seed=spec.seed, granularity=spec.granularity)
    if spec.source == "random_mlps":
        return src.random_mlps(hf, n=k, seed=spec.seed)
    return LOCALIZATIONS[spec.source](hf)
