"""Edit tasks, edit datasets and restricted fine-tuning, against the world's exact ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import finished_checkpoint, train_micro
from transformers import GPTNeoXForCausalLM

from behemoth_interp import WorldConfig, evaluate_facts, load_hf
from behemoth_interp.edit import (
    METHODS,
    TASKS,
    EditDataConfig,
    EditReport,
    EditTask,
    changed_parameters,
    edit,
    edit_dataset,
    evaluate_edit,
    lora_modules,
    select_lr,
    trainable_parameters,
)
from behemoth_interp.errors import CheckpointMismatch, Diverged, InvalidArgument
from behemoth_interp.grammar import PARAPHRASES, edit_choices
from behemoth_interp.model import PRESETS, build_model
from behemoth_interp.rank import COMPONENTS, move_rank


def _keys(world, facts):
    return set(zip(facts[:, 0].tolist(), facts[:, 1].tolist()))


# ------------------------------------------------------------------ tasks
def test_single_override(worlds):
    world, _ = worlds["independent"]
    task = EditTask.draw(world, "single", seed=3)
    (s, r, o), t = task.facts[0], task.targets[0]
    assert len(task.facts) == 1 and r == 0 and world.object_of(s, r) == o
    assert t != o and 0 <= t < world.config.n_objects
    assert task.edited.tolist() == [[s, r, t]]
    again = EditTask.draw(world, "single", seed=3)
    assert np.array_equal(again.facts, task.facts) and np.array_equal(again.targets, task.targets)
    draws = {tuple(EditTask.draw(world, "single", seed=k).facts[0]) for k in range(10)}
    assert len(draws) > 1


def test_correct_mask_limits_the_draw(worlds):
    world, _ = worlds["independent"]
    mask = np.zeros(world.config.n_subjects, dtype=bool)
    mask[[7, 19]] = True
    for seed in range(6):
        assert EditTask.draw(world, "single", seed=seed, correct=mask).facts[0, 0] in (7, 19)
    with pytest.raises(ValueError, match="no tuple .* predicted correctly"):
        EditTask.draw(world, "single", correct=np.zeros_like(mask))
    with pytest.raises(ValueError, match="boolean mask over relation r0's 40 subjects"):
        EditTask.draw(world, "single", correct=mask[:5])


def test_ten_same_and_ten_different(worlds):
    world, _ = worlds["independent"]
    same = EditTask.draw(world, "ten_same", seed=1, relation=2, n=3)
    assert len(same.facts) == 3 and (same.facts[:, 1] == 2).all()
    assert len(set(same.facts[:, 2])) == 1 and len(set(same.targets)) == 1
    assert same.targets[0] != same.facts[0, 2] and len(set(same.facts[:, 0])) == 3
    assert (world.objects_of(same.facts[:, 0], same.facts[:, 1]) == same.facts[:, 2]).all()
    diff = EditTask.draw(world, "ten_different", seed=1, relation=1, n=6)
    assert (diff.facts[:, 1] == 1).all() and len(set(diff.facts[:, 2])) == 6
    assert len(set(diff.targets)) == 6 and (diff.targets != diff.facts[:, 2]).all()
    with pytest.raises(ValueError, match="shared by 10 .* smaller n"):
        EditTask.draw(world, "ten_same", n=10)
    with pytest.raises(ValueError, match="'ten_different' needs 13"):
        EditTask.draw(world, "ten_different", n=13)


def test_forget_remaps_every_tuple_to_object_zero(worlds):
    world, _ = worlds["independent"]
    task = EditTask.draw(world, "forget", relation=1)
    assert np.array_equal(task.facts, world.facts(1)) and (task.targets == 0).all()
    assert np.array_equal(task.changed, world.facts(1)[:, 2] != 0)
    unchanged = task.unchanged()
    assert len(unchanged) == world.n_facts - world.config.n_subjects
    assert (unchanged[:, 1] != 1).all()


def test_dependents_correlated_and_nested(worlds):
    world, _ = worlds["correlated"]  # correlated pair (1, 3), binarized
    task = EditTask.draw(world, "single", seed=0, relation=1)
    (s, _, o), t = task.facts[0], task.targets[0]
    deps, followed = task.dependents()
    assert deps.tolist() == [[s, 3, o]] and followed.tolist() == [t] and t == 1 - o
    assert _keys(world, task.unchanged()) == _keys(world, world.facts()) - {(s, 1), (s, 3)}
    plain = EditTask.draw(world, "single", seed=0, relation=0)
    assert len(plain.dependents()[0]) == 0

    world, _ = worlds["nested"]
    R = world.config.n_relations
    task = EditTask.draw(world, "ten_different", seed=2, relation=1, n=3)
    deps, followed = task.dependents()
    s, t = task.facts[:, 0], task.targets
    assert np.array_equal(deps[:, 0], s) and (deps[:, 1] == 2 * R + 1).all()
    assert np.array_equal(deps[:, 2], world.nested_map[1, task.facts[:, 2]])
    assert np.array_equal(followed, world.nested_map[1, t])
    assert len(task.unchanged()) == world.n_facts - 6
    forget = EditTask.draw(world, "forget", relation=0)
    assert len(forget.dependents()[0]) == world.config.n_subjects
    assert np.array_equal(forget.dependents()[1], np.full(30, world.nested_map[0, 0]))


def test_task_errors(worlds):
    world, _ = worlds["independent"]
    o = world.object_of(4, 0)
    with pytest.raises(ValueError, match=r"target 12 .* outside the relation's objects 0..11"):
        EditTask(world, [[4, 0, o]], [12])
    with pytest.raises(ValueError, match=r"tuple \(s=4, r=0, o=.*\) is not in this world"):
        EditTask(world, [[4, 0, (o + 1) % 12]], [o])
    with pytest.raises(ValueError, match="relation 5 is not in this world"):
        EditTask(world, [[4, 5, 0]], [1])
    with pytest.raises(ValueError, match="is its current object"):
        EditTask(world, [[4, 0, o]], [o])
    with pytest.raises(ValueError, match="edited twice"):
        EditTask(world, [[4, 0, o], [4, 0, o]], [0, 1] if o > 1 else [2, 3])
    with pytest.raises(ValueError, match="unknown edit task 'eleven'.*single"):
        EditTask.draw(world, "eleven")
    nested, _ = worlds["nested"]
    with pytest.raises(ValueError, match="not a base relation"):
        EditTask.draw(nested, "single", relation=3)
    cworld, _ = worlds["correlated"]
    with pytest.raises(ValueError, match=r"outside the relation's objects 0..1"):
        EditTask(cworld, [[0, 1, cworld.object_of(0, 1)]], [2])


def test_task_round_trip(worlds):
    world, _ = worlds["nested"]
    task = EditTask.draw(world, "ten_same", seed=4, n=3)
    back = EditTask.from_dict(task.to_dict(), world)
    assert back.kind == "ten_same" and np.array_equal(back.edited, task.edited)
    with pytest.raises(ValueError, match="another world"):
        EditTask.from_dict(task.to_dict(), worlds["independent"][0])


# ------------------------------------------------------------------ datasets
@pytest.mark.parametrize("kind", ["single", "ten_same", "ten_different"])
def test_override_dataset_parts(worlds, kind):
    world, _ = worlds["correlated"]
    task = EditTask.draw(world, kind, seed=1, relation=1 if kind == "ten_same" else 0, n=2)
    data = edit_dataset(task, EditDataConfig(repeats=30))
    n = 30 * len(task.facts)
    counts = data.counts()
    assert counts["edit"] == n and counts["random"] == 2 * n
    edit_rows = data.facts[data.part == "edit"]
    assert sorted(map(tuple, edit_rows.tolist())) == sorted(map(tuple, task.edited.tolist() * 30))
    rest = data.facts[data.part != "edit"]
    assert (world.objects_of(rest[:, 0], rest[:, 1]) == rest[:, 2]).all()
    touched = _keys(world, task.facts) | _keys(world, task.dependents()[0])
    assert not _keys(world, rest) & touched
    sharing = data.facts[data.part == "sharing"]
    assert counts.get("sharing", 0) in (0, n // 2)
    assert (sharing[:, 1] == task.relation).all() and np.isin(sharing[:, 2], task.facts[:, 2]).all()
    assert set(data.template) == {"paper"}


def test_single_dataset_is_250_125_500(worlds):
    world, _ = worlds["independent"]
    data = edit_dataset(EditTask.draw(world, "single", seed=0))
    assert data.counts() == {"edit": 250, "sharing": 125, "random": 500}
    df = data.to_dataframe()
    assert list(df.columns) == ["subject", "relation", "object", "template", "part"]


def test_forget_dataset_and_grammar_mix(worlds):
    world, _ = worlds["nested"]
    task = EditTask.draw(world, "forget", relation=2)
    config = EditDataConfig(forget_fraction=0.1, forget_ratio=(1, 2),
                            grammar_mix=(("paper", 1), ("mcq", 1)), seed=3)  # fmt: skip
    data = edit_dataset(task, config)
    assert data.counts() == {"forget": 3, "other": 6}
    forget = data.facts[data.part == "forget"]
    assert (forget[:, 1] == 2).all() and (forget[:, 2] == 0).all()
    other = data.facts[data.part == "other"]
    R = world.config.n_relations
    assert not np.isin(other[:, 1], [2, 2 * R + 2]).any()
    assert set(data.template) <= {"paper", "mcq"}
    small = edit_dataset(task, EditDataConfig())
    assert small.counts() == {"forget": math.ceil(0.05 * 30), "other": 2}


@pytest.mark.parametrize("kind", ["single", "ten_different"])
def test_paraphrase_augmented_overrides_state_each_edit_in_k_plus_one_templates(worlds, kind):
    """Retention paper 5.1: k paraphrases per edit. Each edited tuple's repeats are shared
    equally (within one row) between its template and the first k augmentation paraphrases;
    every other row, and every row's fact and part, is the dataset without augmentation."""
    from behemoth_interp.grammar import AUGMENT_PARAPHRASES

    world, _ = worlds["independent"]
    task = EditTask.draw(world, kind, seed=2)
    plain = edit_dataset(task, EditDataConfig(repeats=30))
    k = 3
    augmented = edit_dataset(task, EditDataConfig(repeats=30, paraphrases=k))
    assert np.array_equal(plain.facts, augmented.facts)
    assert np.array_equal(plain.part, augmented.part)
    other = augmented.part != "edit"
    assert np.array_equal(plain.template[other], augmented.template[other])
    df = augmented.to_dataframe()
    per_tuple = df[df.part == "edit"].groupby(["subject", "relation"]).template.value_counts()
    assert len(per_tuple) == len(task.facts) * (k + 1)
    assert set(df[df.part == "edit"].template) == {"paper", *AUGMENT_PARAPHRASES[:k]}
    assert per_tuple.max() - per_tuple.min() <= 1 and per_tuple.sum() == 30 * len(task.facts)
    with pytest.raises(InvalidArgument, match="from 0 to 10"):
        EditDataConfig(paraphrases=11)
    with pytest.raises(InvalidArgument, match="set paraphrases=0"):
        edit_dataset(EditTask.draw(world, "forget", relation=1), EditDataConfig(paraphrases=2))


def test_data_config_validation_and_round_trip():
    c = EditDataConfig(repeats=10, ratio=(2, 0, 4), grammar_mix=(("compact", 2.0),))
    assert EditDataConfig.from_dict(c.to_dict()) == c
    for bad, match in [
        ({"repeats": 0}, "repeats"),
        ({"ratio": (0, 1, 4)}, "edited : sharing : random"),
        ({"forget_fraction": 0}, "forget_fraction"),
        ({"grammar_mix": (("limerick", 1.0),)}, "unknown template 'limerick'"),
        ({"grammar_mix": (("paper", 0.0),)}, "sum to 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            EditDataConfig(**bad)


# ------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def micro_hf(micro_checkpoint):
    torch.set_num_threads(1)
    return load_hf(micro_checkpoint)


def test_trainable_parameter_selection(micro_hf):
    hf, _, _ = micro_hf
    names = trainable_parameters(hf, [1], "attn")
    assert names and all(n.startswith("gpt_neox.layers.1.attention.") for n in names)
    both = trainable_parameters(hf, None, "both")
    assert {n.split(".")[2] for n in both} == {"0", "1"} and not any("layernorm" in n for n in both)
    with pytest.raises(ValueError, match="block set is empty"):
        trainable_parameters(hf, [])
    with pytest.raises(
        ValueError, match=r"blocks \[2\] are not all in this model: it has blocks 0..1"
    ):
        trainable_parameters(hf, [2])
    with pytest.raises(ValueError, match="components must be 'mlp', 'attn', 'both'"):
        trainable_parameters(hf, [0], "embed")


@pytest.mark.parametrize(("block", "component"), [(0, "mlp"), (1, "attn"), (1, "both")])
def test_finetune_changes_only_the_chosen_block(micro_hf, block, component):
    hf, world, _ = micro_hf
    original = {n: p.detach().clone() for n, p in hf.named_parameters()}
    task = EditTask.draw(world, "single", seed=1)
    result = edit(hf, task, blocks=[block], components=component, steps=3, evaluate=False)
    chosen = set(trainable_parameters(hf, [block], component))
    after = dict(result.model.named_parameters())
    for name, p in original.items():
        assert torch.equal(hf.get_parameter(name), p), f"the input model changed at {name}"
        if name in chosen:
            assert not torch.equal(after[name], p), f"{name} was selected but did not move"
        else:
            assert torch.equal(after[name], p), f"{name} is outside block {block} {component}"
    assert set(result.report.changed) == chosen
    with pytest.raises(ValueError, match="block set is empty"):
        edit(hf, task, blocks=[])


def test_single_override_reaches_the_new_object(micro_hf, tmp_path):
    """Over 100 runs (micro models of training seeds 0-4 x edit seeds 0-19) success and forget
    rate were 1.0 every time and remaining accuracy 0.937-1.0 (mean 0.991; the lowest mean of
    five seeds 0.982): asserted over seeds 0-4, each >= 0.92 and the mean >= 0.97."""
    hf, world, _ = micro_hf
    remaining = []
    for seed in range(1, 5):
        r = edit(hf, EditTask.draw(world, "single", seed=seed, correct=hf), seed=seed).report
        assert r.success_top1 == 1.0 and r.forget_rate == 1.0, seed
        remaining.append(r.remaining)
    task = EditTask.draw(world, "single", seed=0, correct=hf)
    result = edit(hf, task, hooked=True)
    r = result.report
    assert r.success_top1 == 1.0 and r.forget_rate == 1.0 and r.remaining_before == 1.0
    remaining.append(r.remaining)
    assert min(remaining) >= 0.92 and np.mean(remaining) >= 0.97, remaining
    assert r.dependent_kept is None and r.settings["dataset"] == {
        "edit": 250,
        "sharing": 125,
        "random": 500,
    }
    # every block weight moves, bar a few elements whose every gradient is exactly 0 in floats
    # (one of 99,456 on this project's later machine, none on the earlier one)
    tuned = {n: p.numel() for n, p in hf.named_parameters() if ".layers." in n
             and "layernorm" not in n}  # fmt: skip
    assert set(r.changed) == set(tuned) and all(r.changed[n] > 0 for n in tuned)
    assert sum(tuned.values()) - 10 <= r.params_changed <= sum(tuned.values())
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(
        result.hooked(x), result.model(input_ids=x).logits, atol=1e-4, rtol=1e-4
    )
    df = r.to_dataframe()
    assert {"success_top1", "remaining", "success/mcq", "params_changed"} <= set(df.metric)
    back = EditReport.load(r.save(tmp_path / "report.json"))
    assert back.metrics() == pytest.approx(r.metrics(), nan_ok=True)
    assert len(r.plot().data) == 1


def test_edit_input_errors(micro_hf, worlds):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single")
    choices = ", ".join(METHODS)
    with pytest.raises(
        ValueError, match=f"unknown edit method 'nonesuch': choose one of {choices}"
    ):
        edit(hf, task, method="nonesuch")
    with pytest.raises(TypeError, match="HF GPT-NeoX model or a checkpoint directory"):
        edit(object(), task)
    with pytest.raises(ValueError, match=r"lr \(--lr\) must be > 0"):
        edit(hf, task, lr=0)
    assert isinstance(hf, GPTNeoXForCausalLM) and set(TASKS) == {
        "single", "ten_same", "ten_different", "forget"
    }  # fmt: skip
    assert changed_parameters(hf, hf) == {}


# ------------------------------------------------------------------ LoRA
def test_lora_changes_only_the_adapted_weights_at_low_rank(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single", seed=2)
    result = edit(hf, task, method="lora", rank=3, blocks=[1], components="mlp", steps=4,
                  evaluate=False)  # fmt: skip
    assert set(result.report.changed) == {
        "gpt_neox.layers.1.mlp.dense_h_to_4h.weight",
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    }
    assert isinstance(result.model, GPTNeoXForCausalLM)
    assert not any("lora" in n for n, _ in result.model.named_parameters())
    moved = move_rank(hf, result.model, threshold=1.0)
    adapted = np.zeros_like(moved.rank, dtype=bool)
    adapted[1, [COMPONENTS.index("W_in"), COMPONENTS.index("W_out")]] = True
    # a rank-3 adapter moves its matrices by rank <= 3 (the whole ΔW energy), nothing else moves
    assert (moved.rank[adapted] >= 1).all() and (moved.rank[adapted] <= 3).all()
    assert (moved.rank[~adapted] == 0).all()
    config = result.report.settings["config"]
    assert (
        config["rank"] == 3 and config["alpha"] is None and result.report.settings["alpha"] == 3.0
    )


def test_lora_single_override_keeps_remaining_accuracy(micro_hf):
    """Rank 4, over 100 runs (5 training seeds x 20 edit seeds): success 1.0 every time,
    remaining 0.848-1.0 (mean 0.968, lowest mean of five seeds 0.919): asserted over seeds
    0-4, each >= 0.80 and the mean >= 0.90."""
    hf, world, _ = micro_hf
    remaining = []
    for seed in range(5):
        task = EditTask.draw(world, "single", seed=seed, correct=hf)
        r = edit(hf, task, method="lora", rank=4, seed=seed).report
        assert r.success_top1 == 1.0, seed
        remaining.append(r.remaining)
    assert min(remaining) >= 0.80 and np.mean(remaining) >= 0.90, remaining


def test_lora_rank_above_the_matrix_rank_raises(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single")
    with pytest.raises(ValueError, match=r"LoRA rank 65 is not in 1..64: .* full rank 64"):
        edit(hf, task, method="lora", rank=65)
    with pytest.raises(ValueError, match=r"rank \(--rank\) must be >= 1, got 0"):
        edit(hf, task, method="lora", rank=0, components="attn")
    assert lora_modules(hf, [0], "attn") == [
        "gpt_neox.layers.0.attention.query_key_value",
        "gpt_neox.layers.0.attention.dense",
    ]


# ------------------------------------------------------------------ learning-rate selection
def test_select_lr_prefers_success_then_remaining(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single", seed=0, correct=hf)
    # with 40 repeats, lr 1e-3 made the edit in 100 of 100 runs (5 training x 20 edit seeds),
    # 3e-4 in only 79, 1e-6 in none
    search = select_lr(hf, task, lrs=[1e-6, 1e-3], data=EditDataConfig(repeats=40), hooked=True)
    df = search.to_dataframe()
    assert df.lr.tolist() == [1e-6, 1e-3] and df.best.tolist() == [False, True]
    assert search.success == [0.0, 1.0] and search.best_lr == 1e-3
    assert (
        search.best.report.success_top1 == 1.0
        and search.best.report.settings["config"]["lr"] == 1e-3
    )
    assert search.best.hooked is not None and len(search.plot().data) == 2
    with pytest.raises(ValueError, match="at least one learning rate"):
        select_lr(hf, task, lrs=[])


# ------------------------------------------------------------------ objectives
def test_localized_objective_overrides(micro_hf):
    """Over seeds 0-7 (torch 2.13.0, the lock's versions) the micro model's single overrides
    with the localized loss all succeed and keep 0.911-1.000 of the other 79 tuples (mean
    0.964; one tuple is 0.013): asserted over seeds 0-4 (measured min 0.937, mean 0.975) with
    that margin, not on one seed's value."""
    hf, world, _ = micro_hf
    remaining = []
    for seed in range(5):
        task = EditTask.draw(world, "single", seed=seed, correct=hf)
        r = edit(hf, task, objective="localized", weights=(1, 1, 0), seed=seed).report
        assert r.success_top1 == 1.0 and r.remaining_before == 1.0, seed
        remaining.append(r.remaining)
    assert min(remaining) >= 0.90 and np.mean(remaining) >= 0.94, remaining
    assert r.settings["config"]["objective"] == {"name": "localized", "injection": 1.0,
                                                 "retain": 1.0, "sft": 0.0, "forget": 0.0}  # fmt: skip


def test_forget_objectives_forget_the_sample_and_report_damage(micro_hf):
    """10 steps at lr 1e-3 on the 2-tuple forget sample, measured over 40 runs (5 training x 8
    data/edit seeds): GA forgot its sample every time, forget rate 0.649-1.0 (lowest mean of
    five seeds 0.795); GradDiff kept one sample tuple once in 80, forget rate 0.568-1.0
    (lowest mean 0.719), the other relations' sample always intact; remaining < 1 always.
    Asserted over seeds 0-4 with those margins."""
    hf, world, tok = micro_hf
    task = EditTask.draw(world, "forget", relation=0)
    rates: dict[str, list[float]] = {"gradient_ascent": [], "gradient_difference": []}
    kept = 0
    for seed in range(5):
        config = EditDataConfig(seed=seed)
        data = edit_dataset(task, config)
        sample = data.facts[data.part == "forget"].copy()
        sample[:, 2] = world.objects_of(sample[:, 0], sample[:, 1])
        other = data.facts[data.part == "other"]
        for objective, got in rates.items():
            result = edit(hf, task, objective=objective, steps=10, lr=1e-3, data=config,
                          seed=seed)  # fmt: skip
            still = int(evaluate_facts(result.model, world, tok, sample).top(1).sum())
            r = result.report
            assert r.remaining_before == 1.0 and r.remaining < 1.0, (objective, seed)
            got.append(r.forget_rate)
            if objective == "gradient_ascent":
                assert still == 0, seed
            else:
                kept += still
                assert evaluate_facts(result.model, world, tok, other).accuracy == 1.0, seed
    assert min(rates["gradient_ascent"]) >= 0.5 and np.mean(rates["gradient_ascent"]) >= 0.7
    assert min(rates["gradient_difference"]) >= 0.4
    assert np.mean(rates["gradient_difference"]) >= 0.65 and kept <= 1, (rates, kept)
    ce = edit(hf, task, data=EditDataConfig(forget_fraction=0.5), epochs=5, lr=1e-3).report
    assert ce.success_top1 >= 0.6  # measured 0.757-1.0
    assert set(ce.metrics()) >= {"forget_rate", "remaining", "remaining_before"}


def test_objective_errors(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single")
    with pytest.raises(ValueError, match="unknown objective 'kl': choose one of ce, .*localized"):
        edit(hf, task, objective="kl")
    with pytest.raises(ValueError, match=r"retain \(localized retain\) must be >= 0"):
        edit(hf, task, objective="localized", weights=(1, -1, 0))


# ------------------------------------------------------------------ dependent tuples
CORRELATED_MICRO = WorldConfig("correlated", n_subjects=40, n_relations=2, n_objects=16,
                               correlated=(0, 1), seed=0)  # fmt: skip
"""Both relations binarized and equal: a 2-layer model learns all 80 tuples (about 10 s)."""


@pytest.fixture(scope="module")
def correlated_hf(tmp_path_factory):
    return load_hf(train_micro(CORRELATED_MICRO, tmp_path_factory.mktemp("correlated_micro")))


def test_correlated_edit_reports_the_partner(correlated_hf):
    hf, world, tok = correlated_hf
    assert evaluate_facts(hf, world, tok).accuracy == 1.0
    task = EditTask.draw(world, "single", seed=0, correct=hf)
    unedited = evaluate_edit(hf, task, before=hf)
    assert (unedited.success_top1, unedited.forget_rate) == (0.0, 0.0)
    assert (unedited.dependent_kept, unedited.dependent_followed) == (1.0, 0.0)
    assert unedited.remaining == unedited.remaining_before == 1.0 and unedited.params_changed == 0
    r = edit(hf, task).report
    assert r.success_top1 == 1.0 and r.dependent_kept is not None
    # the partner's old and new objects cannot both be the top-1 prediction
    assert r.dependent_kept + r.dependent_followed <= 1.0


def test_nested_report_scores_implied_tuples(worlds):
    world, tok = worlds["nested"]
    model = build_model(PRESETS["tiny"], tok, seed=0).eval()
    task = EditTask.draw(world, "ten_different", seed=0, n=3)
    report = evaluate_edit(model, task)
    deps, followed = task.dependents()
    moved = deps.copy()
    moved[:, 2] = followed
    must = followed != deps[:, 2]  # an implied object that stays the same says nothing
    assert report.dependent_followed_all == evaluate_facts(model, world, tok, moved).accuracy
    if must.any():
        assert report.dependent_kept == evaluate_facts(model, world, tok, deps[must]).accuracy
        assert report.dependent_followed == evaluate_facts(model, world, tok, moved[must]).accuracy
    else:
        assert report.dependent_kept is None and report.dependent_followed is None
    assert report.remaining == evaluate_facts(model, world, tok, task.unchanged()).accuracy
    assert report.remaining_before is None and report.changed == {}


# ------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def shipped_hf():
    path = finished_checkpoint("independent")
    if path is None:
        pytest.skip("data/models/independent is missing or still training")
    torch.set_num_threads(1)  # as for the micro model: busy cores make threads spin, not help
    return load_hf(path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "finetune"])
def test_shipped_single_override_keeps_the_rest(shipped_hf, method):
    """Issue 5: a single override (LoRA rank 32, full fine-tuning) reaches the new object while
    remaining accuracy stays within 2 points of the unedited model."""
    hf, world, _ = shipped_hf
    task = EditTask.draw(world, "single", seed=0, correct=hf)
    r = edit(hf, task, method=method, **({"rank": 32} if method == "lora" else {})).report
    assert r.success_top1 == 1.0 and r.forget_rate == 1.0
    assert r.remaining >= r.remaining_before - 0.02


def test_checkpoint_paths_and_fact_accuracy_masks(micro_checkpoint, micro_hf, worlds):
    hf, world, tok = micro_hf
    acc = evaluate_facts(hf, world, tok)
    from_acc = EditTask.draw(world, "single", seed=5, correct=acc)
    from_model = EditTask.draw(world, "single", seed=5, correct=hf)
    assert np.array_equal(from_acc.edited, from_model.edited)
    with pytest.raises(ValueError, match="covers 5 of relation r0's 40 tuples"):
        EditTask.draw(world, "single", correct=evaluate_facts(hf, world, tok, world.facts(0)[:5]))
    result = edit(micro_checkpoint, from_acc, steps=1, evaluate=False)
    assert set(result.report.changed) == set(trainable_parameters(hf))
    other = EditTask.draw(worlds["independent"][0], "single")
    with pytest.raises(ValueError, match="trained on another world than the task's"):
        edit(micro_checkpoint, other)


# ------------------------------------------------------------------ numbers that can be trusted
def test_a_diverged_edit_is_an_error_and_never_selected(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "single", seed=0, correct=hf)
    with pytest.raises(Diverged, match="the edit diverged"):
        edit(hf, task, lr=1e12)
    search = select_lr(hf, task, lrs=(1e12, 3e-4), seed=0)
    assert search.best_lr == 3e-4 and np.isnan(search.success[0])
    assert search.best.report.success_top1 == 1.0
    with pytest.raises(Diverged, match="every learning rate"):
        select_lr(hf, task, lrs=(1e12,))


def test_edit_refuses_another_worlds_task_and_fractional_blocks(micro_hf, worlds):
    hf, world, _ = micro_hf
    other = EditTask.draw(worlds["independent"][0], "single")
    with pytest.raises(CheckpointMismatch, match="another world"):
        edit(hf, other)
    task = EditTask.draw(world, "single", seed=0)
    with pytest.raises(InvalidArgument, match=r"blocks must be integer block indices, got \[1.5\]"):
        edit(hf, task, blocks=[1.5])
    with pytest.raises(InvalidArgument, match=r"max_remaining \(--max-remaining\) must be >= 1"):
        edit(hf, task, max_remaining=0)


def test_forget_success_counts_only_tuples_that_had_to_change(micro_hf):
    """Forgetting maps every tuple of r to object 0; the tuples already at object 0 would be
    'successes' of any model, so success is over the others (the raw rate is kept beside)."""
    hf, world, tok = micro_hf
    task = EditTask.draw(world, "forget", relation=0)
    assert (~task.changed).any() and task.changed.any()
    r = evaluate_edit(hf, task, before=hf)  # the unedited model: nothing was forgotten
    assert r.success_top1 == 0.0 and r.forget_rate == 0.0
    assert r.success_top1_all == pytest.approx((~task.changed).mean())
    at_target = evaluate_facts(hf, world, tok, task.edited).top(1)
    assert r.success_top1_all == pytest.approx(at_target.mean())


def test_formats_are_scored_beside_their_pre_edit_baselines(micro_hf):
    hf, world, tok = micro_hf
    task = EditTask.draw(world, "ten_different", seed=1, n=4, correct=hf)
    r = edit(hf, task).report
    assert set(r.template_before) == set(r.template_success) == {*PARAPHRASES, "mcq"}
    choices = edit_choices(world, task.facts, task.targets)
    before = evaluate_facts(hf, world, tok, task.facts, template="mcq", choices=choices)
    assert r.template_before["mcq"] == before.accuracy
    assert {f"before/{t}" for t in r.template_before} <= set(r.metrics())


# ------------------------------------------------------------------ modes
def test_sequential_mode_edits_one_tuple_after_another(micro_hf):
    hf, world, _ = micro_hf
    task = EditTask.draw(world, "ten_different", seed=2, n=3, correct=hf)
    r = edit(hf, task, mode="sequential").report
    sequence = r.settings["sequence"]
    assert [s["edits"] for s in sequence] == [1, 2, 3] and len(r.settings["steps"]) == 3
    assert all(0 <= s["success"] <= 1 and 0 <= s["remaining"] <= 1 for s in sequence)
    assert r.settings["mode"] == "sequential" and r.success_top1 == sequence[-1]["success"]
    single = EditTask.draw(world, "single", seed=0, correct=hf)
    batched = edit(hf, single, mode="batched", evaluate=False).model
    sequential = edit(hf, single, mode="sequential", evaluate=False).model
    for (name, a), b in zip(batched.named_parameters(), sequential.parameters()):
        assert torch.equal(a, b), name
