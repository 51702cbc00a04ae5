"""Packed corpora: each tuple `copies` times, whole sentences per block, exact roles, files."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS_CONFIG, EVERY_TEMPLATE

from behemoth_interp import (
    Corpus,
    CorpusConfig,
    World,
    WorldConfig,
    WorldTokenizer,
    build_world,
    load_world,
    render,
)
from behemoth_interp.corpus import _pack
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import GRAMMAR, OBJECT, PAD_ROLE, RELATION, SUBJECT


def _columns(corpus: Corpus) -> dict[str, np.ndarray]:
    return {name: corpus.sentences.column(name).to_numpy() for name in
            ("subject", "relation", "object", "block", "offset", "length")}  # fmt: skip


def test_every_tuple_appears_exactly_copies_times(world_corpus):
    world, _, corpus = world_corpus
    c = _columns(corpus)
    seen = Counter(zip(*(c[k].tolist() for k in ("subject", "relation", "object")), strict=True))
    assert seen == Counter({tuple(f): CORPUS_CONFIG.copies for f in world.facts().tolist()})
    assert corpus.sentences.num_rows == CORPUS_CONFIG.copies * world.n_facts
    templates = Counter(corpus.sentences.column("template").to_pylist())
    assert set(templates) == {name for name, _ in EVERY_TEMPLATE}


def test_sentences_shuffled_across_subjects(world_corpus):
    world, _, corpus = world_corpus
    relation = _columns(corpus)["relation"]
    n = world.n_facts
    assert not np.array_equal(relation[:n], np.sort(relation[:n]))  # not relation-major
    # the same subject's tuples are spread over the corpus, not side by side
    subject = _columns(corpus)["subject"]
    assert (subject[1:] == subject[:-1]).mean() < 0.2


def test_blocks_hold_whole_sentences_back_to_back(world_corpus):
    _, tok, corpus = world_corpus
    L = corpus.config.block_len
    c = _columns(corpus)
    assert corpus.tokens.shape == corpus.roles.shape == (corpus.n_blocks, L)
    assert (corpus.tokens[:, 0] == tok.eot_id).all() and (corpus.roles[:, 0] == GRAMMAR).all()
    assert (c["offset"] >= 1).all() and (c["offset"] + c["length"] <= L).all()
    assert np.array_equal(c["block"], np.sort(c["block"]))  # sentences fill blocks in order
    assert set(c["block"].tolist()) == set(range(corpus.n_blocks))
    for b in range(corpus.n_blocks):
        rows = np.flatnonzero(c["block"] == b)
        offsets, lengths = c["offset"][rows], c["length"][rows]
        assert offsets[0] == 1
        assert np.array_equal(offsets[1:], offsets[:-1] + lengths[:-1])  # no gap, no overlap
        end = offsets[-1] + lengths[-1]
        assert (corpus.tokens[b, end:] == tok.pad_id).all()
        assert (corpus.roles[b, end:] == PAD_ROLE).all()
        assert (corpus.tokens[b, :end] != tok.pad_id).all()
        if b + 1 < corpus.n_blocks:  # greedy: the next sentence would not have fit
            assert end + c["length"][rows[-1] + 1] > L
    assert corpus.n_tokens == int((corpus.tokens != tok.pad_id).sum())
    assert corpus.n_tokens == int((corpus.roles != PAD_ROLE).sum())


def test_tokens_at_each_sentence_decode_to_its_tuple(world_corpus):
    world, tok, corpus = world_corpus
    c = _columns(corpus)
    templates = np.array(corpus.sentences.column("template").to_pylist(), dtype=object)
    for i in range(corpus.sentences.num_rows):
        b, off, n = c["block"][i], c["offset"][i], c["length"][i]
        tokens, roles = corpus.tokens[b, off : off + n], corpus.roles[b, off : off + n]
        s, r, o = int(c["subject"][i]), int(c["relation"][i]), int(c["object"][i])
        assert world.object_of(s, r) == o
        expected = ((SUBJECT, world.subject_space(r), s), (RELATION, "relation", r),
                    (OBJECT, world.object_space(r), o))  # fmt: skip
        for role, space, value in expected:
            assert tok.entity_ids(space, tokens[roles == role][None]).tolist() == [value]
        assert tokens[-2:].tolist() == [tok.period_id, tok.eot_id]
        # the roles are exactly those of the same tuple rendered alone; so are the tokens,
        # except the multiple-choice candidates, drawn per corpus
        alone = render(world, tok, [[s, r, o]], templates[i], n_choices=corpus.config.n_choices)
        assert alone.lengths[0] == n
        assert roles.tolist() == alone.roles[0, :n].tolist()
        if templates[i] != "mcq":
            assert tokens.tolist() == alone.tokens[0, :n].tolist()
        assert tok.encode(tok.decode(tokens)) == tokens.tolist()


def test_save_and_memory_mapped_load(worlds, corpora, tmp_path):
    world, _ = worlds["nested"]
    corpus = corpora["nested"]
    corpus.save(tmp_path / "c", world)
    loaded = Corpus.load(tmp_path / "c")
    assert isinstance(loaded.tokens, np.memmap) and isinstance(loaded.roles, np.memmap)
    assert loaded.tokens.dtype == corpus.tokens.dtype == np.uint16
    assert np.array_equal(loaded.tokens, corpus.tokens) and np.array_equal(
        loaded.roles, corpus.roles
    )
    assert loaded.sentences.equals(corpus.sentences)
    assert loaded.config == corpus.config
    assert (loaded.n_blocks, loaded.n_tokens) == (corpus.n_blocks, corpus.n_tokens)
    eager = Corpus.load(tmp_path / "c", mmap=False)
    assert not isinstance(eager.tokens, np.memmap)
    assert np.array_equal(eager.tokens, corpus.tokens)
    with pytest.raises(FileNotFoundError, match="corpus.json is missing"):
        Corpus.load(tmp_path / "nowhere")


def _build(tmp_path, name, seed):
    config = WorldConfig("correlated", n_subjects=30, n_relations=3, n_objects=8, seed=seed)
    return build_world(config, CorpusConfig(EVERY_TEMPLATE, copies=2, block_len=48, seed=seed),
                       tmp_path / name)  # fmt: skip


def test_same_seed_same_bytes_different_seed_different(tmp_path, tree_bytes):
    _build(tmp_path, "a", 11)
    _build(tmp_path, "b", 11)
    _build(tmp_path, "c", 12)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert sorted(a) == ["corpus/corpus.json", "corpus/roles.npy", "corpus/sentences.parquet",
                         "corpus/tokens.npy", "facts.parquet", "tokenizer.json",
                         "tokenizer_config.json", "world.json"]  # fmt: skip
    assert a == b
    for name in ("facts.parquet", "corpus/tokens.npy", "corpus/sentences.parquet"):
        assert a[name] != c[name]
    assert a["tokenizer.json"] == c["tokenizer.json"]  # the layout does not depend on the seed


def test_build_world_and_load_world(tmp_path):
    world, tok, corpus = _build(tmp_path, "w", 3)
    loaded, loaded_tok = load_world(tmp_path / "w")
    assert loaded == world and loaded_tok.tokens == tok.tokens
    on_disk = Corpus.load(tmp_path / "w" / "corpus")
    assert np.array_equal(on_disk.tokens, corpus.tokens)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        _build(tmp_path, "w", 3)
    WorldTokenizer(WorldConfig(n_subjects=7)).save(tmp_path / "w")
    with pytest.raises(ValueError, match="is from another vocabulary"):
        load_world(tmp_path / "w")


def test_one_template_packs_in_closed_form(worlds):
    world, tok = worlds["independent"]
    corpus = Corpus.build(world, tok, CorpusConfig(block_len=40, copies=3))
    c = _columns(corpus)
    per_block = (40 - 1) // 13  # paper sentences of 13 tokens after the block's <|endoftext|>
    n = 3 * world.n_facts
    assert corpus.n_blocks == -(-n // per_block)
    assert c["block"].tolist() == (np.arange(n) // per_block).tolist()
    assert c["offset"].tolist() == (1 + 13 * (np.arange(n) % per_block)).tolist()


def test_pack_greedy_by_hand():
    block, offset = _pack(np.array([3, 4, 2, 5, 1]), 7)
    assert block.tolist() == [0, 0, 1, 1, 2]
    assert offset.tolist() == [0, 3, 0, 2, 0]
    with pytest.raises(ValueError, match="use block_len >= 9"):
        _pack(np.array([3, 8]), 7)


def test_grammar_mix_weights(worlds):
    world, tok = worlds["independent"]
    corpus = Corpus.build(world, tok, CorpusConfig((("paper", 1.0), ("mcq", 0.0)), block_len=64))
    assert set(corpus.sentences.column("template").to_pylist()) == {"paper"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grammar_mix": ()}, "grammar_mix is empty"),
        ({"grammar_mix": (("sonnet", 1.0),)}, "unknown template 'sonnet'"),
        ({"grammar_mix": (("paper", -1.0),)}, "weight of 'paper' is negative"),
        ({"grammar_mix": (("paper", 0.0),)}, "weights sum to zero"),
        ({"copies": 0}, "copies must be at least 1, got 0"),
        ({"block_len": 8}, "block_len=8 is too short"),
    ],
)
def test_bad_corpus_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CorpusConfig(**kwargs)


def test_block_too_short_for_a_sentence(worlds):
    world, tok = worlds["independent"]
    with pytest.raises(ValueError, match=r"a sentence of 25 tokens does not fit in a block of 16 .*"
                       r"use block_len >= 26"):  # fmt: skip
        Corpus.build(world, tok, CorpusConfig((("mcq", 1.0),), block_len=16))


def test_corpus_config_round_trip():
    c = CorpusConfig(CorpusConfig.parse_mix("paper=1, mcq=0.25,compact"), copies=3, block_len=128)
    assert c.grammar_mix == (("compact", 1.0), ("mcq", 0.25), ("paper", 1.0))
    assert CorpusConfig.from_dict(c.to_dict()) == c


def test_tiny_world_round_trip_through_disk(tmp_path):
    """A one-subject world still builds, saves and reloads."""
    config = WorldConfig(n_subjects=1, n_relations=1, n_objects=1)
    world, _, corpus = build_world(config, CorpusConfig(), tmp_path / "w")
    assert corpus.n_blocks == 1 and corpus.sentences.num_rows == 1
    assert World.load(tmp_path / "w") == world


def test_saved_config_rebuilds_the_same_corpus(worlds, tmp_path):
    """The mix is a mapping: its order is canonical, so corpus.json rebuilds the same corpus."""
    world, tok = worlds["correlated"]
    config = CorpusConfig((("mcq", 1.0), ("paper", 2.0), ("compact", 1.0)), block_len=64, seed=9)
    assert config == CorpusConfig((("compact", 1.0), ("paper", 2.0), ("mcq", 1.0)), 1, 64, seed=9)
    corpus = Corpus.build(world, tok, config)
    corpus.save(tmp_path / "c")
    again = Corpus.build(world, tok, Corpus.load(tmp_path / "c").config)
    assert np.array_equal(again.tokens, corpus.tokens)
    assert again.sentences.equals(corpus.sentences)


def test_fresh_choices_redraw_only_the_candidates(worlds):
    from behemoth_interp.grammar import CHOICE, OBJECT

    world, tok = worlds["independent"]
    corpus = Corpus.build(world, tok, CorpusConfig((("mcq", 1.0), ("paper", 1.0)), block_len=64))
    plain = corpus.shuffled(3, tok.pad_id, tok.eot_id)
    a = corpus.shuffled(3, tok.pad_id, tok.eot_id, redraw=(world, tok))
    b = corpus.shuffled(3, tok.pad_id, tok.eot_id, redraw=(world, tok))
    other = corpus.shuffled(4, tok.pad_id, tok.eot_id, redraw=(world, tok))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # a pure function of the seed
    assert np.array_equal(a[1], plain[1])  # same layout: every role where it was
    choice = a[1] == CHOICE
    assert (a[0] != plain[0])[choice].any() and np.array_equal(a[0][~choice], plain[0][~choice])
    assert other[0].shape != a[0].shape or not np.array_equal(other[0], a[0])
    # every multiple-choice sentence still lists its own answer among its candidates
    tokens, roles, _ = corpus.sentence_rows()
    corpus._redraw_choices(tokens, roles, 3, world, tok)
    for row, role in zip(tokens, roles):
        if (role == CHOICE).any():
            answer = tuple(row[role == OBJECT])
            candidates = row[role == CHOICE].reshape(-1, len(answer))
            assert answer in {tuple(c) for c in candidates}


def test_facts_of_a_full_corpus_are_its_worlds(world_corpus):
    """Training evaluates on the corpus's facts: for a world's own corpus, every tuple."""
    world, _, corpus = world_corpus
    assert np.array_equal(corpus.facts(), world.facts())


def test_a_corpus_of_some_tuples_states_them_and_only_them(worlds):
    world, tok = worlds["independent"]
    part = world.facts()[::3]
    corpus = Corpus.build(world, tok, CorpusConfig(copies=2, block_len=64), part)
    assert np.array_equal(corpus.facts(), part) and len(corpus.sentences) == 2 * len(part)
    wrong = part.copy()
    wrong[0, 2] = (wrong[0, 2] + 1) % world.config.n_objects
    with pytest.raises(InvalidArgument, match="not in the corpus's world"):
        Corpus.build(world, tok, CorpusConfig(), wrong)
    with pytest.raises(InvalidArgument, match="given twice"):
        Corpus.build(world, tok, CorpusConfig(), np.concatenate([part, part[:1]]))


ORIGINAL_TEMPLATES = ("compact", "fronted", "mcq", "paper", "relation_first")
ORIGINAL_SHA256 = {
    "independent": "76099e89257705960723e37857b40bcd33a607ac47dfc668a975cd734f102b40",
    "nested": "7bbdf6297e9212e5d5c90b7e5a8e548a49045edb007ce0f9463b3ec3ea6e8d97",
}
"""sha256 of the tokens and roles (int64) of a corpus in the five templates the grammar had
before the augmentation paraphrases, computed with that code (commit c9bf1c1, the parent of
1954190, which added ten templates): new templates never change how older ones render."""


@pytest.mark.parametrize("name", sorted(ORIGINAL_SHA256))
def test_new_templates_leave_older_corpora_byte_for_byte(worlds, name):
    world, tok = worlds[name]
    mix = tuple((t, 1.0) for t in ORIGINAL_TEMPLATES)
    corpus = Corpus.build(world, tok, CorpusConfig(mix, copies=2, block_len=64, seed=5))
    payload = (
        np.asarray(corpus.tokens, np.int64).tobytes() + np.asarray(corpus.roles, np.int64).tobytes()
    )
    assert hashlib.sha256(payload).hexdigest() == ORIGINAL_SHA256[name]


@pytest.mark.parametrize(
    "name", ["independent", "correlated", "nested", "independent-formats", "correlated-formats"]
)
def test_shipped_worlds_corpora_rebuild_byte_for_byte(name):
    path = Path(__file__).resolve().parents[1] / "data" / "worlds" / name
    world, tok = load_world(path)
    shipped = Corpus.load(path / "corpus")
    rebuilt = Corpus.build(world, tok, shipped.config)
    assert np.array_equal(rebuilt.tokens, shipped.tokens)
    assert np.array_equal(rebuilt.roles, shipped.roles)
    assert rebuilt.sentences.equals(shipped.sentences)
