"""Tiny seeded worlds, tokenizers and corpora shared by the whole suite (session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from behemoth_interp import TEMPLATES, Corpus, CorpusConfig, World, WorldConfig, WorldTokenizer

WORLD_CONFIGS: dict[str, WorldConfig] = {
    "independent": WorldConfig("independent", n_subjects=40, n_relations=3, n_objects=12, seed=1),
    "correlated": WorldConfig(
        "correlated", n_subjects=40, n_relations=4, n_objects=12, correlated=(1, 3), seed=2
    ),
    "nested": WorldConfig(
        "nested", n_subjects=30, n_relations=3, n_objects=10, n_nested_objects=5, seed=3
    ),
}
"""One tiny world per distribution; the correlated pair is not (0, 1) so order matters."""

EVERY_TEMPLATE = tuple((name, 1.0) for name in TEMPLATES)
CORPUS_CONFIG = CorpusConfig(EVERY_TEMPLATE, copies=2, block_len=64, seed=5)
"""Every grammar mixed, each tuple twice, short blocks so sentences of many lengths pack."""


@pytest.fixture(scope="session")
def worlds() -> dict[str, tuple[World, WorldTokenizer]]:
    return {name: (World.generate(c), WorldTokenizer(c)) for name, c in WORLD_CONFIGS.items()}


@pytest.fixture(scope="session", params=list(WORLD_CONFIGS))
def world_tok(request, worlds) -> tuple[World, WorldTokenizer]:
    """Each distribution's (world, tokenizer) in turn."""
    return worlds[request.param]


@pytest.fixture(scope="session")
def corpora(worlds) -> dict[str, Corpus]:
    return {name: Corpus.build(w, tok, CORPUS_CONFIG) for name, (w, tok) in worlds.items()}


@pytest.fixture(scope="session", params=list(WORLD_CONFIGS))
def world_corpus(request, worlds, corpora) -> tuple[World, WorldTokenizer, Corpus]:
    """Each distribution's (world, tokenizer, corpus) in turn."""
    world, tok = worlds[request.param]
    return world, tok, corpora[request.param]


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def tree_bytes():
    """`tree_bytes(dir)`: every file under `dir` by relative path, with its bytes."""
    return _file_bytes
