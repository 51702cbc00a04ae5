"""The hook layer: named sites and positions, and the three primitives every analysis uses.

Sites name one activation at one layer (`Site("mlp_post", 2)`, or `"mlp_post.2"`):
- 'resid_pre': the residual stream entering the block  [batch pos d_model]
- 'attn_out':  the attention block's output             [batch pos d_model]
- 'mlp_post':  the MLP's post-activation coefficients   [batch pos d_mlp]
- 'mlp_out':   the MLP block's output                   [batch pos d_model]
- 'head':      each head's output before W_O (hook_z)   [batch pos head d_head]
Model inputs are `<|endoftext|>` + a rendered prompt (`build_inputs`); positions are named from
the sentence's spans ('subject', 'last_subject', 'relation', 'object', 'last', 'all', 'each'),
by token label ('SS', 'subject[1]', 'F0') or given as integer indices into the input.
The primitives are `capture` (activations, and gradients of a scalar, at sites), `patch` (a run
with activations replaced where a per-row mask says) and `swap_params` (another model's
parameters for the duration of a block).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import get_template, render
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

SITE_KINDS = ("resid_pre", "attn_out", "mlp_post", "mlp_out", "head")
"""Every site kind; 'head' activations carry a head axis after pos."""
_HOOK_NAMES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_post": "blocks.{}.mlp.hook_post",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head": "blocks.{}.attn.hook_z",
}
POSITION_NAMES = ("each", "all", "last", "subject", "last_subject", "relation", "object")
"""Named positions: 'each' is one group per input position, the others one group each."""


@dataclass(frozen=True, order=True)
class Site:
    """One activation of one layer: `kind` is one of `SITE_KINDS`."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise InvalidArgument(
                f"unknown site {self.kind!r}: choose one of {', '.join(SITE_KINDS)}"
            )
        if self.layer < 0:
            raise InvalidArgument(f"site {self.kind}.{self.layer}: layers count from 0")

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook point of this site."""
        return _HOOK_NAMES[self.kind].format(self.layer)

    @property
    def has_heads(self) -> bool:
        return self.kind == "head"

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """'mlp_post.2' -> Site('mlp_post', 2)."""
        kind, dot, layer = text.rpartition(".")
        if not dot or not layer.isdigit():
            raise InvalidArgument(
                f"site {text!r} must be '<kind>.<layer>', e.g. 'mlp_post.2', or a bare kind"
            )
        return cls(kind, int(layer))


SiteSpec = str | Site | Iterable[str | Site]
KeysValues = tuple[Float[Tensor, "batch pos head d_head"], Float[Tensor, "batch pos head d_head"]]
"""One block's attention keys (before rotary) and values, as `capture(keep_kv=True)` keeps."""


def resolve_sites(model: HookedTransformer, sites: SiteSpec) -> list[Site]:
    """Sites from a spec: a bare kind ('resid_pre') means every layer, 'resid_pre.3' one layer."""
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    n_layers = model.cfg.n_layers
    out: list[Site] = []
    for item in items:
        if isinstance(item, str) and "." not in item:
            out.extend(Site(item, layer) for layer in range(n_layers))
            continue
        site = item if isinstance(item, Site) else Site.parse(item)
        if site.layer >= n_layers:
            raise InvalidArgument(
                f"site {site} is out of range: the model has layers 0..{n_layers - 1}"
            )
        out.append(site)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Inputs:
    """Model inputs for tuples in one layout: `<|endoftext|>` + prompt + fed object tokens.

    `spans` give (start, end) in input coordinates (the leading `<|endoftext|>` is position 0),
    `labels` name every position by its template part ('SS', 'subject[0]', 'F0', ...).
    """

    tokens: Int[Tensor, "batch pos"]
    facts: np.ndarray
    spans: dict[str, tuple[int, int]]
    labels: tuple[str, ...]

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[1]

    def positions(
        self, spec: str | int | Sequence[str | int]
    ) -> tuple[tuple[str, ...], Bool[Tensor, "group pos"]]:
        """Position groups of a spec, as (labels, mask [group, pos]).

        A name ('subject', 'last', ...), a token label ('SS', 'subject[1]') or an int (index into
        the input, negatives from the end) is one group; 'each' expands to one group per
        position; a list concatenates groups.
        """
        items = [spec] if isinstance(spec, (str, int)) else list(spec)
        labels: list[str] = []
        rows: list[np.ndarray] = []
        for item in items:
            if item == "each":
                labels.extend(self.labels)
                rows.extend(np.eye(self.n_pos, dtype=bool))
                continue
            mask = np.zeros(self.n_pos, dtype=bool)
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if not -self.n_pos <= item < self.n_pos:
                    raise InvalidArgument(
                        f"position {item} is out of range: inputs have {self.n_pos} positions "
                        f"(0..{self.n_pos - 1}, or -{self.n_pos}..-1 from the end)"
                    )
                mask[item] = True
                labels.append(self.labels[item])
            else:
                mask[self._named(str(item))] = True
                labels.append(str(item))
            rows.append(mask)
        if not rows:
            raise InvalidArgument("no positions given: name at least one, e.g. positions='each'")
        return tuple(labels), torch.as_tensor(np.stack(rows), device=self.tokens.device)

    def _named(self, name: str) -> slice:
        spans = self.spans
        if name == "all":
            return slice(0, self.n_pos)
        if name == "last":
            return slice(self.n_pos - 1, self.n_pos)
        if name == "last_subject":
            return slice(spans["subject"][1] - 1, spans["subject"][1])
        if name in spans and spans[name][1] > spans[name][0]:
            return slice(*spans[name])
        if name in self.labels:
            i = self.labels.index(name)
            return slice(i, i + 1)
        known = [p for p in POSITION_NAMES if p != "object" or "object" in spans] + [
            k for k in spans if k not in POSITION_NAMES
        ]
        raise InvalidArgument(
            f"unknown position {name!r}: choose one of {', '.join(known)}, a token label "
            f"({', '.join(self.labels)}) or an int"
        )


def build_inputs(
    world: World,
    tokenizer: WorldTokenizer,
    facts: np.ndarray,
    *,
    template: str = "paper",
    object_tokens: int = 0,
    device: str | torch.device = "cpu",
) -> Inputs:
    """`<|endoftext|>` + each tuple's prompt + its first `object_tokens` object tokens.

    All tuples must render in one layout (one template; relations whose entities have the same
    token counts), so the batch needs no padding and positions mean the same in every row.
    """
    facts = np.asarray(facts, dtype=np.int64).reshape(-1, 3)
    if not len(facts):
        raise InvalidArgument(
            "no tuples given: pass an array [n, 3] of (subject, relation, object)"
        )
    sent = render(world, tokenizer, facts, template)
    if not sent.uniform:
        raise InvalidArgument(
            "these tuples render with different layouts (their relations' entities have different "
            "token counts): pass the relations of one kind at a time"
        )
    obj_start, obj_end = (int(x) for x in sent.spans["object"][0])
    if not 0 <= object_tokens <= obj_end - obj_start:
        raise InvalidArgument(
            f"object_tokens={object_tokens}: objects here have {obj_end - obj_start} tokens"
        )
    length = obj_start + object_tokens
    tokens = np.concatenate(
        [np.full((len(facts), 1), tokenizer.eot_id), sent.tokens[:, :length]], 1
    )
    spans = {k: (int(v[0, 0]) + 1, min(int(v[0, 1]), length) + 1) for k, v in sent.spans.items()}
    labels = ("EOT", *_part_labels(template, sent.spans, sent.tokens.shape[1])[:length])
    return Inputs(torch.as_tensor(tokens, dtype=torch.long, device=device), facts, spans, labels)


def _part_labels(template: str, spans: dict[str, np.ndarray], width: int) -> list[str]:
    """A name per sentence token: the template part, 'subject[i]' for entity tokens."""
    slot = {"<s>": "subject", "<r>": "relation", "<o>": "object", "<choices>": "choices"}
    labels: list[str] = []
    for part in get_template(template).parts:
        if part in slot:
            start, end = spans[slot[part]][0]
            labels.extend(f"{slot[part]}[{i}]" for i in range(end - start))
        else:
            labels.append(part)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # a repeated filler stays distinguishable
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    return labels[:width]


# ---------------------------------------------------------------------------------- patches
@dataclass(frozen=True)
class Patch:
    """Replace `site`'s activation where `mask` is true with `source[rows]`.

    mask: bool [batch, pos] ([batch, pos, head] for 'head' sites; the batch axis may be left
    out to patch every row alike). source: activations [n_source, pos, ...] of the site's shape,
    e.g. from `capture`; rows: int [batch], the source row of each batch row (default: the same
    row). One patch can thus serve a batch that stacks many patch indices.
    """

    site: Site
    source: Tensor
    mask: Tensor
    rows: Tensor | None = None


@dataclass
class Capture:
    """What `capture` returns: logits, activations per site, and gradients if asked for."""

    logits: Float[Tensor, "batch pos vocab"]
    acts: dict[Site, Tensor]
    grads: dict[Site, Tensor] = field(default_factory=dict)
    value: Tensor | None = None
    kv: list[KeysValues] = field(default_factory=list)

    def __getitem__(self, site: Site | str) -> Tensor:
        key = site if isinstance(site, Site) else Site.parse(site)
        if key not in self.acts:
            raise KeyError(
                f"site {key} was not captured: captured {', '.join(map(str, self.acts))}"
            )
        return self.acts[key]


def capture(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    sites: SiteSpec,
    *,
    patches: Sequence[Patch] = (),
    grad_of: Callable[[Float[Tensor, "batch pos vocab"]], Tensor] | None = None,
    start_layer: int = 0,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
    last_only: bool = False,
    start_pos: int = 0,
    kv: Sequence[KeysValues] | None = None,
    keep_kv: bool = False,
) -> Capture:
    """Run `model` on `tokens` (with `patches` applied) and keep the activations at `sites`.

    With `grad_of`, a function of the logits, also return the gradient of its sum with respect
    to each captured activation (attribution patching needs both in one pass). Activations are
    recorded after any patch at the same site. With `resid`, the residual stream entering block
    `start_layer` (say a captured resid_pre), the run resumes there and skips the blocks before;
    `last_only` unembeds the last position only (logits [batch 1 vocab]) and, when no site or
    patch is in the last block, runs that block for the last position only. With `start_pos` as
    well, and `kv` (every block's keys and values of the run `resid` came from, see
    `keep_kv`), it computes positions `start_pos`.. only, attending to the earlier positions
    through TransformerLens' key-value cache: a patch there cannot change what comes before it.
    Activations and logits then cover positions `start_pos`.. only. All of these only save work.
    """
    chosen = resolve_sites(model, sites) if sites else []
    acts: dict[Site, Tensor] = {}
    kept: dict[int, dict[str, Tensor]] = {}

    def record(site: Site) -> Callable[[Tensor], None]:
        def keep(act: Tensor) -> None:
            acts[site] = act

        return keep

    cache = _kv_cache(model, tokens, start_pos, resid, kv)
    hooks = _hooks(model, tokens, patches, {s: record(s) for s in chosen}, start_layer, resid,
                   start_pos)  # fmt: skip
    if keep_kv:
        hooks += [
            (f"blocks.{layer}.attn.hook_{x}", partial(_keep_kv, kept.setdefault(layer, {}), x))
            for layer in range(start_layer, model.cfg.n_layers)
            for x in "kv"
        ]
    # the last block can serve the last position alone when no site or patch there needs more
    touched = [*chosen, *(p.site for p in patches)]
    lean = last_only and not keep_kv and all(s.layer < model.cfg.n_layers - 1 for s in touched)
    run = partial(_forward, model, tokens, start_layer, resid, lean, last_only, start_pos, cache)
    if grad_of is None:
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            logits = run()
        return Capture(logits, acts, kv=[(kept[i]["k"], kept[i]["v"]) for i in sorted(kept)])
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = run()
        value = grad_of(logits)
        grads = torch.autograd.grad(value.sum(), [acts[s] for s in chosen], allow_unused=True)
    return Capture(
        logits.detach(),
        {s: a.detach() for s, a in acts.items()},
        {
            s: torch.zeros_like(acts[s]) if g is None else g
            for s, g in zip(chosen, grads, strict=True)
        },
        value.detach(),
    )


STREAM_PARTS = ("resid_pre", "attn_out", "mlp_out")
"""The sites whose sum is the residual stream leaving a block."""


def stream_after(acts: Capture | Mapping[Site, Tensor], layer: int) -> Tensor:
    """The residual stream leaving block `layer` (TransformerLens' hook_resid_post), from the
    captured `STREAM_PARTS` of that block: the stream entering it plus what attention and the
    MLP add, whether the block is parallel or sequential."""
    entering, attn, mlp = (acts[Site(kind, layer)] for kind in STREAM_PARTS)
    return entering + attn + mlp


def patch(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    patches: Sequence[Patch],
    *,
    start_layer: int = 0,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
    last_only: bool = False,
    start_pos: int = 0,
    kv: Sequence[KeysValues] | None = None,
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of `model` on `tokens` with `patches` applied (in order, per batch row).

    `start_layer`, `resid`, `last_only`, `start_pos` and `kv` save work as in `capture`.
    """
    return capture(
        model, tokens, (), patches=patches, start_layer=start_layer, resid=resid,
        last_only=last_only, start_pos=start_pos, kv=kv,
    ).logits  # fmt: skip


def _keep_kv(into: dict[str, Tensor], name: str, act: Tensor, hook) -> None:
    into[name] = act


def _kv_cache(model, tokens: Tensor, start_pos: int, resid: Tensor | None, kv):
    """A frozen TransformerLens key-value cache holding positions before `start_pos`."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    if not start_pos:
        return None
    if not 0 < start_pos < tokens.shape[1] or resid is None or kv is None:
        raise InvalidArgument(
            f"start_pos={start_pos} needs resid and kv (the keys and values of the run resid "
            f"came from, capture(..., keep_kv=True)), and must be in 0..{tokens.shape[1] - 1}"
        )
    shape = (tokens.shape[0], tokens.shape[1], model.cfg.n_heads, model.cfg.d_head)
    if len(kv) != model.cfg.n_layers or any(tuple(t.shape) != shape for pair in kv for t in pair):
        raise InvalidArgument(
            f"kv must hold every block's keys and values of shape {shape}: pass "
            "capture(..., keep_kv=True).kv of the run resid came from, indexed like resid"
        )
    entries = [
        TransformerLensKeyValueCacheEntry(k[:, :start_pos], v[:, :start_pos], frozen=True)
        for k, v in kv
    ]
    mask = torch.ones(tokens.shape[0], start_pos, dtype=torch.int, device=tokens.device)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def _forward(model, tokens: Tensor, start_layer: int, resid: Tensor | None, lean: bool,
             last_only: bool, start_pos: int, cache):  # fmt: skip
    """Logits from the embedding, or from block `start_layer` given the stream entering it.

    `lean`: the last block runs for the last position only (see `_last_position`).
    """
    from transformer_lens.utilities.activation_functions import apply_softcap

    n_layers = model.cfg.n_layers
    stop = n_layers - 1 if lean and start_layer < n_layers else n_layers
    if resid is None:
        x = model(tokens, stop_at_layer=stop)
    else:
        x = model(resid[:, start_pos:], start_at_layer=start_layer, stop_at_layer=stop,
                  past_kv_cache=cache)  # fmt: skip
    if stop < n_layers:
        x = _last_position(model.blocks[stop], x, None if cache is None else cache.entries[stop])
    logits = model.unembed(model.ln_final(x[:, -1:] if last_only else x))
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _last_position(block, x: Float[Tensor, "batch pos d_model"], past) -> Tensor:
    """`block`'s output at the last position of `x` [batch 1 d_model]: the other positions
    only lend it their keys and values, appended to `past` (a cache entry for the positions
    before `x`, or None). This skips their queries, attention and MLP, which nothing reads.
    """
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    normed = block.ln1(x[:, :-1])
    # no queries are needed before the last position: an empty query input skips them
    _, k, v = block.attn.calculate_qkv_matrices(normed[:, :0], normed, normed)
    if past is not None:
        k, v = torch.cat([past.past_keys, k], 1), torch.cat([past.past_values, v], 1)
    return block(
        x[:, -1:], past_kv_cache_entry=TransformerLensKeyValueCacheEntry(k, v, frozen=True)
    )


def _hooks(model, tokens: Tensor, patches, records: Mapping[Site, Callable], start_layer, resid,
           start_pos: int = 0):  # fmt: skip
    """One TransformerLens hook per hook point: apply its patches, then record the result."""
    n_layers = model.cfg.n_layers
    if tokens.ndim != 2:
        raise InvalidArgument(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if not 0 <= start_layer <= n_layers:
        raise InvalidArgument(
            f"start_layer={start_layer} is out of range: resume at a block of 0..{n_layers - 1}, "
            f"or at {n_layers} from the stream after the last block"
        )
    if resid is None and start_layer:
        raise InvalidArgument(
            f"start_layer={start_layer} needs resid, the residual stream entering it"
        )
    if resid is not None and tuple(resid.shape) != (*tokens.shape, model.cfg.d_model):
        raise InvalidArgument(
            f"resid has shape {tuple(resid.shape)}: resuming needs [batch, pos, d_model] = "
            f"{(*tokens.shape, model.cfg.d_model)}"
        )
    by_site: dict[Site, list[Patch]] = {}
    for p in patches:
        if p.site.layer >= n_layers:
            raise InvalidArgument(
                f"patch site {p.site} is out of range: the model has layers 0..{n_layers - 1}"
            )
        by_site.setdefault(p.site, []).append(p)
    early = [str(s) for s in [*by_site, *records] if s.layer < start_layer]
    if early:
        raise InvalidArgument(
            f"{', '.join(early)} come before start_layer={start_layer}: those blocks do not run"
        )

    def make(site: Site):
        todo, keep = by_site.get(site, []), records.get(site)

        def hook(act: Tensor, hook) -> Tensor:
            for p in todo:
                act = _apply(act, p, start_pos)
            if keep is not None:
                keep(act)
            return act

        return hook

    return [(site.hook_name, make(site)) for site in sorted(set(by_site) | set(records))]


def _apply(act: Tensor, p: Patch, start_pos: int = 0) -> Tensor:
    """`act` with `p` applied; `act` covers positions `start_pos`.. of the patch's inputs."""
    want = 3 if p.site.has_heads else 2
    mask = p.mask.to(device=act.device, dtype=torch.bool)
    if start_pos:
        source = p.source[:, start_pos:]
        mask = mask[:, start_pos:] if mask.ndim == want else mask[start_pos:]
        p = Patch(p.site, source, mask, p.rows)
    if tuple(mask.shape) == tuple(act.shape[1:want]):
        mask = mask.expand(act.shape[0], *mask.shape)
    if tuple(mask.shape) != tuple(act.shape[:want]):
        axes = "pos, head" if p.site.has_heads else "pos"
        raise InvalidArgument(
            f"patch mask for {p.site} has shape {tuple(p.mask.shape)}: the activation "
            f"{tuple(act.shape)} needs [batch, {axes}] = {tuple(act.shape[:want])} or "
            f"[{axes}] = {tuple(act.shape[1:want])}"
        )
    if tuple(p.source.shape[1:]) != tuple(act.shape[1:]):
        raise InvalidArgument(
            f"patch source for {p.site} has shape {tuple(p.source.shape)}, the activation is "
            f"{tuple(act.shape)}: capture the source on inputs of the same length and model shape"
        )
    hit = mask.flatten(1).any(1).nonzero().squeeze(1)
    if not len(hit):
        return act
    rows = hit if p.rows is None else p.rows.to(act.device)[hit]
    source = p.source[rows].to(act.dtype)
    if torch.is_grad_enabled() and source.is_inference():
        source = source.clone()  # an inference tensor cannot take part in autograd
    m = mask[hit].reshape(*mask[hit].shape, *([1] * (act.ndim - want)))
    return act.index_put((hit,), torch.where(m, source, act[hit]))


# ---------------------------------------------------------------------------------- parameters
@contextmanager
def swap_params(
    model: torch.nn.Module,
    other: torch.nn.Module | Mapping[str, Tensor],
    names: str | Sequence[str],
) -> Iterator[list[str]]:
    """Within the block, `model`'s parameters named by `names` hold `other`'s values.

    `names` are parameter names or glob patterns ('blocks.0.mlp.*', '*.W_in'); `other` is a
    model of the same shape or a state dict. The original values come back on exit, also when
    the block raises. Yields the swapped names.
    """
    source = other.state_dict() if isinstance(other, torch.nn.Module) else dict(other)
    params = dict(model.named_parameters())
    chosen: list[str] = []
    for pattern in [names] if isinstance(names, str) else list(names):
        hits = [n for n in params if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise InvalidArgument(
                f"no parameter matches {pattern!r}: names look like "
                f"{', '.join(list(params)[:4])}, ..."
            )
        chosen.extend(h for h in hits if h not in chosen)
    for name in chosen:
        if name not in source:
            raise InvalidArgument(
                f"the other model has no parameter {name!r}: swap between models of one "
                "architecture"
            )
        if source[name].shape != params[name].shape:
            raise InvalidArgument(
                f"{name} has shape {tuple(params[name].shape)} here and "
                f"{tuple(source[name].shape)} in the other model: swap between models of one shape"
            )
    saved = {n: params[n].detach().clone() for n in chosen}
    try:
        with torch.no_grad():
            for n in chosen:
                params[n].copy_(source[n])
        yield chosen
    finally:
        with torch.no_grad():
            for n in chosen:
                params[n].copy_(saved[n])
