"""Downstream tasks, retention sets and the edit -> fine-tune -> retention run (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import behemoth_interp as bi
from behemoth_interp.errors import InvalidArgument, OutputExists
from behemoth_interp.model import parameters_sha256
from behemoth_interp.retention import (
    DOWNSTREAM_TASKS,
    DownstreamConfig,
    RetentionSet,
    downstream,
    load_retention,
    retention,
    retention_set,
)
from behemoth_interp.train import train

WIDE = {
    "independent": bi.WorldConfig("independent", n_subjects=60, n_relations=4, n_objects=100, seed=4),
    "correlated": bi.WorldConfig("correlated", n_subjects=60, n_relations=4, n_objects=100,
                                 correlated=(0, 2), seed=5),
    "nested": bi.WorldConfig("nested", n_subjects=60, n_relations=3, n_objects=100,
                             n_nested_objects=20, seed=6),
}  # fmt: skip
"""Worlds with 100 objects (10 + 10 object tokens), so token-level disjointness leaves room."""


def _text(world: bi.World, space: str, ids) -> list[str]:
    tok = bi.WorldTokenizer(world.config)
    return [tok.decode(t.tolist()) for t in tok.entity_tokens(space, np.atleast_1d(ids))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=st.sampled_from(sorted(WIDE)),
    kind=st.sampled_from(sorted(DOWNSTREAM_TASKS)),
    edit=st.sampled_from(["single", "ten_same", "ten_different"]),
    seed=st.integers(0, 10_000),
    n_keep=st.integers(0, 3),
    relation=st.integers(0, 2),
)
def test_downstream_corpora_never_state_the_edit(world, kind, edit, seed, n_keep, relation):
    """Read back as text, no corpus names an edited subject, an edited relation (so no
    relation-object pair of the edit), or a token of an edited tuple's old or new object; nor a
    kept-out fact's subject or object."""
    w = bi.World.generate(WIDE[world])
    if edit != "single" and relation in w.config.correlated and world == "correlated":
        relation = 1  # a binarized relation has two objects: only single edits there
    n = {"single": 1, "ten_same": 2, "ten_different": 5}[edit]  # 60 subjects share few objects
    task = bi.EditTask.draw(w, edit, seed=seed, relation=relation, n=n)
    rng = np.random.default_rng(seed)
    pool = w.facts(task.relation)
    keep = pool[rng.choice(len(pool), n_keep, replace=False)]
    disjoint = "tokens" if edit == "single" else "objects"  # ten tuples use every object token
    d = downstream(task, DownstreamConfig(kind, copies=1, seed=seed, disjoint=disjoint),
                   keep_out=keep)  # fmt: skip
    corpus = d.corpus()
    tok = bi.WorldTokenizer(w.config)
    text = "|".join(tok.decode(row.tolist()) for row in corpus.tokens)
    for s in _text(w, "subject", np.concatenate([task.facts[:, 0], keep[:, 0]])):
        assert s not in text
    for r in _text(w, "relation", task.facts[:, 1]):
        assert r not in text
    objects = np.concatenate([task.facts[:, 2], task.targets, keep[:, 2]])
    if disjoint == "tokens":  # no token of those objects, anywhere (" dddd" is one token)
        for piece in {p for o in _text(w, "object", objects) for p in o.split()}:
            assert f" {piece}" not in text
    else:
        for o in _text(w, "object", objects):
            assert o not in text
    # what it states: its facts, each a fact of its world that the edit's world does not hold
    assert np.array_equal(corpus.facts(), d.facts[np.lexsort((d.facts[:, 0], d.facts[:, 1]))])
    assert (d.world.objects_of(d.facts[:, 0], d.facts[:, 1]) == d.facts[:, 2]).all()
    known = w.objects_of(d.facts[:, 0], d.facts[:, 1])
    if DOWNSTREAM_TASKS[kind].objects == "new":
        assert (known != d.facts[:, 2]).all()
    elif DOWNSTREAM_TASKS[kind].objects == "true":
        assert (known == d.facts[:, 2]).all() and d.world == w


def test_downstream_tasks_are_what_they_say():
    w = bi.World.generate(WIDE["independent"])
    task = bi.EditTask.draw(w, "single", seed=1)
    built = {k: downstream(task, DownstreamConfig(k, seed=3)) for k in DOWNSTREAM_TASKS}
    # every other subject, every other relation; known facts only where their object is allowed
    assert len(built["new_facts"].facts) == (w.config.n_subjects - 1) * (w.config.n_relations - 1)
    general = built["general"]
    assert 0 < len(general.facts) < len(built["new_facts"].facts)
    assert not np.isin(general.facts[:, 2], general.excluded_objects).any()
    labels = built["classification"].facts
    assert len(np.unique(labels[:, 1])) == 1 and len(np.unique(labels[:, 2])) == 2
    assert abs((labels[:, 2] == labels[0, 2]).mean() - 0.5) <= 1 / len(labels)  # balanced
    templates = {k: set(d.corpus().sentences.column("template").to_pylist())
                 for k, d in built.items()}  # fmt: skip
    assert templates["new_facts"] == templates["classification"] == {"paper"}
    assert templates["instruction"] == {"relation_first", "relation_long"}
    assert "mcq" not in templates["general"] and len(templates["general"]) > 10
    tc = built["instruction"].train_config()
    assert (tc.loss_on, tc.stop_accuracy, tc.eval_template) == ("object", 0.7, "relation_first")
    assert (
        built["general"].train_config().loss_on,
        built["general"].train_config().stop_accuracy,
    ) == ("all", None)
    # seeded: the same config gives the same facts, another seed others
    again = downstream(task, DownstreamConfig("new_facts", seed=3)).facts
    assert np.array_equal(again, built["new_facts"].facts)
    assert not np.array_equal(downstream(task, DownstreamConfig("new_facts", seed=4)).facts, again)
    half = downstream(task, DownstreamConfig("general", subjects=0.5))
    assert len(np.unique(half.facts[:, 0])) == round(0.5 * (w.config.n_subjects - 1))


def test_downstream_says_what_to_change_when_nothing_is_left(micro_model):
    w = micro_model.world  # 16 objects: 4 + 4 object tokens
    task = bi.EditTask.draw(w, "ten_different", seed=0, n=6)  # 12 objects: every first token
    with pytest.raises(InvalidArgument, match="disjoint='objects'"):
        downstream(task, DownstreamConfig("general"))
    one = bi.World.generate(
        bi.WorldConfig("independent", n_subjects=20, n_relations=1, n_objects=30)
    )
    with pytest.raises(InvalidArgument, match="no relation"):
        downstream(bi.EditTask.draw(one, "single"), DownstreamConfig("general"))
    with pytest.raises(InvalidArgument, match="unknown downstream task"):
        DownstreamConfig("sentiment")


def test_retention_set_matches_margins_and_keeps_clear_of_the_edit(micro_checkpoint):
    hf, world, tok = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, "single", seed=2)
    edited = bi.edit(hf, task, method="finetune", blocks=[1], evaluate=False).model
    rs = retention_set(edited, task, per_edit=3, seed=0)
    assert (len(rs.edited), rs.dropped, len(rs.intrinsic)) == (1, 0, 3)
    assert (rs.edited_margin >= 0.1).all() and (rs.intrinsic_margin >= 0.1).all()
    assert set(rs.intrinsic[:, 1]) == {task.relation}
    assert not np.isin(rs.intrinsic[:, 0], task.facts[:, 0]).any()
    assert not np.isin(rs.intrinsic[:, 2], np.concatenate([task.facts[:, 2], task.targets])).any()
    assert np.array_equal(
        world.objects_of(rs.intrinsic[:, 0], rs.intrinsic[:, 1]), rs.intrinsic[:, 2]
    )
    # matched: no other candidate's margin is nearer the edited fact's than the chosen ones'
    pool = world.facts(task.relation)
    pool = pool[
        (pool[:, 0] != task.facts[0, 0]) & ~np.isin(pool[:, 2], [task.facts[0, 2], task.targets[0]])
    ]
    m = bi.evaluate_facts(edited, world, tok, pool, world_check=False).margin
    gaps = np.sort(np.abs(m[m >= 0.1] - rs.edited_margin[0]))
    assert np.allclose(np.sort(np.abs(rs.intrinsic_margin - rs.edited_margin[0])), gaps[:3])
    assert (
        RetentionSet.from_dict(json.loads(json.dumps(rs.to_dict())), world).to_dict()
        == rs.to_dict()
    )
    with pytest.raises(InvalidArgument, match="did not take"):
        retention_set(hf, task)  # the unedited model predicts the old object


def test_margin_and_log_probability_are_the_models(micro_checkpoint):
    hf, world, tok = bi.load_hf(micro_checkpoint)
    facts = world.facts()[:12]
    acc = bi.evaluate_facts(hf, world, tok, facts)
    assert ((acc.margin > 0) == (acc.rank == 0)).all()
    sent = bi.render(world, tok, facts, "paper")
    x = torch.as_tensor(np.concatenate([np.full((len(facts), 1), tok.eot_id), sent.tokens], 1))
    with torch.no_grad():
        logp = hf(input_ids=x).logits.float().log_softmax(-1)
    for i, (a, b) in enumerate(sent.spans["object"]):
        want = sum(logp[i, p, x[i, p + 1]].item() for p in range(a, b))
        assert acc.logp[i] == pytest.approx(want, abs=1e-5)


def test_scores_are_the_teacher_forced_log_probabilities(micro_checkpoint):
    """The edited facts' new and original objects and the intrinsic facts' objects score as
    evaluate_facts scores them, the original ones read from the object distribution."""
    hf, world, tok = bi.load_hf(micro_checkpoint)
    facts = world.facts(bi.EditTask.draw(world, "single", seed=0).relation)[[0, 5, 9, 11]]
    edited = facts[:2].copy()
    edited[:, 2] = (edited[:, 2] + 1) % world.config.n_objects
    sets = RetentionSet(world, edited, facts[:2, 2], facts[2:], np.ones(2), np.ones(2), 0.1, 0)
    got = sets.score(hf)
    for name, rows in (("edited", edited), ("intrinsic", facts[2:])):
        want = bi.evaluate_facts(hf, world, tok, rows)
        assert got[name]["rank"] == want.rank.tolist()
        assert np.allclose(got[name]["logp"], want.logp, atol=1e-5)
    before = bi.evaluate_facts(hf, world, tok, facts[:2]).logp
    assert np.allclose(got["edited"]["logp_original"], before, atol=1e-5)
    total = np.exp(got["edited"]["logp"]) + np.exp(got["edited"]["logp_original"])
    assert (total + np.asarray(got["edited"]["p_related"]) <= 1 + 1e-6).all()


def test_a_no_op_edit_retains_exactly_as_the_intrinsic_facts(micro_checkpoint, tmp_path):
    """The same true facts in both roles (what a no-op edit leaves): the two sets' answers are
    equal at every evaluation of a downstream fine-tune, so nothing but the facts tells them apart."""
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, "single", seed=0)
    facts = world.facts(task.relation)[[0, 5, 9]]
    same = RetentionSet(world, facts, (facts[:, 2] + 1) % world.config.n_objects, facts,
                        np.ones(3), np.ones(3), 0.1, 0)  # fmt: skip
    d = downstream(task, DownstreamConfig("new_facts", disjoint="objects"), keep_out=facts)
    d.write(tmp_path / "down")
    log = train(tmp_path / "down", tmp_path / "ft", d.train_config(init_from=str(micro_checkpoint),
                steps=60, stop_accuracy=None), progress=False, track=same.score)  # fmt: skip
    assert len(log["history"]) == 3
    for entry in log["history"]:
        e, i = entry["track"]["edited"], entry["track"]["intrinsic"]
        assert e["rank"] == i["rank"] and e["logp"] == i["logp"]
    first, last = (log["history"][i]["track"]["intrinsic"]["logp"] for i in (0, -1))
    assert first != last  # the fine-tune moved the model: the equality is not of a still model


@pytest.fixture(scope="module")
def edited_micro(micro_checkpoint):
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, "single", seed=0)
    return bi.edit(hf, task, method="finetune", blocks=[1])


def test_retention_run_writes_its_directory_and_reads_back(edited_micro, tmp_path):
    config = DownstreamConfig("new_facts", disjoint="objects")
    result = retention(edited_micro, out=tmp_path / "r", config=config)
    out = tmp_path / "r"
    assert {p.name for p in out.iterdir()} >= {"run.json", "world", "edited", "downstream",
                                                "model", "retention.json"}  # fmt: skip
    df = result.to_dataframe()
    assert list(df[df.step == 0].retention) == [1.0, 1.0]  # every kept fact had a margin
    assert df.step.is_monotonic_increasing and df.step.max() > 0
    s = result.summary()
    assert s["n_edited"] == 1 and s["n_intrinsic"] == 2
    assert (s["stopped"] is None) == (s["steps"] == 2000)
    again = load_retention(out)
    assert again.history == json.loads(json.dumps(result.history))
    assert again.settings["edited_sha256"] == parameters_sha256(edited_micro.model)
    facts = again.facts_dataframe()
    assert set(facts.set) == {"edited", "intrinsic"} and facts.p_target.between(0, 1).all()
    # where the probability sits: the four kinds of object cover it all, for every fact
    kinds = facts[["p_target", "p_original", "p_related", "p_other"]].fillna(0)
    assert np.allclose(kinds.sum(axis=1), 1) and (kinds >= 0).all().all()
    top = result.top_objects(0)
    assert len(top) == 3 * len(result.history) and set(top.kind) <= {"target", "original",
                                                                     "related", "other"}  # fmt: skip
    first = top[(top.step == 0) & (top["rank"] == 1)].iloc[0]
    edited0 = facts[(facts.step == 0) & (facts.set == "edited")].iloc[0]
    assert first.kind == "target" and first.probability == pytest.approx(edited0.p_target)
    fig = result.plot()
    # retention of both sets; edited: 4 kinds; intrinsic: 3 (no original object)
    assert len(fig.data) == 9 and "n = 1 edited, 2 intrinsic" in fig.layout.annotations[0].text
    with pytest.raises(OutputExists):
        retention(edited_micro, out=out, config=config)
    # the same run again gives the same answers, bit for bit
    twin = retention(edited_micro, out=tmp_path / "twin", config=config)
    assert [h["track"] for h in twin.history] == [h["track"] for h in result.history]
    # resuming a finished run's directory with other settings is refused
    with pytest.raises(InvalidArgument, match="another retention run"):
        retention(edited_micro, out=out, config=DownstreamConfig("general", disjoint="objects"),
                  resume=True)  # fmt: skip


# ------------------------------------------------------------------ as a sweep axis
def _retention_spec(model, **retention) -> dict:
    return {"name": "retention", "models": [str(model)], "tasks": ["single"],
            "methods": [{"method": "finetune", "grid": {"lr": [3e-4]}}], "blocks": [[1]],
            "components": ["both"], "seeds": [0, 1],
            "retention": {"downstream": ["new_facts", "classification"], "freeze": ["none", "edited"],
                          "settings": {"disjoint": "objects", "steps": 100, **retention}}}  # fmt: skip


def test_a_sweep_fine_tunes_every_edit_downstream(micro_checkpoint, tmp_path):
    from behemoth_interp.sweep import SweepResult, SweepSpec, expand, run_sweep
    from behemoth_interp.sweep.retention import DISTRIBUTION_COLUMNS, retention_rows

    spec = SweepSpec.from_dict(_retention_spec(micro_checkpoint))
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    plain = SweepSpec.from_dict({k: v for k, v in _retention_spec(micro_checkpoint).items()
                                 if k != "retention"})  # fmt: skip
    assert "retention" not in plain.to_dict()  # specs without it hash as before
    assert {r.key for r in expand(spec)}.isdisjoint(r.key for r in expand(plain))
    run_sweep(spec, tmp_path / "store", executor="local", progress=False)
    result = SweepResult.load(tmp_path / "store")
    record = result.records[0]
    assert [(i["downstream"], i["freeze"]) for i in record["retention"]] == [
        ("new_facts", "none"), ("new_facts", "edited"),
        ("classification", "none"), ("classification", "edited")]  # fmt: skip
    assert record["retention"][1]["freeze_blocks"] == [1]
    table = result.retention_summary()
    assert len(table) == 4 and (table.seeds + table.undefined == 2).all()
    assert table.edited_retention.between(0, 1).all()
    result.records.reverse()  # a store read in another order summarizes the same
    assert result.retention_summary().equals(table)
    fig = result.retention()
    assert len(fig.data) == 4 and "frozen: edited" in fig.data[0].x[1]
    # the record's fine-tune with the edited block frozen is the direct call's, number for number
    run = next(r for r in expand(spec) if r.key == record["key"])
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.from_dict(run.task, world)
    edited = bi.edit(hf, task, method=run.method, config=bi.FinetuneConfig.from_dict(run.config),
                     blocks=list(run.blocks), components=run.components, seed=run.seed,
                     evaluate=False)  # fmt: skip
    direct = retention(edited, out=tmp_path / "direct", seed=run.seed,
                       config=DownstreamConfig("new_facts", disjoint="objects", seed=run.seed),
                       train_config=bi.TrainConfig(lr=2e-4, steps=100, epochs=None, eval_every=20,
                                                   seed=run.seed, freeze_blocks=(1,)))  # fmt: skip
    stored = record["retention"][1]
    assert {k: stored[k] for k in direct.summary()} == direct.summary()
    # and its Figure 4 end points are the direct run's last evaluation (to float rounding:
    # the sweep's worker runs on another number of threads; measured 1e-7 apart)
    last = direct.to_dataframe().query("step == step.max()").set_index("set")
    row = retention_rows([record]).iloc[1]
    assert row.edited_p_related == pytest.approx(last.loc["edited", "p_related"], abs=1e-5)
    assert row.intrinsic_p_other == pytest.approx(last.loc["intrinsic", "p_other"], abs=1e-5)
    assert table[list(DISTRIBUTION_COLUMNS)].notna().all().all()


@pytest.mark.parametrize(("retention", "match"), [
    ({"downstream": ["sentiment"]}, "unknown task 'sentiment'"),
    ({"freeze": ["all"]}, "'all' is not 'none', 'edited' or a list of blocks"),
    ({"settings": {"steps": 0}}, "steps"),
    ({"settings": {"epochs": 3}}, "settings.epochs"),
    ({"downstrem": ["general"]}, "downstrem"),
])  # fmt: skip
def test_a_bad_retention_block_is_refused_before_any_run(micro_checkpoint, retention, match):
    from behemoth_interp.sweep import SweepSpec

    spec = {**_retention_spec(micro_checkpoint), "retention": retention}
    with pytest.raises(InvalidArgument, match=match):
        SweepSpec.from_dict(spec)
