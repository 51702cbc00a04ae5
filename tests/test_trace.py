"""Causal tracing: exact agreement with TransformerLens' patching functions, the identities the
metric must satisfy, partners, attribution, the result object and the bad-input cases."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformer_lens import patching
from typer.testing import CliRunner

from behemoth_interp import World, WorldConfig, WorldTokenizer
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.hooks import SITE_KINDS, build_inputs
from behemoth_interp.model import PRESETS, build_model, to_hooked
from behemoth_interp.trace import (
    MIN_DENOMINATOR,
    TraceConfig,
    TraceResult,
    find_partners,
    sample_tuples,
    trace,
)

ALL_SITES = tuple(SITE_KINDS)


@pytest.fixture(scope="module")
def tuples(fact_model):
    """A few traceable tuples, from every relation (TransformerLens loops once per index)."""
    return sample_tuples(fact_model.world, max(1, 4 // fact_model.world.n_relations), seed=3)


@pytest.fixture(scope="module")
def exact(fact_model, tuples):
    return trace(fact_model, tuples, sites=ALL_SITES)


@pytest.fixture(scope="module")
def micro_tuples(micro_model):
    return sample_tuples(micro_model.world, 2, seed=3)


@pytest.fixture(scope="module")
def micro_exact(micro_model, micro_tuples):
    return trace(micro_model, micro_tuples, sites=ALL_SITES)


def _object_tokens(model, facts):
    return model.world_tokenizer.entity_tokens("object", facts[:, 2])


def _all_close(t, value, atol=1e-4):
    torch.testing.assert_close(t, torch.full_like(t, value), atol=atol, rtol=0)


def test_micro_model_knows_its_facts(micro_model):
    acc = evaluate_facts(micro_model, micro_model.world, micro_model.world_tokenizer)
    assert acc.accuracy >= 0.95


# ---------------------------------------------------------------------------------- TransformerLens
def _tl_reference(model, facts, partners):
    """TransformerLens' looping patching functions on the same inputs and the same metric."""
    world, tok = model.world, model.world_tokenizer
    clean = build_inputs(world, tok, facts, object_tokens=1).tokens
    corrupted = build_inputs(world, tok, partners, object_tokens=1).tokens
    right, wrong = (torch.as_tensor(_object_tokens(model, f)[:, 1]) for f in (facts, partners))

    def diff(logits):
        last = logits[:, -1]
        return last.gather(1, right[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]

    with torch.inference_mode():
        logits, cache = model.run_with_cache(clean)
        d_clean, d_corrupt = diff(logits), diff(model(corrupted))

        def metric(logits):  # the mean over tuples of each tuple's IOI metric
            return ((diff(logits) - d_corrupt) / (d_clean - d_corrupt)).mean()

        return {
            "resid_pre": patching.get_act_patch_resid_pre(model, corrupted, cache, metric),
            "attn_out": patching.get_act_patch_attn_out(model, corrupted, cache, metric),
            "mlp_out": patching.get_act_patch_mlp_out(model, corrupted, cache, metric),
            "mlp_post": patching.generic_activation_patch(
                model,
                corrupted,
                cache,
                metric,
                patch_setter=patching.layer_pos_patch_setter,
                activation_name="post",
                index_axis_names=("layer", "pos"),
            ),  # fmt: skip
            "head": patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric),
        }


def test_trace_matches_transformer_lens_patching(fact_model, tuples, exact):
    assert exact.n_excluded == 0  # TransformerLens' metric averages every tuple
    reference = _tl_reference(fact_model, tuples, exact.partners)
    for kind in ALL_SITES:
        assert exact.mean[kind].shape == reference[kind].shape, kind
        torch.testing.assert_close(exact.mean[kind], reference[kind].cpu(), atol=1e-4, rtol=0)


def test_batch_size_does_not_change_scores(micro_model, micro_tuples):
    small = trace(micro_model, micro_tuples[:3], sites=("mlp_post", "head"), batch_size=7)
    large = trace(micro_model, micro_tuples[:3], sites=("mlp_post", "head"))
    for kind in small.scores:
        torch.testing.assert_close(small.scores[kind], large.scores[kind], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- identities
def test_restoring_everything_gives_one_and_nothing_gives_zero(fact_model, tuples, exact):
    full = trace(fact_model, tuples, sites="resid_pre", positions=["all", "subject", "EOT", "SS"])
    s = full.scores["resid_pre"]
    _all_close(s[:, :, 0], 1.0)  # the whole stream at any layer carries the clean run
    _all_close(s[:, 0, 1], 1.0)  # at layer 0 it is token embeddings: only the subject differs
    # <|endoftext|> and SS precede the subject: clean and corrupted agree there at every site
    _all_close(s[:, :, 2:], 0.0, atol=1e-5)
    before_subject = [exact.positions.index(p) for p in ("EOT", "SS")]
    for kind in ALL_SITES:
        _all_close(exact.scores[kind][:, :, before_subject], 0.0, atol=1e-5)
    # layer-0 residual positions other than the subject hold identical token embeddings, and a
    # layer-0 MLP sees only its own position's embedding
    others = [i for i, p in enumerate(exact.positions) if not p.startswith("subject")]
    for kind in ("resid_pre", "mlp_post", "mlp_out"):
        _all_close(exact.scores[kind][:, 0, others], 0.0, atol=1e-5)
    # GPT-NeoX blocks are parallel (resid_pre + attn_out + mlp_out), so at the last position,
    # where layer 0's stream and MLP agree, layer 1's stream adds only layer 0's attention
    torch.testing.assert_close(
        exact.scores["resid_pre"][:, 1, -1], exact.scores["attn_out"][:, 0, -1], atol=1e-5, rtol=0
    )


def test_the_clean_run_beats_the_corrupted_run(exact):
    # the partner's object is the corrupted run's answer: the logit difference changes sign
    assert (exact.clean > 0).mean() >= 0.9 and (exact.corrupted < 0).mean() >= 0.9


def test_metrics_are_rescalings_of_one_logit_difference(fact_model, tuples, exact):
    raw = trace(fact_model, tuples, sites="attn_out", metric="logit_diff")
    np.testing.assert_allclose(raw.clean, exact.clean, rtol=1e-5)
    scale = torch.as_tensor(exact.clean - exact.corrupted)[:, None, None]
    expected = exact.scores["attn_out"] * scale
    torch.testing.assert_close(raw.scores["attn_out"], expected, atol=1e-4, rtol=1e-4)
    prob = trace(fact_model, tuples, sites="resid_pre", positions="all", metric="prob")
    _all_close(prob.scores["resid_pre"], 1.0)
    assert ((prob.clean > 0) & (prob.clean <= 1)).all()


def test_noise_corruption_restores_at_the_subject_embeddings(fact_model, tuples):
    kwargs = dict(sites=("resid_pre", "mlp_post"), corruption="noise",
                  positions=["subject", "EOT", "SS", "relation", "all"])  # fmt: skip
    result = trace(fact_model, tuples, **kwargs)
    s = result.scores["resid_pre"]
    _all_close(s[:, 0, 0], 1.0)  # the subject's embeddings are all that was noised
    _all_close(s[:, :, 4], 1.0)  # the whole stream
    _all_close(s[:, :, 1:3], 0.0, atol=1e-5)  # before the subject nothing changed
    _all_close(s[:, 0, 3], 0.0, atol=1e-5)  # the relation's embedding was never noised
    assert (result.clean > result.corrupted).mean() >= 0.75
    again = trace(fact_model, tuples, **kwargs)
    torch.testing.assert_close(again.scores["mlp_post"], result.scores["mlp_post"])  # seeded
    prob = trace(fact_model, tuples, sites="resid_pre", corruption="noise", metric="prob")
    assert (prob.partners == -1).all()  # no incorrect token to name, so no partners drawn


def test_first_object_token(fact_model, tuples):
    result = trace(fact_model, tuples, sites="resid_pre", object_token=0, positions=["each", "all"])
    obj, other = (_object_tokens(fact_model, f) for f in (result.tuples, result.partners))
    assert (obj[:, 0] != other[:, 0]).all()
    assert result.positions[-2:] == ("OO", "all")  # nothing fed: the prompt ends before the object
    _all_close(result.scores["resid_pre"][:, :, -1], 1.0)
    _all_close(result.scores["resid_pre"][:, :, :2], 0.0, atol=1e-5)
    assert (result.clean > result.corrupted).mean() >= 0.9


# ---------------------------------------------------------------------------------- attribution
def test_attribution_estimates_exact_patching(fact_model, tuples, exact):
    approx = trace(fact_model, tuples, sites=ALL_SITES, method="attribution")
    np.testing.assert_allclose(approx.clean, exact.clean, rtol=1e-5)
    np.testing.assert_allclose(approx.corrupted, exact.corrupted, rtol=1e-5, atol=1e-5)
    for kind in ALL_SITES:
        assert approx.scores[kind].shape == exact.scores[kind].shape
    x = torch.cat([exact.mean[k].flatten() for k in ALL_SITES])
    y = torch.cat([approx.mean[k].flatten() for k in ALL_SITES])
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.7
    # before the subject the activations agree, so the estimate is exactly zero there too
    _all_close(approx.scores["resid_pre"][:, :, :2], 0.0, atol=1e-6)


# ---------------------------------------------------------------------------------- partners
def test_partners_share_the_prefix_and_differ_at_the_measured_token(micro_model):
    world = micro_model.world
    facts = world.facts()
    for j in (0, 1):
        partners = find_partners(world, facts, object_token=j, seed=1)
        ok = partners[:, 0] >= 0
        assert ok.mean() > 0.9
        a, b = _object_tokens(micro_model, facts[ok]), _object_tokens(micro_model, partners[ok])
        assert (a[:, :j] == b[:, :j]).all() and (a[:, j] != b[:, j]).all()
        assert (partners[ok, 1] == facts[ok, 1]).all() and (partners[ok, 0] != facts[ok, 0]).all()
        assert (partners[ok, 2] == world.objects_of(partners[ok, 0], partners[ok, 1])).all()
    assert np.array_equal(find_partners(world, facts, seed=1), find_partners(world, facts, seed=1))
    assert not np.array_equal(
        find_partners(world, facts, seed=1), find_partners(world, facts, seed=2)
    )


@settings(max_examples=25, deadline=None)
@given(
    n_subjects=st.integers(2, 30), n_objects=st.integers(2, 30), object_tokens=st.integers(1, 3),
    object_token=st.integers(-3, 2), seed=st.integers(0, 1000),
)  # fmt: skip
def test_partners_exist_exactly_when_a_candidate_does(
    n_subjects, n_objects, object_tokens, object_token, seed
):
    config = WorldConfig(
        n_subjects=n_subjects,
        n_relations=2,
        n_objects=n_objects,
        object_tokens=object_tokens,
        seed=seed,
    )
    world, tok = World.generate(config), WorldTokenizer(config)
    object_token = max(object_token, -object_tokens) % object_tokens
    facts = world.facts()
    partners = find_partners(world, facts, object_token=object_token, seed=seed)
    toks = tok.entity_tokens("object", facts[:, 2])
    j = object_token
    same_rel = facts[:, None, 1] == facts[None, :, 1]
    prefix = (toks[:, None, :j] == toks[None, :, :j]).all(-1)
    candidate = same_rel & prefix & (toks[:, None, j] != toks[None, :, j])
    assert np.array_equal(partners[:, 0] >= 0, candidate.any(1))
    rows = np.flatnonzero(partners[:, 0] >= 0)
    index = {(s, r): i for i, (s, r, _) in enumerate(facts.tolist())}
    assert all(candidate[i, index[(partners[i, 0], partners[i, 1])]] for i in rows)


def test_sample_tuples_takes_pairable_tuples_per_relation(micro_model):
    world = micro_model.world
    picked = sample_tuples(world, 5, seed=0)
    assert np.bincount(picked[:, 1]).tolist() == [5, 5]
    assert (find_partners(world, picked)[:, 0] >= 0).all()
    assert np.array_equal(picked, sample_tuples(world, 5, seed=0))
    assert len(sample_tuples(world, 5, relations=[1])) == 5


# ---------------------------------------------------------------------------------- result
def test_result_tables(micro_exact, micro_tuples):
    exact, tuples = micro_exact, micro_tuples
    df = exact.to_dataframe()
    n_layers, n_pos = exact.n_layers, len(exact.positions)
    n_heads = exact.scores["head"].shape[-1]
    assert len(df) == n_layers * n_pos * (4 + n_heads)
    assert set(df.columns) == {"site", "layer", "position", "head", "score", "n_tuples"}
    row = df[(df.site == "mlp_post") & (df.layer == 1) & (df.position == "subject[1]")]
    assert row.score.item() == pytest.approx(exact.mean["mlp_post"][1, 3].item())
    assert (
        df[df.site == "resid_pre"]["head"].isna().all()
        and df[df.site == "head"]["head"].max() == n_heads - 1
    )
    per = exact.to_dataframe(per_tuple=True)
    assert len(per) == len(tuples) * len(df)
    assert {"subject", "relation", "object", "relation_name", "excluded"} <= set(per.columns)
    top = exact.top(5)
    assert (
        len(top) == 5 and top.score.is_monotonic_decreasing and top.score.iloc[0] == df.score.max()
    )
    assert set(exact.top(3, site="attn_out").site) == {"attn_out"}
    by = exact.by_relation()
    relations = sorted(set(tuples[:, 1].tolist()))
    assert sorted(by.relation.unique().tolist()) == relations
    r0 = by[(by.relation == relations[0]) & (by.site == "resid_pre")].score.to_numpy()
    assert np.allclose(r0, exact.for_relation(relations[0]).mean["resid_pre"].flatten().numpy())
    assert exact.for_relation("r1").tuples[:, 1].tolist() == [1] * int((tuples[:, 1] == 1).sum())


def test_heatmap_has_a_panel_per_site(micro_exact):
    exact = micro_exact
    fig = exact.heatmap()
    assert len(fig.data) == len(ALL_SITES)
    assert list(fig.data[0].x) == list(exact.positions) and len(fig.data[0].y) == exact.n_layers
    assert len(fig.data[-1].y) == exact.n_layers * exact.scores["head"].shape[-1]
    assert fig.layout.coloraxis.cmid == 0
    one = exact.plot(["mlp_post"], relation="r0")
    assert len(one.data) == 1 and "relation r0" in one.layout.title.text
    with pytest.raises(ValueError, match="site 'mlp' was not traced"):
        exact.heatmap(["mlp"])
    with pytest.raises(ValueError, match="unknown relation 'r9'"):
        exact.heatmap(relation="r9")


# ---------------------------------------------------------------------------------- denominators
def test_tuples_the_corruption_does_not_lower_are_excluded(micro_model, micro_tuples):
    """A tuple whose clean - corrupted metric is below min_denominator keeps its scores but
    leaves the mean, top() and the maps; the counts are reported."""
    kwargs = dict(sites=("resid_pre", "mlp_post"), corruption="noise",
                  positions=["subject", "last_subject", "relation", "last"])  # fmt: skip
    noisy = trace(micro_model, micro_tuples, **kwargs)
    assert noisy.config.min_denominator == MIN_DENOMINATOR["ioi"] == 1.0
    # with the measured denominators, and with some made negative by construction
    low = noisy.denominator.argsort()[:3]
    corrupted = noisy.corrupted.copy()
    corrupted[low] = noisy.clean[low] + np.array([0.5, 3.0, 0.0])  # denominators -0.5, -3, 0
    for result in (noisy, dataclasses.replace(noisy, corrupted=corrupted)):
        keep = result.denominator >= 1.0
        assert np.array_equal(result.excluded, ~keep) and result.n_excluded == int((~keep).sum())
        for kind, s in result.scores.items():
            torch.testing.assert_close(result.mean[kind], s[torch.as_tensor(keep)].mean(0))
        df = result.to_dataframe()
        assert (df.n_tuples == keep.sum()).all()
        per = result.to_dataframe(per_tuple=True)
        assert len(per) == len(result.tuples) * len(df)  # excluded tuples keep their rows
        excluded_rows = per[per.excluded][["subject", "relation", "object"]].drop_duplicates()
        assert np.array_equal(excluded_rows.to_numpy(), result.tuples[~keep])
        best = result.top(1).iloc[0]
        assert best.score == df.score.max() and best.n_tuples == keep.sum()
    constructed = dataclasses.replace(noisy, corrupted=corrupted)
    assert constructed.n_excluded >= 3 and (constructed.excluded[low]).all()
    n, k = len(micro_tuples), constructed.n_excluded
    title = constructed.heatmap().layout.title.text
    assert f"n={n - k} of {n} tuples ({k} excluded: clean − corrupted < 1)" in title
    assert f"({k} excluded" in repr(constructed)
    # -inf keeps every tuple: the mean of all of them, as before the threshold existed
    everything = trace(micro_model, micro_tuples, min_denominator=-np.inf, **kwargs)
    assert everything.n_excluded == 0
    for kind, s in everything.scores.items():
        torch.testing.assert_close(s, noisy.scores[kind])
        torch.testing.assert_close(everything.mean[kind], s.mean(0))


def test_a_trace_with_nothing_excluded_is_unchanged(micro_exact):
    assert micro_exact.n_excluded == 0 and micro_exact.denominator.min() > 1.0
    for kind, s in micro_exact.scores.items():
        assert torch.equal(micro_exact.mean[kind], s.mean(0))
    assert "excluded" not in micro_exact.heatmap().layout.title.text
    assert f"n={len(micro_exact.tuples)} tuples" in micro_exact.heatmap().layout.title.text


def test_denominators_per_metric(micro_model, micro_tuples):
    prob = trace(micro_model, micro_tuples, sites="resid_pre", positions="last", metric="prob")
    assert prob.config.min_denominator == MIN_DENOMINATOR["prob"] == 0.1
    np.testing.assert_array_equal(prob.denominator, prob.clean - prob.corrupted)
    raw = trace(micro_model, micro_tuples, sites="resid_pre", positions="last", metric="logit_diff")
    assert raw.config.min_denominator is None and raw.denominator is None
    assert raw.n_excluded == 0 and not raw.to_dataframe(per_tuple=True).excluded.any()
    with pytest.raises(ValueError, match="'logit_diff' has no denominator"):
        TraceConfig(metric="logit_diff", min_denominator=0.5)
    with pytest.raises(ValueError, match="min_denominator is NaN"):
        TraceConfig(min_denominator=float("nan"))


def test_every_tuple_excluded_is_an_error(micro_model, micro_tuples, micro_exact):
    with pytest.raises(ValueError, match=r"all 4 tuples are excluded: their LD_clean − "
                                         r"LD_corrupted .* below min_denominator=1e\+06"):  # fmt: skip
        trace(micro_model, micro_tuples, sites="resid_pre", min_denominator=1e6)
    none_left = dataclasses.replace(micro_exact, corrupted=micro_exact.clean + 1)
    with pytest.raises(ValueError, match="all 4 tuples are excluded.*lower min_denominator"):
        _ = none_left.mean
    with pytest.raises(ValueError, match="all 4 tuples are excluded"):
        none_left.top()


def test_save_and_load_round_trip(micro_exact, tmp_path):
    exact = micro_exact
    exact.save(tmp_path / "trace")
    back = TraceResult.load(tmp_path / "trace")
    assert back.config == exact.config and back.positions == exact.positions
    assert back.relation_names == exact.relation_names
    for name in ("tuples", "partners", "clean", "corrupted"):
        assert np.array_equal(getattr(back, name), getattr(exact, name))
    for kind in exact.scores:
        assert torch.equal(back.scores[kind], exact.scores[kind])
    with pytest.raises(FileExistsError):
        exact.save(tmp_path / "trace")
    with pytest.raises(FileNotFoundError, match="trace description"):
        TraceResult.load(tmp_path / "missing")
    # the threshold travels in the config; exclusions are recomputed from clean and corrupted
    strict = dataclasses.replace(
        exact, config=dataclasses.replace(exact.config, min_denominator=exact.denominator.max())
    )
    back = TraceResult.load(strict.save(tmp_path / "strict"))
    assert back.config.min_denominator == strict.config.min_denominator
    assert (
        np.array_equal(back.excluded, strict.excluded) and back.n_excluded == len(exact.tuples) - 1
    )
    # a trace saved before min_denominator existed loads with the metric's default
    meta = json.loads((tmp_path / "trace" / "trace.json").read_text())
    del meta["config"]["min_denominator"]
    (tmp_path / "trace" / "trace.json").write_text(json.dumps(meta))
    old = TraceResult.load(tmp_path / "trace")
    assert old.config.min_denominator == MIN_DENOMINATOR["ioi"] and old.config == exact.config


def test_config_round_trips_and_validates():
    config = TraceConfig(sites="mlp_post", positions=("subject", -1), corruption="noise")
    assert config.sites == ("mlp_post",) and TraceConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown site 'mlp'"):
        TraceConfig(sites=("mlp",))
    with pytest.raises(ValueError, match="unknown corruption 'zero': choose one of swap, noise"):
        TraceConfig(corruption="zero")
    with pytest.raises(ValueError, match="unknown metric"):
        TraceConfig(metric="loss")
    with pytest.raises(ValueError, match="unknown template"):
        TraceConfig(template="nope")


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named(micro_model, micro_tuples):
    tuples = micro_tuples
    bad = tuples.copy()
    bad[1, 2] = (bad[1, 2] + 1) % 16
    s, r, o = bad[1]
    with pytest.raises(ValueError, match=rf"tuple \(s={s}, r={r}, o={o}\) is not in this world"):
        trace(micro_model, bad)
    with pytest.raises(ValueError, match="relation 7 is not in this world: it has relations 0..1"):
        trace(micro_model, [[0, 7, 0]])
    with pytest.raises(ValueError, match=r"tuples must be a non-empty array \[n, 3\]"):
        trace(micro_model, np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="unknown site 'mlp_in'"):
        trace(micro_model, tuples, sites=("mlp_in",))
    with pytest.raises(ValueError, match="position 11 is out of range"):
        trace(micro_model, tuples, positions=[11])
    with pytest.raises(ValueError, match="unknown position 'objekt'"):
        trace(micro_model, tuples, positions="objekt")
    with pytest.raises(ValueError, match="object_token=2, but objects have 2 tokens"):
        trace(micro_model, tuples, object_token=2)
    with pytest.raises(ValueError, match=r"partner \(\d+, 0, \d+\) of tuple .* is not a valid"):
        trace(micro_model, tuples, partners=tuples)  # a partner needs another subject


def test_a_model_of_another_world_is_refused(micro_model, micro_tuples, worlds):
    other_world, _ = worlds["independent"]
    with pytest.raises(ValueError, match="the model's tokenizer is not this world's"):
        trace(micro_model, other_world.facts()[:2], world=other_world)
    bare = to_hooked(
        build_model(PRESETS["tiny"], micro_model.world_tokenizer, seed=0),
        micro_model.world_tokenizer,
    )
    with pytest.raises(ValueError, match="the model carries no world: load it with bi.load_model"):
        trace(bare, micro_tuples)


def test_tuples_without_partners_are_named(worlds):
    world, tok = worlds["correlated"]  # relations 1 and 3 are binarized: objects 0 and 1
    model = to_hooked(build_model(dataclasses.replace(PRESETS["tiny"], n_ctx=64), tok, seed=0), tok)
    model.world = world
    binarized = world.facts(relations=[1])[:4]
    with pytest.raises(
        ValueError, match=r"4 of 4 tuples have no corruption partner.*object_token=0"
    ):
        trace(model, binarized, object_token=0)
    assert (find_partners(world, binarized, object_token=0) == -1).all()


# ---------------------------------------------------------------------------------- CLI
def test_trace_command(micro_checkpoint, tmp_path):
    from behemoth_interp.cli import app

    out = tmp_path / "trace"
    args = ["trace", str(micro_checkpoint), "--out", str(out), "--per-relation", "3",
            "--sites", "resid_pre,mlp_post", "--html", str(tmp_path / "t.html")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = TraceResult.load(out)
    assert saved.sites == ("resid_pre", "mlp_post") and len(saved.tuples) == 6
    assert (tmp_path / "t.html").is_file()
    assert "top 10" in result.output and "resid_pre" in result.output
