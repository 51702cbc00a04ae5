"""Localizations as objects: components and the weights they own, parameter matching, the
sources, and fine-tuning restricted to a localization down to a single attention head."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformer_lens.pretrained.weight_conversions import convert_neox_weights

import behemoth_interp as bi
from behemoth_interp.edit import EditTask, edit, trainable_parameters
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.model import ModelConfig, build_model
from behemoth_interp.probe import Localization
from behemoth_interp.trace import TraceConfig, TraceResult

SHAPE = ModelConfig(n_layers=3, d_model=32, n_heads=4, d_mlp=64, n_ctx=128)
"""3 blocks of an MLP (4,192 weights) and 4 heads (1,048 each; attention 4,224 with W_O's bias)."""
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def world_hf(worlds):
    """An untrained model of the independent world: exactness needs no training."""
    torch.set_num_threads(1)
    world, tok = worlds["independent"]
    return world, build_model(SHAPE, tok, seed=0)


def _size(hf, names) -> int:
    return sum(hf.get_parameter(n).numel() for n in names)


# ------------------------------------------------------------------ components
def test_component_names_and_bad_components():
    for text in ("mlp.0", "attn.2", "head.1.3"):
        assert bi.Component.parse(text).name == text
    assert bi.Component("head", 1, 3) == bi.Component.parse("head.1.3")
    for bad, match in [("embed.0", "unknown component kind 'embed'"), ("head.1", r"head \(--head\) must be an integer"),
                       ("mlp.1.2", "mlp.1 has no head index"), ("attn.x", "cannot read"),
                       ("mlp.-1", "cannot read")]:  # fmt: skip
        with pytest.raises(InvalidArgument, match=match):
            bi.Component.parse(bad)
    assert bi.Component("attn", 1).overlaps(bi.Component("head", 1, 0))
    assert not bi.Component("attn", 1).overlaps(bi.Component("head", 2, 0))


def test_component_sizes(world_hf):
    _, hf = world_hf
    d, n_heads = SHAPE.d_model, SHAPE.n_heads
    d_head = d // n_heads
    assert bi.Component("head", 0, 1).n_parameters(hf) == 4 * d_head * d + 3 * d_head
    for kind in ("mlp", "attn"):
        names = trainable_parameters(hf, [2], kind)
        assert bi.Component(kind, 2).n_parameters(hf) == _size(hf, names)
    heads = bi.ComponentSet([f"head.2.{h}" for h in range(n_heads)])
    assert heads.n_parameters(hf) + d == bi.Component("attn", 2).n_parameters(hf)  # + W_O's bias
    assert bi.nonlocalized(hf).n_parameters(hf) == _size(hf, trainable_parameters(hf))
    assert bi.all_mlps(hf).n_parameters(hf) == _size(hf, trainable_parameters(hf, None, "mlp"))


def test_head_slices_are_transformer_lens_heads(world_hf):
    """Raising every entry a head owns changes that head's W_Q, W_K, W_V, b_Q, b_K, b_V and
    W_O in TransformerLens' own conversion, entirely, and nothing else."""
    _, hf = world_hf
    cfg = SimpleNamespace(n_layers=SHAPE.n_layers, n_heads=SHAPE.n_heads,
                          d_head=SHAPE.d_model // SHAPE.n_heads, d_vocab=hf.config.vocab_size,
                          dtype=torch.float32)  # fmt: skip
    before = {k: v.detach().clone() for k, v in convert_neox_weights(hf, cfg).items()}
    for head in (0, 3):
        moved = {}
        for name, mask in bi.Component("head", 1, head).masks(hf).items():
            p = hf.get_parameter(name)
            moved[name] = p.detach().clone()
            with torch.no_grad():
                p.add_(mask.float())
        after = convert_neox_weights(hf, cfg)
        for key, value in after.items():
            diff = value != before[key]
            if key.startswith("blocks.1.attn.") and key != "blocks.1.attn.b_O":
                assert diff[head].all() and not diff[torch.arange(4) != head].any(), key
            else:
                assert not diff.any(), key
        with torch.no_grad():
            for name, value in moved.items():
                hf.get_parameter(name).copy_(value)


# ------------------------------------------------------------------ the localization object
def test_component_set_validation(world_hf):
    _, hf = world_hf
    with pytest.raises(InvalidArgument, match="the localization is empty"):
        bi.ComponentSet(())
    with pytest.raises(InvalidArgument, match="attn.1 and head.1.2 overlap"):
        bi.ComponentSet(["attn.1", "head.1.2"])
    with pytest.raises(InvalidArgument, match="overlap"):
        bi.ComponentSet(["mlp.0", "mlp.0"])
    with pytest.raises(InvalidArgument, match=r"\['mlp.2'\] are not among the candidates"):
        bi.ComponentSet(["mlp.2"], candidates=["mlp.0", "mlp.1"])
    with pytest.raises(InvalidArgument, match="2 finite numbers"):
        bi.ComponentSet(["mlp.0"], candidates=["mlp.0", "mlp.1"], scores=[1.0])
    with pytest.raises(
        InvalidArgument, match="head 4 is not in this model: block 1 has heads 0..3"
    ):
        bi.ComponentSet(["head.1.4"]).n_parameters(hf)
    with pytest.raises(InvalidArgument, match=r"blocks \[3\] are not all in this model"):
        bi.ComponentSet(["mlp.3"]).masks(hf)
    located = bi.ComponentSet(["head.1.2", "mlp.0", "head.1.0"])
    assert bi.ComponentSet("head.1.2") == bi.ComponentSet([bi.Component("head", 1, 2)])
    assert [c.name for c in located] == ["mlp.0", "head.1.0", "head.1.2"]
    assert located.blocks == (0, 1) and located.kinds == ("mlp", "head")
    masks = located.masks(hf)
    qkv = "gpt_neox.layers.1.attention.query_key_value.weight"
    assert (
        int(masks[qkv].sum()) == 2 * 3 * 8 * 32
        and masks["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"] is None
    )
    df = located.to_dataframe(hf)
    assert df["chosen"].all() and df["n_parameters"].sum() == located.n_parameters(hf)
    assert df["head"].isna().tolist() == [True, False, False]


def _sources(hf) -> list[bi.ComponentSet]:
    every = bi.random_components(hf, n=15).candidates
    scores = tuple(np.linspace(-1, 1, 15)[::-1] ** 3)  # the first five score best
    scored = bi.ComponentSet(every[:5], "scored", every, scores)
    return [bi.random_components(hf, n=2, seed=1), bi.random_components(hf, n=2, granularity="attn"),
            bi.random_mlps(hf, n=1), bi.all_mlps(hf), bi.nonlocalized(hf), scored]  # fmt: skip


def test_json_round_trip(world_hf):
    _, hf = world_hf
    for located in _sources(hf):
        again = bi.ComponentSet.from_dict(json.loads(json.dumps(located.to_dict())))
        assert again == located and again.to_dict() == located.to_dict()
    config = bi.FinetuneConfig(localization=_sources(hf)[-1])
    assert bi.FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "localization" not in bi.FinetuneConfig().to_dict()  # older runs keep their keys
    with pytest.raises(InvalidArgument, match="unknown ComponentSet fields"):
        bi.ComponentSet.from_dict({"components": ["mlp.0"], "blocks": [0]})


@SETTINGS
@given(which=st.integers(0, 5), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_match_reaches_the_budget(world_hf, which, fraction, seed):
    """Within half the largest candidate of the target (or a single component above it), the
    same for the same seed, inside the candidates; scored sets keep the best-scored."""
    _, hf = world_hf
    located = _sources(hf)[which]
    sizes = {c: c.n_parameters(hf) for c in located.candidates}
    target = max(1, round(fraction * sum(sizes.values())))
    matched = located.match(hf, target, seed=seed)
    n = matched.n_parameters(hf)
    assert abs(n - target) <= max(sizes.values()) / 2 or (len(matched) == 1 and n > target)
    assert matched == located.match(hf, target, seed=seed)
    assert set(matched.candidates) == set(located.candidates) and matched.source == located.source
    if located.scores is not None:
        score = dict(zip(located.candidates, located.scores))
        worst_in = min(score[c] for c in matched)
        assert all(score[c] <= worst_in for c in located.candidates if c not in matched)


def test_match_refuses_impossible_budgets(world_hf):
    _, hf = world_hf
    mlps = bi.all_mlps(hf)
    with pytest.raises(InvalidArgument, match="more than the 12576 weights of all 3 candidates"):
        mlps.match(hf, 12577)
    with pytest.raises(InvalidArgument, match="n_parameters"):
        mlps.match(hf, 0)
    assert mlps.match(hf, 4192 * 2, seed=0).n_parameters(hf) == 4192 * 2


# ------------------------------------------------------------------ sources
def _trace_result(values: dict[str, np.ndarray]) -> TraceResult:
    """A trace whose every tuple scores `values` ([layer, position] or [layer, position, head])."""
    scores = {k: torch.as_tensor(np.stack([v, v]), dtype=torch.float32) for k, v in values.items()}
    return TraceResult(scores, np.zeros((2, 3), int), np.zeros((2, 3), int), ("a", "b"), ("r0",),
                       np.full(2, 2.0), np.zeros(2), TraceConfig(sites=tuple(values)))  # fmt: skip


def test_from_trace_ranks_by_absolute_score(world_hf):
    _, hf = world_hf
    mlp = np.array([[0.1, 0.2], [0.0, 0.3], [0.05, -0.9]])  # |max| over positions: .2 .3 .9
    head = np.zeros((3, 2, 4))
    head[0, 1, 2], head[2, 0, 1], head[1, 0, 0] = 0.5, -0.25, 0.1
    result = _trace_result({"resid_pre": mlp, "mlp_post": mlp, "attn_out": mlp, "head": head})
    top = bi.from_trace(hf, result, k=4)
    assert [c.name for c in top] == ["head.0.2", "mlp.1", "mlp.2", "head.2.1"]
    assert top.source == "causal_tracing" and len(top.candidates) == 3 + 12
    attn = bi.from_trace(hf, result, k=2, kinds=("attn",))
    assert [c.name for c in attn] == ["attn.1", "attn.2"]
    budget = bi.from_trace(hf, result, n_parameters=4192 + 1048)
    assert [c.name for c in budget] == ["head.0.2", "mlp.2"]
    for kwargs, match in [({"k": 2, "n_parameters": 10}, "exactly one"), ({}, "exactly one"),
                          ({"k": 16}, "k"), ({"k": 1, "kinds": ("attn", "head")}, "overlap")]:  # fmt: skip
        with pytest.raises(InvalidArgument, match=match):
            bi.from_trace(hf, result, **kwargs)
    with pytest.raises(InvalidArgument, match="this trace scores components"):
        bi.from_trace(hf, _trace_result({"resid_pre": mlp}), k=1)
    with pytest.raises(InvalidArgument, match="the trace has 2 layers, the model 3"):
        bi.from_trace(hf, _trace_result({"mlp_post": mlp[:2]}), k=1)


def test_from_flu_grows_by_the_next_best_gain(world_hf):
    _, hf = world_hf
    probe_loc = Localization((1,), np.array([0.2, 0.5, -0.1]), np.zeros(4), 0.8)
    flu = bi.from_flu(hf, probe_loc)
    assert [c.name for c in flu] == ["mlp.1"] and flu.scores == (0.2, 0.5, -0.1)
    assert [c.name for c in flu.match(hf, 2 * 4192)] == ["mlp.0", "mlp.1"]
    both = bi.from_flu(hf, probe_loc, components="both")
    assert [c.name for c in both] == ["mlp.1", "attn.1"] and len(both.candidates) == 6
    with pytest.raises(InvalidArgument, match="components must be"):
        bi.from_flu(hf, probe_loc, components="head")
    assert set(bi.LOCALIZATIONS) == {"trace", "flu", "random", "random_mlps", "all_mlps",
                                     "nonlocalized"}  # fmt: skip


def test_random_sources_are_seeded(world_hf):
    _, hf = world_hf
    draws = {tuple(c.name for c in bi.random_components(hf, n=3, seed=s)) for s in range(8)}
    assert len(draws) > 1
    assert bi.random_mlps(hf, n=2, seed=5) == bi.random_mlps(hf, n=2, seed=5)
    assert all(c.kind == "mlp" for c in bi.random_mlps(hf, n=2, seed=5))
    with pytest.raises(InvalidArgument, match="granularity"):
        bi.random_components(hf, n=1, granularity="block")
    with pytest.raises(InvalidArgument, match="n"):
        bi.random_mlps(hf, n=4)


# ------------------------------------------------------------------ localized editing
def test_head_finetune_changes_only_that_head(world_hf):
    """With weight decay, which alone would move every entry of the fused QKV and W_O: the
    head's slices all move, every other entry of every parameter stays bit-identical."""
    world, hf = world_hf
    task = EditTask.draw(world, "single", seed=1)
    located = bi.ComponentSet(["head.1.2"])
    original = {n: p.detach().clone() for n, p in hf.named_parameters()}
    result = edit(hf, task, localization=located, steps=3, weight_decay=0.5, evaluate=False)
    masks = located.masks(hf)
    after = dict(result.model.named_parameters())
    for name, p in original.items():
        assert torch.equal(hf.get_parameter(name), p), f"the input model changed at {name}"
        moved = after[name].detach() != p
        if name in masks:
            assert moved[masks[name]].any() and not moved[~masks[name]].any(), name
        else:
            assert not moved.any(), name
    # every weight entry moves (bias entries may not: a key bias has no gradient)
    assert {n: c for n, c in result.report.changed.items() if n.endswith("weight")} == {
        n: int(m.sum()) for n, m in masks.items() if n.endswith("weight")
    }
    settings_ = result.report.settings
    assert settings_["config"]["localization"] == located.to_dict()
    assert settings_["localization_parameters"] == 1048
    assert (settings_["blocks"], settings_["components"]) == ([1], ["head"])
    # the test has power: unmasked, the same decay moves the whole fused QKV
    whole = edit(hf, task, blocks=[1], components="attn", steps=3, weight_decay=0.5,
                 evaluate=False).report.changed  # fmt: skip
    qkv = "gpt_neox.layers.1.attention.query_key_value.weight"
    assert whole[qkv] == original[qkv].numel()


def test_lora_takes_whole_components_only(world_hf):
    world, hf = world_hf
    task = EditTask.draw(world, "single", seed=2)
    located = bi.ComponentSet(["mlp.0", "attn.2"])
    result = edit(hf, task, method="lora", localization=located, steps=2, rank=4, evaluate=False)
    allowed = set(trainable_parameters(hf, [0], "mlp")) | set(trainable_parameters(hf, [2], "attn"))
    assert result.report.changed and set(result.report.changed) <= allowed
    with pytest.raises(
        InvalidArgument, match=r"single heads \['head.1.0'\]: use method='finetune'"
    ):
        edit(hf, task, method="lora", localization=bi.ComponentSet(["head.1.0"]), steps=1)


def test_localized_edit_refuses_bad_input(world_hf):
    world, hf = world_hf
    task = EditTask.draw(world, "single", seed=1)
    located = bi.ComponentSet(["mlp.0"])
    for kwargs in ({"blocks": [0]}, {"components": "mlp"}):
        with pytest.raises(InvalidArgument, match="both say where to edit: pass one of them"):
            edit(hf, task, localization=located, steps=1, **kwargs)
    with pytest.raises(InvalidArgument, match="head 9 is not in this model"):
        edit(hf, task, localization=bi.ComponentSet(["head.0.9"]), steps=1)
    with pytest.raises(InvalidArgument, match="localization= is for 'finetune' and 'lora'"):
        edit(hf, task, method="rome", localization=located)
    with pytest.raises(InvalidArgument, match="localization must be a ComponentSet"):
        bi.FinetuneConfig(localization=["mlp.0"])
