"""Worlds: config validation, exact ground truth per distribution, determinism, persistence."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from behemoth_interp import Fact, World, WorldConfig
from behemoth_interp.world import entity_factors

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# ---------------------------------------------------------------------- entity factors
@pytest.mark.parametrize(
    ("n", "k", "sizes"),
    [(400, 2, (20, 20)), (120_000, 2, (347, 346)), (1, 2, (1, 1)), (10, 1, (10,)),
     (12, 2, (4, 3)), (1000, 3, (10, 10, 10)), (10**6, 3, (100, 100, 100))],
)  # fmt: skip
def test_entity_factors_exact(n, k, sizes):
    assert entity_factors(n, k) == sizes


@given(n=st.integers(1, 10**7), k=st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_entity_factors_cover_and_balance(n, k):
    sizes = entity_factors(n, k)
    assert len(sizes) == k
    assert math.prod(sizes) >= n
    # balanced: no position set is larger than the k-th root rounded up
    assert max(sizes) <= math.ceil(round(n ** (1 / k), 9))
    assert all(s >= 1 for s in sizes)


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_subjects": 0}, "n_subjects must be at least 1, got 0"),
        ({"n_objects": -3}, "n_objects must be at least 1, got -3"),
        ({"distribution": "zipf"}, "unknown distribution 'zipf'"),
        ({"n_subjects": 10_000, "subject_tokens": 1}, "more than the 10000 four-digit tokens"),
        ({"n_subjects": 10**9, "subject_tokens": 2}, "more than the 10000 four-digit tokens"),
        ({"distribution": "correlated", "n_relations": 1}, "at least 2 relations"),
        ({"distribution": "correlated", "correlated": (2, 2)}, "two different relations"),
        ({"distribution": "correlated", "correlated": (0, 6)}, r"in 0\.\.5"),
        ({"distribution": "correlated", "correlated": (0,)}, "exactly two relations"),
        ({"distribution": "correlated", "n_objects": 1}, "n_objects must be >= 2"),
        ({"subject_tokens": 5}, "subject_tokens must be 1..4"),
        ({"object_tokens": 0}, "object_tokens must be 1..4"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)


def test_four_digit_space_boundary():
    # 24 fillers + 9975 one-token subjects + 1 relation + 1 object = 10001 > 10000
    with pytest.raises(ValueError, match="needs 9977 entity tokens plus 24 fillers"):
        WorldConfig(n_subjects=9975, subject_tokens=1, n_relations=1, n_objects=1, object_tokens=1)
    WorldConfig(n_subjects=9974, subject_tokens=1, n_relations=1, n_objects=1, object_tokens=1)


def test_config_json_round_trip():
    for c in (WorldConfig(), WorldConfig("correlated", correlated=(2, 4), seed=9),
              WorldConfig("nested", n_nested_objects=7, nested_tokens=1)):  # fmt: skip
        assert WorldConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown WorldConfig fields \['colour'\]"):
        WorldConfig.from_dict({**WorldConfig().to_dict(), "colour": "red"})


# ---------------------------------------------------------------------- ground truth
def test_independent_world(worlds):
    world, _ = worlds["independent"]
    c = world.config
    assert world.objects.shape == (c.n_subjects, c.n_relations)
    assert world.n_relations == c.n_relations and world.n_facts == c.n_subjects * c.n_relations
    facts = world.facts()
    assert facts.shape == (world.n_facts, 3)
    for s, r, o in facts:
        assert o == world.objects[s, r] == world.object_of(s, r)
        assert world.fact(s, r, o) == Fact(s, r, o)
        assert world.dependents((s, r, o)) == []
    assert set(np.unique(world.objects)) <= set(range(c.n_objects))


def test_correlated_relations_are_equal_for_every_subject(worlds):
    world, _ = worlds["correlated"]
    r1, r2 = world.config.correlated
    assert (r1, r2) == (1, 3)
    for s in range(world.config.n_subjects):
        assert world.object_of(s, r1) == world.object_of(s, r2)
        assert world.object_of(s, r1) in (0, 1)
        assert world.dependents((s, r1)) == [Fact(s, r2, world.object_of(s, r2))]
        assert world.dependents((s, r2)) == [Fact(s, r1, world.object_of(s, r1))]
        assert world.dependents((s, 0)) == []
    assert set(world.objects[:, r1]) == {0, 1}
    assert world.candidate_objects(r1).tolist() == [0, 1]
    assert len(world.candidate_objects(0)) == world.config.n_objects
    assert world.objects[:, [0, 2]].max() > 1  # the other relations are not binarized


def test_nested_world_hand_built():
    """Hand-computed implied tuples N_r(o(s, r)) and dependents on a 3-subject world."""
    c = WorldConfig("nested", n_subjects=3, n_relations=2, n_objects=3, n_nested_objects=2)
    objects = np.array([[0, 2], [2, 2], [1, 0]])
    nested_map = np.array([[1, 0, 1], [0, 0, 1]])
    world = World(c, objects, nested_map)
    assert [world.relation_name(r) for r in range(6)] == ["r0", "r1", "r0^", "r1^", "r0~", "r1~"]
    assert [world.relation_kind(r) for r in (1, 2, 5)] == ["base", "nested", "implied"]
    assert world.facts(kind="implied").tolist() == [
        [0, 4, 1], [1, 4, 1], [2, 4, 0], [0, 5, 1], [1, 5, 1], [2, 5, 0],
    ]  # fmt: skip
    assert world.facts(relations=3).tolist() == [[0, 3, 0], [1, 3, 0], [2, 3, 1]]
    assert world.n_facts == 6 + 6 + 6
    assert world.dependents((2, 0, 1)) == [Fact(2, 4, 0)]
    assert world.dependents((2, 2, 1)) == [Fact(1, 4, 1)]
    assert world.dependents((2, 3, 1)) == [Fact(0, 5, 1), Fact(1, 5, 1)]
    assert world.dependents((1, 3, 0)) == []  # no subject has r1-object 1
    assert world.dependents((0, 4, 1)) == []
    assert world.sharing_object((0, 1, 2)) == [Fact(1, 1, 2)]
    assert world.subject_space(2) == "object" and world.object_space(2) == "nested"
    assert world.subject_space(4) == "subject" and world.object_space(4) == "nested"


def test_nested_implied_equal_nested_of_object_for_every_subject(worlds):
    world, _ = worlds["nested"]
    c = world.config
    R = c.n_relations
    assert world.n_relations == 3 * R
    for s in range(c.n_subjects):
        for r in range(R):
            o = int(world.objects[s, r])
            implied = int(world.nested_map[r, o])
            assert world.object_of(o, R + r) == implied
            assert world.object_of(s, 2 * R + r) == implied
            assert world.dependents((s, r, o)) == [Fact(s, 2 * R + r, implied)]
    for r in range(R):
        for o in range(c.n_objects):
            nested = int(world.nested_map[r, o])
            expected = [Fact(s, 2 * R + r, nested) for s in range(c.n_subjects)
                        if world.objects[s, r] == o]  # fmt: skip
            assert world.dependents((o, R + r, nested)) == expected
            assert all(world.object_of(f.subject, f.relation) == f.object for f in expected)
    assert len(world.facts(kind="nested")) == R * c.n_objects
    assert world.n_facts == len(world.facts()) == R * (2 * c.n_subjects + c.n_objects)


# ---------------------------------------------------------------------- tuples not in the world
def test_tuples_not_in_the_world_raise(worlds):
    world, _ = worlds["independent"]
    o = world.object_of(3, 1)
    wrong = (o + 1) % world.config.n_objects
    with pytest.raises(ValueError, match=rf"tuple \(s=3, r=1, o={wrong}\) is not in this world: "
                       rf"\(3, r1\) has object {o}"):  # fmt: skip
        world.fact(3, 1, wrong)
    with pytest.raises(ValueError, match=r"subject 40 is not in this world for relation r0: "
                       r"it has subjects 0\.\.39"):  # fmt: skip
        world.fact(40, 0)
    with pytest.raises(ValueError, match="subject -1 is not in this world"):
        world.object_of(-1, 0)
    with pytest.raises(
        ValueError, match=r"relation 3 is not in this world: it has relations 0\.\.2"
    ):
        world.fact(0, 3)
    with pytest.raises(ValueError, match="relation -1 is not in this world"):
        world.objects_of(np.array([0, 1]), np.array([0, -1]))
    with pytest.raises(ValueError, match="relation 7 is not in this world"):
        world.facts(relations=[0, 7])


def test_nested_subjects_of_object_level_relations_are_objects(worlds):
    world, _ = worlds["nested"]
    R, n_objects = world.config.n_relations, world.config.n_objects
    world.fact(n_objects - 1, R)
    with pytest.raises(ValueError, match=rf"subject {n_objects} is not in this world for relation "
                       rf"r0\^: it has subjects 0\.\.{n_objects - 1}"):  # fmt: skip
        world.fact(n_objects, R)


def test_world_rejects_inconsistent_tables():
    c = WorldConfig(n_subjects=2, n_relations=2, n_objects=3)
    with pytest.raises(ValueError, match=r"objects table has shape \(2, 3\)"):
        World(c, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"objects must lie in 0\.\.2"):
        World(c, np.full((2, 2), 3))
    with pytest.raises(ValueError, match="only a nested world has one"):
        World(c, np.zeros((2, 2)), np.zeros((2, 3)))


# ---------------------------------------------------------------------- determinism
@given(
    distribution=st.sampled_from(["independent", "correlated", "nested"]),
    n_subjects=st.integers(1, 50),
    n_relations=st.integers(2, 5),
    n_objects=st.integers(2, 30),
    seed=st.integers(0, 2**32 - 1),
)
@SETTINGS
def test_same_seed_same_world(distribution, n_subjects, n_relations, n_objects, seed):
    c = WorldConfig(distribution, n_subjects=n_subjects, n_relations=n_relations,
                    n_objects=n_objects, n_nested_objects=3, seed=seed)  # fmt: skip
    a, b = World.generate(c), World.generate(c)
    assert a == b
    assert np.array_equal(a.facts(), b.facts())
    other = World.generate(WorldConfig.from_dict({**c.to_dict(), "seed": seed + 1}))
    assert other != a or n_subjects * n_relations < 4  # a tiny world may repeat by chance


def test_same_seed_same_bytes_different_seed_different(tmp_path, tree_bytes):
    for name, c in (("a", WorldConfig("nested", n_subjects=60, seed=4)),
                    ("b", WorldConfig("nested", n_subjects=60, seed=4)),
                    ("c", WorldConfig("nested", n_subjects=60, seed=5))):  # fmt: skip
        World.generate(c).save(tmp_path / name)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert sorted(a) == ["facts.parquet", "world.json"]
    assert a == b
    assert a["facts.parquet"] != c["facts.parquet"]
    assert World.generate(WorldConfig(seed=4)) != World.generate(WorldConfig(seed=5))


# ---------------------------------------------------------------------- persistence
def test_save_load_round_trips_bit_for_bit(world_tok, tmp_path, tree_bytes):
    world, _ = world_tok
    world.save(tmp_path / "w")
    loaded = World.load(tmp_path / "w")
    assert loaded == world
    assert loaded.config == world.config
    assert loaded.objects.dtype == world.objects.dtype
    assert loaded.objects.tobytes() == world.objects.tobytes()
    if world.nested_map is not None:
        assert loaded.nested_map.tobytes() == world.nested_map.tobytes()
    assert np.array_equal(loaded.facts(), world.facts())
    loaded.save(tmp_path / "again")
    assert tree_bytes(tmp_path / "again") == tree_bytes(tmp_path / "w")


def test_save_refuses_to_overwrite(tmp_path, worlds):
    world, _ = worlds["independent"]
    world.save(tmp_path / "w")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        world.save(tmp_path / "w")
    other = World.generate(WorldConfig(n_subjects=5, n_relations=2, n_objects=3))
    other.save(tmp_path / "w", overwrite=True)
    assert World.load(tmp_path / "w") == other


def test_load_rejects_tampered_or_missing_files(tmp_path, worlds):
    world, _ = worlds["nested"]
    path = world.save(tmp_path / "w")
    facts = world.facts()
    implied = np.flatnonzero(facts[:, 1] >= 2 * world.config.n_relations)[0]
    facts[implied, 2] = (facts[implied, 2] + 1) % world.config.n_nested_objects
    table = pa.table({"subject": facts[:, 0], "relation": facts[:, 1], "object": facts[:, 2]})
    pq.write_table(table, path / "facts.parquet")
    with pytest.raises(ValueError, match="does not match its config"):
        World.load(path)
    (path / "facts.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="facts.parquet is missing"):
        World.load(path)
    with pytest.raises(FileNotFoundError, match="world.json is missing"):
        World.load(tmp_path / "nowhere")
