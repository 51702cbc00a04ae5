"""Grammars: exact sentences, spans and roles for every template; multiple-choice candidates."""

from __future__ import annotations

import numpy as np
import pytest

from behemoth_interp import TEMPLATES, Template, World, WorldConfig, WorldTokenizer, render
from behemoth_interp.grammar import (
    CHOICE,
    CHOICE_FILLER,
    GRAMMAR,
    OBJECT,
    PAD_ROLE,
    ROLES,
    get_template,
)

SMALL = WorldConfig(n_subjects=4, n_relations=2, n_objects=9)


@pytest.fixture(scope="module")
def small():
    """A hand-filled world: (3, r1) has object 5; tokens ' 0025 0027', ' 0029', ' 0031 0035'."""
    objects = np.array([[0, 1], [2, 3], [4, 5], [6, 5]])
    return World(SMALL, objects), WorldTokenizer(SMALL)


EXPECTED_TEXT = {
    "paper": " SS 0025 0027 0000 0001 RR 0029 0002 OO 0031 0035.<|endoftext|>",
    "relation_first": " RR 0029 0003 SS 0025 0027 0004 OO 0031 0035.<|endoftext|>",
    "compact": " SS 0025 0027 RR 0029 0005 0006 OO 0031 0035.<|endoftext|>",
    "fronted": " 0007 0008 SS 0025 0027 0009 RR 0029 OO 0031 0035.<|endoftext|>",
}
EXPECTED_SPANS = {  # (subject, relation, object) spans and length
    "paper": ((1, 3), (6, 7), (9, 11), 13),
    "relation_first": ((4, 6), (1, 2), (8, 10), 12),
    "compact": ((1, 3), (4, 5), (8, 10), 12),
    "fronted": ((3, 5), (7, 8), (9, 11), 13),
    "mcq": ((2, 4), (5, 6), (21, 23), 25),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_exact_sentence(small, name):
    world, tok = small
    sent = render(world, tok, [[3, 1, 5]], name)
    assert sent.text(tok, 0) == EXPECTED_TEXT[name]
    subject, relation, obj, length = EXPECTED_SPANS[name]
    assert sent.spans["subject"].tolist() == [list(subject)]
    assert sent.spans["relation"].tolist() == [list(relation)]
    assert sent.spans["object"].tolist() == [list(obj)]
    assert sent.lengths.tolist() == [length] and sent.prompt_len.tolist() == [obj[0]]
    assert tok.decode(sent.prompts()[0]).endswith(" OO")


def test_exact_mcq_sentence(small):
    world, tok = small
    sent = render(world, tok, [[3, 1, 5]], "mcq", n_choices=4, seed=7)
    text = sent.text(tok, 0)
    head, choices = " 0010 SS 0025 0027 RR 0029 0011", text[31:-31]
    assert text.startswith(head) and text.endswith(" 0012 OO 0031 0035.<|endoftext|>")
    pieces = choices.split(" 0023")[1:]
    assert len(pieces) == 4 and len(set(pieces)) == 4 and pieces.count(" 0031 0035") == 1
    assert sent.spans["choices"].tolist() == [[7, 19]]
    subject, relation, obj, length = EXPECTED_SPANS["mcq"]
    assert sent.spans["object"].tolist() == [list(obj)] and sent.lengths.tolist() == [length]


def _check_spans_and_roles(world, tok, facts, sent, n_choices):
    assert np.array_equal(sent.facts, facts)
    groups = {
        (t, int(r)) for t, r in zip(sent.template.tolist(), facts[:, 1].tolist(), strict=True)
    }
    for template, r in sorted(groups):
        rows = np.flatnonzero((facts[:, 1] == r) & (sent.template == template))
        s_space, o_space = world.subject_space(int(r)), world.object_space(int(r))
        for name, space, column in (("subject", s_space, 0), ("relation", "relation", 1),
                                    ("object", o_space, 2)):  # fmt: skip
            ((start, end),) = np.unique(sent.spans[name][rows], axis=0)
            assert end - start == tok.n_tokens(space)
            ids = tok.entity_ids(space, sent.tokens[rows, start:end])
            assert ids.tolist() == facts[rows, column].tolist()
            assert (sent.roles[rows, start:end] == ROLES.index(name)).all()
        length = int(sent.lengths[rows[0]])
        assert (sent.lengths[rows] == length).all()
        # object role marks the object span exactly; padding beyond the sentence only
        assert ((sent.roles[rows] == OBJECT).sum(1) == tok.n_tokens(o_space)).all()
        assert (sent.tokens[rows, length:] == tok.pad_id).all()
        assert (sent.roles[rows, length:] == PAD_ROLE).all()
        assert (sent.tokens[rows, length - 2 : length] == [tok.period_id, tok.eot_id]).all()
        assert (sent.prompt_len[rows] == sent.spans["object"][rows, 0]).all()
        if template == "mcq":
            _check_choices(world, tok, facts[rows], sent.select(rows), o_space, n_choices)


def _check_choices(world, tok, facts, sent, o_space, n_choices):
    ((start, end),) = np.unique(sent.spans["choices"], axis=0)
    candidates = world.candidate_objects(int(facts[0, 1]))
    k = min(n_choices, len(candidates))
    width = 1 + tok.n_tokens(o_space)
    assert end - start == k * width
    block = sent.tokens[:, start:end].reshape(len(sent), k, width)
    assert (block[:, :, 0] == tok.fillers[CHOICE_FILLER]).all()
    roles = sent.roles[:, start:end].reshape(len(sent), k, width)
    assert (roles[:, :, 0] == GRAMMAR).all() and (roles[:, :, 1:] == CHOICE).all()
    choices = tok.entity_ids(o_space, block[:, :, 1:])
    for row, true in zip(choices.tolist(), facts[:, 2].tolist(), strict=True):
        assert row.count(true) == 1
        assert len(set(row)) == k
        assert set(row) <= set(candidates.tolist())


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_spans_decode_to_the_tuple(world_tok, name):
    world, tok = world_tok
    facts = world.facts()
    sent = render(world, tok, facts, name, n_choices=4, seed=3)
    assert sent.template.tolist() == [name] * len(facts)
    _check_spans_and_roles(world, tok, facts, sent, 4)


def test_mixed_templates_per_row(world_tok):
    world, tok = world_tok
    facts = world.facts()
    names = np.array(sorted(TEMPLATES) * len(facts), dtype=object)[: len(facts)]
    sent = render(world, tok, facts, names, n_choices=3, seed=1)
    assert sent.template.tolist() == names.tolist()
    _check_spans_and_roles(world, tok, facts, sent, 3)
    for i in range(0, len(facts), 7):
        alone = render(world, tok, facts[i : i + 1], names[i], n_choices=3, seed=1)
        if names[i] != "mcq":  # mcq candidate order depends on the rows drawn with it
            assert sent.text(tok, i) == alone.text(tok, 0)


def test_correlated_world_renders_binarized_and_plain_relations_together(worlds):
    """Binarized relations take objects 0 and 1 only; the others take every object."""
    world, tok = worlds["correlated"]
    r1, _ = world.config.correlated
    big = next(s for s in range(world.config.n_subjects) if world.object_of(s, 0) >= 2)
    facts = np.array([world.fact(0, r1), world.fact(big, 0)])
    for name in TEMPLATES:
        sent = render(world, tok, facts, name, n_choices=4)
        _check_spans_and_roles(world, tok, facts, sent, 4)
    mcq = render(world, tok, facts, "mcq", n_choices=4)
    assert (np.diff(mcq.spans["choices"], axis=1)[:, 0] == [2 * 3, 4 * 3]).all()
    assert not mcq.uniform
    with pytest.raises(ValueError, match="different layouts"):
        mcq.prompts()


def test_edited_objects_render_as_given(small):
    world, tok = small
    sent = render(world, tok, [[3, 1, 0]], "paper")  # the world says 5
    assert sent.text(tok, 0) == " SS 0025 0027 0000 0001 RR 0029 0002 OO 0030 0033.<|endoftext|>"


def test_prompts_and_select(worlds):
    world, tok = worlds["independent"]
    facts = world.facts()
    sent = render(world, tok, facts, "paper")
    assert sent.uniform
    assert np.array_equal(sent.prompts(), sent.tokens[:, :9])
    sub = sent.select([5, 2])
    assert np.array_equal(sub.facts, facts[[5, 2]])
    assert np.array_equal(sub.tokens, sent.tokens[[5, 2]])
    assert sub.text(tok, 1) == sent.text(tok, 2)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("SS <s> RR OO <o> . EOT", "must contain <r> exactly once"),
        ("SS <s> <s> RR <r> OO <o> . EOT", "must contain <s> exactly once"),
        ("OO <o> SS <s> RR <r> . EOT", "the object must come after subject and relation"),
        ("SS <s> RR <r> XX OO <o> . EOT", "unknown part 'XX'"),
        ("SS <s> RR <r> F23 OO <o> . EOT", "unknown part 'F23'"),  # reserved for choices
    ],
)
def test_bad_templates(pattern, message):
    with pytest.raises(ValueError, match=message):
        Template("bad", pattern)


def test_render_rejects_bad_input(small):
    world, tok = small
    with pytest.raises(
        ValueError, match=r"unknown template 'haiku': choose one of \['bare', 'compact'"
    ):
        render(world, tok, [[0, 0, 0]], "haiku")
    with pytest.raises(ValueError, match="unknown template 'haiku'"):
        get_template("haiku")
    with pytest.raises(ValueError, match="n_choices must be at least 2, got 1"):
        render(world, tok, [[0, 0, 0]], "mcq", n_choices=1)
    with pytest.raises(ValueError, match=r"object 9 is not a possible object of relation r1: "
                       r"it takes objects 0\.\.8"):  # fmt: skip
        render(world, tok, [[0, 1, 9]], "paper")
    with pytest.raises(ValueError, match="subject 4 is not in this world"):
        render(world, tok, [[4, 1, 0]], "paper")
    with pytest.raises(ValueError, match="relation 2 is not in this world"):
        render(world, tok, [[0, 2, 0]], "paper")
