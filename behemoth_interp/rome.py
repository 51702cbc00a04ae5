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

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit import EditTask
from behemoth_interp.errors import Diverged, InvalidArgument
from behemoth_interp.grammar import get_template, render
from behemoth_interp.hooks import Capture, Inputs, Patch, Site, build_inputs, capture
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


ROME_POSITIONS = ("object", "last_subject")
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
    estimated on the world's tuples rendered in them, and δ fit in all of them. cov_sentences:
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

    def __post_init__(self) -> None:
        templates = (self.templates,) if isinstance(self.templates, str) else self.templates
        object.__setattr__(self, "templates", tuple(templates))
        if not self.templates or len(set(self.templates)) != len(self.templates):
            raise InvalidArgument(
                f"templates must name each template once, at least one: got {self.templates}"
            )
        for name in self.templates:
            get_template(name)
        if self.layer < 0:
            raise InvalidArgument(f"layer={self.layer}: blocks count from 0")
        if self.position not in ROME_POSITIONS:
            raise InvalidArgument(
                f"unknown position {self.position!r}: choose one of {', '.join(ROME_POSITIONS)}"
            )
        if self.v_lr <= 0 or self.v_steps < 1 or self.clamp_norm_factor <= 0:
            raise InvalidArgument(
                f"need v_lr > 0, v_steps >= 1 and clamp_norm_factor > 0 (v_lr={self.v_lr}, "
                f"v_steps={self.v_steps}, clamp_norm_factor={self.clamp_norm_factor})"
            )
        if min(self.v_stop_loss, self.kl_factor, self.weight_decay, self.cov_ridge) < 0:
            raise InvalidArgument(
                "v_stop_loss, kl_factor, weight_decay and cov_ridge must be >= 0: got "
                f"{self.v_stop_loss}, {self.kl_factor}, {self.weight_decay}, {self.cov_ridge}"
            )
        if self.cov_sentences is not None and self.cov_sentences < 1:
            raise InvalidArgument(
                f"cov_sentences={self.cov_sentences}: draw at least one, or None for all"
            )


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


# ============================================================================ key statistics
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
    _check_layer(model, layer)
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
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if _feeds_keys(name, layer):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _feeds_keys(name: str, layer: int) -> bool:
    """Whether HookedTransformer parameter `name` can change the keys of block `layer`."""
    if not name.startswith("blocks."):
        return not name.startswith(("unembed.", "ln_final."))
    _, block, rest = name.split(".", 2)
    return int(block) < layer or (int(block) == layer and rest not in ("mlp.W_out", "mlp.b_out"))


def _check_layer(model: HookedTransformer, layer: int) -> None:
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise InvalidArgument(
            f"ROME layer {layer} is not in this model: it has blocks 0..{n - 1}. Pass "
            "rome=RomeConfig(layer=...) or blocks=[...]; at position 'object' the shipped "
            "models edit best at block 3, where probes start to decode the object (bi.flu_layers)"
        )


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
    _check_layer(model, config.layer)
    if config.position == "last_subject" and config.layer == model.cfg.n_layers - 1:
        raise InvalidArgument(
            f"ROME cannot edit through the last block ({config.layer}): its MLP output at the "
            f"last subject token reaches no later position; choose a layer of "
            f"0..{config.layer - 1}"
        )
    world = task.world
    cov = key_covariance(model, world, config.layer, templates=config.templates,
                         n_sentences=config.cov_sentences, seed=config.seed)  # fmt: skip
    ridge = config.cov_ridge * torch.diagonal(cov).mean()
    regularized = cov + ridge * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    touched = np.concatenate([task.facts, task.dependents()[0]])
    updates = []
    for fact, target in zip(task.facts[task.changed], task.targets[task.changed]):
        # at 'object' δ reaches the edited prompt alone: the KL term has nothing to hold
        essence = (_essence(world, int(fact[0]), touched) if config.position == "last_subject"
                   else np.empty((0, 3), np.int64))  # fmt: skip
        update = _fit(model, world, fact, int(target), essence, regularized, config)
        if not torch.isfinite(update.matrix).all():
            raise Diverged(
                f"ROME diverged on tuple {tuple(fact.tolist())}: its update is NaN or infinite "
                f"(v_lr {config.v_lr}); lower RomeConfig.v_lr or cov_ridge's inverse"
            )
        with torch.no_grad():
            model.blocks[config.layer].mlp.W_out += update.matrix
        updates.append(update)
    return updates


def _essence(world: World, subject: int, touched: np.ndarray) -> np.ndarray:
    """The subject's other tuples [m, 3], true objects: every relation with subjects from the
    subject space, but the task's edited (subject, relation) pairs and their dependents."""
    relations = [r for r in range(world.n_relations) if world.subject_space(r) == "subject"]
    pairs = {(int(s), int(r)) for s, r in touched[:, :2]}
    rows = [r for r in relations if (subject, r) not in pairs]
    s = np.full(len(rows), subject)
    return np.stack([s, rows, world.objects_of(s, np.asarray(rows))], 1).astype(np.int64)


@dataclass
class _Group:
    """Prompts of one layout (template and entity spaces) and their unedited run: rows
    `rewrite` hold the edited fact, `mask` [batch, pos] marks where δ is added (the last
    subject token of every row, or the object positions of the edited row)."""

    inputs: Inputs
    rewrite: Tensor
    mask: Tensor
    n_object: int
    base: Capture | None = None


def _groups(
    world: World, tok: WorldTokenizer, facts: np.ndarray, templates, position: str, device
) -> list[_Group]:
    """`facts` (row 0 the edited fact with its new object) rendered whole in every template,
    one batch per layout."""
    spaces = np.array([f"{world.subject_space(r)}/{world.object_space(r)}" for r in facts[:, 1]])
    out = []
    for template in templates:
        for layout in np.unique(spaces):
            rows = np.flatnonzero(spaces == layout)
            n_object = tok.n_tokens(world.object_space(int(facts[rows[0], 1])))
            inputs = build_inputs(world, tok, facts[rows], template=template,
                                  object_tokens=n_object, device=device)  # fmt: skip
            rewrite = torch.as_tensor(rows == 0, device=device)
            if position == "last_subject":
                mask = inputs.positions("last_subject")[1][0].expand(len(rows), -1)
            else:  # the positions whose next token is an object token, edited row only
                at = torch.zeros(inputs.n_pos, dtype=torch.bool, device=device)
                at[inputs.n_pos - n_object - 1 : inputs.n_pos - 1] = True
                mask = rewrite[:, None] & at
            out.append(_Group(inputs, rewrite, mask, n_object))
    return out


def _fit(
    model: HookedTransformer, world: World, fact: np.ndarray, target: int, essence: np.ndarray,
    regularized: Tensor, config: RomeConfig,
) -> RomeUpdate:  # fmt: skip
    """k* (ROME's compute_u, with the r-ROME key), v* (compute_v) and the update of one tuple."""
    started = time.perf_counter()
    L = config.layer
    device = next(model.parameters()).device
    edited = np.array([[fact[0], fact[1], target]], dtype=np.int64)
    groups = _groups(world, WorldTokenizer(world.config), np.concatenate([edited, essence]),
                     config.templates, config.position, device)  # fmt: skip
    sites = [Site("resid_pre", L), Site("mlp_post", L), Site("mlp_out", L)]
    for g in groups:
        g.base = capture(model, g.inputs.tokens, sites)
    with torch.no_grad():
        keys = [g.base[sites[1]][g.rewrite][:, g.mask[g.rewrite][0]]
                for g in groups if g.rewrite.any()]  # fmt: skip
        key = torch.cat(keys)  # [rows, positions, d_mlp]
        # ROME averages the subject's key over prompts; object positions keep one key each
        key = key.mean((0, 1)) if config.position == "last_subject" else key.flatten(0, 1)
        mlp = model.blocks[L].mlp
        value = key @ mlp.W_out + mlp.b_out
    delta, steps, terms = _optimize_delta(model, groups, value, config)
    K = key.double().reshape(-1, key.shape[-1]).T  # [d_mlp, n_keys]
    solved = torch.linalg.solve(regularized, K)
    gram = K.T @ solved
    left = (solved @ torch.linalg.solve(gram, torch.ones(len(gram), dtype=gram.dtype))).float()
    return RomeUpdate((int(fact[0]), int(fact[1]), int(fact[2])), target, L, key, value + delta,
                      left, delta, steps, float(terms[0]), float(terms[2]),
                      time.perf_counter() - started)  # fmt: skip


def _optimize_delta(
    model: HookedTransformer, groups: list[_Group], value: Tensor, config: RomeConfig
) -> tuple[Float[Tensor, " d_model"], int, Tensor]:
    """ROME's v* search: Adam on δ, added to the MLP output where each group's mask says (the
    last subject token of every prompt, or the edited prompt's object positions; through
    `hooks.patch`, resuming at block L), with its norm clamped. Returns δ, the Adam steps taken
    and the final [NLL, kl_factor · KL, KL]."""
    L = config.layer
    resid, out = Site("resid_pre", L), Site("mlp_out", L)
    # the objective's terms are means over all groups: each group's sum is divided by the totals
    n_nll = sum(int(g.rewrite.sum()) * g.n_object for g in groups)
    n_kl = max(1, sum(int((~g.rewrite).sum()) * g.n_object for g in groups))
    streams = [g.base[resid].clone() for g in groups]
    outputs = [g.base[out].clone() for g in groups]
    before = [_object_logp(g.base.logits, g) for g in groups]
    delta = torch.zeros(model.cfg.d_model, device=value.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.v_lr)
    scale = value.norm(dim=-1).mean()  # |v|, averaged over the keys
    max_norm = config.clamp_norm_factor * scale
    steps = 0
    while True:
        grad = torch.zeros_like(delta)
        terms = torch.zeros(3, device=value.device)
        for g, stream, output, logp0 in zip(groups, streams, outputs, before):
            run = capture(
                model, g.inputs.tokens, [out], start_layer=L, resid=stream,
                patches=[Patch(out, output + delta.detach(), g.mask)],
                grad_of=lambda logits, g=g, logp0=logp0: _terms(logits, g, logp0, n_nll, n_kl,
                                                                  config.kl_factor),
            )  # fmt: skip
            grad += run.grads[out][g.mask].sum(0)
            terms += run.value
        decay = config.weight_decay * delta.norm() / scale**2
        if float(terms[:2].sum() + decay.detach()) < config.v_stop_loss or steps == config.v_steps:
            return delta.detach(), steps, terms
        opt.zero_grad()
        decay.backward()
        delta.grad += grad
        opt.step()
        steps += 1
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta *= max_norm / delta.norm()


def _object_logp(logits: Tensor, g: _Group) -> Float[Tensor, "batch object vocab"]:
    """Log-probabilities of the next token at the positions that predict the object's tokens."""
    return logits[:, -g.n_object - 1 : -1].float().log_softmax(-1)


def _terms(logits, g: _Group, logp0, n_nll: int, n_kl: int, kl_factor: float) -> Tensor:
    """[NLL of the new object on the edited rows, kl_factor · KL(before ‖ now) on the others,
    the KL itself (detached: reported, not differentiated)], each this group's share of the
    mean over all groups."""
    logp = _object_logp(logits, g)
    targets = g.inputs.tokens[:, -g.n_object :]
    nll = -logp[g.rewrite].gather(-1, targets[g.rewrite, :, None]).sum() / n_nll
    keep = ~g.rewrite
    kl = (logp0[keep].exp() * (logp0[keep] - logp[keep])).sum() / n_kl
    return torch.stack([nll, kl_factor * kl, kl.detach()])
