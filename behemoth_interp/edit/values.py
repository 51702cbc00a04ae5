"""The value search the locate-then-edit methods share: the δ that, added to block L's MLP
output at an edit's key positions, makes the model say the new object (ROME's compute_v,
MEMIT's compute_z), fit by Adam through the hook layer with ROME's loss and norm clamp."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import augment_templates, get_template
from behemoth_interp.hooks import Capture, Inputs, Patch, Site, build_inputs, capture
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


KEY_POSITIONS = ("object", "last_subject")
"""Where the locate-then-edit methods read their keys: the positions that predict the object,
or the last subject token."""


@dataclass
class Group:
    """Prompts of one layout (template and entity spaces) and their unedited run: rows
    `rewrite` hold the edited fact, `mask` [batch, pos] marks where δ is added (the last
    subject token of every row, or the object positions of the edited row)."""

    inputs: Inputs
    rewrite: Tensor
    mask: Tensor
    n_object: int
    base: Capture | None = None


def groups(
    world: World, tok: WorldTokenizer, facts: np.ndarray, templates, position: str, device
) -> list[Group]:
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
            out.append(Group(inputs, rewrite, mask, n_object))
    return out


def edit_groups(
    model: HookedTransformer, world: World, edited: np.ndarray, essence: np.ndarray, templates,
    position: str, sites: list[Site],
) -> list[Group]:  # fmt: skip
    """`groups` of one edit, `edited` [1, 3] (the tuple with its new object) then `essence`
    (the prompts the KL term holds), with their unedited run captured at `sites`."""
    device = next(model.parameters()).device
    batches = groups(world, WorldTokenizer(world.config), np.concatenate([edited, essence]),
                     templates, position, device)  # fmt: skip
    for g in batches:
        g.base = capture(model, g.inputs.tokens, sites)
    return batches


def read_keys(
    batches: list[Group], site: Site, position: str, runs: list[Capture] | None = None
) -> Float[Tensor, "*keys d"]:
    """`site`'s activations at the edited rows' key positions, from each group's unedited run
    (or from `runs`, one per group): at 'last_subject' one key averaged over the prompts (ROME
    averages the subject's key over prompts) [d], at 'object' one per prompt and position
    [keys, d]."""
    runs = [g.base for g in batches] if runs is None else runs
    with torch.no_grad():
        key = torch.cat([run[site][g.rewrite][:, g.mask[g.rewrite][0]]
                         for g, run in zip(batches, runs) if g.rewrite.any()])  # fmt: skip
        # [rows, positions, d]
        return key.mean((0, 1)) if position == "last_subject" else key.flatten(0, 1)


def essence(world: World, subject: int, touched: np.ndarray) -> np.ndarray:
    """The subject's other tuples [m, 3], true objects: every relation with subjects from the
    subject space, but the task's edited (subject, relation) pairs and their dependents."""
    relations = [r for r in range(world.n_relations) if world.subject_space(r) == "subject"]
    pairs = {(int(s), int(r)) for s, r in touched[:, :2]}
    rows = [r for r in relations if (subject, r) not in pairs]
    s = np.full(len(rows), subject)
    return np.stack([s, rows, world.objects_of(s, np.asarray(rows))], 1).astype(np.int64)


class ValueSettings(Protocol):
    """The settings of the δ search (ROME's): where the key is read (`position`) and in which
    `templates`, Adam's lr and step budget, the loss to stop at, the KL and norm-decay weights
    and the norm clamp, as multiples of ‖v‖."""

    position: str
    templates: tuple[str, ...]
    v_lr: float
    v_steps: int
    v_stop_loss: float
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float


def prompt_templates(config) -> tuple[str, ...]:
    """The templates the δ search states an edit in: the config's `templates`, then its
    `paraphrases` (the first k augmentation paraphrases: paraphrase-augmented editing,
    Retention paper section 5.1). The key statistics stay on `templates`, the model's grammar."""
    return (*config.templates, *augment_templates(config.paraphrases))


def check_settings(config) -> None:
    """Validate what the configs of ROME, MEMIT and AlphaEdit share (from their
    `__post_init__`): `templates` (a name becomes a tuple), `position`, the δ search's
    `ValueSettings`, `cov_sentences` and `cov_ridge` (where the config has one)."""
    templates = (config.templates,) if isinstance(config.templates, str) else config.templates
    object.__setattr__(config, "templates", tuple(templates))
    if not config.templates or len(set(config.templates)) != len(config.templates):
        raise InvalidArgument(
            f"templates must name each template once, at least one: got {config.templates}"
        )
    for name in config.templates:
        get_template(name)
    if set(config.templates) & set(augment_templates(config.paraphrases)):
        raise InvalidArgument(
            f"templates {config.templates} already name some of the {config.paraphrases} "
            "augmentation paraphrases: name them in one place"
        )
    if config.position not in KEY_POSITIONS:
        raise InvalidArgument(
            f"unknown position {config.position!r}: choose one of {', '.join(KEY_POSITIONS)}"
        )
    if config.v_lr <= 0 or config.v_steps < 1 or config.clamp_norm_factor <= 0:
        raise InvalidArgument(
            f"need v_lr > 0, v_steps >= 1 and clamp_norm_factor > 0 (v_lr={config.v_lr}, "
            f"v_steps={config.v_steps}, clamp_norm_factor={config.clamp_norm_factor})"
        )
    ridge = getattr(config, "cov_ridge", 0.0)
    if min(config.v_stop_loss, config.kl_factor, config.weight_decay, ridge) < 0:
        raise InvalidArgument(
            "v_stop_loss, kl_factor, weight_decay and cov_ridge must be >= 0: got "
            f"{config.v_stop_loss}, {config.kl_factor}, {config.weight_decay}, {ridge}"
        )
    if config.cov_sentences is not None and config.cov_sentences < 1:
        raise InvalidArgument(
            f"cov_sentences={config.cov_sentences}: draw at least one, or None for all"
        )


@dataclass
class ValueFit:
    """The δ search of one edit at block `layer`: its prompt `groups` (with their unedited
    run), the key k* at the key positions, the old MLP output `value` = W_out^T k* + b_out
    there, `delta` δ, the Adam `steps` taken and the final `terms` [NLL, weighted KL, KL]."""

    groups: list[Group]
    key: Float[Tensor, "*keys d_mlp"]
    value: Float[Tensor, "*keys d_model"]
    delta: Float[Tensor, " d_model"]
    steps: int
    terms: Tensor


def fit_value(
    model: HookedTransformer, world: World, fact: np.ndarray, target: int, essence: np.ndarray,
    layer: int, config: ValueSettings, *, sites: tuple[Site, ...] = (),
) -> ValueFit:  # fmt: skip
    """ROME's compute_v (MEMIT's compute_z) for one tuple `fact` -> `target` at block `layer`:
    the prompts of the edit and of `essence`, their unedited run (also at `sites`), the key,
    the old value and the δ that `optimize_delta` finds."""
    L = layer
    needed = [Site("resid_pre", L), Site("mlp_post", L), Site("mlp_out", L)]
    edited = np.array([[fact[0], fact[1], target]], dtype=np.int64)
    batches = edit_groups(model, world, edited, essence, prompt_templates(config),
                          config.position, needed + [s for s in sites if s not in needed])  # fmt: skip
    key = read_keys(batches, needed[1], config.position)
    with torch.no_grad():
        mlp = model.blocks[L].mlp
        value = key @ mlp.W_out + mlp.b_out
    delta, steps, terms = optimize_delta(model, batches, value, L, config)
    return ValueFit(batches, key, value, delta, steps, terms)


def optimize_delta(
    model: HookedTransformer, groups: list[Group], value: Tensor, layer: int,
    config: ValueSettings,
) -> tuple[Float[Tensor, " d_model"], int, Tensor]:  # fmt: skip
    """ROME's v* search: Adam on δ, added to the MLP output where each group's mask says (the
    last subject token of every prompt, or the edited prompt's object positions; through
    `hooks.patch`, resuming at block L), with its norm clamped. Returns δ, the Adam steps taken
    and the final [NLL, kl_factor · KL, KL]."""
    L = layer
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


def _object_logp(logits: Tensor, g: Group) -> Float[Tensor, "batch object vocab"]:
    """Log-probabilities of the next token at the positions that predict the object's tokens."""
    return logits[:, -g.n_object - 1 : -1].float().log_softmax(-1)


def _terms(logits, g: Group, logp0, n_nll: int, n_kl: int, kl_factor: float) -> Tensor:
    """[NLL of the new object on the edited rows, kl_factor · KL(before ‖ now) on the others,
    the KL itself (detached: reported, not differentiated)], each this group's share of the
    mean over all groups."""
    logp = _object_logp(logits, g)
    targets = g.inputs.tokens[:, -g.n_object :]
    nll = -logp[g.rewrite].gather(-1, targets[g.rewrite, :, None]).sum() / n_nll
    keep = ~g.rewrite
    kl = (logp0[keep].exp() * (logp0[keep] - logp[keep])).sum() / n_kl
    return torch.stack([nll, kl_factor * kl, kl.detach()])
