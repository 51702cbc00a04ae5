"""The unit of localization: a block's MLP, its whole attention, or one attention head.

Mechanistic Unlearning (section 2.2) takes the query, key, value and output weights of each head
and the weights of each MLP as the model's components. In GPT-NeoX a head owns a slice of its
block's fused `attention.query_key_value` (weight and bias, rows laid out (head, qkv, d_head))
and the columns of `attention.dense` (W_O) that read its output; the output bias is shared by
every head, so it belongs to the whole attention only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Bool
from torch import Tensor
from transformers import GPTNeoXForCausalLM

from behemoth_interp.errors import InvalidArgument, check_int

COMPONENT_KINDS = ("mlp", "attn", "head")
"""'mlp': a block's `mlp.*`; 'attn': its `attention.*`; 'head': one head's slices of them."""


@dataclass(frozen=True)
class Component:
    """One component: `kind` ('mlp', 'attn' or 'head') of block `layer`, and for a head its
    index `head`. Written 'mlp.3', 'attn.3', 'head.3.5' (`name`, `Component.parse`).

    `masks(hf)` says which entries of which HF parameters it owns, `n_parameters(hf)` how many
    that is; both check that the component exists in `hf`.
    """

    kind: str
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise InvalidArgument(
                f"unknown component kind {self.kind!r}: choose one of {', '.join(COMPONENT_KINDS)}"
            )
        check_int("layer", self.layer, 0)
        if self.kind == "head":
            check_int("head", self.head, 0)
        elif self.head is not None:
            raise InvalidArgument(
                f"{self.kind}.{self.layer} has no head index: give head= only for kind 'head'"
            )

    @property
    def name(self) -> str:
        return ".".join(str(x) for x in (self.kind, self.layer, self.head) if x is not None)

    def __str__(self) -> str:
        return self.name

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Block first, then MLP, attention, heads in order: the order sets list components in."""
        return self.layer, COMPONENT_KINDS.index(self.kind), -1 if self.head is None else self.head

    @classmethod
    def parse(cls, text: str | Component) -> Component:
        """'mlp.3', 'attn.3' or 'head.3.5' as a Component (a Component is returned as it is)."""
        if isinstance(text, Component):
            return text
        parts = str(text).split(".")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
            raise InvalidArgument(
                f"cannot read component {text!r}: write 'mlp.<layer>', 'attn.<layer>' or "
                "'head.<layer>.<head>'"
            )
        return cls(parts[0], *(int(p) for p in parts[1:]))

    def overlaps(self, other: Component) -> bool:
        """Whether the two share parameters: the same component, or a head and its attention."""
        if self.layer != other.layer:
            return False
        return self == other or {self.kind, other.kind} == {"attn", "head"}

    def check(self, hf: GPTNeoXForCausalLM) -> None:
        """Raise `InvalidArgument` unless `hf` has this block (and head)."""
        # edit's methods import this package, so the selection helpers load late
        from behemoth_interp.edit.selection import selection

        selection(hf, [self.layer], "mlp")
        n_heads = hf.config.num_attention_heads
        if self.kind == "head" and self.head >= n_heads:
            raise InvalidArgument(
                f"head {self.head} is not in this model: block {self.layer} has heads "
                f"0..{n_heads - 1}"
            )

    def masks(self, hf: GPTNeoXForCausalLM) -> dict[str, Bool[Tensor, "..."] | None]:
        """The HF parameters this component owns, each with the mask of its entries (None: the
        whole tensor). A head owns rows of the fused QKV weight and bias and columns of W_O."""
        from behemoth_interp.edit.selection import trainable_parameters

        self.check(hf)
        if self.kind != "head":
            return dict.fromkeys(trainable_parameters(hf, [self.layer], self.kind))
        prefix = f"gpt_neox.layers.{self.layer}.attention."
        params = dict(hf.named_parameters())
        n_heads, d_model = hf.config.num_attention_heads, hf.config.hidden_size
        device = params[prefix + "dense.weight"].device
        qkv = torch.zeros(n_heads, 3, d_model // n_heads, d_model, dtype=torch.bool, device=device)
        qkv[self.head] = True
        out = torch.zeros(d_model, n_heads, d_model // n_heads, dtype=torch.bool, device=device)
        out[:, self.head] = True
        masks = {
            prefix + "query_key_value.weight": rearrange(
                qkv, "head qkv d_head d_model -> (head qkv d_head) d_model"
            ),
            prefix + "query_key_value.bias": rearrange(
                qkv[..., 0], "head qkv d_head -> (head qkv d_head)"
            ),
            prefix + "dense.weight": rearrange(out, "d_model head d_head -> d_model (head d_head)"),
        }
        return {name: mask for name, mask in masks.items() if name in params}

    def n_parameters(self, hf: GPTNeoXForCausalLM) -> int:
        """How many weights this component owns in `hf`."""
        return sum(
            hf.get_parameter(name).numel() if mask is None else int(mask.sum())
            for name, mask in self.masks(hf).items()
        )
