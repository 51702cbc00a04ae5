"""Residual knowledge: the relearning attack, checked against models whose knowledge of the
attacked facts is known exactly (the original, which knows them; the oracle, which never did)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import behemoth_interp as bi
from behemoth_interp.cli import app
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.residual import (
    BatteryConfig,
    RelearnConfig,
    neighbourhood_scores,
    neighbours,
    relearn,
    residual_knowledge,
)

ATTACK = RelearnConfig()
"""The default attack: 20 steps of 16 at 3e-4. Measured on the micro model with seeds 0 and 1
(and at 60 steps, and 100 at 1e-4): the oracle's held-out accuracy after it is 0.00-0.05
(chance 0.0625), its trained half 0.11-0.56; the original model's held-out half 0.95-1.00."""


@pytest.fixture(scope="module")
def forget(micro_checkpoint, tmp_path_factory):
    """The micro model, its forget task (relation 0: 40 tuples, those not at object 0 change)
    and the task's oracle, which never saw their true objects."""
    torch.set_num_threads(1)
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, "forget", correct=hf)
    truth = bi.oracle(micro_checkpoint, task, cache=tmp_path_factory.mktemp("oracles"))
    return hf, task, truth


def test_relearning_recovers_nothing_a_model_never_knew(forget):
    """Attacking the oracle: the held-out half was never learned, and in an independent world
    the trained half says nothing of it, so held-out accuracy stays at chance level."""
    hf, task, truth = forget
    result = relearn(hf, task, config=ATTACK, baseline=truth)
    acc = result.accuracy
    assert acc.loc[("baseline", "heldout"), "before"] == 0.0  # it answers object 0 there
    assert acc.loc[("baseline", "trained"), "after"] > 0.0  # the attack itself is learned
    assert acc.loc[("baseline", "heldout"), "after"] <= result.chance + 0.1
    # the unedited model knew every fact, and the attack restates half of them
    assert acc.loc[("edited", "heldout"), "before"] == 1.0
    assert acc.loc[("edited", "heldout"), "after"] >= 0.9
    assert len(result.trained) + len(result.heldout) == task.changed.sum()
    assert not set(map(tuple, result.trained)) & set(map(tuple, result.heldout))


def test_relearning_is_seeded_and_leaves_its_input_alone(forget):
    hf, task, _ = forget
    before = [p.detach().clone() for p in hf.parameters()]
    a, b = (relearn(hf, task, config=RelearnConfig(steps=2)) for _ in range(2))
    assert a.accuracy.equals(b.accuracy) and np.array_equal(a.trained, b.trained)
    assert all(torch.equal(p, q) for p, q in zip(before, hf.parameters()))
    other = relearn(hf, task, config=RelearnConfig(steps=2, seed=1))
    assert not np.array_equal(other.trained, a.trained)
    assert set(a.to_dataframe().columns) == {"model", "split", "before", "after"}


def test_relearning_needs_tuples_to_hold_out(forget):
    hf, task, _ = forget
    single = bi.EditTask.draw(task.world, "single", correct=hf)
    with pytest.raises(InvalidArgument, match="use a forget or ten_"):
        relearn(hf, single)
    with pytest.raises(InvalidArgument, match="fraction must be below 1"):
        RelearnConfig(fraction=1.0)


def test_neighbours_are_the_edits_untouched_near_facts(forget):
    hf, task, _ = forget
    w = task.world
    single = bi.EditTask.draw(w, "single", seed=2, correct=hf)
    ((s, r, new),) = single.edited.tolist()
    tok = bi.WorldTokenizer(w.config)
    subject_tokens = set(tok.entity_tokens("subject", np.array([s]))[0].tolist())
    found = neighbours(single)
    unchanged = set(map(tuple, single.unchanged().tolist()))
    for facts, lure in found.values():
        assert len(facts) and (lure == new).all() and (facts[:, 2] != new).all()
        assert (w.objects_of(facts[:, 0], facts[:, 1]) == facts[:, 2]).all()
        assert set(map(tuple, facts.tolist())) <= unchanged
    same, _ = found["same_subject"]
    assert (same[:, 0] == s).all() and (same[:, 1] != r).all()
    near, _ = found["shared_tokens"]
    assert (near[:, 1] == r).all() and (near[:, 0] != s).all()
    for subject in near[:, 0]:
        assert subject_tokens & set(tok.entity_tokens("subject", np.array([subject]))[0].tolist())
    # every subject sharing a token, whose object is not the lure, is there
    every = w.facts(r)
    shares = np.isin(tok.entity_tokens("subject", every[:, 0]), list(subject_tokens)).any(1)
    assert len(near) == int((shares & (every[:, 0] != s) & (every[:, 2] != new)).sum())
    scores = neighbourhood_scores(hf, single, before=hf)
    assert scores.set_index("neighbourhood")[["accuracy", "edit_error"]].to_dict("list") == {
        "accuracy": [1.0, 1.0],
        "edit_error": [0.0, 0.0],
    }  # the unedited model knows them all


QUICK = BatteryConfig(attack=RelearnConfig(steps=2), krs_settings=("coefficients",),
                      krs_windows=(1,), krs_prompts=8, neighbours=50)  # fmt: skip


def test_the_battery_of_an_unedited_model_finds_nothing_removed(forget):
    hf, task, truth = forget
    result = residual_knowledge(hf, task, before=hf, oracle=truth, config=QUICK)
    df = result.to_dataframe().set_index(["part", "metric"])
    assert df.loc[("edit", "forget rate"), "value"] == 0.0
    assert df.loc[("edit", "maintain"), "value"] == df.loc[("edit", "maintain"), "before"]
    assert result.krs is None and "nothing" in result.undefined["krs"]
    assert result.latent is None and "probe" in result.undefined["latent"]
    assert not df["value"].isna().any()
    assert set(df.index.get_level_values("part")) >= {"edit", "oracle", "neighbourhood", "relearn"}
    assert BatteryConfig.from_dict(QUICK.to_dict()) == QUICK
    assert result.plot().data


def test_the_battery_of_an_unlearning_run_measures_every_part(forget, micro_checkpoint, tmp_path):
    hf, task, truth = forget
    unlearned = bi.edit(hf, task, objective="gradient_ascent", lr=1e-3, evaluate=False)
    edited = unlearned.model
    probes = bi.probe(bi.load_model(micro_checkpoint), relation=task.relation, seed=0)
    result = residual_knowledge(edited, task, before=hf, oracle=truth, probes=probes,
                                config=QUICK)  # fmt: skip
    assert not result.undefined
    df = result.to_dataframe().set_index(["part", "metric"])
    assert df.loc[("edit", "forget rate"), "value"] > 0.0
    assert set(df.index.get_level_values("part")) == {
        "edit",
        "oracle",
        "neighbourhood",
        "relearn",
        "latent",
        "krs",
    }
    assert np.isfinite(df["value"]).all()
    # the command line: the same battery as a report page, from the saved edit
    unlearned.save(tmp_path / "edited")
    page = tmp_path / "residual.html"
    args = ["residual", str(tmp_path / "edited"), "--before", str(micro_checkpoint), "--out",
            str(page), "--attack-steps", "2", "--no-krs", "--no-probes"]  # fmt: skip
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "Residual knowledge after finetune" in page.read_text()
    assert "krs: not run" in shown.output and "latent: no probes" in shown.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--force" in str(again.exception)
