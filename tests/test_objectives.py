"""The fine-tuning objectives: each decreases its own loss, edits only what it may, NPO tends to
gradient ascent as β -> 0, and bad settings are refused by name."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from behemoth_interp import OBJECTIVES, EditTask, edit, load_hf
from behemoth_interp.edit import (
    NPO,
    RMU,
    EditDataConfig,
    GradientAscent,
    Localized,
    SimNPO,
    edit_dataset,
    general_data,
    get_objective,
    trainable_parameters,
)
from behemoth_interp.edit.fit import object_inputs
from behemoth_interp.edit.objectives import Batch, objective_from_dict, objective_to_dict
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.tokenizer import WorldTokenizer

UNLEARNING = [name for name, cls in OBJECTIVES.items() if cls.needs_forget]


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    torch.set_num_threads(1)
    return load_hf(micro_checkpoint)


def _task(world, name: str) -> EditTask:
    return EditTask.draw(world, "forget" if name in UNLEARNING else "single", seed=0)


def _batch(hf, task: EditTask, objective, reference) -> Batch:
    """The first 32 rows of the task's dataset as one batch (what `fit.finetune` builds)."""
    data = edit_dataset(task, EditDataConfig(forget_fraction=0.5))
    w, tok = task.world, WorldTokenizer(task.world.config)
    x, mask = object_inputs(w, tok, data.facts, data.template, 0, "cpu")
    old = data.facts.copy()
    old[:, 2] = w.objects_of(old[:, 0], old[:, 1])
    x_old, _ = object_inputs(w, tok, old, data.template, 0, "cpu")
    injected = np.isin(data.part, ("edit", "forget"))
    forget = injected & (old[:, 2] != data.facts[:, 2])
    rows = slice(0, 32)
    general = None
    if objective.needs_general:
        g = general_data(task)
        general = tuple(t[:32] for t in object_inputs(w, tok, g.facts, g.template, 0, "cpu"))
    return Batch(hf, x[rows], x_old[rows], mask[rows], torch.as_tensor(injected[rows]),
                 torch.as_tensor(forget[rows]), reference, general)  # fmt: skip


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_decreases_its_own_loss(micro, name):
    hf, world, _ = micro
    task = _task(world, name)
    objective = get_objective(name, **({"layer": 1} if name == "rmu" else {}))
    with torch.no_grad():
        before = objective.loss(_batch(hf, task, objective, hf)).item()
    result = edit(hf, task, objective=objective, steps=8, lr=1e-3, evaluate=False,
                  data=EditDataConfig(forget_fraction=0.5))  # fmt: skip
    with torch.no_grad():
        after = objective.loss(_batch(result.model, task, objective, hf)).item()
    assert math.isfinite(after) and after < before, (before, after)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_edits_only_the_chosen_weights(micro, name):
    hf, world, _ = micro
    task = _task(world, name)
    options = {"layer": 1} if name == "rmu" else {}
    r = edit(hf, task, objective=name, blocks=[1], components="mlp", steps=2, evaluate=False,
             **options).report  # fmt: skip
    allowed = set(trainable_parameters(hf, [1], "mlp"))
    assert r.changed and set(r.changed) <= allowed, set(r.changed) - allowed


def test_npo_tends_to_gradient_ascent_as_beta_goes_to_zero(micro):
    """dNPO/d(log π - log π_ref) = 2σ(β (log π - log π_ref)) -> 1 as β -> 0, so NPO's gradient
    tends to mean_rows ∇ log π(y) = |y| · GA's (GA averages over the |y| = 2 object tokens).
    Away from the reference (after 10 steps of GA) the relative gap of the gradients measured
    0.99 at β = 1, 0.046 at β = 1e-2 and 4.6e-4 at β = 1e-4 (linear in β, as the expansion
    1 + β d / 2 says); asserted < 1e-3 at β = 1e-4 and shrinking with β. (Adam trajectories are
    compared in no test: its eps makes tiny gradients scale-dependent, a 0.35% gap at step 1
    whatever β is.)"""
    hf, world, _ = micro
    task = EditTask.draw(world, "forget", seed=0)
    moved = edit(hf, task, objective="gradient_ascent", steps=10, lr=1e-3, evaluate=False,
                 data=EditDataConfig(forget_fraction=0.5)).model  # fmt: skip

    def grad(objective) -> torch.Tensor:
        moved.zero_grad()
        objective.loss(_batch(moved, task, objective, hf)).backward()
        return torch.cat([p.grad.flatten() for p in moved.parameters() if p.grad is not None])

    ga = 2 * grad(GradientAscent())
    gaps = [((grad(NPO(beta=b)) - ga).norm() / ga.norm()).item() for b in (1.0, 1e-2, 1e-4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps


def test_rmu_pushes_the_forget_stream_toward_its_direction(micro):
    hf, world, _ = micro
    task = EditTask.draw(world, "forget", seed=0)
    rmu = RMU(layer=1, steering=4.0, alpha=1.0)
    before = _batch(hf, task, rmu, hf)
    result = edit(hf, task, objective=rmu, blocks=[0, 1], steps=20, lr=1e-3, evaluate=False,
                  data=EditDataConfig(forget_fraction=0.5))  # fmt: skip
    u = rmu.direction(hf.config.hidden_size, "cpu")

    def cosine(model) -> float:
        with torch.no_grad():
            h = model(input_ids=before.x_old[:, :-1], output_hidden_states=True).hidden_states[2]
        last = before.mask.float().argmax(1)  # the last prompt token
        rows = before.forget
        h = h[rows, last[rows]]
        return torch.nn.functional.cosine_similarity(h, u[None], dim=-1).mean().item()

    assert cosine(result.model) > cosine(hf) + 0.3


def test_objective_configs_round_trip_and_validate():
    for name, cls in OBJECTIVES.items():
        objective = cls()
        assert objective_from_dict(objective_to_dict(objective)) == objective, name
    assert get_objective("npo", beta=0.3) == NPO(beta=0.3)
    assert get_objective(NPO(), retain="kl") == NPO(retain="kl")
    with pytest.raises(InvalidArgument, match="unknown objective 'kl'"):
        get_objective("kl")
    with pytest.raises(InvalidArgument, match=r"beta \(--beta \(npo\)\) must be > 0, got 0"):
        NPO(beta=0)
    with pytest.raises(InvalidArgument, match="beta"):
        SimNPO(beta=-1.0)
    with pytest.raises(InvalidArgument, match="retain must be one of None, 'nll', 'kl'"):
        NPO(retain="l2")
    with pytest.raises(InvalidArgument, match="objective 'ce' has no setting"):
        get_objective("ce", beta=1.0)
    with pytest.raises(InvalidArgument, match=r"injection \(localized injection\) must be >= 0"):
        Localized(injection=-1.0)


def test_bad_objective_uses_are_refused(micro):
    hf, world, _ = micro
    facts = world.facts(0)
    at_zero = facts[facts[:, 2] == 0]
    assert len(at_zero)
    nothing = EditTask(world, at_zero, np.zeros(len(at_zero)), "forget")
    with pytest.raises(InvalidArgument, match="no tuple whose object changes"):
        edit(hf, nothing, objective="npo", steps=1)
    task = EditTask.draw(world, "forget", seed=0)
    with pytest.raises(InvalidArgument, match="RMU layer 5 is not in this model"):
        edit(hf, task, objective="rmu", layer=5, steps=1, evaluate=False)
    with pytest.raises(InvalidArgument, match="method 'rome' has no training objective"):
        edit(hf, task, method="rome", blocks=[0], objective="npo")
    with pytest.raises(InvalidArgument, match="has no setting"):
        edit(hf, task, objective="ce", beta=0.1)
    # the reference model is the unedited one, never the model being trained
    reference = copy.deepcopy(hf)
    edit(hf, task, objective="npo", steps=2, evaluate=False)
    for (name, a), b in zip(hf.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
