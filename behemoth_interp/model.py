"""The Pythia-31M architecture as a Hugging Face GPT-NeoX model, and its HookedTransformer twin.

Checkpoints are standard HF model directories (config.json, model.safetensors, tokenizer files)
plus the world they were trained on (world.json, facts.parquet) and a training log. Loading
converts to a TransformerLens `HookedTransformer` with no weight processing (no layer-norm
folding or centering), so every HookedTransformer parameter is exactly one HF parameter and
parameter swaps between models mean what they say.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """GPT-NeoX shape: Pythia-31M is 6 layers, d_model 256, 8 heads, d_mlp 1024, rotary 25%."""

    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 8
    d_mlp: int = 1024
    rotary_pct: float = 0.25
    n_ctx: int = 2048

    def __post_init__(self) -> None:
        if min(self.n_layers, self.d_model, self.n_heads, self.d_mlp, self.n_ctx) < 1:
            raise ValueError(f"model sizes must be positive: {self}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")


PRESETS: dict[str, ModelConfig] = {
    "pythia-31m": ModelConfig(),
    "small": ModelConfig(n_layers=4, d_model=128, n_heads=4, d_mlp=512),
    "tiny": ModelConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=512),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def hf_config(shape: ModelConfig, tokenizer: WorldTokenizer) -> GPTNeoXConfig:
    """The GPT-NeoX config of `shape` with the world's vocabulary (untied embeddings)."""
    return GPTNeoXConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        intermediate_size=shape.d_mlp,
        hidden_act="gelu",
        max_position_embeddings=shape.n_ctx,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": shape.rotary_pct,
        },  # fmt: skip
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=tokenizer.eot_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id,
    )


def build_model(shape: ModelConfig, tokenizer: WorldTokenizer, seed: int) -> GPTNeoXForCausalLM:
    """A freshly initialized GPT-NeoX model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(hf_config(shape, tokenizer))
    return model.float()


def shape_of(hf: GPTNeoXForCausalLM) -> ModelConfig:
    c = hf.config
    return ModelConfig(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        rotary_pct=c.rope_parameters["partial_rotary_factor"],
        n_ctx=c.max_position_embeddings,
    )


def to_hooked(
    hf: GPTNeoXForCausalLM, tokenizer: WorldTokenizer, device: str | torch.device = "cpu"
) -> HookedTransformer:
    """Convert an HF GPT-NeoX model to a HookedTransformer with the world's tokenizer attached."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_neox_weights

    shape = shape_of(hf)
    d_head = shape.d_model // shape.n_heads
    cfg = HookedTransformerConfig(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        d_head=d_head,
        d_mlp=shape.d_mlp,
        d_vocab=hf.config.vocab_size,
        n_ctx=shape.n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        eps=hf.config.layer_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=round(shape.rotary_pct * d_head),
        rotary_base=int(hf.config.rope_parameters.get("rope_theta", 10000)),
        rotary_adjacent_pairs=False,
        parallel_attn_mlp=True,
        original_architecture="GPTNeoXForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=True,
        device=str(device),
        dtype=torch.float32,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer.hf, move_to_device=False)
    state = convert_neox_weights(hf.float().cpu(), cfg)
    model.load_and_process_state_dict(
        {k: v.detach().clone() for k, v in state.items()},
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.world_tokenizer = tokenizer
    return model.to(device).eval()


def logits_of(
    model: HookedTransformer | GPTNeoXForCausalLM, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of either model kind for token ids (no BOS is added)."""
    if isinstance(model, GPTNeoXForCausalLM):
        return model(input_ids=tokens).logits
    return model(tokens, return_type="logits")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "world.json",
    "facts.parquet",
)


def write_checkpoint(into: Path, hf: GPTNeoXForCausalLM, world: World) -> None:
    """Write `hf` with its world and tokenizer into the directory `into`, the files `load_hf`
    reads; callers write into a temporary directory (`_io.write_dir`) so that it is atomic."""
    hf.save_pretrained(str(into), safe_serialization=True)
    WorldTokenizer(world.config).save(into)
    world.write_into(into)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' per-tensor 'Loading weights' bar (noise for a 30M model)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def load_hf(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPTNeoXForCausalLM, World, WorldTokenizer]:
    """Load a checkpoint directory as (HF model, world, tokenizer), checking that it is whole.

    Raises a clear error for a missing directory or file, a directory that is not a
    behemoth-interp checkpoint, and a tokenizer or embedding from another vocabulary.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a checkpoint written by `train`")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a complete behemoth-interp checkpoint: missing {', '.join(missing)}"
        )
    world = World.load(path)
    tokenizer = WorldTokenizer(world.config)
    tokenizer.check_saved(path)
    with _quiet_loading():
        hf = GPTNeoXForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    if hf.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"{path}: the model has a vocabulary of {hf.config.vocab_size} tokens but its world's "
            f"tokenizer has {tokenizer.vocab_size}: the weights come from another world"
        )
    return hf.to(device).eval(), world, tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu") -> HookedTransformer:
    """Load a checkpoint as a HookedTransformer with the world's tokenizer attached.

    The world is available as `model.world` and the token layout as `model.world_tokenizer`.
    """
    hf, world, _ = load_hf(path)
    model = hooked_in_world(hf, world, device)
    model.checkpoint = Path(path)
    return model


def hooked_in_world(
    hf: GPTNeoXForCausalLM, world: World, device: str | torch.device | None = None
) -> HookedTransformer:
    """`hf` as a HookedTransformer with `world` attached (`model.world`, and its tokenizer), as
    `load_model` gives it; on `hf`'s device unless `device` says otherwise."""
    device = next(hf.parameters()).device if device is None else device
    model = to_hooked(hf, WorldTokenizer(world.config), device)
    model.world = world
    return model
