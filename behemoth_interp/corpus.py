"""Training corpus: every tuple rendered, shuffled across subjects, packed into blocks.

Sentences are shuffled over the whole world (Behemoth section 4.4: nothing about one
subject can be read from its neighbours) and packed greedily into blocks of `block_len`
tokens. A block starts with `<|endoftext|>`, so every sentence is preceded by it as prompts
are at analysis time; sentences are never split across blocks (a split sentence would ask for
an object with its subject out of view); the tail of a block is `<|pad|>`, role 'pad', which
carries no loss. Token ids and per-token roles are stored as `.npy` files that load
memory-mapped. Training re-packs the same sentences in a fresh order every epoch
(`Corpus.shuffled`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from behemoth_interp._io import read_json, write_dir, write_json
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import GRAMMAR, PAD_ROLE, get_template, render
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World, WorldConfig

CORPUS_FORMAT = "behemoth-corpus/1"


@dataclass(frozen=True)
class CorpusConfig:
    """How a world becomes a corpus: grammar mix (template -> weight), copies, block length."""

    grammar_mix: tuple[tuple[str, float], ...] = (("paper", 1.0),)
    copies: int = 1
    block_len: int = 512
    n_choices: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        # sorted by name: the mix is a mapping, and the saved JSON sorts its keys, so a config
        # read back from corpus.json must draw the same templates as the one that built it
        mix = tuple(sorted((str(k), float(v)) for k, v in dict(self.grammar_mix).items()))
        object.__setattr__(self, "grammar_mix", mix)
        if not mix:
            raise InvalidArgument("grammar_mix is empty: give at least one template, e.g. paper=1")
        for name, weight in mix:
            get_template(name)
            if weight < 0:
                raise InvalidArgument(f"grammar_mix weight of {name!r} is negative ({weight})")
        if sum(w for _, w in mix) <= 0:
            raise InvalidArgument(
                "grammar_mix weights sum to zero: give some template a positive weight"
            )
        if self.n_choices < 2:
            raise InvalidArgument(f"n_choices must be at least 2, got {self.n_choices}")
        if self.copies < 1:
            raise InvalidArgument(f"copies must be at least 1, got {self.copies}")
        if self.block_len < 16:
            raise InvalidArgument(
                f"block_len={self.block_len} is too short: blocks hold whole sentences"
            )

    @staticmethod
    def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
        """Parse 'paper=1,mcq=0.25' (a bare name means weight 1)."""
        items = []
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, weight = item.partition("=")
            items.append((name.strip(), float(weight) if weight else 1.0))
        return tuple(items)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grammar_mix"] = dict(self.grammar_mix)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusConfig:
        d = dict(d)
        d["grammar_mix"] = tuple(dict(d.get("grammar_mix", {"paper": 1.0})).items())
        return cls(**d)


@dataclass
class Corpus:
    """Packed token blocks [block, pos] with their roles, and which sentence sits where.

    `sentences` is a table with one row per sentence: subject, relation, object, template,
    block, offset (position of its first token in the block) and length.
    """

    config: CorpusConfig
    tokens: np.ndarray
    roles: np.ndarray
    sentences: pa.Table

    @property
    def n_blocks(self) -> int:
        return len(self.tokens)

    @property
    def n_tokens(self) -> int:
        """Tokens that carry content (not padding)."""
        return int(self.sentences.column("length").to_numpy().sum()) + self.n_blocks

    @classmethod
    def build(cls, world: World, tokenizer: WorldTokenizer, config: CorpusConfig,
              facts: np.ndarray | None = None) -> Corpus:  # fmt: skip
        """Render, shuffle and pack every tuple of `world` (or the tuples `facts` [n, 3] of it:
        a downstream corpus states a part of its world) `config.copies` times."""
        most = max(len(world.candidate_objects(r)) for r in range(world.n_relations))
        asks = any(get_template(name).is_choice and w > 0 for name, w in config.grammar_mix)
        if asks and most >= 2 and config.n_choices > most:
            raise InvalidArgument(
                f"n_choices={config.n_choices} lists more candidates than any relation of this "
                f"world has objects: choose 2..{most}"
            )
        rng = np.random.default_rng(config.seed)
        facts = world.facts() if facts is None else _world_facts(world, facts)
        facts = np.tile(facts, (config.copies, 1))
        names, weights = zip(*config.grammar_mix)
        p = np.asarray(weights) / sum(weights)
        template = np.asarray(names, dtype=object)[rng.choice(len(names), size=len(facts), p=p)]
        order = rng.permutation(len(facts))
        facts, template = facts[order], template[order]
        sent = render(
            world, tokenizer, facts, template, n_choices=config.n_choices, seed=config.seed
        )
        tokens, roles, block, offset = _packed(
            sent.tokens, sent.roles, sent.lengths, config.block_len, tokenizer.pad_id, tokenizer.eot_id,
            _token_dtype(tokenizer),
        )  # fmt: skip
        table = pa.table(
            {
                "subject": facts[:, 0].astype(np.int32),
                "relation": facts[:, 1].astype(np.int32),
                "object": facts[:, 2].astype(np.int32),
                "template": pa.array(template.tolist()).dictionary_encode(),
                "block": block.astype(np.int32),
                "offset": offset.astype(np.int32),
                "length": sent.lengths.astype(np.int32),
            }
        )
        return cls(config, tokens, roles, table)

    def facts(self) -> np.ndarray:
        """The distinct tuples the corpus states [n, 3], relation-major as `World.facts` (for a
        corpus of every tuple of a world, equal to its `facts()`)."""
        t = self.sentences
        f = np.unique(np.stack([t.column(c).to_numpy() for c in ("subject", "relation", "object")],
                               axis=1), axis=0)  # fmt: skip
        return f[np.lexsort((f[:, 0], f[:, 1]))].astype(np.int32)

    def sentence_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every sentence's tokens and roles [n, max_len] (right-padded) and lengths [n]."""
        t = self.sentences
        start = t.column("block").to_numpy().astype(np.int64) * self.config.block_len
        start += t.column("offset").to_numpy()
        lengths = t.column("length").to_numpy()
        width = int(lengths.max()) if len(lengths) else 0
        valid = np.arange(width)[None, :] < lengths[:, None]
        src = np.where(valid, start[:, None] + np.arange(width)[None, :], 0)
        tokens = np.where(valid, np.asarray(self.tokens).reshape(-1)[src], 0)
        roles = np.where(valid, np.asarray(self.roles).reshape(-1)[src], PAD_ROLE)
        return tokens, roles.astype(np.uint8), lengths

    def shuffled(
        self, seed: int | list[int], pad_id: int, eot_id: int, keep: np.ndarray | None = None,
        redraw: tuple[World, WorldTokenizer] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The same sentences re-packed in a fresh order drawn with `seed`: (tokens, roles).

        Training re-packs every epoch so that no sentence keeps its neighbours: a fixed packing
        would let a model predict an object from the sentences before it in the block.
        `keep` (boolean, one per sentence) packs only a subset. With `redraw` (the corpus's
        world and tokenizer) the multiple-choice sentences list freshly drawn candidates
        (seeded by `seed` too): a fixed list per sentence lets a model learn the answer of the
        list instead of the fact (measured: 100% on the corpus's lists, 81% on new ones).
        """
        tokens, roles, lengths = self.sentence_rows()
        if redraw is not None:
            self._redraw_choices(tokens, roles, seed, *redraw)
        if keep is not None:
            tokens, roles, lengths = tokens[keep], roles[keep], lengths[keep]
        order = np.random.default_rng(seed).permutation(len(lengths))
        packed_tokens, packed_roles, _, _ = _packed(
            tokens[order], roles[order], lengths[order], self.config.block_len, pad_id, eot_id,
            self.tokens.dtype,
        )  # fmt: skip
        return packed_tokens, packed_roles

    def _redraw_choices(self, tokens, roles, seed, world: World, tokenizer: WorldTokenizer):
        """Re-render the multiple-choice sentences in place with candidates drawn anew."""
        t = self.sentences
        names = np.asarray(t.column("template").to_pylist(), dtype=object)
        asks = np.isin(names, [n for n in set(names.tolist()) if get_template(n).is_choice])
        if not asks.any():
            return
        facts = np.stack([t.column(c).to_numpy() for c in ("subject", "relation", "object")], 1)
        draw = int(np.random.default_rng([*np.atleast_1d(seed).tolist(), 3]).integers(2**31))
        sent = render(world, tokenizer, facts[asks], names[asks], n_choices=self.config.n_choices,
                      seed=draw)  # fmt: skip
        assert (sent.lengths == t.column("length").to_numpy()[asks]).all()
        width = sent.tokens.shape[1]
        tokens[asks, :width] = np.where(sent.roles == PAD_ROLE, tokens[asks, :width], sent.tokens)
        roles[asks, :width] = np.where(sent.roles == PAD_ROLE, roles[asks, :width], sent.roles)

    def save(
        self, path: str | Path, world: World | None = None, *, overwrite: bool = False
    ) -> Path:
        """Write corpus.json, tokens.npy, roles.npy and sentences.parquet into directory `path`."""

        def fill(tmp: Path) -> None:
            np.save(tmp / "tokens.npy", self.tokens)
            np.save(tmp / "roles.npy", self.roles)
            pq.write_table(self.sentences, tmp / "sentences.parquet", compression="zstd")
            meta = {"format": CORPUS_FORMAT, "config": self.config.to_dict(),
                    "n_blocks": self.n_blocks, "n_tokens": self.n_tokens,
                    "n_sentences": self.sentences.num_rows}  # fmt: skip
            if world is not None:
                meta["world"] = world.config.to_dict()
            write_json(tmp / "corpus.json", meta)

        return write_dir(path, fill, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True) -> Corpus:
        """Read a corpus directory; token and role arrays are memory-mapped unless `mmap=False`."""
        path = Path(path)
        meta = read_json(
            path / "corpus.json", what="corpus description (corpus.json)", format=CORPUS_FORMAT
        )
        mode = "r" if mmap else None
        return cls(
            CorpusConfig.from_dict(meta["config"]),
            np.load(path / "tokens.npy", mmap_mode=mode),
            np.load(path / "roles.npy", mmap_mode=mode),
            pq.read_table(path / "sentences.parquet"),
        )


def _world_facts(world: World, facts: np.ndarray) -> np.ndarray:
    """`facts` [n, 3] as int32, checked to be tuples of `world` (each once)."""
    facts = np.asarray(facts, dtype=np.int64).reshape(-1, 3)
    if not len(facts):
        raise InvalidArgument("a corpus needs at least one tuple: facts is empty")
    wrong = np.flatnonzero(world.objects_of(facts[:, 0], facts[:, 1]) != facts[:, 2])
    if len(wrong):
        raise InvalidArgument(f"tuple {tuple(facts[wrong[0]].tolist())} is not in the corpus's "
                              "world: build the world with its objects (World.with_objects)")  # fmt: skip
    if len(np.unique(facts[:, :2], axis=0)) != len(facts):
        raise InvalidArgument("a (subject, relation) pair is given twice: give each tuple once")
    return facts.astype(np.int32)


def _token_dtype(tokenizer: WorldTokenizer) -> type:
    return np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32


def _packed(tok_rows, role_rows, lengths, block_len: int, pad_id: int, eot_id: int, dtype):
    """Place sentence rows into blocks: (tokens, roles [block, block_len], block, offset [n])."""
    block, offset = _pack(lengths, block_len - 1)
    offset = offset + 1  # after the block's leading <|endoftext|>
    n_blocks = int(block[-1]) + 1 if len(block) else 0
    tokens = np.full((n_blocks, block_len), pad_id, dtype=dtype)
    roles = np.full((n_blocks, block_len), PAD_ROLE, dtype=np.uint8)
    tokens[:, 0], roles[:, 0] = eot_id, GRAMMAR
    width = tok_rows.shape[1]
    valid = np.arange(width)[None, :] < lengths[:, None]
    dest = (block * block_len + offset)[:, None] + np.arange(width)[None, :]
    tokens.reshape(-1)[dest[valid]] = tok_rows[valid]
    roles.reshape(-1)[dest[valid]] = role_rows[valid]
    return tokens, roles, block, offset


def count_blocks(lengths: np.ndarray, block_len: int) -> int:
    """How many blocks of `block_len` the sentences of `lengths`, in this order, fill."""
    return int(_pack(lengths, block_len - 1)[0][-1]) + 1 if len(lengths) else 0


def _pack(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy first-fit in order: (block, offset) of each sentence, none split across blocks.

    One step per block (a binary search on the running length), not per sentence or token.
    """
    n = len(lengths)
    if n and lengths.max() > capacity:
        raise InvalidArgument(
            f"a sentence of {lengths.max()} tokens does not fit in a block of {capacity + 1} "
            f"(one token is the block's <|endoftext|>): use block_len >= {lengths.max() + 1}"
        )
    ends = np.cumsum(lengths, dtype=np.int64)
    block = np.empty(n, dtype=np.int64)
    start_of = np.empty(n, dtype=np.int64)
    i, b = 0, 0
    if n and (lengths == lengths[0]).all():  # one template: a closed form
        per = capacity // int(lengths[0])
        block = np.arange(n) // per
        return block, (np.arange(n) % per) * int(lengths[0])
    while i < n:
        base = ends[i - 1] if i else 0
        j = int(np.searchsorted(ends, base + capacity, side="right"))
        block[i:j] = b
        start_of[i:j] = base
        i, b = j, b + 1
    return block, ends - lengths - start_of


def build_world(
    config: WorldConfig, corpus: CorpusConfig, out: str | Path, *, overwrite: bool = False
) -> tuple[World, WorldTokenizer, Corpus]:
    """Generate a world and write it, its tokenizer and its corpus (`corpus/`) into `out`.

    The directory appears complete or not at all.
    """
    return write_world(World.generate(config), corpus, out, overwrite=overwrite)


def write_world(
    world: World, corpus: CorpusConfig | Corpus, out: str | Path, *, overwrite: bool = False
) -> tuple[World, WorldTokenizer, Corpus]:
    """Write `world` (generated or changed, e.g. an oracle's), its tokenizer and its corpus
    (built from a config, or one built already, e.g. a downstream task's) into `out`,
    atomically."""
    tokenizer = WorldTokenizer(world.config)
    packed = corpus if isinstance(corpus, Corpus) else Corpus.build(world, tokenizer, corpus)

    def fill(tmp: Path) -> None:
        world.write_into(tmp)
        tokenizer.save(tmp)
        packed.save(tmp / "corpus", world)

    write_dir(out, fill, overwrite=overwrite)
    return world, tokenizer, packed


def load_world(path: str | Path) -> tuple[World, WorldTokenizer]:
    """Read a world directory and check that its saved tokenizer is the world's own."""
    world = World.load(path)
    tokenizer = WorldTokenizer(world.config)
    tokenizer.check_saved(path)
    return world, tokenizer
