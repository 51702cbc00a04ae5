"""The hook layer: sites, inputs and positions, capture, patch and swap_params, checked against
plain TransformerLens runs on the micro model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from behemoth_interp import World, WorldConfig, WorldTokenizer
from behemoth_interp.hooks import (
    SITE_KINDS,
    Patch,
    Site,
    build_inputs,
    capture,
    patch,
    resolve_sites,
    swap_params,
)


@pytest.fixture(scope="module")
def inputs(micro_model):
    world = micro_model.world
    facts = world.facts()[[0, 5, 41, 60]]
    return build_inputs(world, micro_model.world_tokenizer, facts, object_tokens=1)


@pytest.fixture(scope="module")
def other_model(micro_model):
    """The micro model with every parameter perturbed (same shapes, other values)."""
    other = copy.deepcopy(micro_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return other


# ---------------------------------------------------------------------------------- sites
def test_sites_name_transformer_lens_hooks(micro_model):
    assert Site("resid_pre", 1).hook_name == "blocks.1.hook_resid_pre"
    assert Site("mlp_post", 0).hook_name == "blocks.0.mlp.hook_post"
    assert Site("head", 1).hook_name == "blocks.1.attn.hook_z"
    hook_points = dict(micro_model.hook_dict)
    for kind in SITE_KINDS:
        assert Site(kind, 1).hook_name in hook_points
    assert (
        Site.parse("attn_out.1") == Site("attn_out", 1) and str(Site("mlp_out", 0)) == "mlp_out.0"
    )
    assert resolve_sites(micro_model, ["resid_pre", "mlp_post.1", Site("resid_pre", 0)]) == [
        Site("resid_pre", 0), Site("resid_pre", 1), Site("mlp_post", 1)
    ]  # fmt: skip


def test_bad_sites_are_named(micro_model):
    with pytest.raises(ValueError, match="unknown site 'mlp'.*resid_pre, attn_out"):
        resolve_sites(micro_model, "mlp")
    with pytest.raises(
        ValueError, match=r"site resid_pre.2 is out of range: the model has layers 0..1"
    ):
        resolve_sites(micro_model, "resid_pre.2")
    with pytest.raises(ValueError, match="must be '<kind>.<layer>'"):
        Site.parse("resid_pre.x")


# ---------------------------------------------------------------------------------- inputs
def test_inputs_are_eot_prompt_and_fed_object_tokens(micro_model, inputs):
    world, tok = micro_model.world, micro_model.world_tokenizer
    facts = inputs.facts
    obj = tok.entity_tokens("object", facts[:, 2])
    expected = [[tok.eot_id, tok.ss_id, *tok.entity_tokens("subject", [s])[0], tok.fillers[0],
                 tok.fillers[1], tok.rr_id, *tok.entity_tokens("relation", [r])[0], tok.fillers[2],
                 tok.oo_id, obj[i, 0]] for i, (s, r, _) in enumerate(facts)]  # fmt: skip
    assert inputs.tokens.tolist() == expected
    assert inputs.labels == ("EOT", "SS", "subject[0]", "subject[1]", "F0", "F1", "RR",
                             "relation[0]", "F2", "OO", "object[0]")  # fmt: skip
    assert inputs.spans == {"subject": (2, 4), "relation": (7, 8), "object": (10, 11)}
    bare = build_inputs(world, tok, facts)
    assert bare.n_pos == 10 and bare.labels[-1] == "OO"
    assert torch.equal(bare.tokens, inputs.tokens[:, :-1])


def test_positions_resolve_from_spans(inputs):
    labels, mask = inputs.positions(
        ["subject", "last_subject", "relation", "last", "all", 3, -2, "object"]
    )
    assert labels == (
        "subject",
        "last_subject",
        "relation",
        "last",
        "all",
        "subject[1]",
        "OO",
        "object",
    )
    assert [np.flatnonzero(row).tolist() for row in mask.numpy()] == [
        [2, 3], [3], [7], [10], list(range(11)), [3], [9], [10]
    ]  # fmt: skip
    labels, mask = inputs.positions("each")
    assert labels == inputs.labels and torch.equal(mask, torch.eye(11, dtype=torch.bool))


def test_bad_positions_are_named(micro_model, inputs):
    with pytest.raises(
        ValueError, match=r"position 11 is out of range: inputs have 11 positions \(0..10"
    ):
        inputs.positions(11)
    with pytest.raises(ValueError, match="position -12 is out of range"):
        inputs.positions([0, -12])
    with pytest.raises(ValueError, match="unknown position 'verb': choose one of each, all, last"):
        inputs.positions("verb")
    bare = build_inputs(micro_model.world, micro_model.world_tokenizer, inputs.facts)
    with pytest.raises(ValueError, match="unknown position 'object'"):
        bare.positions("object")  # no object token is fed
    with pytest.raises(ValueError, match="object_tokens=3: objects here have 2 tokens"):
        build_inputs(micro_model.world, micro_model.world_tokenizer, inputs.facts, object_tokens=3)


def test_mixed_layouts_are_refused():
    # nested relations take objects (1 token here) as subjects (2 tokens): two layouts
    config = WorldConfig(
        "nested", n_subjects=10, n_relations=1, n_objects=5, n_nested_objects=3, object_tokens=1
    )
    world, tok = World.generate(config), WorldTokenizer(config)
    facts = world.facts()
    with pytest.raises(ValueError, match="different layouts.*one kind at a time"):
        build_inputs(world, tok, facts)
    assert build_inputs(world, tok, world.facts(kind="nested")).n_pos == 9


# ---------------------------------------------------------------------------------- capture
def test_capture_matches_run_with_cache(micro_model, inputs):
    got = capture(micro_model, inputs.tokens, list(SITE_KINDS))
    logits, cache = micro_model.run_with_cache(inputs.tokens)
    assert torch.equal(got.logits, logits)
    assert len(got.acts) == len(SITE_KINDS) * 2
    for site, act in got.acts.items():
        assert torch.equal(act, cache[site.hook_name]), site
    assert got["head.1"].shape == (4, 11, 4, 16) and got["mlp_post.0"].shape == (4, 11, 256)
    with pytest.raises(KeyError, match="site attn_out.0 was not captured"):
        capture(micro_model, inputs.tokens, "resid_pre")["attn_out.0"]


def test_capture_gradients_match_finite_differences(micro_model, inputs):
    """In float64 with eps 1e-4 the worst |numeric - analytic| / tolerance measured 3e-4 over
    20 directions x 5 micro models (in float32 with eps 1e-2 the curvature error failed 7 of
    those 100 checks, so the check runs in float64)."""
    model = copy.deepcopy(micro_model).double()
    site = Site("mlp_post", 0)
    token = int(inputs.tokens[0, -1])

    def logit(logits):
        return logits[:, -1, token]

    got = capture(model, inputs.tokens, [site], grad_of=logit)
    assert torch.allclose(got.value, got.logits[:, -1, token])
    direction = torch.randn(got[site].shape, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)  # fmt: skip
    eps = 1e-4
    everywhere = torch.ones(inputs.tokens.shape, dtype=torch.bool)

    def nudged(step):
        return patch(model, inputs.tokens, [Patch(site, got[site] + step, everywhere)])

    up, down = (nudged(sign * eps * direction)[:, -1, token] for sign in (1, -1))
    numeric = (up - down) / (2 * eps)
    analytic = (got.grads[site] * direction).sum((1, 2))
    assert torch.allclose(numeric, analytic, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------- patch
def test_patch_nothing_is_a_plain_run(micro_model, inputs):
    plain = micro_model(inputs.tokens)
    assert torch.equal(patch(micro_model, inputs.tokens, []), plain)
    source = capture(micro_model, inputs.tokens.flip(0), "resid_pre").acts[Site("resid_pre", 1)]
    none = torch.zeros(inputs.tokens.shape, dtype=torch.bool)
    assert torch.equal(
        patch(micro_model, inputs.tokens, [Patch(Site("resid_pre", 1), source, none)]), plain
    )


def test_patching_a_whole_residual_stream_gives_the_source_run(micro_model, inputs):
    tokens, other = inputs.tokens, inputs.tokens.flip(0)
    source = capture(micro_model, other, "resid_pre")
    everywhere = torch.ones(inputs.n_pos, dtype=torch.bool)  # no batch axis: every row alike
    for layer in (0, 1):
        site = Site("resid_pre", layer)
        got = patch(micro_model, tokens, [Patch(site, source[site], everywhere)])
        assert torch.allclose(got, source.logits, atol=1e-5)


def test_patch_rows_pick_source_rows_and_masks_pick_rows(micro_model, inputs):
    tokens = inputs.tokens
    site = Site("resid_pre", 0)
    src = capture(micro_model, tokens, [site])
    # batch: row 0 gets tuple 2's whole stream, row 1 nothing, row 2 tuple 0's subject only
    batch = tokens[[1, 1, 3]]
    mask = torch.zeros(3, inputs.n_pos, dtype=torch.bool)
    mask[0] = True
    mask[2, 2:4] = True
    got = patch(micro_model, batch, [Patch(site, src[site], mask, rows=torch.tensor([2, 0, 0]))])
    assert torch.allclose(got[0], src.logits[2], atol=1e-5)
    assert torch.allclose(got[1], src.logits[1], atol=1e-5)
    swapped = tokens[3].clone()
    swapped[2:4] = tokens[0, 2:4]  # at layer 0 a subject's stream is its token embeddings
    assert torch.allclose(got[2], micro_model(swapped[None])[0], atol=1e-5)


def test_patching_every_head_equals_patching_attn_out(micro_model, inputs):
    tokens, other = inputs.tokens, inputs.tokens.flip(0)
    source = capture(micro_model, other, ["head.1", "attn_out.1"])
    heads = patch(
        micro_model,
        tokens,
        [Patch(Site("head", 1), source["head.1"], torch.ones(11, 4, dtype=torch.bool))],
    )
    attn = patch(
        micro_model,
        tokens,
        [Patch(Site("attn_out", 1), source["attn_out.1"], torch.ones(11, dtype=torch.bool))],
    )
    assert torch.allclose(heads, attn, atol=1e-5)
    assert not torch.allclose(heads, micro_model(tokens), atol=1e-3)


def test_resuming_and_last_only_save_work_not_results(micro_model, inputs):
    tokens = inputs.tokens
    full = capture(micro_model, tokens, "resid_pre")
    for layer in (0, 1):
        resumed = patch(
            micro_model, tokens, [], start_layer=layer, resid=full[f"resid_pre.{layer}"]
        )
        assert torch.allclose(resumed, full.logits, atol=1e-5)
    _, cache = micro_model.run_with_cache(tokens)
    final = patch(micro_model, tokens, [], start_layer=2, resid=cache["blocks.1.hook_resid_post"])
    assert torch.allclose(final, full.logits, atol=1e-5)  # resuming after the last block
    last = patch(micro_model, tokens, [], last_only=True)
    assert last.shape == (4, 1, micro_model.cfg.d_vocab)
    assert torch.allclose(last[:, 0], full.logits[:, -1], atol=1e-6)
    other = capture(micro_model, tokens.flip(0), "resid_pre.1")
    swap = Patch(Site("resid_pre", 1), other["resid_pre.1"], torch.ones(11, dtype=torch.bool))
    got = patch(micro_model, tokens, [swap], start_layer=1, resid=full["resid_pre.1"])
    assert torch.allclose(got, other.logits, atol=1e-5)  # a patch at the resumed layer applies
    early = Patch(Site("resid_pre", 0), full["resid_pre.0"], torch.ones(11, dtype=torch.bool))
    cases = [
        (dict(start_layer=1), "start_layer=1 needs resid"),
        (dict(start_layer=3, resid=full["resid_pre.1"]), "start_layer=3 is out of range"),
        (dict(start_layer=1, resid=full["resid_pre.1"][:, :5]), r"resid has shape \(4, 5, 64\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            patch(micro_model, tokens, [], **kwargs)
    with pytest.raises(ValueError, match="resid_pre.0 come before start_layer=1"):
        patch(micro_model, tokens, [early], start_layer=1, resid=full["resid_pre.1"])


def test_resuming_at_a_position_reuses_earlier_keys_and_values(micro_model, inputs):
    tokens = inputs.tokens
    base = capture(micro_model, tokens, "resid_pre", keep_kv=True)
    assert len(base.kv) == micro_model.cfg.n_layers
    assert base.kv[0][0].shape == (4, 11, micro_model.cfg.n_heads, micro_model.cfg.d_head)
    other = capture(micro_model, tokens.flip(0), ("mlp_post.1", "head.0"))
    mask = torch.zeros(11, dtype=torch.bool)
    mask[6] = True
    heads = torch.zeros(11, micro_model.cfg.n_heads, dtype=torch.bool)
    heads[6:, 1] = True
    patches = [Patch(Site("mlp_post", 1), other["mlp_post.1"], mask),
               Patch(Site("head", 0), other["head.0"], heads)]  # fmt: skip
    full = patch(micro_model, tokens, patches)
    for start_pos in (1, 6):
        suffix = capture(micro_model, tokens, "mlp_post.1", patches=patches,
                         resid=base["resid_pre.0"], start_pos=start_pos, kv=base.kv)  # fmt: skip
        assert suffix.logits.shape == (4, 11 - start_pos, micro_model.cfg.d_vocab)
        assert torch.allclose(suffix.logits, full[:, start_pos:], atol=1e-5)
        assert suffix["mlp_post.1"].shape[1] == 11 - start_pos
    resumed = patch(micro_model, tokens, patches[:1], start_layer=1, resid=base["resid_pre.1"],
                    start_pos=6, kv=base.kv, last_only=True)  # fmt: skip
    assert torch.allclose(resumed[:, 0], patch(micro_model, tokens, patches[:1])[:, -1], atol=1e-5)
    # with no hook in the last block, its MLP runs on the last position alone
    widths = []
    spy = micro_model.blocks[-1].mlp.register_forward_hook(
        lambda mod, args, out: widths.append(out.shape[1])
    )
    try:
        for sites, width in (("mlp_post.0", 1), ("mlp_post.1", 5)):
            run = capture(micro_model, tokens, sites, patches=patches[1:], resid=base["resid_pre.0"],
                          start_pos=6, kv=base.kv, last_only=True)  # fmt: skip
            assert widths.pop() == width and run[sites].shape[1] == 5
            assert torch.allclose(run.logits[:, 0], full[:, -1], atol=1e-5)
    finally:
        spy.remove()
    for kwargs in (dict(kv=base.kv), dict(resid=base["resid_pre.0"]),
                   dict(resid=base["resid_pre.0"], kv=base.kv[:1]),
                   dict(resid=base["resid_pre.0"], kv=base.kv, start_pos=11)):  # fmt: skip
        with pytest.raises(ValueError, match="start_pos=.* needs resid and kv|kv must hold"):
            patch(micro_model, tokens, [], **{"start_pos": 3, **kwargs})


def test_bad_patches_are_named(micro_model, inputs):
    src = capture(micro_model, inputs.tokens, "head.0")
    with pytest.raises(
        ValueError,
        match=r"head.0 has shape \(4, 11\): .* \[batch, pos, head\] = \(4, 11, 4\) or \[pos",
    ):
        patch(
            micro_model,
            inputs.tokens,
            [Patch(Site("head", 0), src["head.0"], torch.ones(4, 11, dtype=torch.bool))],
        )
    with pytest.raises(
        ValueError, match=r"patch source for resid_pre.0 has shape \(4, 11, 4, 16\)"
    ):
        patch(
            micro_model,
            inputs.tokens,
            [Patch(Site("resid_pre", 0), src["head.0"], torch.ones(11, dtype=torch.bool))],
        )
    with pytest.raises(ValueError, match="patch site attn_out.5 is out of range"):
        patch(
            micro_model,
            inputs.tokens,
            [Patch(Site("attn_out", 5), src["head.0"], torch.ones(11, dtype=torch.bool))],
        )


# ---------------------------------------------------------------------------------- swap_params
def test_swap_params_borrows_and_restores(micro_model, other_model, inputs):
    before = {n: p.detach().clone() for n, p in micro_model.named_parameters()}
    with swap_params(micro_model, other_model, "*") as names:
        assert len(names) == len(before)
        assert torch.allclose(micro_model(inputs.tokens), other_model(inputs.tokens), atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in micro_model.named_parameters())

    with swap_params(micro_model, other_model, ["blocks.0.mlp.*", "blocks.0.mlp.W_in"]) as names:
        assert names == [
            "blocks.0.mlp.W_in",
            "blocks.0.mlp.b_in",
            "blocks.0.mlp.W_out",
            "blocks.0.mlp.b_out",
        ]
        assert torch.equal(micro_model.blocks[0].mlp.W_in, other_model.blocks[0].mlp.W_in)
        assert torch.equal(micro_model.blocks[1].mlp.W_in, before["blocks.1.mlp.W_in"])
    with (
        pytest.raises(RuntimeError, match="inside"),
        swap_params(micro_model, other_model.state_dict(), "unembed.*"),
    ):
        raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in micro_model.named_parameters())


def test_bad_swaps_are_named(micro_model, other_model):
    wrong = {"blocks.0.mlp.b_in": torch.zeros(3)}
    cases = [
        (other_model, "blocks.7.*", "no parameter matches 'blocks.7.*': names look like embed.W_E"),
        (wrong, "blocks.0.mlp.b_in", r"blocks.0.mlp.b_in has shape \(256,\) here and \(3,\)"),
        (wrong, "blocks.0.mlp.b_out", "the other model has no parameter 'blocks.0.mlp.b_out'"),
    ]
    for other, names, message in cases:
        with pytest.raises(ValueError, match=message), swap_params(micro_model, other, names):
            pass
