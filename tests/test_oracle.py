"""Exact oracles: the model trained on the world as an edit says it should be, with the edited
model's recipe and seed; a no-op edit's oracle is the original model, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHIPPED_MODELS
from typer.testing import CliRunner

from behemoth_interp import EditTask, evaluate_edit, load_hf, oracle, oracle_path
from behemoth_interp.cli import app
from behemoth_interp.edit import oracle_distance
from behemoth_interp.errors import MissingInput
from behemoth_interp.evaluate import evaluate_facts

SHIPPED_ORACLES = SHIPPED_MODELS.parent / "oracles"


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    torch.set_num_threads(1)  # as the micro model was trained: the same float sums
    return load_hf(micro_checkpoint)


def test_the_oracle_of_a_no_op_task_is_the_original_model(micro, micro_checkpoint, tmp_path):
    hf, world, _ = micro
    facts = world.facts(0)
    at_zero = facts[facts[:, 2] == 0]
    noop = EditTask(world, at_zero, np.zeros(len(at_zero)), "forget")
    assert not noop.changed.any()
    truth = oracle(micro_checkpoint, noop, cache=tmp_path)
    for (name, a), b in zip(hf.named_parameters(), truth.parameters()):
        assert torch.equal(a, b), name
    assert oracle_path(micro_checkpoint, noop, tmp_path).is_dir()
    distance = oracle_distance(hf, truth, noop)
    assert distance["agreement"] == 1.0 and distance["kl"] == 0.0


def test_an_oracle_knows_the_edit_and_scores_itself_perfectly(micro, micro_checkpoint, tmp_path):
    hf, world, tok = micro
    task = EditTask.draw(world, "single", seed=3, correct=hf)
    truth = oracle(micro_checkpoint, task, cache=tmp_path)
    report = evaluate_edit(truth, task, before=hf, oracle=truth)
    assert report.oracle_agreement == 1.0 and report.oracle_kl == 0.0
    assert report.success_top1 == 1.0  # trained on the changed world, it knows the new object
    # the original model disagrees with the oracle on the edited tuple (and little else)
    far = oracle_distance(hf, truth, task)
    assert far["agreement"] < 1.0 and far["kl"] > 0.0
    edited_row = np.flatnonzero((world.facts()[:, :2] == task.facts[0, :2]).all(1))[0]
    assert far["per_tuple_agreement"][edited_row] == 0.0
    # trained once: asked again, it is read from the cache
    again = oracle(micro_checkpoint, task, cache=tmp_path)
    for a, b in zip(truth.parameters(), again.parameters()):
        assert torch.equal(a, b)
    # the command line draws the same task and finds it there
    shown = CliRunner().invoke(app, ["oracle", str(micro_checkpoint), "--task", "single",
                                     "--seed", "3", "--cache", str(tmp_path)])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert f"oracle read from {oracle_path(micro_checkpoint, task, tmp_path)}" in shown.output
    assert f"agrees with it on {far['agreement']:.4f} of the tuples" in shown.output


def test_an_oracle_needs_a_training_recipe(micro, tmp_path):
    hf, world, _ = micro
    edited = tmp_path / "edited"
    from behemoth_interp import edit

    task = EditTask.draw(world, "single", seed=0)
    edit(hf, task, steps=1, evaluate=False).save(edited)
    with pytest.raises(MissingInput, match="an oracle repeats the checkpoint's training"):
        oracle(edited, task, cache=tmp_path / "cache")


def test_the_shipped_forget_oracle_is_found_and_knows_the_changed_world():
    """data/oracles holds the oracle of the shipped independent model's forget task: found
    under the key bi.oracle computes, it answers object 0 on every tuple of r0 and knows every
    other fact (top-1 on every tuple of the changed world)."""
    model = SHIPPED_MODELS / "independent"
    hf, world, tok = load_hf(model)
    task = EditTask.draw(world, "forget", correct=hf)
    path = oracle_path(model, task, SHIPPED_ORACLES)
    assert (path / "model" / "model.safetensors").is_file(), path
    truth, changed, _ = load_hf(path / "model")
    assert changed == world.with_objects(task.facts, task.targets)
    assert evaluate_facts(truth, changed, tok).accuracy == 1.0
    assert (changed.objects_of(task.facts[:, 0], task.facts[:, 1]) == 0).all()
