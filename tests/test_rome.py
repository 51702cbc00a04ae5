"""ROME: the update's exact identities (the edited MLP maps k* to v*, ΔW has rank one and sits in
one tensor), the cached key covariance against a direct computation, sequential multi-tuple
edits, the bad-input cases, and a single override on the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import finished_checkpoint

from behemoth_interp import (
    EditTask,
    RomeConfig,
    Site,
    apply_rome,
    build_inputs,
    capture,
    edit,
    key_covariance,
    load_hf,
    render,
    swap_params,
    to_hooked,
)

W_OUT = "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight"


@pytest.fixture(scope="module")
def micro_hf(micro_checkpoint):
    torch.set_num_threads(1)
    return load_hf(micro_checkpoint)


def _singular_values(after, before, name: str) -> torch.Tensor:
    return torch.linalg.svdvals((after.get_parameter(name) - before.get_parameter(name)).double())


# ------------------------------------------------------------------ config
def test_config_round_trip_and_validation():
    c = RomeConfig(layer=1, v_lr=0.1, templates=("paper", "compact"), cov_sentences=None)
    assert RomeConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert RomeConfig(templates="paper").templates == ("paper",)
    for bad, match in [
        ({"layer": -1}, "blocks count from 0"),
        ({"position": "middle"}, "unknown position 'middle'"),
        ({"v_lr": 0}, "need v_lr > 0"),
        ({"v_steps": 0}, "v_steps >= 1"),
        ({"kl_factor": -1}, "must be >= 0"),
        ({"cov_sentences": 0}, "draw at least one"),
        ({"templates": ()}, "at least one"),
        ({"templates": ("limerick",)}, "unknown template 'limerick'"),
    ]:
        with pytest.raises(ValueError, match=match):
            RomeConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown RomeConfig fields \['lr'\]"):
        RomeConfig.from_dict({"lr": 1.0})


# ------------------------------------------------------------------ key covariance
def test_key_covariance_is_the_cached_second_moment_of_mlp_keys(micro_model):
    world, tok = micro_model.world, micro_model.world_tokenizer
    cov = key_covariance(micro_model, world, 1, n_sentences=None)
    sent = render(world, tok, world.facts(), "paper")
    assert sent.uniform
    x = np.concatenate([np.full((len(sent), 1), tok.eot_id), sent.tokens], 1)
    _, cache = micro_model.run_with_cache(torch.as_tensor(x, dtype=torch.long))
    keys = cache["blocks.1.mlp.hook_post"].reshape(-1, micro_model.cfg.d_mlp).double()
    torch.testing.assert_close(cov, keys.T @ keys / len(keys))
    assert key_covariance(micro_model, world, 1, n_sentences=None) is cov
    # the keys of block 1 do not depend on its W_out (what ROME edits), but on block 0's
    doubled = {n: 2 * p.detach() for n, p in micro_model.named_parameters()}
    with swap_params(micro_model, doubled, "blocks.1.mlp.W_out"):
        assert key_covariance(micro_model, world, 1, n_sentences=None) is cov
    with swap_params(micro_model, doubled, "blocks.0.mlp.W_out"):
        other = key_covariance(micro_model, world, 1, n_sentences=None)
    assert not torch.allclose(other, cov)
    sample = key_covariance(micro_model, world, 1, n_sentences=10, seed=3)
    assert sample is not cov and not torch.allclose(sample, cov)
    with pytest.raises(ValueError, match=r"ROME layer 2 is not in this model: it has blocks 0..1"):
        key_covariance(micro_model, world, 2)


# ------------------------------------------------------------------ the update
def test_edited_mlp_maps_the_key_to_the_value(micro_hf):
    """r-ROME: the same k* in numerator and denominator, so W' k* = v* exactly, and the edited
    model's MLP output at the last subject token is v*."""
    hf, world, tok = micro_hf
    model = to_hooked(hf, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = EditTask.draw(world, "single", seed=1)
    (update,) = apply_rome(model, task, RomeConfig(layer=0, position="last_subject", v_steps=5))
    mlp = model.blocks[0].mlp
    assert float(update.left @ update.key) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(update.key @ mlp.W_out + mlp.b_out, update.value)
    inputs = build_inputs(world, tok, task.edited)
    pos = int(inputs.positions("last_subject")[1][0].nonzero()[0, 0])
    out = capture(model, inputs.tokens, [Site("mlp_out", 0)])[Site("mlp_out", 0)]
    torch.testing.assert_close(out[0, pos], update.value, atol=1e-4, rtol=1e-4)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved == ["blocks.0.mlp.W_out"]
    assert update.fact == tuple(task.facts[0].tolist()) and update.steps <= 5
    assert set(update.to_dict()) >= {"fact", "target", "steps", "nll", "kl", "delta_norm"}


def test_paraphrases_state_the_delta_search_in_the_augmentation_templates(micro_hf):
    """Paraphrase-augmented ROME / MEMIT / AlphaEdit (Retention paper 5.1): δ is fit on the
    edit stated in the config's templates and in the first k augmentation paraphrases; the
    key statistics stay on the templates."""
    from behemoth_interp.edit.methods.memit import MemitConfig
    from behemoth_interp.edit.values import fit_value, prompt_templates
    from behemoth_interp.errors import InvalidArgument
    from behemoth_interp.grammar import AUGMENT_PARAPHRASES

    hf, world, tok = micro_hf
    model = to_hooked(hf, tok)
    task = EditTask.draw(world, "single", seed=1)
    fact, target = task.facts[0], int(task.targets[0])
    counts = {}
    for k in (0, 2):
        config = RomeConfig(layer=1, v_steps=1, paraphrases=k)
        assert prompt_templates(config) == ("paper", *AUGMENT_PARAPHRASES[:k])
        fit = fit_value(model, world, fact, target, np.zeros((0, 3), dtype=np.int64), 1, config)
        counts[k] = len(fit.groups)
    assert counts[2] == 3 * counts[0]
    assert prompt_templates(MemitConfig(paraphrases=10))[1:] == AUGMENT_PARAPHRASES
    assert RomeConfig.from_dict(RomeConfig(paraphrases=5).to_dict()).paraphrases == 5
    with pytest.raises(InvalidArgument, match="name them in one place"):
        RomeConfig(templates=("paper", "bare"), paraphrases=1)
    with pytest.raises(InvalidArgument, match="from 0 to 10"):
        MemitConfig(paraphrases=-1)


def test_object_position_maps_every_key_to_the_value(micro_hf):
    """position='object': one key per position that predicts an object token, one δ, a
    rank-one update that maps each key to its old output + δ (even in the last block)."""
    hf, world, tok = micro_hf
    model = to_hooked(hf, tok)
    task = EditTask.draw(world, "single", seed=1)
    (update,) = apply_rome(model, task, RomeConfig(layer=1, v_steps=5))
    n_object = tok.n_tokens(world.object_space(int(task.facts[0, 1])))
    assert update.key.shape == (n_object, model.cfg.d_mlp)
    torch.testing.assert_close(update.key @ update.left, torch.ones(n_object), atol=1e-5, rtol=0)
    mlp = model.blocks[1].mlp
    torch.testing.assert_close(update.key @ mlp.W_out + mlp.b_out, update.value)
    inputs = build_inputs(world, tok, task.edited, object_tokens=n_object)
    out = capture(model, inputs.tokens, [Site("mlp_out", 1)])[Site("mlp_out", 1)]
    torch.testing.assert_close(out[0, -n_object - 1 : -1], update.value, atol=1e-4, rtol=1e-4)


def test_rome_edit_is_rank_one_in_one_tensor(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single", seed=2)
    fast = RomeConfig(layer=0, v_steps=10)
    original = hf.get_parameter(W_OUT.format(0)).detach().clone()
    result = edit(hf, task, method="rome", blocks=[0], rome=fast, hooked=True, evaluate=False)
    assert set(result.report.changed) == {W_OUT.format(0)}
    assert torch.equal(hf.get_parameter(W_OUT.format(0)), original)  # the input is kept
    s = _singular_values(result.model, hf, W_OUT.format(0))
    assert s[0] > 0 and s[1] < 1e-5 * s[0]
    settings = result.report.settings
    assert settings["mode"] == "sequential" and settings["blocks"] == [0]
    assert settings["config"] == fast.to_dict() and len(_updates(settings)) == 1
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(
        result.hooked(x), result.model(input_ids=x).logits, atol=1e-4, rtol=1e-4
    )


def test_multi_tuple_tasks_apply_rome_sequentially(micro_hf):
    """One rank-one update per tuple; layer-0 keys depend on the last subject token alone, so
    ΔW_out has one rank per distinct last subject token."""
    hf, world, tok = micro_hf
    fast = RomeConfig(layer=0, position="last_subject", v_steps=2)
    task = EditTask.draw(world, "ten_different", seed=1, n=3)
    result = edit(hf, task, method="rome", rome=fast, evaluate=False)
    r = result.report
    assert r.settings["mode"] == "sequential" and r.settings["skipped"] == 0
    assert [e["fact"] for e in _updates(r.settings)] == task.facts.tolist()
    assert set(r.changed) == {W_OUT.format(0)}
    distinct = len(np.unique(tok.entity_tokens("subject", task.facts[:, 0])[:, -1]))
    s = _singular_values(result.model, hf, W_OUT.format(0))
    assert distinct == 2 and int((s > 1e-5 * s[0]).sum()) == distinct
    forget = EditTask.draw(world, "forget")
    r = edit(hf, forget, method="rome", rome=RomeConfig(layer=0, v_steps=1), evaluate=False).report
    already = int((world.facts(0)[:, 2] == 0).sum())
    assert r.settings["skipped"] == already and len(_updates(r.settings)) == 40 - already


def test_rome_input_errors(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single")
    for blocks in ([], [0, 1]):
        with pytest.raises(ValueError, match="ROME edits the MLP of exactly one block"):
            edit(hf, task, method="rome", blocks=blocks)
    with pytest.raises(ValueError, match=r"blocks \[2\] are not all in this model"):
        edit(hf, task, method="rome", blocks=[2])
    with pytest.raises(
        ValueError, match=r"cannot edit through the last block \(1\).*layer of 0..0"
    ):
        edit(hf, task, method="rome", rome=RomeConfig(layer=1, position="last_subject"))
    for components in ("attn", "both", ("mlp", "attn")):
        with pytest.raises(ValueError, match="ROME edits MLP output weights only"):
            edit(hf, task, method="rome", blocks=[0], components=components)
    with pytest.raises(ValueError, match=r"blocks=\[1\] and rome.layer=0 disagree"):
        edit(hf, task, method="rome", blocks=[1], rome=RomeConfig(layer=0))
    with pytest.raises(
        ValueError, match=r"method 'rome' has no setting \['lr'\]: it takes \['clamp_norm_factor'"
    ):
        edit(hf, task, method="rome", lr=1e-3)
    with pytest.raises(ValueError, match="rome= configures method='rome', not 'lora'"):
        edit(hf, task, method="lora", rome=RomeConfig())


# ------------------------------------------------------------------ the shipped model
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])  # both failed at block 0's last subject token
def test_shipped_single_override_by_rome_keeps_the_rest(seed):
    """Issue 5: a ROME single override (default config: block 3, keys at the object
    positions) reaches the new object while remaining accuracy stays within 2 points of the
    unedited model (12 of 12 drawn overrides; at the last subject token of block 0, 7 of 12)."""
    path = finished_checkpoint("independent")
    if path is None:
        pytest.skip("data/models/independent is missing or still training")
    torch.set_num_threads(1)
    hf, world, _ = load_hf(path)
    task = EditTask.draw(world, "single", seed=seed, correct=hf)
    r = edit(hf, task, method="rome", max_remaining=1000).report
    assert r.success_top1 == 1.0 and r.forget_rate == 1.0
    assert r.remaining >= r.remaining_before - 0.02
    assert set(r.changed) == {W_OUT.format(3)}


def _updates(settings) -> list[dict]:
    """The ROME updates of a report's settings, in the order they were applied."""
    return [u for step in settings["steps"] for u in step["edits"]]
