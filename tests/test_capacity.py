"""Capacity search: bisection toward the boundary, recorded probes, and a search that resumes."""

from __future__ import annotations

import json

import pytest

from behemoth_interp import CorpusConfig, WorldConfig
from behemoth_interp import capacity as capacity_module
from behemoth_interp.capacity import RECORD, bits_per_parameter, capacity_search
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.train import TrainConfig

TINY = dict(preset="tiny", lr=3e-3, warmup_steps=20, schedule="cosine", loss_on="object")
SEARCH = dict(
    world=WorldConfig(n_relations=1, n_objects=4),
    corpus=CorpusConfig(block_len=32),
    config=TrainConfig(steps=40, epochs=None, eval_every=40, **TINY),
    target=0.9,
    low=2,
    high=64,
)


def test_capacity_search_on_a_tiny_budget(tmp_path):
    probes = capacity_search(**SEARCH, iterations=3, workdir=tmp_path)
    assert [p["n_subjects"] for p in probes][0] == 33
    for before, after in zip(probes, probes[1:]):  # bisection moves toward the boundary
        assert (after["n_subjects"] > before["n_subjects"]) == before["reached"]
    assert all(0 <= p["accuracy"] <= 1 and p["steps"] == 40 for p in probes)
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["probes"] == probes
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD]  # probes' dirs removed


def test_a_stopped_search_continues_from_its_record(tmp_path, monkeypatch):
    """Two iterations, then the same search asked for three: the two recorded probes are not
    trained again and the result equals an uninterrupted three-iteration search."""
    straight = capacity_search(**SEARCH, iterations=3, workdir=tmp_path / "straight")
    capacity_search(**SEARCH, iterations=2, workdir=tmp_path / "resumed")
    trained = []
    real = capacity_module.train
    monkeypatch.setattr(capacity_module, "train",
                        lambda world, *a, **k: trained.append(world) or real(world, *a, **k))  # fmt: skip
    resumed = capacity_search(**SEARCH, iterations=3, workdir=tmp_path / "resumed")
    untimed = lambda probes: [{k: v for k, v in p.items() if k != "seconds"} for p in probes]  # noqa: E731
    assert len(trained) == 1 and untimed(resumed) == untimed(straight)
    # a probe whose training finished but was not recorded is read, not trained again
    record = tmp_path / "resumed" / RECORD
    data = json.loads(record.read_text())
    data["probes"] = data["probes"][:2]
    record.write_text(json.dumps(data))
    capacity_search(**SEARCH, iterations=3, workdir=tmp_path / "resumed", keep=True)
    assert len(trained) == 2  # the third probe was trained once more (its model was removed)


def test_a_record_of_other_settings_is_refused(tmp_path):
    capacity_search(**SEARCH, iterations=1, workdir=tmp_path)
    with pytest.raises(InvalidArgument, match="other settings"):
        capacity_search(**{**SEARCH, "target": 0.5}, iterations=1, workdir=tmp_path)


def test_bits_per_parameter_is_the_papers_estimate():
    """Behemoth section 4.5: 29 bits (17 + 3 + 9) x 120,000 subjects x 6 relations, about 21
    million bits, over Pythia-31M's parameters is 0.65 bits per parameter."""
    paper = WorldConfig(n_subjects=120_000, n_relations=6, n_objects=400)
    assert bits_per_parameter(paper, 32_000_000) == pytest.approx(29 * 720_000 / 32e6)
    assert round(bits_per_parameter(paper, 32_000_000), 2) == 0.65
    small = WorldConfig(n_subjects=400, n_relations=6, n_objects=400)
    assert bits_per_parameter(small, 4_806_144) == pytest.approx(21 * 2400 / 4_806_144)
    with pytest.raises(InvalidArgument, match="n_parameters"):
        bits_per_parameter(small, 0)
