"""Tiny seeded worlds, tokenizers and corpora shared by the whole suite (session-scoped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _browser import Browser, find_chromium  # tests/ is on the path

from behemoth_interp import TEMPLATES, Corpus, CorpusConfig, World, WorldConfig, WorldTokenizer
from behemoth_interp.corpus import build_world
from behemoth_interp.model import load_model
from behemoth_interp.train import TrainConfig, train

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


# ------------------------------------------------------------------ trained models
MICRO_WORLD = WorldConfig("independent", n_subjects=40, n_relations=2, n_objects=16, seed=0)
MICRO_CORPUS = CorpusConfig(block_len=80)
MICRO_TRAIN = TrainConfig(preset="tiny", lr=3e-3, steps=400, loss_on="object", schedule="cosine",
                          warmup_steps=50, eval_every=400)  # fmt: skip
"""A 2-layer model that learns all 80 facts of a 40-subject world (about 15 s on one CPU core)."""
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory of the micro model, trained once per session."""
    return train_micro(MICRO_WORLD, tmp_path_factory.mktemp("micro"))


def train_micro(world: WorldConfig, root: Path) -> Path:
    """Build `world` under `root` and train the micro recipe on it; returns the checkpoint."""
    build_world(world, MICRO_CORPUS, root / "world")
    threads = torch.get_num_threads()
    # a 2-layer model gains nothing from threads, and on busy cores their spin-waits make
    # training 30x slower
    torch.set_num_threads(1)
    try:
        train(root / "world", root / "model", MICRO_TRAIN, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "model"


@pytest.fixture(scope="session")
def micro_model(micro_checkpoint):
    """The micro model as a HookedTransformer with `.world` attached."""
    return load_model(micro_checkpoint)


def finished_checkpoint(name: str) -> Path | None:
    """data/models/<name> if its training has finished (the final log entry is written)."""
    path = SHIPPED_MODELS / name
    log = path / "train_log.json"
    if not (path / "model.safetensors").is_file() or not log.is_file():
        return None
    return path if "final" in json.loads(log.read_text()) else None


@pytest.fixture(scope="session", params=["micro", "independent"])
def fact_model(request, micro_model):
    """Trained models to check analyses on: the micro model, then the shipped default
    data/models/independent once it exists and has finished training (skipped before)."""
    if request.param == "micro":
        return micro_model
    path = finished_checkpoint(request.param)
    if path is None:
        pytest.skip(f"{SHIPPED_MODELS / request.param} is missing or still training")
    return load_model(path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: small models and small regressions gain nothing
    from threads on the busy CI cores (use with `pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[str, Path]:
    """`behemoth-interp demo --n 2` on the shipped model, once per session: (what it printed,
    the report page it wrote). test_cli checks the command, test_report the page in a browser."""
    from typer.testing import CliRunner

    from behemoth_interp.cli import app

    page = tmp_path_factory.mktemp("demo") / "trace.html"
    result = CliRunner().invoke(app, ["demo", "--out", str(page), "--n", "2"])
    assert result.exit_code == 0, result.output
    return result.output, page


# ------------------------------------------------------------------ a real browser
@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> Browser:
    """One headless Chromium for the session's page checks (skipped, saying why, without one)."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium on PATH: `apt-get install -y chromium` (.ci/run installs it)")
    b = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.quit()
