"""The key statistics the locate-then-edit methods share: C = E[k kᵀ] of an MLP's keys (its
post-activation coefficients) over the world's own sentences, estimated once per model and
layer and cached, so that ROME, MEMIT and AlphaEdit read the same estimate."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import render
from behemoth_interp.hooks import Site, capture
from behemoth_interp.model import parameters_sha256
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_COVARIANCES: OrderedDict[tuple, Tensor] = OrderedDict()
_CACHE_SIZE = 8


def key_covariance(
    model: HookedTransformer,
    world: World,
    layer: int,
    *,
    templates: tuple[str, ...] = ("paper",),
    n_sentences: int | None = None,
    seed: int = 0,
) -> Float[Tensor, "d_mlp d_mlp"]:
    """Second moment C = E[k kᵀ] of block `layer`'s MLP keys over the world's corpus (float64).

    Keys are `Site("mlp_post", layer)` at every token of `<|endoftext|>` + sentence, for the
    world's tuples rendered in `templates` (one drawn per tuple), `n_sentences` of them drawn
    with `seed` (None: all). Cached in memory (the last 8) under a fingerprint of the weights
    the keys depend on: embeddings, the blocks before `layer` and `layer` but for its W_out and
    b_out, so sequential ROME edits of that W_out reuse it. Do not modify the result in place.
    """
    check_layer(model, layer)
    cache_key = (_fingerprint(model, layer), layer, tuple(templates), n_sentences, seed,
                 json.dumps(world.config.to_dict(), sort_keys=True))  # fmt: skip
    if cache_key in _COVARIANCES:
        _COVARIANCES.move_to_end(cache_key)
        return _COVARIANCES[cache_key]
    tok = WorldTokenizer(world.config)
    rng = np.random.default_rng([seed, 17])
    facts = world.facts()
    if n_sentences is not None and n_sentences < len(facts):
        facts = facts[np.sort(rng.choice(len(facts), n_sentences, replace=False))]
    names = np.asarray(templates, dtype=object)[rng.integers(len(templates), size=len(facts))]
    sent = render(world, tok, facts, names, seed=seed)
    eot = np.full((len(sent), 1), tok.eot_id)
    tokens = np.concatenate([eot, sent.tokens], 1).astype(np.int64)
    real = np.arange(tokens.shape[1])[None, :] <= sent.lengths[:, None]  # EOT + sentence
    device = next(model.parameters()).device
    d_mlp = model.cfg.d_mlp
    total = torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device)
    site = Site("mlp_post", layer)
    for start in range(0, len(tokens), 256):
        rows = slice(start, start + 256)
        x = torch.as_tensor(tokens[rows], device=device)
        keys = capture(model, x, [site])[site][torch.as_tensor(real[rows], device=device)]
        total += keys.double().T @ keys.double()
    cov = total / int(real.sum())
    _COVARIANCES[cache_key] = cov
    while len(_COVARIANCES) > _CACHE_SIZE:
        _COVARIANCES.popitem(last=False)
    return cov


def _fingerprint(model: HookedTransformer, layer: int) -> str:
    """sha256 of every parameter the keys of block `layer` depend on."""
    return parameters_sha256(model, lambda name: _feeds_keys(name, layer))


def _feeds_keys(name: str, layer: int) -> bool:
    """Whether HookedTransformer parameter `name` can change the keys of block `layer`."""
    if not name.startswith("blocks."):
        return not name.startswith(("unembed.", "ln_final."))
    _, block, rest = name.split(".", 2)
    return int(block) < layer or (int(block) == layer and rest not in ("mlp.W_out", "mlp.b_out"))


def check_layer(model: HookedTransformer, layer: int) -> None:
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise InvalidArgument(
            f"ROME layer {layer} is not in this model: it has blocks 0..{n - 1}. Pass "
            "rome=RomeConfig(layer=...) or blocks=[...]; at position 'object' the shipped "
            "models edit best at block 3, where probes start to decode the object (bi.flu_layers)"
        )
