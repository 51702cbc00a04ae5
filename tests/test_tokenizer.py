"""The partitioned tokenizer: exact layout, partitions, round trips, out-of-vocabulary text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from behemoth_interp import TEMPLATES, OutOfVocabularyError, WorldConfig, WorldTokenizer, render
from behemoth_interp.tokenizer import SPACES

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SMALL = WorldConfig(n_subjects=4, n_relations=2, n_objects=9)
"""Subjects 2 x 2 tokens, relations 2 x 1, objects 3 x 3: a layout small enough to write out."""


def test_exact_layout_of_a_small_world():
    tok = WorldTokenizer(SMALL)
    numbers = [f" {n:04d}" for n in range(36)]
    prefixes = [" ", " 0", " 00", " 000", " 001", " 002", " 003"]
    assert tok.tokens == ["<|endoftext|>", "<|pad|>", " SS", " RR", " OO", ".", *numbers, *prefixes]
    assert tok.vocab_size == 49
    assert (tok.eot_id, tok.pad_id, tok.ss_id, tok.rr_id, tok.oo_id, tok.period_id) == tuple(
        range(6)
    )
    assert tok.decode(tok.fillers) == "".join(numbers[:24])
    assert [tok.decode(p) for p in tok.positions["subject"]] == [" 0024 0025", " 0026 0027"]
    assert [tok.decode(p) for p in tok.positions["relation"]] == [" 0028 0029"]
    assert [tok.decode(p) for p in tok.positions["object"]] == [
        " 0030 0031 0032",
        " 0033 0034 0035",
    ]
    assert tok.decode(tok.entity_tokens("subject", [3])[0]) == " 0025 0027"
    assert tok.decode(tok.entity_tokens("object", [5])[0]) == " 0031 0035"  # 5 = 1 * 3 + 2
    assert tok.entity_ids("object", tok.entity_tokens("object", [5])).tolist() == [5]
    assert tok.n_tokens("subject") == 2 and tok.n_tokens("relation") == 1


def test_space_of_small_world():
    tok = WorldTokenizer(SMALL)
    ids = [tok.vocab[t] for t in ("<|pad|>", " 0005", " 0024", " 0029", " 0035", " ", " 003")]
    assert tok.space_of(ids).tolist() == [
        "special", "filler", "subject", "relation", "object", "prefix", "prefix",
    ]  # fmt: skip


def test_partitions(world_tok):
    world, tok = world_tok
    assert len(set(tok.tokens)) == tok.vocab_size  # no token string twice
    owner = {}
    sets = [("filler", 0, tok.fillers)]
    sets += [(space, p, ids) for space, pos in tok.positions.items() for p, ids in enumerate(pos)]
    for space, p, ids in sets:
        for i in ids.tolist():
            assert i not in owner, f"token {tok.tokens[i]!r} in {owner.get(i)} and {(space, p)}"
            owner[i] = (space, p)
        assert set(tok.space_of(ids)) == {space}
    for space, pos in tok.positions.items():
        for a in range(len(pos)):
            for b in range(a + 1, len(pos)):
                assert not set(pos[a].tolist()) & set(pos[b].tolist())
        assert len(pos) == world.config.token_spaces()[space][1]
    expected_spaces = {"special", "filler", "subject", "relation", "object", "prefix"}
    if world.config.distribution == "nested":
        expected_spaces.add("nested")
    assert set(tok.space_of(np.arange(tok.vocab_size))) == expected_spaces
    # every id is special, an entity or filler number, or a prefix
    prefix = tok.token_space == SPACES.index("prefix")
    assert len(owner) + 6 + prefix.sum() == tok.vocab_size


def test_prefixes_exist_but_are_never_produced(world_tok):
    world, tok = world_tok
    numbers = [t for t in tok.tokens if t[1:].isdigit() and len(t) == 5]
    for t in numbers:
        for i in range(1, 5):
            assert t[:i] in tok.vocab and tok.space_of([tok.vocab[t[:i]]])[0] == "prefix"
    prefix_ids = set(np.flatnonzero(tok.token_space == SPACES.index("prefix")).tolist())
    assert prefix_ids
    facts = world.facts()
    for name in TEMPLATES:
        sent = render(world, tok, facts, name)
        for i in range(len(sent)):
            ids = tok.encode(sent.text(tok, i))
            assert ids == sent.tokens[i, : sent.lengths[i]].tolist()
            assert not prefix_ids & set(ids)


def test_entity_tokens_round_trip_every_entity(world_tok):
    world, tok = world_tok
    for space, (n, k) in world.config.token_spaces().items():
        ids = np.arange(n)
        t = tok.entity_tokens(space, ids)
        assert t.shape == (n, k)
        assert len({tuple(row) for row in t.tolist()}) == n
        for p in range(k):
            assert set(t[:, p].tolist()) <= set(tok.positions[space][p].tolist())
        assert tok.entity_ids(space, t).tolist() == ids.tolist()
        with pytest.raises(ValueError, match=rf"{space} {n} is not in this world: "
                           rf"it has {space}s 0\.\.{n - 1}"):  # fmt: skip
            tok.entity_tokens(space, [0, n])
        if k > 1:  # tokens in the wrong positions, or from another space, are not an entity
            assert (tok.entity_ids(space, t[:, ::-1]) == -1).all()
            assert (tok.entity_ids(space, np.full((1, k), tok.fillers[0])) == -1).all()


def _sentence_ids(world, tok, data) -> list[int]:
    facts = world.facts()
    rows = data.draw(st.lists(st.integers(0, len(facts) - 1), min_size=1, max_size=4))
    template = data.draw(st.sampled_from(sorted(TEMPLATES)))
    sent = render(world, tok, facts[rows], template, seed=data.draw(st.integers(0, 1000)))
    return [i for r in range(len(sent)) for i in sent.tokens[r, : sent.lengths[r]].tolist()]


@given(data=st.data())
@SETTINGS
def test_round_trip_on_random_sentences(world_tok, data):
    world, tok = world_tok
    ids = _sentence_ids(world, tok, data)
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.hf(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.hf.decode(ids) == text
    assert tok.hf.decode(tok.hf(text, add_special_tokens=False)["input_ids"]) == text


@given(data=st.data())
@SETTINGS
def test_round_trip_on_any_token_sequence(world_tok, data):
    """Even prefixes, pads and bare markers in any order decode and re-encode to themselves."""
    _, tok = world_tok
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=20))
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    assert tok.hf(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.hf.decode(ids) == text


@pytest.mark.parametrize(
    ("text", "piece", "at"),
    [(" SS 9999", "' 9999'", 3), (" SS 00123", "'3'", 8), ("hello", "'hello'", 0),
     ("SS 0001", "'SS'", 0), (" 0001<|endoftext|> ab", "'ab'", 19), (" 0001,", "','", 5)],
)  # fmt: skip
def test_out_of_vocabulary_text_names_the_piece(text, piece, at):
    tok = WorldTokenizer(SMALL)
    with pytest.raises(OutOfVocabularyError, match=f"^{piece} at character {at} is not a token"):
        tok.encode(text)
    assert issubclass(OutOfVocabularyError, ValueError)


def test_hf_tokenizer_saves_and_reloads(tmp_path):
    tok = WorldTokenizer(SMALL)
    tok.save(tmp_path)
    tok.check_saved(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = " SS 0025 0027 0000 0001 RR 0029 0002 OO 0031 0035.<|endoftext|><|pad|>"
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert reloaded.decode(tok.encode(text)) == text
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|pad|>",
    )  # fmt: skip
    other = WorldTokenizer(WorldConfig(n_subjects=5, n_relations=2, n_objects=9))
    with pytest.raises(ValueError, match="is from another vocabulary"):
        other.check_saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        tok.check_saved(tmp_path / "nowhere")


def test_layout_is_a_function_of_the_config():
    a = WorldTokenizer(SMALL)
    b = WorldTokenizer(WorldConfig.from_dict({**SMALL.to_dict(), "seed": 123}))
    assert a.tokens == b.tokens
