"""Where localizations come from: the output tracing, fact lookup and baseline localizations of
Mechanistic Unlearning (section 2.2), each a constructor registered in `LOCALIZATIONS` by name.

Every constructor takes the HF model it localizes (its blocks and heads, and the weights that
`n_parameters=` counts) and returns a `ComponentSet`. Given `n_parameters`, the localization
is grown or shrunk to that many weights (`ComponentSet.match`), so localizations of different
sources can be compared at the same trainable-parameter count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from behemoth_interp.errors import InvalidArgument, check_int
from behemoth_interp.localize.components import COMPONENT_KINDS, Component
from behemoth_interp.localize.localization import ComponentSet

if TYPE_CHECKING:
    from behemoth_interp.probe import Localization
    from behemoth_interp.trace import TraceResult

LOCALIZATIONS: dict[str, Callable[..., ComponentSet]] = {}
"""The localization constructors by name: 'trace', 'flu', 'random', 'random_mlps', 'all_mlps',
'nonlocalized'."""

_TRACED = {"mlp_post": "mlp", "mlp_out": "mlp", "attn_out": "attn", "head": "head"}
"""The trace sites that score a component kind (the residual stream scores none)."""


def _source(name: str):
    def register(fn: Callable[..., ComponentSet]) -> Callable[..., ComponentSet]:
        LOCALIZATIONS[name] = fn
        return fn

    return register


def _every(hf: GPTNeoXForCausalLM, kind: str) -> list[Component]:
    """Every component of `kind` in `hf`, block by block (and head by head)."""
    layers, heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    if kind == "head":
        return [Component("head", b, h) for b in range(layers) for h in range(heads)]
    return [Component(kind, b) for b in range(layers)]


def _sized(localization: ComponentSet, hf, n_parameters: int | None, seed: int = 0):
    localization.check(hf)
    return localization if n_parameters is None else localization.match(hf, n_parameters, seed=seed)


def _one_size(k: int | None, n_parameters: int | None, k_name: str) -> None:
    if (k is None) == (n_parameters is None):
        raise InvalidArgument(
            f"give {k_name} (components) or n_parameters (weights), exactly one of them"
        )


@_source("trace")
def from_trace(
    hf: GPTNeoXForCausalLM, result: TraceResult, *, k: int | None = None,
    n_parameters: int | None = None, kinds: tuple[str, ...] | None = None,
) -> ComponentSet:  # fmt: skip
    """Output tracing (OT): the top components by a causal or attribution trace of `hf`.

    A component's score is its largest |mean score| over position groups (and over the sites
    that score it: 'mlp_post'/'mlp_out' an MLP, 'attn_out' an attention, 'head' a head;
    Mechanistic Unlearning 2.2 keeps |S(c)| > tau). `kinds` picks the kinds ranked (default:
    every traced kind, heads instead of whole attentions when both are traced). Keeps the best
    `k` components, or grows from the best one to `n_parameters` weights.
    """
    _one_size(k, n_parameters, "k")
    traced = {_TRACED[s] for s in result.sites if s in _TRACED}
    if kinds is None:
        kinds = tuple(c for c in COMPONENT_KINDS if c in traced)
        kinds = tuple(c for c in kinds if c != "attn") if "head" in kinds else kinds
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(c not in traced for c in kinds):
        raise InvalidArgument(
            f"this trace scores components {sorted(traced)}, not {list(kinds)}: trace sites "
            "'mlp_post' or 'mlp_out' (MLPs), 'attn_out' (attentions) or 'head' (heads)"
        )
    if result.n_layers != hf.config.num_hidden_layers:
        raise InvalidArgument(
            f"the trace has {result.n_layers} layers, the model {hf.config.num_hidden_layers}: "
            "trace the model you localize"
        )
    mean = result.mean
    best: dict[str, torch.Tensor] = {}
    for site, kind in _TRACED.items():
        if site in mean and kind in kinds:
            score = mean[site].abs().amax(1).reshape(-1)  # over positions: [layer (* head)]
            best[kind] = score if kind not in best else torch.maximum(best[kind], score)
    candidates = [c for kind in kinds for c in _every(hf, kind)]
    scores = torch.cat([best[kind] for kind in kinds]).tolist()
    if len(scores) != len(candidates):
        raise InvalidArgument(
            f"the trace scores {len(scores)} components, the model has {len(candidates)} of "
            f"kinds {list(kinds)}: trace the model you localize"
        )
    order = np.argsort(-np.asarray(scores), kind="stable")
    if k is not None:
        check_int("k", k, 1, len(candidates))
    top = [candidates[i] for i in order[: 1 if k is None else k]]
    source = "attribution_patching" if result.config.method == "attribution" else "causal_tracing"
    return _sized(ComponentSet(tuple(top), source, tuple(candidates), tuple(scores)), hf,
                  n_parameters)  # fmt: skip


@_source("flu")
def from_flu(
    hf: GPTNeoXForCausalLM, localization: Localization, *,
    components: str | tuple[str, ...] = "mlp", n_parameters: int | None = None,
) -> ComponentSet:  # fmt: skip
    """Fact lookup (FLU): the `components` ('mlp', the paper's choice; 'attn' or 'both') of the
    blocks of a probe localization (`bi.flu_layers`), each scored by its block's probe
    accuracy gain, so that `n_parameters` grows it by the next-best block's."""
    from behemoth_interp.edit.selection import selection  # edit's methods import this package

    blocks, comps = selection(hf, localization.blocks, components)
    if len(localization.gains) != hf.config.num_hidden_layers:
        raise InvalidArgument(
            f"the probe localization has {len(localization.gains)} blocks, the model "
            f"{hf.config.num_hidden_layers}: probe the model you localize"
        )
    candidates = [Component(kind, b) for b in range(len(localization.gains)) for kind in comps]
    scores = [float(localization.gains[c.layer]) for c in candidates]
    chosen = tuple(c for c in candidates if c.layer in blocks)
    return _sized(ComponentSet(chosen, "flu", tuple(candidates), tuple(scores)), hf, n_parameters)


def _random(hf, pool: list[Component], n, n_parameters, seed: int, source: str) -> ComponentSet:
    _one_size(n, n_parameters, "n")
    if n is not None:
        check_int("n", n, 1, len(pool))
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = tuple(pool[i] for i in order[: 1 if n is None else n])
    return _sized(ComponentSet(chosen, source, tuple(pool)), hf, n_parameters, seed)


@_source("random")
def random_components(
    hf: GPTNeoXForCausalLM, *, n: int | None = None, n_parameters: int | None = None,
    seed: int = 0, granularity: str = "head",
) -> ComponentSet:  # fmt: skip
    """Random: `n` components drawn (seeded) from every MLP and every attention head of `hf`
    (granularity 'head', the paper's components) or every whole attention ('attn'); or drawn
    one by one to `n_parameters` weights."""
    if granularity not in ("head", "attn"):
        raise InvalidArgument(
            f"granularity must be 'head' or 'attn' (the unit of attention), got {granularity!r}"
        )
    pool = _every(hf, "mlp") + _every(hf, granularity)
    return _random(hf, pool, n, n_parameters, seed, "random")


@_source("random_mlps")
def random_mlps(
    hf: GPTNeoXForCausalLM, *, n: int | None = None, n_parameters: int | None = None, seed: int = 0
) -> ComponentSet:
    """Random MLPs: `n` blocks' MLPs drawn (seeded), or drawn one by one to `n_parameters`
    weights; the baseline that asks whether training MLPs alone explains a localization."""
    return _random(hf, _every(hf, "mlp"), n, n_parameters, seed, "random_mlps")


@_source("all_mlps")
def all_mlps(hf: GPTNeoXForCausalLM) -> ComponentSet:
    """All MLPs: every block's MLP."""
    return ComponentSet(tuple(_every(hf, "mlp")), "all_mlps")


@_source("nonlocalized")
def nonlocalized(hf: GPTNeoXForCausalLM) -> ComponentSet:
    """Nonlocalized: every block's MLP and attention (layer norms and embeddings stay frozen,
    as in every fine-tuning edit)."""
    return ComponentSet(tuple(_every(hf, "mlp") + _every(hf, "attn")), "nonlocalized")
