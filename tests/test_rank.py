"""move_rank: constructed low-rank weight deltas come back with their exact rank."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from behemoth_interp import WorldConfig, WorldTokenizer
from behemoth_interp.model import PRESETS, ModelConfig, build_model
from behemoth_interp.rank import COMPONENTS, MoveRank, block_matrices, energy_rank, move_rank


@pytest.fixture(scope="module")
def base():
    tok = WorldTokenizer(WorldConfig(n_subjects=20, n_relations=2, n_objects=8))
    return build_model(PRESETS["tiny"], tok, seed=0), tok


def _add(model, layer: int, component: str, delta: torch.Tensor) -> None:
    """Add `delta` to one component's matrix in place (through the NeoX layout for Q, K, V)."""
    block = model.gpt_neox.layers[layer]
    with torch.no_grad():
        if component in ("W_Q", "W_K", "W_V"):
            c = model.config
            h, d = c.num_attention_heads, c.hidden_size
            qkv = block.attention.query_key_value.weight.view(h, 3, d // h, d)
            qkv[:, "QKV".index(component[-1])] += delta.view(h, d // h, d)
        else:
            target = {"W_O": block.attention.dense, "W_in": block.mlp.dense_h_to_4h,
                      "W_out": block.mlp.dense_4h_to_h}[component]  # fmt: skip
            target.weight += delta


def _low_rank(shape: tuple[int, int], r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("r", [1, 3, 17])
def test_constructed_rank_r_delta_returns_r(base, component, r):
    model, _ = base
    edited = copy.deepcopy(model)
    layer = 1
    shape = tuple(block_matrices(model, layer)[component].shape)
    _add(edited, layer, component, _low_rank(shape, r, seed=r))
    result = move_rank(model, edited, threshold=1.0)
    expected = np.zeros((2, len(COMPONENTS)), dtype=np.int64)
    expected[layer, COMPONENTS.index(component)] = r
    np.testing.assert_array_equal(result.rank, expected)
    assert result.full_rank[layer, COMPONENTS.index(component)] == min(shape)


def test_zero_delta_is_rank_zero(base):
    model, _ = base
    result = move_rank(model, copy.deepcopy(model))
    assert (result.rank == 0).all() and (result.norm == 0).all()
    df = result.to_dataframe()
    assert len(df) == 2 * len(COMPONENTS) and set(df.component) == set(COMPONENTS)


def test_threshold_edges(base):
    """Singular values 3, 2, 1: energy fractions 9/14, 13/14, 1."""
    model, _ = base
    edited = copy.deepcopy(model)
    delta = torch.zeros(PRESETS["tiny"].d_model, PRESETS["tiny"].d_mlp)
    delta[0, 0], delta[1, 1], delta[2, 2] = 3.0, 2.0, 1.0
    _add(edited, 0, "W_out", delta)
    j = COMPONENTS.index("W_out")
    for threshold, k in [(0.01, 1), (9 / 14, 1), (0.65, 2), (13 / 14, 2), (0.93, 3), (1.0, 3)]:
        assert move_rank(model, edited, threshold).rank[0, j] == k, threshold
    assert energy_rank(np.zeros(4), 0.95) == 0
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match=r"threshold .* \(0, 1\]"):
            move_rank(model, edited, bad)


def test_mismatched_models_raise(base):
    model, tok = base
    other = build_model(ModelConfig(n_layers=3, d_model=64, n_heads=4, d_mlp=256), tok, seed=0)
    with pytest.raises(ValueError, match="different shapes.*edited copy"):
        move_rank(model, other)
    with pytest.raises(TypeError, match="HF GPT-NeoX models or checkpoint directories"):
        move_rank(model, 3)


def test_save_load_plot(base, tmp_path):
    model, _ = base
    edited = copy.deepcopy(model)
    _add(edited, 0, "W_in", _low_rank((256, 64), 2, seed=0))
    result = move_rank(model, edited, keep_spectra=True)
    assert result.singular_values[(0, "W_in")].shape == (64,)
    back = MoveRank.load(result.save(tmp_path / "rank.json"))
    np.testing.assert_array_equal(back.rank, result.rank)
    assert back.to_dataframe().equals(result.to_dataframe())
    fig = result.plot()
    assert len(fig.data) == len(COMPONENTS)
