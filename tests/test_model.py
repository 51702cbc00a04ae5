"""Model building, HF -> HookedTransformer conversion, checkpoint loading, shipped models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from behemoth_interp import CorpusConfig, WorldConfig, WorldTokenizer, build_world, load_model
from behemoth_interp.errors import BehemothError, CheckpointMismatch, CorruptFile
from behemoth_interp.evaluate import accuracy_by_format, evaluate_facts
from behemoth_interp.grammar import TEMPLATES
from behemoth_interp.model import (
    PRESETS,
    ModelConfig,
    build_model,
    hooked_in_world,
    load_hf,
    to_hooked,
)
from behemoth_interp.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED = ("independent", "correlated", "nested", "independent-formats", "correlated-formats")
# shipped models trained on every grammar template (data/models/README.md)
SHIPPED_FORMATS = ("independent-formats", "correlated-formats")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    build_world(
        WorldConfig(n_subjects=12, n_relations=2, n_objects=9),
        CorpusConfig(block_len=64),
        root / "w",
    )
    config = TrainConfig(preset="tiny", steps=3, epochs=None, eval_every=3)
    train(root / "w", root / "m", config, progress=False)
    return root / "m"


def test_pythia_31m_shape():
    tok = WorldTokenizer(WorldConfig(n_subjects=10))
    hf = build_model(PRESETS["pythia-31m"], tok, seed=0)
    c = hf.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        6,
        256,
        8,
        1024,
    )
    assert c.rope_parameters["partial_rotary_factor"] == 0.25 and c.use_parallel_residual
    assert (
        hf.get_input_embeddings().weight.data_ptr() != hf.get_output_embeddings().weight.data_ptr()
    )
    assert c.vocab_size == tok.vocab_size
    body = sum(
        p.numel() for n, p in hf.named_parameters() if "embed" not in n and "lm_head" not in n
    )
    assert body == 6 * (4 * 256 * 256 + 4 * 256 + 2 * 256 * 1024 + 1024 + 256 + 4 * 256) + 2 * 256
    assert body == 4_739_072  # Pythia-31M without its 50k-token embeddings


def test_same_seed_same_weights():
    tok = WorldTokenizer(WorldConfig(n_subjects=10))
    a, b, c = (build_model(PRESETS["tiny"], tok, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.gpt_neox.embed_in.weight, c.gpt_neox.embed_in.weight)


@pytest.mark.parametrize("preset", ["tiny", "pythia-31m"])
def test_hooked_logits_match_hf(preset):
    tok = WorldTokenizer(WorldConfig(n_subjects=50))
    hf = build_model(PRESETS[preset], tok, seed=3).eval()
    with torch.no_grad():  # random weights give tiny logits: scale to a trained model's ~10
        for p in hf.parameters():
            p.mul_(3.0)
    hooked = to_hooked(hf, tok)
    x = torch.randint(0, tok.vocab_size, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - hooked(x)).abs().max().item()
    assert diff < 1e-4


def test_load_model_attaches_world_and_tokenizer(checkpoint):
    model = load_model(checkpoint)
    hf, world, tok = load_hf(checkpoint)
    assert model.world == world and model.world_tokenizer.vocab == tok.vocab
    prompt = " SS" + tok.decode(tok.entity_tokens("subject", np.array([3]))[0])
    ids = model.to_tokens(prompt)
    assert ids[0, 0].item() == tok.eot_id and ids[0, 1:].tolist() == tok.encode(prompt)
    assert model.to_string(ids[0]) == "<|endoftext|>" + prompt
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json, model.safetensors"):
        load_model(tmp_path / "empty")


def test_checkpoint_missing_a_file(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "facts.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="missing facts.parquet"):
        load_model(broken)


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "legacy"])
def test_checkpoint_from_another_vocabulary(checkpoint, tmp_path, record):
    """With checkpoint.json the changed file is named by its hash; a legacy checkpoint without
    the record still has its tokenizer and vocabulary size checked."""
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoint, foreign)
    if not record:
        (foreign / "checkpoint.json").unlink()
    WorldTokenizer(WorldConfig(n_subjects=500)).save(foreign)
    match = "tokenizer.json is not the file" if record else "another vocabulary"
    with pytest.raises(CheckpointMismatch if record else ValueError, match=match):
        load_model(foreign)
    # a consistent world and tokenizer but weights of another vocabulary size
    other = tmp_path / "other_weights"
    shutil.copytree(checkpoint, other)
    if not record:
        (other / "checkpoint.json").unlink()
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BehemothError, match="config.json"):
        load_model(other)


def test_bad_model_config():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="unknown model preset"):
        TrainConfig(preset="pythia-70b")


def render_paper(world, tok) -> np.ndarray:
    from behemoth_interp.grammar import render

    return render(world, tok, world.facts(relations=0)).tokens


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_knows_its_world(name):
    """Each default model loads and scores >= 95% on every relation (evaluation only)."""
    path = DATA / "models" / name
    hf, world, tok = load_hf(path)
    acc = evaluate_facts(hf, world, tok)
    per_relation = acc.per_relation()
    assert len(per_relation) == world.n_relations
    assert per_relation.min() >= 0.95, per_relation.to_dict()
    log = json.loads((path / "train_log.json").read_text())
    assert log["final"]["top1"] == pytest.approx(acc.accuracy)
    hooked = to_hooked(hf, tok)
    x = torch.as_tensor(np.concatenate([[[tok.eot_id]] * 64, render_paper(world, tok)[:64]], 1))
    with torch.no_grad():
        assert (hooked(x) - hf(input_ids=x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("name", SHIPPED_FORMATS)
def test_shipped_formats_model_knows_every_relation_in_every_format(name):
    """A model shipped to answer paraphrases and MCQ scores >= 95% on every relation in every
    grammar template (the paper's robustness questions need it before any edit)."""
    hf, world, tok = load_hf(DATA / "models" / name)
    table = accuracy_by_format(hf, world, tok)
    assert list(table.columns) == list(TEMPLATES)
    per_relation = table.drop(index="all")
    assert len(per_relation) == world.n_relations
    assert per_relation.min().min() >= 0.95, per_relation.min().to_dict()


# ------------------------------------------------------------------ a checkpoint knows its world
@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of another world with the same vocabulary (only the facts differ)."""
    root = tmp_path_factory.mktemp("other")
    build_world(WorldConfig(n_subjects=12, n_relations=2, n_objects=9, seed=5),
                CorpusConfig(block_len=64), root / "w")  # fmt: skip
    train(root / "w", root / "m", TrainConfig(preset="tiny", steps=3, epochs=None, eval_every=3),
          progress=False)  # fmt: skip
    return root / "m"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # a weight changes; the file still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["world.json", "facts.parquet", "config.json", "tokenizer.json"])
def test_a_part_from_another_world_is_named(checkpoint, other_checkpoint, tmp_path, part):
    mixed = tmp_path / "mixed"
    shutil.copytree(checkpoint, mixed)
    shutil.copy(other_checkpoint / part, mixed / part)
    if part != "tokenizer.json":  # the same vocabulary: the file is identical
        with pytest.raises(CheckpointMismatch, match=f"{part} is not the file this checkpoint"):
            load_model(mixed)


def test_changed_or_truncated_weights_are_named(checkpoint, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    _flip_last_byte(changed / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match="model.safetensors is not the file"):
        load_model(changed)
    # without checkpoint.json (an older checkpoint) the training log's hash still catches it
    (changed / "checkpoint.json").unlink()
    with pytest.raises(CheckpointMismatch, match="model.safetensors is not the file its training"):
        load_model(changed)
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    (truncated / "checkpoint.json").unlink()
    (truncated / "train_log.json").unlink()
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="model.safetensors and config.json cannot be read"):
        load_model(truncated)


def test_world_json_rewritten_consistently_is_still_caught(checkpoint, other_checkpoint, tmp_path):
    """world.json and facts.parquet both from another world, and checkpoint.json's hashes
    rewritten to match: the recorded world fingerprint still disagrees."""
    mixed = tmp_path / "mixed"
    shutil.copytree(checkpoint, mixed)
    for part in ("world.json", "facts.parquet"):
        shutil.copy(other_checkpoint / part, mixed / part)
    record = json.loads((mixed / "checkpoint.json").read_text())
    for part in ("world.json", "facts.parquet"):
        record["sha256"][part] = json.loads((other_checkpoint / "checkpoint.json").read_text())[
            "sha256"
        ][part]
    (mixed / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointMismatch, match="describe another world"):
        load_model(mixed)


def test_a_model_is_only_used_with_its_own_world(checkpoint, other_checkpoint):
    hf, world, tok = load_hf(checkpoint)
    _, other, other_tok = load_hf(other_checkpoint)
    assert tok.vocab == other_tok.vocab and world != other
    with pytest.raises(CheckpointMismatch, match=f"the model from {checkpoint}.*another world"):
        hooked_in_world(hf, other)
    with pytest.raises(CheckpointMismatch, match="another world"):
        evaluate_facts(hf, other, other_tok)
    hooked = load_model(checkpoint)
    with pytest.raises(CheckpointMismatch, match="another world"):
        evaluate_facts(hooked, other, other_tok)
    evaluate_facts(hooked, world, tok)  # its own world is fine
