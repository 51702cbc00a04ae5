"""The Pythia-31M architecture as a Hugging Face GPT-NeoX model, and its HookedTransformer twin.

Checkpoints are standard HF model directories (config.json, model.safetensors, tokenizer files)
plus the world they were trained on (world.json, facts.parquet) and a training log. Loading
converts to a TransformerLens `HookedTransformer` with no weight processing (no layer-norm
folding or centering), so every HookedTransformer parameter is exactly one HF parameter and
parameter swaps between models mean what they say.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from torch import Tensor
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig, read_json, write_json
from behemoth_interp.errors import CheckpointMismatch, CorruptFile, InvalidArgument, MissingInput
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
            raise InvalidArgument(f"model sizes must be positive: {self}")
        if self.d_model % self.n_heads:
            raise InvalidArgument(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if not 0 < self.rotary_pct <= 1:
            raise InvalidArgument(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")


PRESETS: dict[str, ModelConfig] = {
    "pythia-31m": ModelConfig(),
    "small": ModelConfig(n_layers=4, d_model=128, n_heads=4, d_mlp=512),
    "tiny": ModelConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=512),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise InvalidArgument(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
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
CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_FORMAT = "behemoth-checkpoint/1"


def write_checkpoint(into: Path, hf: GPTNeoXForCausalLM, world: World) -> None:
    """Write `hf` with its world and tokenizer into the directory `into`, the files `load_hf`
    reads, and `checkpoint.json`: the world's fingerprint and the sha256 of every file, which
    `load_hf` checks. Callers write into a temporary directory (`_io.write_dir`): atomic."""
    hf.config.behemoth_world = world.fingerprint
    with _quiet():
        hf.save_pretrained(str(into), safe_serialization=True)
    WorldTokenizer(world.config).save(into)
    world.write_into(into)
    write_json(into / CHECKPOINT_META, {"format": CHECKPOINT_FORMAT, "world": world.fingerprint,
               "sha256": {f: file_sha256(into / f) for f in CHECKPOINT_FILES}})  # fmt: skip


def parameters_sha256(model: torch.nn.Module, include: Callable[[str], bool] | None = None) -> str:
    """sha256 of a model's parameters (names, shapes, dtypes and bytes), or of those whose name
    `include` accepts: equal for equal weights, wherever they are stored."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if include is None or include(name):
            t = p.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(path: Path) -> bool:
    """Whether directory `path` holds a model checkpoint (which `train --force` may replace)."""
    return (path / "model.safetensors").is_file() and (path / "world.json").is_file()


def _check_files(path: Path) -> str | None:
    """Compare every file with the sha256 `checkpoint.json` recorded when it was written and
    return the recorded world fingerprint (None for checkpoints older than the record, whose
    weights are checked against the training log's hash, when it has one)."""
    if not (path / CHECKPOINT_META).is_file():
        log = path / "train_log.json"
        recorded = (
            read_json(log, what="training log").get("weights_sha256") if log.is_file() else None
        )
        if recorded and file_sha256(path / "model.safetensors") != recorded:
            raise CheckpointMismatch(
                f"{path}/model.safetensors is not the file its training wrote (sha256 recorded in "
                "train_log.json differs): restore the original weights or retrain"
            )
        return None
    meta = read_json(path / CHECKPOINT_META, what="checkpoint record", format=CHECKPOINT_FORMAT)
    for name, recorded in meta["sha256"].items():
        if file_sha256(path / name) != recorded:
            raise CheckpointMismatch(
                f"{path}/{name} is not the file this checkpoint was written with (its sha256 "
                f"differs from the one in {CHECKPOINT_META}): it was modified, truncated or "
                "copied from another checkpoint. Restore the original file, or retrain"
            )
    return meta["world"]


def describe(model) -> str:
    """A model's name in messages: its checkpoint directory when it was loaded from one."""
    path = getattr(model, "checkpoint", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return f"the model from {path}" if path else f"this {type(model).__name__}"


def model_world(model) -> str | None:
    """The fingerprint of the world `model` belongs to, when it records one: a
    HookedTransformer's `.world`, or the HF config's `behemoth_world` (set by checkpoints)."""
    world = getattr(model, "world", None)
    if isinstance(world, World):
        return world.fingerprint
    return getattr(getattr(model, "config", None), "behemoth_world", None)


def check_world(model, world: World) -> None:
    """Raise `CheckpointMismatch` if `model` records a world other than `world`."""
    recorded = model_world(model)
    if recorded is not None and recorded != world.fingerprint:
        raise CheckpointMismatch(
            f"{describe(model)} was trained on another world than {world!r}: use the world it "
            "was trained on (load_model(path).world, or load_hf(path)[1])"
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Without transformers' progress bars ('Loading weights', 'Writing model shards'): noise
    for a 30M model."""
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
        raise MissingInput(f"{path} is not a directory: pass a checkpoint written by `train`")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise MissingInput(
            f"{path} is not a complete behemoth-interp checkpoint: missing {', '.join(missing)}"
        )
    recorded = _check_files(path)
    world = World.load(path)
    if recorded is not None and world.fingerprint != recorded:
        raise CheckpointMismatch(
            f"{path}: world.json and facts.parquet describe another world than the one the model "
            "was trained on: restore them from the world directory it was trained on"
        )
    tokenizer = WorldTokenizer(world.config)
    tokenizer.check_saved(path)
    try:
        with _quiet():
            hf = GPTNeoXForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CorruptFile(
            f"{path}: model.safetensors and config.json cannot be read as one GPT-NeoX model "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}): restore them or retrain"
        ) from None
    if getattr(hf.config, "behemoth_world", None) not in (None, world.fingerprint):
        raise CheckpointMismatch(
            f"{path}/config.json belongs to a model of another world: restore the checkpoint's "
            "own config.json"
        )
    hf.config.behemoth_world = world.fingerprint
    if hf.config.vocab_size != tokenizer.vocab_size:
        raise InvalidArgument(
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
    check_world(hf, world)
    device = next(hf.parameters()).device if device is None else device
    model = to_hooked(hf, WorldTokenizer(world.config), device)
    model.world = world
    return model


def weights_sha256(path: str | Path) -> str:
    """The sha256 of a checkpoint's `model.safetensors`, as its `checkpoint.json` records it
    (else its training log's `weights_sha256`, else hashed now). `load_hf` checks the file
    against the record, so a loaded model has these weights."""
    path = Path(path)
    meta = path / CHECKPOINT_META
    if meta.is_file():
        return read_json(meta, what="checkpoint record")["sha256"]["model.safetensors"]
    log = path / "train_log.json"
    if log.is_file():
        recorded = read_json(log, what="training log").get("weights_sha256")
        if recorded:
            return recorded
    return file_sha256(path / "model.safetensors")
