"""ROME: a rank-one edit of one MLP's output weights (Meng et al. 2022), with the r-ROME fix.

Block L's MLP maps a key k (its post-activation coefficients, `Site("mlp_post", L)`) to a value
W_out^T k + b_out. ROME picks a value v* that makes the model say the new object and changes
W_out by the rank-one update that maps k* to v* while moving the values of the world's other
keys least (C = E[k k^T] over the world's corpus):

    ΔW_out = C⁻¹k* (v* - W_out^T k* - b_out)^T / (k*^T C⁻¹ k*)

The same key k* stands in the numerator and the denominator (r-ROME, Gupta et al. 2024: ROME
uses a prefix-averaged key in one and the bare key in the other, which makes repeated edits
collapse), so the edited MLP maps k* to v* exactly. v* = W_out^T k* + b_out + δ, with δ fit by
Adam as in ROME: added to the MLP output at the key's positions, δ minimizes the new object's
NLL (both object tokens, teacher-forced) + weight_decay · ‖δ‖ / ‖v‖², and ‖δ‖ is clamped to
clamp_norm_factor · ‖v‖. Tasks with several tuples are edited sequentially, one rank-one update
after the other.

Where the key is read (`RomeConfig.position`):
- 'last_subject', ROME's site: k* is averaged over the prompt templates (ROME averages over
  context prefixes), δ is added at the last subject token of every prompt and the loss adds
  kl_factor · KL(before ‖ after) on the subject's other facts (this world's "essence" of s).
  GPT-NeoX blocks are parallel (the MLP reads the block's input, not the attention output), so
  layer-0 keys depend on the last subject token alone: a layer-0 edit moves every subject that
  ends in that token.
- 'object' (the default): where the object is predicted, the last prompt token and every
  object token but the last, one key k_i each; they depend on subject and relation, so they
  name the fact. One δ is added at all of them, in the edited prompt only (so there is no KL
  term), and the update stays rank one, ΔW_out = u (v* - W_out^T k* - b_out)^T with
  u = C⁻¹K (KᵀC⁻¹K)⁻¹ 1 (u · k_i = 1 for every key; for one key, the update above).
The shipped models look facts up at the last prompt token (blocks 3-4, see `probe.flu_layers`),
not at the subject, which reaches it through layer-0 attention from the embeddings: a δ at the
last subject token often cannot make them say the new object (7 of 12 single overrides at
layer 0, none at layers 1-4), while a δ at the object positions of block 3 always did (12 of
12). C is cached in memory only: it takes seconds to estimate.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.covariance import check_layer, key_covariance
from behemoth_interp.edit.registry import Method, Where, register
from behemoth_interp.edit.selection import block_list, selection
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.edit.values import KEY_POSITIONS, check_settings, essence, fit_value
from behemoth_interp.errors import Diverged, InvalidArgument
from behemoth_interp.model import hooked_in_world
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


ROME_POSITIONS = KEY_POSITIONS
"""Where ROME reads its key: the positions that predict the object, or the last subject token."""


@dataclass(frozen=True)
class RomeConfig(JsonConfig):
    """How ROME edits. kl_factor, weight_decay, clamp_norm_factor and v_stop_loss are ROME's
    GPT-2 XL values; layer, position, v_lr and v_steps were measured on the shipped independent
    model (single overrides, seeds 0..11): at the object positions of block 3 every override
    succeeds with remaining accuracy kept; at the last subject token only layer 0 moves the
    object at all (7 of 12; its outputs there are ~250 long, so δ needs larger and more steps).

    layer: the block whose MLP output weights W_out change. position: where the key is read,
    one of `ROME_POSITIONS` (see the module). v_lr, v_steps, v_stop_loss: Adam on δ, at most
    v_steps updates, stopping once the loss is below v_stop_loss. kl_factor, weight_decay,
    clamp_norm_factor: ROME's loss weights and norm bound (see the module; kl_factor acts at
    'last_subject' only). templates: the grammar the model was trained on; the covariance is
    estimated on the world's tuples rendered in them, and δ fit in all of them and in the first
    `paraphrases` augmentation paraphrases (paraphrase-augmented editing). cov_sentences:
    sentences drawn (with `seed`) for the covariance, None for every tuple of the world.
    cov_ridge: C + cov_ridge · mean eigenvalue · I is inverted (layer-0 keys depend on the token
    alone and span few directions). ROME's closed form does not depend on the scale of C, so
    there is no weight on it.
    """

    layer: int = 3
    position: str = "object"
    v_lr: float = 3.0
    v_steps: int = 200
    v_stop_loss: float = 0.05
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    templates: tuple[str, ...] = ("paper",)
    cov_sentences: int | None = 1000
    cov_ridge: float = 1e-3
    seed: int = 0
    paraphrases: int = 0

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise InvalidArgument(f"layer={self.layer}: blocks count from 0")
        check_settings(self)


@dataclass
class RomeUpdate:
    """One applied ROME edit: W_out += outer(`left`, `delta`) in block `layer`.

    `key` is k* ([n_keys, d_mlp] at position 'object'), `value` v* (the MLP output the edited
    weights give k*), `left` C⁻¹k* / (k*ᵀC⁻¹k*) (C⁻¹K (KᵀC⁻¹K)⁻¹ 1 for several keys, so
    key · left = 1), `delta` δ = v* - the old output; `steps` Adam updates were taken and
    `nll` / `kl` are the final losses (nats per object token / per essence position).
    """

    fact: tuple[int, int, int]
    target: int
    layer: int
    key: Float[Tensor, "*keys d_mlp"]
    value: Float[Tensor, "*keys d_model"]
    left: Float[Tensor, " d_mlp"]
    delta: Float[Tensor, " d_model"]
    steps: int
    nll: float
    kl: float
    seconds: float

    @property
    def matrix(self) -> Float[Tensor, "d_mlp d_model"]:
        """ΔW_out in HookedTransformer layout (the HF dense_4h_to_h weight moves by its transpose)."""
        return torch.outer(self.left, self.delta)

    def to_dict(self) -> dict[str, Any]:
        """The update's scalars (no tensors), for an edit report's settings."""
        return {"fact": list(self.fact), "target": self.target, "layer": self.layer,
                "steps": self.steps, "nll": self.nll, "kl": self.kl,
                "delta_norm": float(self.delta.norm()),
                "value_norm": float(self.value.norm(dim=-1).mean()),
                "seconds": self.seconds}  # fmt: skip


# ============================================================================ editing
def apply_rome(
    model: HookedTransformer, task: EditTask, config: RomeConfig = RomeConfig()
) -> list[RomeUpdate]:
    """Edit `model` (a HookedTransformer of the task's world) in place with ROME.

    One rank-one update of `blocks[config.layer].mlp.W_out` per tuple the task changes,
    applied sequentially: each v* is fit on the model the previous updates left (the keys, and
    so the cached covariance, stay the same). Tuples whose target is already their object
    (forgetting's object-0 tuples) are skipped. Returns the updates in order.
    """
    check_layer(model, config.layer)
    if config.position == "last_subject" and config.layer == model.cfg.n_layers - 1:
        raise InvalidArgument(
            f"ROME cannot edit through the last block ({config.layer}): its MLP output at the "
            f"last subject token reaches no later position; choose a layer of "
            f"0..{config.layer - 1}"
        )
    world = task.world
    regularized = regularized_covariance(model, world, config)
    touched = np.concatenate([task.facts, task.dependents()[0]])
    updates = []
    for fact, target in zip(task.facts[task.changed], task.targets[task.changed]):
        # at 'object' δ reaches the edited prompt alone: the KL term has nothing to hold
        held = (essence(world, int(fact[0]), touched) if config.position == "last_subject"
                else np.empty((0, 3), np.int64))  # fmt: skip
        update = _fit(model, world, fact, int(target), held, regularized, config)
        if not torch.isfinite(update.matrix).all():
            raise Diverged(
                f"ROME diverged on tuple {tuple(fact.tolist())}: its update is NaN or infinite "
                f"(v_lr {config.v_lr}); lower RomeConfig.v_lr or cov_ridge's inverse"
            )
        with torch.no_grad():
            model.blocks[config.layer].mlp.W_out += update.matrix
        updates.append(update)
    return updates


def _fit(
    model: HookedTransformer, world: World, fact: np.ndarray, target: int, essence: np.ndarray,
    regularized: Tensor, config: RomeConfig,
) -> RomeUpdate:  # fmt: skip
    """k* (ROME's compute_u, with the r-ROME key), v* (compute_v) and the update of one tuple."""
    started = time.perf_counter()
    fit = fit_value(model, world, fact, target, essence, config.layer, config)
    left = rome_left(regularized, fit.key)
    return RomeUpdate((int(fact[0]), int(fact[1]), int(fact[2])), target, config.layer, fit.key,
                      fit.value + fit.delta, left, fit.delta, fit.steps, float(fit.terms[0]),
                      float(fit.terms[2]), time.perf_counter() - started)  # fmt: skip


def rome_left(regularized: Tensor, key: Tensor) -> Float[Tensor, " d_mlp"]:
    """ROME's left vector u = C⁻¹K (KᵀC⁻¹K)⁻¹ 1 for keys K [n_keys, d_mlp] (one key: C⁻¹k /
    kᵀC⁻¹k), so that u · k_i = 1 for every key and ΔW_out = outer(u, δ) maps each to v*."""
    K = key.double().reshape(-1, key.shape[-1]).T  # [d_mlp, n_keys]
    solved = torch.linalg.solve(regularized, K)
    gram = K.T @ solved
    return (solved @ torch.linalg.solve(gram, torch.ones(len(gram), dtype=gram.dtype))).float()


def regularized_covariance(
    model: HookedTransformer, world: World, config, layer: int | None = None
) -> Tensor:
    """The key covariance of block `layer` (default `config.layer`) with ROME's ridge: C +
    cov_ridge · mean eigenvalue · I (layer-0 keys depend on one token and span few directions)."""
    layer = config.layer if layer is None else layer
    cov = key_covariance(model, world, layer, templates=config.templates,
                         n_sentences=config.cov_sentences, seed=config.seed)  # fmt: skip
    ridge = config.cov_ridge * torch.diagonal(cov).mean()
    return cov + ridge * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)


@register
class Rome(Method):
    """ROME on the HookedTransformer twin of the HF model through the hook layer; the edited
    W_out is copied back. One rank-one update per changed tuple: a multi-tuple task is always
    edited tuple after tuple (MEMIT and AlphaEdit edit a batch at once)."""

    name: ClassVar[str] = "rome"
    Config: ClassVar[type] = RomeConfig
    modes: ClassVar[tuple[str, ...]] = ("sequential",)
    where_fields: ClassVar[tuple[str, ...]] = ("layer",)

    def where(self, hf, blocks, components, config):
        n = hf.config.num_hidden_layers
        if blocks is not None:
            blocks = block_list(blocks)
            if len(blocks) != 1:
                raise InvalidArgument(
                    f"ROME edits the MLP of exactly one block, got blocks={blocks}: pass one block "
                    f"of 0..{n - 1}, e.g. blocks=[0], or None for rome.layer"
                )
            if config is not None and config.layer != blocks[0]:
                raise InvalidArgument(
                    f"blocks={blocks} and rome.layer={config.layer} disagree: give the layer once"
                )
            config = dataclasses.replace(config or RomeConfig(), layer=blocks[0])
        config = RomeConfig() if config is None else config
        layer, comps = selection(hf, [config.layer], "mlp" if components is None else components)
        if comps != ("mlp",):
            raise InvalidArgument(
                f"ROME edits MLP output weights only, got components={components!r}: "
                "pass components='mlp' or leave it out"
            )
        return Where(tuple(layer), comps), config

    def apply(self, hf: GPTNeoXForCausalLM, task: EditTask, where: Where, config, *, seed: int,
              memory: dict) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
        # sequential editing calls this once per tuple: the twin lives on between the calls,
        # and only W_out of one block changes, in both models alike
        twin = memory.get("twin")
        if twin is None:
            twin = memory["twin"] = hooked_in_world(hf, task.world)
        updates = apply_rome(twin, task, config)
        weight = hf.gpt_neox.layers[config.layer].mlp.dense_4h_to_h.weight
        with torch.no_grad():
            weight.copy_(twin.blocks[config.layer].mlp.W_out.T)
        return hf, {"edits": [u.to_dict() for u in updates],
                    "skipped": int((~task.changed).sum())}  # fmt: skip
