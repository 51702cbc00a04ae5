"""MEMIT and AlphaEdit: what they may change, MEMIT's reduction to ROME's closed form, AlphaEdit's
null-space guarantee and its closed form, batched against sequential, single overrides of the
micro model, and the bad-input cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from behemoth_interp import (
    AlphaEditConfig,
    EditTask,
    MemitConfig,
    RomeConfig,
    Site,
    capture,
    edit,
    key_covariance,
    load_hf,
    render,
    to_hooked,
)
from behemoth_interp.edit.methods.alphaedit import apply_alphaedit, null_space
from behemoth_interp.edit.methods.memit import apply_memit
from behemoth_interp.edit.methods.rome import regularized_covariance, rome_left

W_OUT = "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight"
FAST = {"v_steps": 20}
"""Enough Adam steps for a δ that moves the model; the identities below hold for any δ."""


@pytest.fixture(scope="module")
def micro_hf(micro_checkpoint):
    torch.set_num_threads(1)
    return load_hf(micro_checkpoint)


# ------------------------------------------------------------------ configs
def test_configs_round_trip_and_validate():
    for c in (MemitConfig(layers=(1, 2), cov_weight=10.0, templates=("paper", "compact")),
              AlphaEditConfig(layers=(0,), null_threshold=0.1, position="last_subject")):  # fmt: skip
        assert type(c).from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert MemitConfig(layers=2).layers == (2,)
    for cls, bad, match in [
        (MemitConfig, {"layers": ()}, "layers is empty"),
        (MemitConfig, {"layers": (2, 4)}, r"layers=\(2, 4\) are not consecutive.*\(2, 3, 4\)"),
        (MemitConfig, {"layers": (3, 2)}, "not consecutive"),
        (MemitConfig, {"layers": (-1, 0)}, r"layers \(--layers\) must be >= 0"),
        (MemitConfig, {"cov_weight": 0}, r"cov_weight \(--cov-weight\) must be > 0"),
        (MemitConfig, {"position": "middle"}, "unknown position 'middle'"),
        (MemitConfig, {"v_lr": 0}, "need v_lr > 0"),
        (
            AlphaEditConfig,
            {"null_threshold": 0},
            r"null_threshold \(--null-threshold\) must be > 0",
        ),
        (AlphaEditConfig, {"null_threshold": 1.5}, "null_threshold.*<= 1, got 1.5"),
        (AlphaEditConfig, {"l2": -1.0}, r"l2 \(--l2\) must be > 0"),
        (AlphaEditConfig, {"layers": (1, 3)}, "not consecutive"),
    ]:
        with pytest.raises(ValueError, match=match):
            cls(**bad)
    with pytest.raises(ValueError, match=r"unknown AlphaEditConfig fields \['cov_weight'\]"):
        AlphaEditConfig.from_dict({"cov_weight": 1.0})


def test_bad_selections_name_the_field(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single")
    for method in ("memit", "alphaedit"):
        with pytest.raises(ValueError, match=r"layers=\(1, 2\) are not all in this model: it has "
                                             r"blocks 0..1"):  # fmt: skip
            edit(hf, task, method=method, layers=(1, 2), evaluate=False)
        with pytest.raises(ValueError, match=r"layers=\(2,\) are not all in this model"):
            edit(hf, task, method=method, blocks=[2], evaluate=False)
        with pytest.raises(ValueError, match=r"layers=\(0, 2\) are not consecutive"):
            edit(hf, task, method=method, blocks=[0, 2], evaluate=False)
        for components in ("attn", "both", ("mlp", "attn")):
            with pytest.raises(ValueError, match=f"{method} edits MLP output weights only"):
                edit(hf, task, method=method, components=components, evaluate=False)
        with pytest.raises(ValueError, match=r"blocks=\[1\] and .*layers=\(0,\) disagree"):
            config = (MemitConfig if method == "memit" else AlphaEditConfig)(layers=(0,))
            edit(hf, task, method=method, blocks=[1], config=config, evaluate=False)
        with pytest.raises(ValueError, match=r"cannot end in the last block \(1\)"):
            edit(hf, task, method=method, layers=(1,), position="last_subject", evaluate=False)
    with pytest.raises(ValueError, match=r"method 'alphaedit' has no setting \['cov_weight'\]"):
        edit(hf, task, method="alphaedit", cov_weight=1.0)
    with pytest.raises(ValueError, match="method 'memit' takes a MemitConfig, got RomeConfig"):
        edit(hf, task, method="memit", config=RomeConfig(), evaluate=False)


# ------------------------------------------------------------------ what may change
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("layers", [(0, 1), (1,)])
def test_only_the_chosen_mlp_output_weights_change(micro_hf, method, layers):
    """Every named parameter but W_out (dense_4h_to_h.weight) of the chosen layers is
    bit-identical after the edit, and the input model is left as it was."""
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "ten_different", seed=1, n=2)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    result = edit(hf, task, method=method, layers=layers, evaluate=False, **FAST)
    after = dict(result.model.named_parameters())
    moved = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert moved == {W_OUT.format(layer) for layer in layers}
    assert all(torch.equal(p, before[n]) for n, p in hf.named_parameters())
    settings = result.report.settings
    assert settings["mode"] == "batched" and settings["blocks"] == list(layers)
    assert settings["config"]["layers"] == list(layers) and set(result.report.changed) == moved


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_sequential_equals_batched_for_one_edit(micro_hf, method):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single", seed=3)
    runs = [edit(hf, task, method=method, layers=(0, 1), mode=mode, seed=2, evaluate=False,
                 **FAST).model for mode in ("batched", "sequential")]  # fmt: skip
    one, other = (dict(m.named_parameters()) for m in runs)
    assert all(torch.equal(p, other[n]) for n, p in one.items())


# ------------------------------------------------------------------ MEMIT's closed form
def test_memit_on_one_layer_and_one_key_is_rome_scaled(micro_hf):
    """One layer, one key k (position 'last_subject'), residual r, ROME's regularized
    covariance C and weight λ. Sherman-Morrison, (λC + kkᵀ)⁻¹ = (1/λ)[C⁻¹ - C⁻¹kkᵀC⁻¹/(λ + s)]
    with s = kᵀC⁻¹k, gives (λC + kkᵀ)⁻¹k = (1/λ)[C⁻¹k - C⁻¹k · s/(λ + s)] = C⁻¹k/(λ + s), so

        ΔW_MEMIT = (λC + kkᵀ)⁻¹k rᵀ = C⁻¹k rᵀ/(λ + s) = ΔW_ROME · s/(λ + s),

    ΔW_ROME = C⁻¹k rᵀ/s (ROME's update for the same key and target). On one layer r = δ."""
    hf, world, tok = micro_hf
    task = EditTask.draw(world, "single", seed=1)
    for weight in (1.0, 100.0):
        model = to_hooked(hf, tok)
        config = MemitConfig(layers=(0,), position="last_subject", cov_weight=weight, **FAST)
        e = apply_memit(model, task, config)
        (k,), (r,) = e.keys[0].double(), e.residuals[0]
        torch.testing.assert_close(r.float(), e.deltas[0], rtol=1e-5, atol=1e-5)
        cov = regularized_covariance(model, world, config, 0)
        u = rome_left(cov, k).double()  # C⁻¹k / s
        s = float(k @ torch.linalg.solve(cov, k))
        expected = torch.outer(u, r) * s / (weight + s)
        torch.testing.assert_close(e.updates[0].double(), expected, rtol=1e-5,
                                   atol=1e-5 * float(expected.abs().max()))  # fmt: skip


def test_memit_with_several_keys_tends_to_rome_left_vector(micro_hf):
    """Position 'object', one layer: by Woodbury ΔW = C⁻¹Kᵀ(λI + KC⁻¹Kᵀ)⁻¹R for any λ, and as
    λ -> 0 this is ROME's u δᵀ, u = C⁻¹Kᵀ(KC⁻¹Kᵀ)⁻¹1 (every row of R is δ on one layer)."""
    hf, world, tok = micro_hf
    task = EditTask.draw(world, "single", seed=1)
    for weight, rtol in ((10.0, 1e-5), (1e-4, 1e-4)):
        model = to_hooked(hf, tok)
        config = MemitConfig(layers=(1,), cov_weight=weight, **FAST)
        e = apply_memit(model, task, config)
        K, R = e.keys[1].double(), e.residuals[1]
        assert len(K) == tok.n_tokens(world.object_space(int(task.facts[0, 1]))) > 1
        cov = regularized_covariance(model, world, config, 1)
        solved = torch.linalg.solve(cov, K.T)
        woodbury = solved @ torch.linalg.solve(weight * torch.eye(len(K)) + K @ solved, R)
        torch.testing.assert_close(e.updates[1].double(), woodbury, rtol=rtol,
                                   atol=rtol * float(woodbury.abs().max()))  # fmt: skip
    rome = torch.outer(rome_left(cov, K).double(), e.deltas[0].double())
    torch.testing.assert_close(e.updates[1].double(), rome, rtol=1e-4,
                               atol=1e-4 * float(rome.abs().max()))  # fmt: skip


# ------------------------------------------------------------------ AlphaEdit
def _preserved_keys(model, world, tok, layer: int, n_sentences: int, seed: int = 0):
    """The keys the covariance of `key_covariance(..., n_sentences, seed)` is the second moment
    of (its own draw of sentences, repeated here), checked against it."""
    rng = np.random.default_rng([seed, 17])
    facts = world.facts()
    facts = facts[np.sort(rng.choice(len(facts), n_sentences, replace=False))]
    names = np.asarray(["paper"], dtype=object)[rng.integers(1, size=len(facts))]
    sent = render(world, tok, facts, names, seed=seed)
    tokens = np.concatenate([np.full((len(sent), 1), tok.eot_id), sent.tokens], 1)
    real = np.arange(tokens.shape[1])[None, :] <= sent.lengths[:, None]
    site = Site("mlp_post", layer)
    keys = capture(model, torch.as_tensor(tokens, dtype=torch.long), [site])[site]
    keys = keys[torch.as_tensor(real)].double()
    cov = key_covariance(model, world, layer, n_sentences=n_sentences, seed=seed)
    torch.testing.assert_close(keys.T @ keys / len(keys), cov)
    return keys, torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(real)


def test_alphaedit_leaves_every_preserved_key_where_it_was(micro_hf):
    """Preserved set: the keys of 12 sentences (at most 12 x 8 tokens < d_mlp = 256, so
    their second moment has an exact null space, picked by null_threshold=1e-9: its numerical
    zeros are ~1e-16 of the largest eigenvalue). Every preserved key's output moves by < 1e-5
    at each layer, and so the edited model's logits on those sentences stay, while the edit
    moves its own keys' outputs by the residual."""
    hf, world, tok = micro_hf
    model = to_hooked(hf, tok)
    preserved = {layer: _preserved_keys(model, world, tok, layer, 12) for layer in (0, 1)}
    assert all(len(k) < model.cfg.d_mlp for k, _, _ in preserved.values())
    _, tokens, real = preserved[0]
    logits = model(tokens)[real]
    config = AlphaEditConfig(layers=(0, 1), null_threshold=1e-9, cov_sentences=12, l2=1e-3, **FAST)
    e = apply_alphaedit(model, EditTask.draw(world, "ten_different", seed=2, n=3), config)
    for layer, (keys, _, _) in preserved.items():
        assert float((keys @ e.updates[layer].double()).abs().max()) < 1e-5
    # block 0's keys depend on the token alone, and the preserved sentences hold the edit's
    # tokens: only block 1 can write, and it writes most of what is left
    written = e.keys[1].double() @ e.updates[1].double()
    assert float(written.norm()) > 0.5 * float(e.residuals[1].norm())
    torch.testing.assert_close(model(tokens)[real], logits, atol=1e-4, rtol=0)


def test_alphaedit_is_the_papers_closed_form_and_accumulates_edited_keys(micro_hf):
    """Two edits in sequence: the second one's update at each layer is eq. 13 of the paper,
    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + I)⁻¹ (column convention, transposed for W_out), with
    K_p the first edit's keys there and P the projector onto the null space."""
    hf, world, tok = micro_hf
    model = to_hooked(hf, tok)
    config = AlphaEditConfig(layers=(0, 1), **FAST)
    task = EditTask.draw(world, "ten_different", seed=4, n=2)
    memory: dict = {}
    first, second = (apply_alphaedit(model, EditTask(world, task.facts[[i]], task.targets[[i]]),
                                     config, memory=memory) for i in (0, 1))  # fmt: skip
    for layer in config.layers:
        # the null space is that of the unedited model (block 0's edit moves block 1's keys)
        cov = key_covariance(to_hooked(hf, tok), world, layer, n_sentences=config.cov_sentences)
        basis = null_space(cov, config.null_threshold)
        P = basis @ basis.T
        Kp, K1 = first.keys[layer].double().T, second.keys[layer].double().T  # [d_mlp, n]
        R = second.residuals[layer].T  # [d_model, n]
        eye = torch.eye(len(P), dtype=P.dtype)
        paper = R @ K1.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K1 @ K1.T @ P + eye)
        torch.testing.assert_close(second.updates[layer].double(), paper.T, rtol=1e-4,
                                   atol=1e-4 * float(paper.abs().max()))  # fmt: skip
        torch.testing.assert_close(memory["edited_keys"][layer], Kp @ Kp.T + K1 @ K1.T)


# ------------------------------------------------------------------ single overrides
@pytest.mark.parametrize(
    "method, options, margin",
    [("memit", {"layers": (1,), "cov_weight": 10.0}, 0.03),
     ("alphaedit", {"layers": (1,), "null_threshold": 3e-3, "l2": 1e-2}, 0.2)],
)  # fmt: skip
def test_single_overrides_of_the_micro_model_succeed(micro_hf, method, options, margin):
    """Single overrides, seeds 0-7, of the micro model, which is trained in the session and so
    differs between CPUs (the float kernels do): measured on an AMD EPYC, both methods move
    every original object out of the top-1 and bring the new one into the top-2 on 8 of 8
    seeds, and to the top-1 on 4 of 8 (MEMIT with λ = 100, the shipped default, on 5 of 8 and
    not even into the top-2 on 3); the mean loss of remaining accuracy (79 other tuples, 1.000
    before) is 0.014 for MEMIT and 0.114 for AlphaEdit (at most 0.038 and 0.316). On the
    machine the defaults were chosen on, both made seeds 0-4 top-1. The range is block 1:
    block 0's keys at the object positions depend on the token alone. The micro model's keys
    are short (‖k‖² ~ 30, s = kᵀC⁻¹k ~ 10²), so MEMIT wants a smaller λ and AlphaEdit a smaller
    l2 than on the shipped model; AlphaEdit's null space (eigenvalues below 3e-3 of the
    largest) still admits directions the other facts use, hence its larger margin."""
    hf, world, _ = micro_hf
    reports = []
    for seed in range(8):
        task = EditTask.draw(world, "single", seed=seed)
        reports.append(edit(hf, task, method=method, seed=seed, **options).report)
    # one seed of slack below the 8 of 8 measured, for the CPUs not measured on
    assert sum(r.forget_rate == 1.0 and r.success_top2 == 1.0 for r in reports) >= 7
    assert sum(r.success_top1 == 1.0 for r in reports) >= 3
    assert np.mean([r.remaining_before - r.remaining for r in reports]) <= margin
