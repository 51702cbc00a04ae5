"""MEMIT: a batch of edits spread over a range of MLP layers (Meng et al. 2023).

Each edited tuple gets its δ at the last layer L of the range, as ROME's v* (`values.fit_value`:
added to block L's MLP output at the key positions it makes the model say the new object), so
its target is z = the residual stream leaving block L there + δ. The layers are then edited in
ascending order; at layer l, with the weights the earlier layers left (MEMIT eqs. 14-16):

    K_l  the keys (`Site("mlp_post", l)`) of every edit at its key positions   [n, d_mlp]
    R_l  (z - the stream leaving block L now) / (layers left, l included)      [n, d_model]
    ΔW_out(l) = (λ C_l + K_lᵀ K_l)⁻¹ K_lᵀ R_l                                   [d_mlp, d_model]

in TransformerLens' layout (W_out [d_mlp, d_model]; the HF dense_4h_to_h weight moves by the
transpose). C_l = E[k kᵀ] over the world's sentences with ROME's ridge (`regularized_covariance`)
and λ is MEMIT's mom2 weight, `cov_weight`: the update minimizes λ‖ΔW‖²_C + ‖K_l ΔW - R_l‖², so
λ weighs how much the world's other keys may move against how much of R_l is written. With one
layer and one key this is ROME's update scaled by s / (λ + s), s = kᵀC⁻¹k (Sherman-Morrison; see
tests/test_memit.py). The covariances are those of the unedited model, estimated once and kept in
the sequential mode's memory: editing layer l changes the keys of the layers above it.
At position 'object' there is one key per position that predicts an object token (one δ each
edit); at 'last_subject' one key and one target per edit, averaged over the templates (MEMIT
averages over context prefixes), and δ's loss holds the subject's other facts by ROME's KL term.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.methods.rome import regularized_covariance
from behemoth_interp.edit.registry import Method, Where, register
from behemoth_interp.edit.selection import block_list, selection
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.edit.values import check_settings, essence, fit_value, read_keys
from behemoth_interp.errors import Diverged, InvalidArgument, check_int, check_range
from behemoth_interp.hooks import STREAM_PARTS, Site, capture
from behemoth_interp.model import hooked_in_world

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class LocateConfig(JsonConfig):
    """What the configs of MEMIT and AlphaEdit share. layers: consecutive blocks whose MLP
    output weights change, δ fit at the last. position: where keys are read, 'object' or
    'last_subject' (as ROME's). The δ search's settings (v_lr ... clamp_norm_factor) are ROME's
    (`RomeConfig`), as are templates, paraphrases, cov_sentences and seed (the key statistics'
    estimate)."""

    layers: tuple[int, ...] = (2, 3, 4)
    position: str = "object"
    v_lr: float = 3.0
    v_steps: int = 200
    v_stop_loss: float = 0.05
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    templates: tuple[str, ...] = ("paper",)
    cov_sentences: int | None = 1000
    seed: int = 0
    paraphrases: int = 0

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, int | np.integer) else self.layers
        object.__setattr__(self, "layers", tuple(layers))
        check_layers(self.layers)
        check_settings(self)


@dataclass(frozen=True)
class MemitConfig(LocateConfig):
    """How MEMIT edits (`LocateConfig`'s fields, and): cov_weight, λ in (λ C + KᵀK), MEMIT's
    mom2 weight; cov_ridge, ROME's ridge on C (`RomeConfig`).

    layers and cov_weight were measured on the shipped independent model: batched edits of
    single overrides and ten_different tasks (n=10), seeds 0-2, success top-1 / remaining
    accuracy on 1,000 sampled unchanged tuples (1.000 before every edit):

        λ      layers      single          ten_different
        100    (3, 4)      1.000 / 1.0000  0.967 / 0.9960
        100    (2, 3)      1.000 / 0.9983  1.000 / 0.9943
        100    (2, 3, 4)   1.000 / 0.9980  1.000 / 0.9973   <- the default
        100    (1, 2, 3)   1.000 / 0.9957  1.000 / 0.9840
        300    (2, 3, 4)   1.000 / 0.9980  0.967 / 0.9977
        1000   (3, 4)      1.000 / 1.0000  0.967 / 0.9983
        1000   (2, 3)      1.000 / 0.9990  0.967 / 0.9963
        1000   (2, 3, 4)   1.000 / 0.9993  0.967 / 0.9987
        1000   (1, 2, 3)   1.000 / 0.9973  0.967 / 0.9930
        10000  any above   0.667           0.30-0.53

    (2, 3, 4) at λ = 100 is the best success, then remaining accuracy. Here s = kᵀC⁻¹k of an
    edit's key is ~10³-10⁴, so λ = 10⁴ writes only part of the residual and edits fail; the
    micro model's keys (d_mlp 256) have s ~ 10², so it wants λ ~ 10-100.
    """

    cov_weight: float = 100.0
    cov_ridge: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("cov_weight", self.cov_weight, 0, low_open=True)


def check_layers(layers: tuple[int, ...], n_layers: int | None = None) -> None:
    """`layers` must be consecutive ascending block indices (of 0..n_layers-1 if given)."""
    if not layers:
        raise InvalidArgument("layers is empty: name at least one block, e.g. layers=(2, 3, 4)")
    for layer in layers:
        check_int("layers", layer, 0)
    if any(b != a + 1 for a, b in zip(layers, layers[1:])):
        raise InvalidArgument(
            f"layers={tuple(layers)} are not consecutive: MEMIT spreads an edit over a range "
            f"of blocks, e.g. layers={tuple(range(min(layers), max(layers) + 1))}"
        )
    if n_layers is not None and layers[-1] >= n_layers:
        raise InvalidArgument(
            f"layers={tuple(layers)} are not all in this model: it has blocks 0..{n_layers - 1}"
        )


@dataclass
class MemitEdit:
    """One applied MEMIT (or AlphaEdit) edit of a batch: `facts` [n, 3] -> `targets` [n],
    per tuple its δ at the last layer (`deltas` [n, d_model], `steps`, final `nll`), per layer
    the keys, the residuals and the update ΔW_out (TransformerLens layout) it wrote."""

    facts: np.ndarray
    targets: np.ndarray
    layers: tuple[int, ...]
    deltas: Float[Tensor, "n d_model"]
    steps: list[int]
    nll: list[float]
    keys: dict[int, Tensor] = field(default_factory=dict)
    residuals: dict[int, Tensor] = field(default_factory=dict)
    updates: dict[int, Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The edit's scalars (no tensors), for an edit report's settings."""
        return {"facts": self.facts.tolist(), "targets": self.targets.tolist(),
                "layers": list(self.layers), "steps": self.steps, "nll": self.nll,
                "delta_norm": self.deltas.norm(dim=-1).tolist(),
                "residual_norm": {str(b): float(r.norm(dim=-1).mean())
                                  for b, r in self.residuals.items()},
                "update_norm": {str(b): float(u.norm()) for b, u in self.updates.items()},
                "seconds": self.seconds}  # fmt: skip


Solve = Callable[[int, Tensor, Tensor], Tensor]
"""(layer, keys [n, d_mlp], residuals [n, d_model], float64) -> ΔW_out [d_mlp, d_model]."""


# ============================================================================ editing
def apply_memit(
    model: HookedTransformer, task: EditTask, config: MemitConfig = MemitConfig(),
    *, memory: dict | None = None,
) -> MemitEdit:  # fmt: skip
    """Edit `model` (a HookedTransformer of the task's world) in place with MEMIT: every tuple
    the task changes at once, spread over `config.layers`. `memory` keeps the unedited model's
    covariances between the calls of a sequence (sequential mode). Tuples whose target is
    already their object (forgetting's object-0 tuples) are skipped. Returns the edit."""
    check_model(model, config)
    memory = {} if memory is None else memory
    covariances = unedited_covariances(model, task, config, memory)

    def solve(layer: int, keys: Tensor, residuals: Tensor) -> Tensor:
        lhs = config.cov_weight * covariances[layer] + keys.T @ keys
        return torch.linalg.solve(lhs, keys.T @ residuals)

    return spread(model, task, config, solve)


def unedited_covariances(model: HookedTransformer, task: EditTask, config, memory: dict
                         ) -> dict[int, Tensor]:  # fmt: skip
    """C_l with ROME's ridge for each layer of the range, of the model as the first call of a
    sequence found it (kept in `memory`): later edits of lower layers change the keys."""
    kept = memory.setdefault("covariances", {})
    settings = (config.templates, config.cov_sentences, config.seed, config.cov_ridge)
    for layer in config.layers:
        if (layer, settings) not in kept:
            kept[layer, settings] = regularized_covariance(model, task.world, config, layer)
    return {layer: kept[layer, settings] for layer in config.layers}


def check_model(model: HookedTransformer, config) -> None:
    """The config's layers must be in the model, and end below its last block at the last
    subject token (an MLP output there reaches no later position)."""
    check_layers(config.layers, model.cfg.n_layers)
    last = config.layers[-1]
    if config.position == "last_subject" and last == model.cfg.n_layers - 1:
        raise InvalidArgument(
            f"at the last subject token the layers cannot end in the last block ({last}): its "
            f"MLP output there reaches no later position; end the range below {last}"
        )


def spread(model: HookedTransformer, task: EditTask, config, solve: Solve) -> MemitEdit:
    """MEMIT's loop (module docstring): one δ per changed tuple at the last layer, then each
    layer in turn gets `solve(layer, K_l, R_l)` added to its W_out."""
    started = time.perf_counter()
    check_model(model, config)
    world, layers, last = task.world, config.layers, config.layers[-1]
    changed = task.changed
    facts, targets = task.facts[changed], task.targets[changed]
    touched = np.concatenate([task.facts, task.dependents()[0]])
    stream = tuple(Site(kind, last) for kind in STREAM_PARTS)
    keys_at = {layer: Site("mlp_post", layer) for layer in layers}
    fits = []
    for fact, target in zip(facts, targets):
        held = (essence(world, int(fact[0]), touched) if config.position == "last_subject"
                else np.empty((0, 3), np.int64))  # fmt: skip
        fits.append(fit_value(model, world, fact, int(target), held, last, config,
                              sites=(*stream, *keys_at.values())))  # fmt: skip
    if not fits:
        return MemitEdit(facts, targets, layers, torch.zeros(0, model.cfg.d_model), [], [])
    edit = MemitEdit(facts, targets, layers, torch.stack([f.delta for f in fits]),
                     [f.steps for f in fits], [float(f.terms[0]) for f in fits])  # fmt: skip
    # z: the stream leaving the last layer at each key position, plus that edit's δ
    z = torch.cat([_stream(f.groups, stream, config.position).reshape(-1, model.cfg.d_model)
                   + f.delta for f in fits]).double()  # fmt: skip
    for i, layer in enumerate(layers):
        # the unedited runs serve the first layer; later ones see the updates below them
        runs = [None if i == 0 else [capture(model, g.inputs.tokens, [keys_at[layer], *stream])
                                     for g in f.groups] for f in fits]  # fmt: skip
        keys = torch.cat([read_keys(f.groups, keys_at[layer], config.position, run)
                          .reshape(-1, model.cfg.d_mlp) for f, run in zip(fits, runs)])  # fmt: skip
        now = torch.cat([_stream(f.groups, stream, config.position, run)
                         .reshape(-1, model.cfg.d_model) for f, run in zip(fits, runs)])  # fmt: skip
        residuals = (z - now.double()) / (len(layers) - i)
        update = solve(layer, keys.double(), residuals).float()
        if not torch.isfinite(update).all():
            raise Diverged(
                f"the update of layer {layer} is NaN or infinite (v_lr {config.v_lr}): lower "
                "v_lr, or raise cov_weight (MEMIT) or l2 (AlphaEdit)"
            )
        with torch.no_grad():
            model.blocks[layer].mlp.W_out += update
        edit.keys[layer], edit.residuals[layer], edit.updates[layer] = keys, residuals, update
    edit.seconds = time.perf_counter() - started
    return edit


def _stream(groups, stream: tuple[Site, ...], position: str, runs=None) -> Tensor:
    """The residual stream leaving the last layer at the key positions (`read_keys`' layout)."""
    return sum(read_keys(groups, site, position, runs) for site in stream)


class LocateThenEdit(Method):
    """What MEMIT and AlphaEdit share as methods: `blocks` set the config's `layers`, only MLP
    output weights change, and the edit runs on the HookedTransformer twin of the HF model
    (kept in `memory` across a sequence), whose edited W_out are copied back."""

    where_fields: ClassVar[tuple[str, ...]] = ("layers",)
    modes: ClassVar[tuple[str, ...]] = ("batched", "sequential")

    def where(self, hf, blocks, components, config):
        n = hf.config.num_hidden_layers
        if config is not None:
            self.config_from(config, {})  # a config of another method is refused by name
        _, comps = selection(hf, None, "mlp" if components is None else components)
        if comps != ("mlp",):
            raise InvalidArgument(
                f"{self.name} edits MLP output weights only, got components={components!r}: "
                "pass components='mlp' or leave it out"
            )
        if blocks is not None:
            blocks = tuple(block_list(blocks))
            check_layers(blocks, n)
            if config is not None and config.layers != blocks:
                raise InvalidArgument(
                    f"blocks={list(blocks)} and {self.Config.__name__}.layers={config.layers} "
                    "disagree: give the layers once"
                )
            config = dataclasses.replace(config or self.Config(), layers=blocks)
        config = self.Config() if config is None else config
        check_layers(config.layers, n)
        return Where(config.layers, comps), config

    def apply(self, hf: GPTNeoXForCausalLM, task: EditTask, where: Where, config, *, seed: int,
              memory: dict) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:  # fmt: skip
        twin = memory.get("twin")
        if twin is None:
            twin = memory["twin"] = hooked_in_world(hf, task.world)
        edit = self.edit(twin, task, config, memory)
        with torch.no_grad():
            for layer in config.layers:
                hf.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight.copy_(
                    twin.blocks[layer].mlp.W_out.T
                )
        return hf, {"edit": edit.to_dict(), "skipped": int((~task.changed).sum())}

    def edit(self, model, task: EditTask, config, memory: dict) -> MemitEdit:
        raise NotImplementedError


@register
class Memit(LocateThenEdit):
    """MEMIT (module docstring): a batch at once (batched) or one tuple at a time."""

    name: ClassVar[str] = "memit"
    Config: ClassVar[type] = MemitConfig

    def edit(self, model, task: EditTask, config, memory: dict) -> MemitEdit:
        return apply_memit(model, task, config, memory=memory)
