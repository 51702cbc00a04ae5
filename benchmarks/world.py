"""Time the paper-scale world: 120,000 subjects x 6 relations x 400 objects, packed in 512s.

Generating the world and building its tokenized, packed corpus must take at most 30 s on a
developer machine. The reference line is a plain copy of the packed arrays measured in the
same run, so the ratio says how far the build is from moving its output bytes once.

    python benchmarks/world.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from behemoth_interp import Corpus, CorpusConfig, World, WorldConfig, WorldTokenizer

BUDGET_S = 30.0
CONFIG = WorldConfig("independent", n_subjects=120_000, n_relations=6, n_objects=400, seed=0)
CORPUS = CorpusConfig(block_len=512)


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    start = time.perf_counter()
    world = World.generate(CONFIG)
    generated = time.perf_counter()
    tokenizer = WorldTokenizer(CONFIG)
    corpus = Corpus.build(world, tokenizer, CORPUS)
    built = time.perf_counter()
    total = built - start

    ref_start = time.perf_counter()
    np.copy(corpus.tokens), np.copy(corpus.roles)
    reference = time.perf_counter() - ref_start

    with tempfile.TemporaryDirectory() as tmp:
        save_start = time.perf_counter()
        corpus.save(Path(tmp) / "corpus", world)
        saved = time.perf_counter() - save_start
        disk_mb = _dir_mb(Path(tmp) / "corpus")

    memory_mb = (corpus.tokens.nbytes + corpus.roles.nbytes + corpus.sentences.nbytes) / 1e6
    print(f"world      {world!r}")
    print(f"vocabulary {tokenizer.vocab_size} tokens, stored as {corpus.tokens.dtype}")
    print(f"generate   {generated - start:8.2f} s")
    print(f"corpus     {built - generated:8.2f} s  ({corpus.sentences.num_rows:,} sentences)")
    print(f"total      {total:8.2f} s  (budget {BUDGET_S:.0f} s: {total / BUDGET_S:.1%} of it)")
    ratio = total / reference
    print(f"reference  {reference:8.3f} s  copying the packed arrays (build: {ratio:.0f}x)")
    print(f"tokens     {corpus.n_tokens:,} ({corpus.n_blocks * CORPUS.block_len:,} with padding)")
    print(f"blocks     {corpus.n_blocks:,} of {CORPUS.block_len}")
    print(f"size       {memory_mb:.1f} MB in memory (tokens, roles, sentence table); "
          f"{disk_mb:.1f} MB on disk, saved in {saved:.2f} s")  # fmt: skip
    if total > BUDGET_S:
        raise SystemExit(f"too slow: {total:.1f} s > {BUDGET_S:.0f} s")


if __name__ == "__main__":
    main()
