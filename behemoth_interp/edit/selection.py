"""Where an edit may change the model: blocks and components, as HF parameter and module names.

A block's attention is its `attention.*` (fused QKV and output), its MLP `mlp.*`; layer norms,
embeddings and unembedding stay frozen.
"""

from __future__ import annotations

import numpy as np
from transformers import GPTNeoXForCausalLM

from behemoth_interp.errors import InvalidArgument

COMPONENT_CHOICES = ("mlp", "attn")
_LORA_MODULES = {"attn": ("attention.query_key_value", "attention.dense"),
                 "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}  # fmt: skip


def trainable_parameters(
    hf: GPTNeoXForCausalLM, blocks=None, components: str | tuple[str, ...] = ("mlp", "attn")
) -> list[str]:
    """Names of the HF parameters that a block/component selection trains.

    `blocks`: block indices (None: every block); `components`: 'mlp', 'attn', 'both' or a
    tuple of them. A block's attention is its `attention.*` (fused QKV and output), its MLP
    `mlp.*`; layer norms, embeddings and unembedding stay frozen.
    """
    blocks, comps = selection(hf, blocks, components)
    module = {"mlp": "mlp", "attn": "attention"}
    prefixes = tuple(f"gpt_neox.layers.{b}.{module[c]}." for b in blocks for c in comps)
    return [name for name, _ in hf.named_parameters() if name.startswith(prefixes)]


def lora_modules(
    hf: GPTNeoXForCausalLM, blocks=None, components: str | tuple[str, ...] = ("mlp", "attn")
) -> list[str]:
    """Full names of the linear modules LoRA adapts for a block/component selection: a block's
    attention is `query_key_value` and `dense`, its MLP `dense_h_to_4h` and `dense_4h_to_h`."""
    blocks, comps = selection(hf, blocks, components)
    return [f"gpt_neox.layers.{b}.{m}" for b in blocks for c in comps for m in _LORA_MODULES[c]]


def block_list(blocks) -> list[int]:
    """Block indices from a list, an array or a `Localization`: sorted, each once."""
    values = np.atleast_1d(np.asarray(list(blocks)))
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise InvalidArgument(f"blocks must be integer block indices, got {list(blocks)}")
    return sorted({int(b) for b in values})


def selection(hf, blocks, components) -> tuple[list[int], tuple[str, ...]]:
    """Validated (blocks, components) of a selection: None means every block; components
    "mlp", "attn", "both" or a tuple of them."""
    n = hf.config.num_hidden_layers
    if blocks is None:
        blocks = range(n)
    blocks = block_list(blocks)
    if not blocks:
        raise InvalidArgument(
            f"the block set is empty: name at least one block of 0..{n - 1}, or None for all"
        )
    if blocks[0] < 0 or blocks[-1] >= n:
        raise InvalidArgument(
            f"blocks {blocks} are not all in this model: it has blocks 0..{n - 1}"
        )
    comps = ("mlp", "attn") if components == "both" else (
        (components,) if isinstance(components, str) else tuple(components)
    )  # fmt: skip
    if not comps or any(c not in COMPONENT_CHOICES for c in comps):
        raise InvalidArgument(
            f"components must be 'mlp', 'attn', 'both' or a tuple of them, got {components!r}"
        )
    return blocks, comps
