"""Fact accuracy never calls a broken model correct: ties count against the true token,
non-finite logits raise, and a model is only scored against its own world."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from behemoth_interp import WorldConfig, WorldTokenizer, evaluate_facts, load_hf
from behemoth_interp.errors import CheckpointMismatch, Diverged
from behemoth_interp.evaluate import object_distribution
from behemoth_interp.world import World


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    return load_hf(micro_checkpoint)


def test_the_trained_micro_model_is_right_on_every_tuple(micro):
    hf, world, tok = micro
    acc = evaluate_facts(hf, world, tok)
    assert acc.accuracy == 1.0 and (acc.rank == 0).all()


def test_all_equal_logits_score_zero(micro):
    hf, world, tok = micro
    flat = copy.deepcopy(hf)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()
    acc = evaluate_facts(flat, world, tok)
    assert acc.accuracy == 0.0 and (acc.rank == tok.vocab_size - 1).all()
    assert acc.per_relation().max() == 0.0 and not acc.top(2).any()


def test_a_tie_counts_against_the_true_token(micro):
    hf, world, tok = micro
    facts = world.facts()
    first = tok.entity_tokens(world.object_space(0), facts[:, 2])[:, 0]
    true = int(first[0])
    rival = int(tok.entity_tokens("subject", np.array([0]))[0, 0])  # never an object token
    tied = copy.deepcopy(hf)
    with torch.no_grad():
        tied.get_output_embeddings().weight[rival] = tied.get_output_embeddings().weight[true]
    acc = evaluate_facts(tied, world, tok)
    hit = first == true
    assert hit.any() and (~hit).any()
    assert not acc.top(1)[hit].any() and acc.top(2)[hit].all()  # second, behind its twin
    assert acc.top(1)[~hit].all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise_naming_the_model(micro, micro_checkpoint, bad):
    hf, world, tok = micro
    broken = copy.deepcopy(hf)
    with torch.no_grad():
        broken.get_output_embeddings().weight[3, 0] = bad
    with pytest.raises(Diverged, match=f"the model from {micro_checkpoint}.*non-finite logits"):
        evaluate_facts(broken, world, tok)


def test_another_worlds_model_or_tokenizer_is_refused(micro):
    hf, world, tok = micro
    other = World.generate(WorldConfig("independent", n_subjects=40, n_relations=2,
                                       n_objects=16, seed=1))  # fmt: skip
    other_tok = WorldTokenizer(other.config)
    assert other_tok.vocab_size == tok.vocab_size  # the same vocabulary: only the facts differ
    with pytest.raises(CheckpointMismatch, match="trained on another world"):
        evaluate_facts(hf, other, other_tok)
    with pytest.raises(CheckpointMismatch, match="tokenizer is another world's"):
        evaluate_facts(hf, world, WorldTokenizer(WorldConfig(n_subjects=500)))


@pytest.mark.parametrize("template", ["paper", "relation_first", "mcq"])
@pytest.mark.parametrize("batch_size", [7, 512])
def test_shared_prefixes_give_the_whole_rows_logits(micro, template, batch_size):
    """A subject's tuples share their prefix's forward pass (key-value cache); the logits
    equal running every row whole, also when a prefix's rows straddle two batches."""
    from behemoth_interp.evaluate import _logits_in_batches, _prefix_split
    from behemoth_interp.grammar import render

    hf, world, tok = micro
    facts = world.facts()
    sent = render(world, tok, facts, template)
    inputs = np.concatenate([np.full((len(facts), 1), tok.eot_id), sent.tokens], 1)
    split = _prefix_split(inputs[:, :-1])
    if template == "paper":  # <|endoftext|> + the sentence up to the relation, one per subject
        assert split == int(sent.spans["relation"][0, 0]) + 1
    # MCQ's choice lists differ from the first rows on: sharing would save too little to split
    assert (split > 0) == (template != "mcq")
    with torch.inference_mode():
        whole = hf(input_ids=torch.as_tensor(inputs[:, :-1])).logits
        seen = np.zeros(len(facts), dtype=int)
        for rows, logits in _logits_in_batches(hf, inputs, batch_size):
            seen[rows] += 1
            torch.testing.assert_close(logits, whole[rows], atol=1e-4, rtol=1e-4)
    assert (seen == 1).all()


def test_hf_and_hooked_models_rank_every_format_alike(micro):
    """The HF path shares prefixes, the HookedTransformer path runs rows whole: same ranks."""
    from behemoth_interp import TEMPLATES
    from behemoth_interp.model import hooked_in_world

    hf, world, tok = micro
    hooked = hooked_in_world(hf, world)
    for template in TEMPLATES:
        a = evaluate_facts(hf, world, tok, template=template)
        b = evaluate_facts(hooked, world, tok, template=template)
        np.testing.assert_array_equal(a.rank, b.rank, err_msg=template)


def test_fact_scores_run_each_tuple_once_and_equal_evaluate_facts(micro):
    from behemoth_interp import FactScores

    hf, world, tok = micro
    facts = world.facts()
    calls = []
    handle = hf.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        scores = FactScores(hf, world)
        some = facts[::3]
        np.testing.assert_array_equal(scores(some).rank, evaluate_facts(hf, world, tok, some).rank)
        calls.clear()
        again = scores(np.concatenate([some[::-1], some[:5]]))  # asked before: nothing runs
        assert not calls and len(again.rank) == len(some) + 5
        wrong = facts[:4].copy()
        wrong[:, 2] = (wrong[:, 2] + 1) % world.config.n_objects
        np.testing.assert_array_equal(
            scores(wrong).rank, evaluate_facts(hf, world, tok, wrong).rank
        )
        assert calls and (scores(wrong).rank > 0).all()
    finally:
        handle.remove()


@pytest.mark.parametrize("template", ["paper", "relation_first"])
def test_object_distribution_is_each_objects_teacher_forced_probability(micro, template):
    """Every object's probability from the prefix rows equals scoring that object as the
    answer (evaluate_facts), and the mass on objects is at most 1."""
    hf, world, tok = micro
    facts = world.facts()[:: max(1, len(world.facts()) // 5)][:5]
    dist = object_distribution(hf, world, tok, facts, template=template)
    n = world.config.n_objects
    assert dist.shape == (len(facts), n)
    for i, f in enumerate(facts):
        every = np.repeat(f[None], n, 0)
        every[:, 2] = np.arange(n)
        want = evaluate_facts(hf, world, tok, every, template=template).logp
        assert np.allclose(dist[i], want, atol=1e-5)
    assert (np.exp(dist).sum(1) <= 1 + 1e-6).all()
    if template == "paper":  # the micro model knows every tuple in the template it learned
        assert (dist.argmax(1) == facts[:, 2]).all()
