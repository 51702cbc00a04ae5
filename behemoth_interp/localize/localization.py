"""`ComponentSet`: a localization as the components an edit may change, where they came from and
how they scored, matched to a parameter budget as Mechanistic Unlearning does (section 2.2)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool
from torch import Tensor
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.localize.components import COMPONENT_KINDS, Component


@dataclass(frozen=True)
class ComponentSet(JsonConfig):
    """The components an edit may change (`Component`s or their names: 'mlp.0', 'head.1.2').

    `source` names how it was found ('causal_tracing', 'flu', 'random', ...); `candidates` are
    the components it was chosen from (default: the components themselves) and `scores` their
    importance, one per candidate (None for sources without scores). `match` grows or shrinks
    it within the candidates to a parameter budget. Components may not overlap (a head and its
    block's whole attention). Round-trips to JSON with `to_dict` / `from_dict`.
    """

    components: tuple[Component, ...]
    source: str = "manual"
    candidates: tuple[Component, ...] = ()
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        one = isinstance(self.components, str | Component)
        chosen = [Component.parse(c) for c in ((self.components,) if one else self.components)]
        pool = [Component.parse(c) for c in self.candidates] or chosen
        if not chosen:
            raise InvalidArgument(
                "the localization is empty: name at least one component (e.g. 'mlp.0'), or use "
                "nonlocalized(hf) for every block"
            )
        for what, items in (("components", chosen), ("candidates", pool)):
            for i, a in enumerate(items):
                for b in items[i + 1 :]:
                    if a.overlaps(b):
                        raise InvalidArgument(
                            f"{what} {a} and {b} overlap (the same weights): keep one of them"
                        )
        missing = [str(c) for c in chosen if c not in pool]
        if missing:
            raise InvalidArgument(
                f"components {missing} are not among the candidates: add them to candidates"
            )
        scores = None
        if self.scores is not None:
            scores = [float(s) for s in self.scores]
            if len(scores) != len(pool) or not all(math.isfinite(s) for s in scores):
                raise InvalidArgument(
                    f"scores must be {len(pool)} finite numbers, one per candidate, got "
                    f"{list(self.scores)}"
                )
        order = sorted(range(len(pool)), key=lambda i: pool[i].sort_key)
        object.__setattr__(self, "components", tuple(sorted(chosen, key=lambda c: c.sort_key)))
        object.__setattr__(self, "candidates", tuple(pool[i] for i in order))
        object.__setattr__(
            self, "scores", None if scores is None else tuple(scores[i] for i in order)
        )

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components)

    def __len__(self) -> int:
        return len(self.components)

    def __repr__(self) -> str:
        return f"ComponentSet({[c.name for c in self.components]}, source={self.source!r})"

    @property
    def blocks(self) -> tuple[int, ...]:
        """The blocks the components are in, each once."""
        return tuple(sorted({c.layer for c in self.components}))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of component it holds ('mlp', 'attn', 'head'), each once."""
        return tuple(k for k in COMPONENT_KINDS if any(c.kind == k for c in self))

    def check(self, hf: GPTNeoXForCausalLM) -> None:
        """Raise `InvalidArgument` unless every candidate exists in `hf`."""
        for c in self.candidates:
            c.check(hf)

    def masks(self, hf: GPTNeoXForCausalLM) -> dict[str, Bool[Tensor, "..."] | None]:
        """Every HF parameter a component owns, with the mask of the entries the components own
        (None: the whole tensor), in the model's parameter order."""
        merged: dict[str, Tensor | None] = {}
        for c in self.components:
            for name, mask in c.masks(hf).items():
                # components do not overlap, so only heads of one block share a tensor
                merged[name] = mask if name not in merged else mask | merged[name]
        return {name: merged[name] for name, _ in hf.named_parameters() if name in merged}

    def n_parameters(self, hf: GPTNeoXForCausalLM) -> int:
        """How many weights of `hf` the components own: what an edit restricted to them trains."""
        return sum(c.n_parameters(hf) for c in self.components)

    def match(self, hf: GPTNeoXForCausalLM, n_parameters: int, *, seed: int = 0) -> ComponentSet:
        """The localization grown or shrunk, one component at a time, to `n_parameters` weights
        of `hf` (within half the size of the last component it adds or removes; never empty).

        Scored localizations add the best-scored candidate left and remove the lowest-scored
        component; unscored ones draw both seeded by `seed` (Mechanistic Unlearning 2.2: every
        localization gets the same number of trainable parameters).
        """
        check_int("n_parameters", n_parameters, 1)
        sizes = {c: c.n_parameters(hf) for c in self.candidates}
        if n_parameters > sum(sizes.values()):
            raise InvalidArgument(
                f"n_parameters {n_parameters} is more than the {sum(sizes.values())} weights of "
                f"all {len(sizes)} candidates of this {self.source} localization: lower it"
            )
        chosen = set(self.components)
        count = sum(sizes[c] for c in chosen)
        grow = count < n_parameters
        pool = [c for c in self.candidates if (c in chosen) != grow]
        if self.scores is None:
            queue = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
        else:
            score = dict(zip(self.candidates, self.scores))
            queue = sorted(pool, key=lambda c: -score[c] if grow else score[c])
        for c in queue:
            if (count >= n_parameters) if grow else (count <= n_parameters or len(chosen) == 1):
                break
            after = count + (sizes[c] if grow else -sizes[c])
            crosses = after >= n_parameters if grow else after <= n_parameters
            if crosses and abs(after - n_parameters) > abs(count - n_parameters):
                break
            chosen ^= {c}
            count = after
        return ComponentSet(tuple(chosen), self.source, self.candidates, self.scores)

    def to_dataframe(self, hf: GPTNeoXForCausalLM | None = None) -> pd.DataFrame:
        """One row per candidate: component, kind, layer, head (NA off heads), score (NaN when
        unscored), chosen; with `hf`, also its n_parameters."""
        rows = self.candidates
        df = pd.DataFrame({
            "component": [c.name for c in rows],
            "kind": [c.kind for c in rows],
            "layer": [c.layer for c in rows],
            "head": pd.array([c.head for c in rows], "Int64"),
            "score": np.nan if self.scores is None else list(self.scores),
            "chosen": [c in self.components for c in rows],
        })  # fmt: skip
        if hf is not None:
            df["n_parameters"] = [c.n_parameters(hf) for c in rows]
        return df

    def to_dict(self) -> dict[str, Any]:
        return {"components": [c.name for c in self.components], "source": self.source,
                "candidates": [c.name for c in self.candidates],
                "scores": None if self.scores is None else list(self.scores)}  # fmt: skip
