"""A fully partitioned tokenizer for a world, shipped as a Hugging Face fast tokenizer.

Every entity and filler token is a space and a four-digit number (Behemoth section 4.4).
Subject, relation, object, nested-object and filler tokens are disjoint sets of numbers, and
within a multi-token entity each position has its own disjoint token set. Special tokens are
`<|endoftext|>` (also BOS), `<|pad|>`, ` SS`, ` RR`, ` OO` and `.`. Every proper prefix of a
used number (" ", " 1", " 12", " 123") is in the vocabulary too, but greedy longest-match
tokenization never produces one from a well-formed sentence.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from behemoth_interp.errors import InvalidArgument, MissingInput
from behemoth_interp.world import N_FILLERS, EntitySpace, WorldConfig, entity_factors

EOT = "<|endoftext|>"
PAD = "<|pad|>"
MARKERS = (" SS", " RR", " OO", ".")
SPACES: tuple[str, ...] = ("special", "filler", "subject", "relation", "object", "nested", "prefix")
_SPLIT = Regex(r" SS| RR| OO| \d{0,4}|\.")


class OutOfVocabularyError(InvalidArgument):
    """Text contains a piece that is not a token of this world's vocabulary."""


class WorldTokenizer:
    """Token layout of one world: entity ids <-> token ids, text <-> token ids.

    The layout is a pure function of the world config's entity counts and tokens per entity,
    so a checkpoint's tokenizer can be checked against its world exactly.
    """

    def __init__(self, config: WorldConfig):
        self.config = config
        tokens: list[str] = [EOT, PAD, *MARKERS]
        space_of: list[str] = ["special"] * len(tokens)
        number = 0

        def take(count: int, space: str) -> np.ndarray:
            nonlocal number
            ids = np.arange(len(tokens), len(tokens) + count)
            tokens.extend(f" {n:04d}" for n in range(number, number + count))
            space_of.extend([space] * count)
            number += count
            return ids

        self.fillers = take(N_FILLERS, "filler")
        self.positions: dict[EntitySpace, list[np.ndarray]] = {}
        self.factors: dict[EntitySpace, tuple[int, ...]] = {}
        for space, (n, k) in config.token_spaces().items():
            self.factors[space] = entity_factors(n, k)
            self.positions[space] = [take(size, space) for size in self.factors[space]]
        prefixes = sorted({t[:i] for t in tokens if t[1:].isdigit() for i in range(1, 5)})
        tokens.extend(prefixes)
        space_of.extend(["prefix"] * len(prefixes))
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.token_space = np.array([SPACES.index(s) for s in space_of], dtype=np.int8)
        self.eot_id = self.vocab[EOT]
        self.pad_id = self.vocab[PAD]
        self.ss_id, self.rr_id, self.oo_id, self.period_id = (self.vocab[m] for m in MARKERS)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def n_tokens(self, space: EntitySpace) -> int:
        """Tokens per entity of `space`."""
        return len(self.factors[space])

    # ------------------------------------------------------------------ entities
    def entity_tokens(self, space: EntitySpace, ids: np.ndarray) -> np.ndarray:
        """Token ids [n, k] of entities `ids` [n] of `space` (mixed radix, first token major)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = self.config.token_spaces()[space][0]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad = int(ids[(ids < 0) | (ids >= n)][0])
            raise InvalidArgument(f"{space} {bad} is not in this world: it has {space}s 0..{n - 1}")
        digits = np.unravel_index(ids, self.factors[space])
        return np.stack([pos[d] for pos, d in zip(self.positions[space], digits)], axis=-1)

    def entity_ids(self, space: EntitySpace, token_ids: np.ndarray) -> np.ndarray:
        """Inverse of `entity_tokens`: entity ids [n] from token ids [n, k]; -1 where invalid."""
        token_ids = np.asarray(token_ids, dtype=np.int64)
        digits = []
        for p, pos in enumerate(self.positions[space]):
            lookup = np.full(self.vocab_size, -1, dtype=np.int64)
            lookup[pos] = np.arange(len(pos))
            digits.append(lookup[token_ids[..., p]])
        digits = np.stack(digits, axis=-1)
        valid = (digits >= 0).all(-1)
        out = np.where(
            valid, np.ravel_multi_index(tuple(np.maximum(digits, 0).T), self.factors[space]).T, -1
        )
        n = self.config.token_spaces()[space][0]
        return np.where(out < n, out, -1)

    def space_of(self, token_ids: np.ndarray) -> np.ndarray:
        """Name of each token's space ('subject', 'object', 'filler', 'prefix', ...)."""
        return np.asarray(SPACES, dtype=object)[self.token_space[np.asarray(token_ids)]]

    # ------------------------------------------------------------------ text
    @cached_property
    def hf(self) -> PreTrainedTokenizerFast:
        """The Hugging Face fast tokenizer (what TransformerLens `to_tokens` uses)."""
        tok = Tokenizer(models.WordLevel(self.vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(_SPLIT, behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([EOT, PAD])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=EOT,
            eos_token=EOT,
            pad_token=PAD,
            model_max_length=4096,
            clean_up_tokenization_spaces=False,
            add_bos_token=True,  # prompts start with <|endoftext|>, as every corpus sentence does
            add_eos_token=False,
            name_or_path="behemoth-world",
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a piece outside the vocabulary raises `OutOfVocabularyError`."""
        self.check_text(text)
        return self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids) -> str:
        """Text of `token_ids`, special tokens included, so `encode(decode(ids)) == ids`."""
        ids = np.asarray(token_ids).ravel()
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
                         or ids.max() >= self.vocab_size):  # fmt: skip
            raise InvalidArgument(
                f"token ids must be integers in 0..{self.vocab_size - 1} (this world's "
                f"vocabulary), got {ids[:8].tolist()}"
            )
        return "".join(self.tokens[int(i)] for i in ids)

    def check_text(self, text: str) -> None:
        """Raise `OutOfVocabularyError` naming the first piece of `text` that is not a token."""
        offset = 0
        for chunk in _split_specials(text):
            if chunk not in (EOT, PAD):
                for piece, (start, _) in self.hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str(
                    chunk
                ):
                    if piece not in self.vocab:
                        raise OutOfVocabularyError(
                            f"{piece!r} at character {offset + start} is not a token of this world: "
                            "tokens are ' SS', ' RR', ' OO', '.', <|endoftext|>, <|pad|> and a space "
                            "followed by one of this world's four-digit numbers"
                        )
            offset += len(chunk)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the HF tokenizer files (tokenizer.json, tokenizer_config.json) into `path`."""
        self.hf.save_pretrained(str(path))

    def check_saved(self, path: str | Path) -> None:
        """Raise if the tokenizer saved in `path` is not exactly this world's vocabulary."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise MissingInput(f"{file} is missing: a checkpoint carries its world's tokenizer")
        saved = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
        if saved != self.vocab:
            diff = sorted(set(saved.items()) ^ set(self.vocab.items()))[:3]
            raise InvalidArgument(
                f"{file} is from another vocabulary ({len(saved)} tokens vs this world's "
                f"{len(self.vocab)}; first differences {diff}): load it with the world it was "
                "trained on"
            )


def _split_specials(text: str) -> list[str]:
    parts: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(s), s) for s in (EOT, PAD) if s in rest]
        if not hits:
            parts.append(rest)
            break
        i, s = min(hits)
        if i:
            parts.append(rest[:i])
        parts.append(s)
        rest = rest[i + len(s) :]
    return parts
