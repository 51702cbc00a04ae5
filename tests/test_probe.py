"""Linear probes: ground truth of the split and the hook layer, shipped-model accuracy against a
random initialization of the same shape, FLU localization, latent knowledge after an edit."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from conftest import finished_checkpoint
from typer.testing import CliRunner

import behemoth_interp as bi
from behemoth_interp import EditTask, ProbeConfig, ProbeResult, edit, flu_layers, probe
from behemoth_interp.cli import app
from behemoth_interp.edit import trainable_parameters
from behemoth_interp.model import ModelConfig, build_model, load_hf, shape_of, to_hooked

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro_probes(micro_model):
    return probe(micro_model, 0, sites=("resid", "mlp_out"))


@pytest.fixture(scope="module")
def shipped():
    path = finished_checkpoint("independent")
    if path is None:
        pytest.skip("data/models/independent is missing or still training")
    return bi.load_model(path)


# ---------------------------------------------------------------------------------- accuracy
def test_shipped_model_probes_reach_the_answer_and_a_random_one_stays_at_chance(shipped):
    """Measured over 6 relations x 4 seeds: the stream after the last block decodes 0.99-1.00 of
    the held-out subjects' first object token, the one entering it 0.86-0.98; a random model of
    the same shape never beats chance by more than 0.023 (sd of a 101-subject test set ~0.025)."""
    result = probe(shipped, 0)
    acc = result.accuracy["resid"]
    assert len(acc) == shipped.cfg.n_layers + 1 and len(result.classes) == 20
    assert acc[-1] >= 0.95 and acc[-2] >= 0.8
    assert acc[0] in _majority_accuracies(result)
    random = to_hooked(build_model(shape_of(load_hf(shipped.checkpoint)[0]), shipped.world_tokenizer,
                                   seed=1), shipped.world_tokenizer)  # fmt: skip
    random.world = shipped.world
    baseline = probe(random, 0)
    assert baseline.chance == result.chance  # same subjects, same seeded split
    assert baseline.accuracy["resid"].max() <= baseline.chance + 0.1
    loc = flu_layers(result)
    assert {3, 4} <= set(loc) and loc.blocks == tuple(sorted(loc))
    with pytest.raises(ValueError, match="within 0.2 of chance.*is the model trained"):
        flu_layers(baseline)


def _majority_accuracies(result: ProbeResult) -> np.ndarray:
    """Test accuracy of always answering each of the most frequent training classes; at 'last'
    layer 0 is the same token embedding in every prompt, so a probe can only answer one."""
    values, counts = np.unique(result.labels[result.train], return_counts=True)
    majority = values[counts == counts.max()]
    by_class = (result.labels[result.test, None] == majority).mean(0)
    assert result.chance == pytest.approx(by_class.mean())
    return by_class


def test_probe_activations_come_from_the_hook_layer(micro_model, micro_probes, monkeypatch):
    """`capture` is the only way in, and applying the stored probes to TransformerLens' own
    cache at the probed position gives the stored predictions (resid: resid_pre of each block,
    then the last block's resid_post)."""
    calls = []
    probe_module = importlib.import_module("behemoth_interp.probe")  # bi.probe is the function
    real = probe_module.capture

    def spy(model, tokens, sites, **kwargs):
        calls.append(sites)
        return real(model, tokens, sites, **kwargs)

    monkeypatch.setattr(probe_module, "capture", spy)
    again = probe(micro_model, 0, sites=("resid", "mlp_out"))
    assert calls == [["attn_out.1", "mlp_out", "mlp_out.1", "resid_pre"]]
    np.testing.assert_array_equal(again.predictions["resid"], micro_probes.predictions["resid"])
    inputs = bi.build_inputs(micro_model.world, micro_model.world_tokenizer, micro_probes.facts)
    _, cache = micro_model.run_with_cache(inputs.tokens)
    n = micro_model.cfg.n_layers
    names = {"resid": [f"blocks.{i}.hook_resid_pre" for i in range(n)]
             + [f"blocks.{n - 1}.hook_resid_post"],
             "mlp_out": [f"blocks.{i}.hook_mlp_out" for i in range(n)]}  # fmt: skip
    for site, hooks in names.items():
        x = torch.stack([cache[h][:, -1] for h in hooks]).double()
        scores = x @ micro_probes.weights[site].transpose(1, 2) + micro_probes.bias[site][:, None]
        got = micro_probes.classes[scores.argmax(-1).numpy()]
        np.testing.assert_array_equal(got, micro_probes.predictions[site])
    np.testing.assert_array_equal(
        micro_probes.predict(micro_model)["resid"], micro_probes.predictions["resid"]
    )


# ---------------------------------------------------------------------------------- the split
def test_split_is_by_subject_stratified_and_seeded(micro_model, micro_probes):
    r = micro_probes
    world, tok = micro_model.world, micro_model.world_tokenizer
    assert np.array_equal(r.facts, world.facts(0))
    first = tok.entity_tokens("object", r.facts[:, 2])[:, 0]
    assert np.array_equal(r.labels, first) and np.array_equal(r.classes, np.unique(first))
    train, test = set(r.facts[r.train, 0]), set(r.facts[r.test, 0])
    assert not train & test and train | test == set(range(40))
    for c in r.classes:  # each class holds out round(25%) of its subjects
        members = r.labels == c
        assert (members & r.test).sum() == round(0.25 * members.sum())
    same = probe(micro_model, 0, sites=("resid", "mlp_out"))
    np.testing.assert_array_equal(same.train, r.train)
    for site in r.sites:
        assert torch.equal(same.weights[site], r.weights[site])
        np.testing.assert_array_equal(same.accuracy[site], r.accuracy[site])
    other = probe(micro_model, 0, seed=1)
    assert not np.array_equal(other.train, r.train)
    left_out = probe(micro_model, 0, exclude=[0, 5, 7])
    assert not np.isin([0, 5, 7], left_out.facts[:, 0]).any() and len(left_out.facts) == 37
    assert left_out.config.exclude == (0, 5, 7)


def test_micro_model_probes_and_ovr(micro_model, micro_probes):
    """The micro model (2 blocks) answers from the stream after its last block: measured 1.00
    of 9-11 held-out subjects for both relations, both object tokens, split seeds 0-2, with
    multinomial and one-vs-rest probes (Guo et al. 2024); entering block 1 it is 0.22-0.78
    (r0) and 0.45-1.00 (r1, last token) over 10 splits x 5 micro models."""
    assert micro_probes.accuracy["resid"][-1] >= 0.85
    assert micro_probes.accuracy["resid"][0] in _majority_accuracies(micro_probes)
    ovr = probe(micro_model, 0, multiclass="ovr")
    assert ovr.accuracy["resid"][-1] >= 0.85 and ovr.weights["resid"].shape == (3, 4, 64)
    second = probe(micro_model, 1, object_token=-1)  # teacher-forced first object token
    assert second.accuracy["resid"][-1] >= 0.85


def test_flu_takes_the_fewest_blocks_that_make_the_share(micro_probes):
    curve = np.array([0.1, 0.1, 0.2, 0.6, 0.9, 0.95, 1.0])
    fake = dataclasses.replace(micro_probes, accuracy={"resid": curve})
    # gains 0, .1, .4, .3, .05, .05 (sum .9): .4 + .3 < .8 * .9 <= .4 + .3 + .1
    loc = flu_layers(fake)
    assert loc.blocks == (1, 2, 3) and list(loc) == [1, 2, 3] and len(loc) == 3
    np.testing.assert_allclose(loc.gains, np.diff(curve))
    assert flu_layers(fake, share=0.75).blocks == (2, 3)
    assert flu_layers(fake, share=1.0).blocks == (1, 2, 3, 4, 5)
    df = loc.to_dataframe()
    assert df["chosen"].tolist() == [False, True, True, True, False, False]
    assert len(loc.plot().data) == 2
    tok = bi.WorldTokenizer(bi.WorldConfig(n_subjects=4, n_relations=1, n_objects=4))
    hf = build_model(ModelConfig(n_layers=6, d_model=32, n_heads=2, d_mlp=64), tok, seed=0)
    assert trainable_parameters(hf, loc, "mlp") == trainable_parameters(hf, [1, 2, 3], "mlp")
    with pytest.raises(ValueError, match="needs the residual stream.*sites including 'resid'"):
        flu_layers(dataclasses.replace(micro_probes, accuracy={"mlp_out": curve[1:]}))
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
        flu_layers(fake, share=0)


# ---------------------------------------------------------------------------------- latent knowledge
def test_latent_knowledge_after_a_forget_edit(micro_model, micro_checkpoint, micro_probes):
    world = micro_model.world
    task = EditTask.draw(world, "forget", relation=0)
    new_first = micro_model.world_tokenizer.entity_tokens("object", task.targets[:1])[0, 0]
    before = bi.latent_knowledge(micro_probes, micro_model, task)
    # scored: the probes' held-out subjects whose first object token the edit changes
    rows = micro_probes.test & (micro_probes.labels != new_first)
    np.testing.assert_array_equal(before.facts, micro_probes.facts[rows])
    for site in micro_probes.sites:
        pred = micro_probes.predictions[site][:, rows]
        np.testing.assert_array_equal(
            before.original[site], (pred == micro_probes.labels[rows]).mean(1)
        )
        np.testing.assert_array_equal(before.new[site], (pred == new_first).mean(1))
    result = edit(micro_checkpoint, task, steps=20, lr=1e-3, evaluate=False, hooked=True)
    after = bi.latent_knowledge(micro_probes, result.hooked, task)
    from_hf = bi.latent_knowledge(micro_probes, result.model, task)
    for site in micro_probes.sites:
        for values in (after.original[site], after.new[site]):
            assert ((values >= 0) & (values <= 1)).all()
        assert (after.original[site] + after.new[site] <= 1).all()  # two classes, one answer
        np.testing.assert_array_equal(from_hf.original[site], after.original[site])
    np.testing.assert_array_equal(after.facts, before.facts)
    assert not np.array_equal(after.predictions["resid"], before.predictions["resid"])
    df = after.to_dataframe()
    assert set(df["answer"]) == {"original", "new"} and len(df) == 2 * (3 + 2)
    assert len(after.plot({"unedited": before}).data) == 2 * 2 * 2  # models x sites x answers


def test_latent_knowledge_errors(micro_model, micro_probes):
    world = micro_model.world
    seen = micro_probes.facts[micro_probes.train][:1]
    single = EditTask(world, seen, (seen[:, 2] + 4) % 16)  # another first token
    with pytest.raises(ValueError, match="Fit the probes with exclude=task.facts"):
        bi.latent_knowledge(micro_probes, micro_model, single)
    other = EditTask.draw(world, "single", relation=1, seed=0)
    with pytest.raises(ValueError, match="the probes read relation r0, the task edits r1"):
        bi.latent_knowledge(micro_probes, micro_model, other)
    with pytest.raises(ValueError, match="the probes read relation r0: pass tuples of that"):
        micro_probes.predict(micro_model, world.facts(1))
    kept_out = probe(micro_model, 0, exclude=single.facts[:, 0])
    lk = bi.latent_knowledge(kept_out, micro_model, single)
    assert np.array_equal(lk.facts, seen)
    assert lk.original["resid"][-1] == 1.0  # measured: the micro model's answer is decodable


# ---------------------------------------------------------------------------------- errors
def test_bad_inputs_are_named(micro_model, worlds):
    with pytest.raises(ValueError, match="relation 7 is not in this world: it has relations 0..1"):
        probe(micro_model, 7)
    with pytest.raises(ValueError, match="unknown position 'object'"):
        probe(micro_model, 0, position="object")
    with pytest.raises(ValueError, match="position 'subject' covers 2 input positions"):
        probe(micro_model, 0, position="subject")
    with pytest.raises(ValueError, match="position 20 is out of range"):
        probe(micro_model, 0, position=20)
    with pytest.raises(ValueError, match="unknown site 'mlp'"):
        probe(micro_model, 0, sites="mlp")
    with pytest.raises(ValueError, match="object_token=2, but objects have 2 tokens"):
        probe(micro_model, 0, object_token=2)
    with pytest.raises(ValueError, match="excluded subject 40 is not a subject of r0"):
        probe(micro_model, 0, exclude=[40])
    with pytest.raises(ValueError, match=r"test_size is a share of the subjects in \(0, 1\)"):
        probe(micro_model, 0, test_size=1)
    bare = to_hooked(build_model(bi.PRESETS["tiny"], micro_model.world_tokenizer, seed=0),
                     micro_model.world_tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="the model carries no world: load it with bi.load_model"):
        probe(bare, 0)
    world, tok = worlds["correlated"]  # relations 1 and 3 are binarized: objects 0 and 1
    tiny = to_hooked(build_model(bi.PRESETS["tiny"], tok, seed=0), tok)
    tiny.world = world
    with pytest.raises(ValueError, match="every object of r1 has the same token 0"):
        probe(tiny, 1)
    assert len(probe(tiny, 1, object_token=-1).classes) == 2


# ---------------------------------------------------------------------------------- results
def test_config_and_result_round_trip(micro_model, micro_probes, tmp_path):
    config = micro_probes.config
    assert ProbeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ProbeConfig fields"):
        ProbeConfig.from_dict({**config.to_dict(), "layers": 3})
    path = micro_probes.save(tmp_path / "probes")
    back = ProbeResult.load(path)
    assert back.config == config and back.chance == micro_probes.chance
    for site in micro_probes.sites:
        assert torch.equal(back.weights[site], micro_probes.weights[site])
        np.testing.assert_array_equal(back.accuracy[site], micro_probes.accuracy[site])
    np.testing.assert_array_equal(
        back.predict(micro_model)["resid"], micro_probes.predictions["resid"]
    )
    with pytest.raises(FileExistsError):
        micro_probes.save(path)
    df = micro_probes.to_dataframe()
    assert list(df.columns) == ["site", "layer", "accuracy", "train_accuracy", "chance"]
    assert len(df) == 3 + 2
    fig = micro_probes.plot({"again": back})
    assert len(fig.data) == 4 and "chance" in str(fig.layout.annotations)
    assert "ProbeResult(r0 at 'last'" in repr(micro_probes)


def test_cli_probe(micro_checkpoint, tmp_path, monkeypatch, capsys):
    import sys

    from behemoth_interp.cli import main

    out = tmp_path / "probes.html"
    result = CliRunner().invoke(app, ["probe", str(micro_checkpoint), "--relation", "0", "--out",
                                      str(out), "--sites", "resid,mlp_out"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "plotly" in out.read_text().lower() and "accuracy" in result.output
    saved = tmp_path / "probes"
    assert (
        CliRunner().invoke(app, ["probe", str(micro_checkpoint), "--out", str(saved)]).exit_code
        == 0
    )
    assert ProbeResult.load(saved).config.relation == 0
    monkeypatch.setattr(sys, "argv", ["behemoth-interp", "probe", str(micro_checkpoint),
                                      "--relation", "9", "--out", str(out), "--force"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err == "error: relation 9 is not in this world: it has relations 0..1\n"
    )


def test_cli_refuses_an_occupied_out_before_probing(micro_checkpoint, tmp_path, monkeypatch):
    saved = tmp_path / "probes"
    saved.mkdir()
    (saved / "keep.txt").write_text("not ours")

    def fail(*args, **kwargs):
        raise AssertionError("probed before checking --out")

    monkeypatch.setattr(importlib.import_module("behemoth_interp.probe"), "probe", fail)
    again = CliRunner().invoke(app, ["probe", str(micro_checkpoint), "--out", str(saved)])
    assert isinstance(again.exception, FileExistsError), again.output
    assert (saved / "keep.txt").read_text() == "not ours"
