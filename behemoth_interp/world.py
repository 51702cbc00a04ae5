"""Synthetic fact worlds: seeded (subject, relation, object) tuples with exact ground truth.

Three distributions follow the Behemoth paper (section 4.2, 4.9, 4.10):
- independent: every subject gets, for each relation, an object drawn uniformly;
- correlated: two relations are binarized and equal for every subject;
- nested: each object o of relation r has a nested object N_r(o); the world holds
  base tuples (s, r, o), object-level tuples (o, r^, N_r(o)) and the implied tuples
  (s, r~, N_r(o(s, r))).
Relation ids are global: with R base relations, nested worlds number object-level relations
R..2R-1 and implied relations 2R..3R-1 (relation r's partners are R + r and 2R + r).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from behemoth_interp._io import JsonConfig, read_json, write_dir, write_json
from behemoth_interp.errors import CorruptFile, InvalidArgument, MissingInput

Distribution = Literal["independent", "correlated", "nested"]
TupleKind = Literal["base", "nested", "implied"]
EntitySpace = Literal["subject", "relation", "object", "nested"]
SPACE_NAMES: tuple[EntitySpace, ...] = ("subject", "relation", "object", "nested")

FOUR_DIGIT_SPACE = 10_000
"""Every entity and filler token is a space plus a four-digit number: 0000..9999."""
N_FILLERS = 24
"""Four-digit tokens reserved for grammar fillers (FT1, FT2, ...)."""
WORLD_FORMAT = "behemoth-world/1"


class Fact(NamedTuple):
    """One (subject, relation, object) tuple; ids index the entity space of the relation."""

    subject: int
    relation: int
    object: int


def entity_factors(n: int, k: int) -> tuple[int, ...]:
    """Per-position token-set sizes for `n` entities written with `k` tokens each.

    The sizes are as balanced as possible and their product is at least `n`, so the total
    number of distinct tokens (their sum) is close to the minimum k * n^(1/k).
    """
    sizes = []
    remaining = n
    for position in range(k, 0, -1):
        size = max(1, math.ceil(remaining ** (1 / position) - 1e-9))
        while size > 1 and (size - 1) ** position >= remaining:
            size -= 1
        sizes.append(size)
        remaining = math.ceil(remaining / size)
    return tuple(sizes)


@dataclass(frozen=True)
class WorldConfig(JsonConfig):
    """Everything that determines a world; the same config gives the same world, bit for bit."""

    distribution: Distribution = "independent"
    n_subjects: int = 1000
    n_relations: int = 6
    n_objects: int = 400
    n_nested_objects: int = 40
    correlated: tuple[int, int] = (0, 1)
    subject_tokens: int = 2
    relation_tokens: int = 1
    object_tokens: int = 2
    nested_tokens: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "correlated", tuple(self.correlated))
        if self.distribution not in ("independent", "correlated", "nested"):
            raise InvalidArgument(
                f"unknown distribution {self.distribution!r}: "
                "choose 'independent', 'correlated' or 'nested'"
            )
        for name in ("n_subjects", "n_relations", "n_objects", "n_nested_objects"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("subject_tokens", "relation_tokens", "object_tokens", "nested_tokens"):
            if not 1 <= getattr(self, name) <= 4:
                raise InvalidArgument(
                    f"{name} must be 1..4 tokens per entity, got {getattr(self, name)}"
                )
        if self.distribution == "correlated":
            if len(self.correlated) != 2:
                raise InvalidArgument(
                    f"correlated={self.correlated} must name exactly two relations, e.g. (0, 1)"
                )
            r1, r2 = self.correlated
            if self.n_relations < 2:
                raise InvalidArgument(
                    f"a correlated world needs at least 2 relations, got n_relations={self.n_relations}"
                )
            if r1 == r2 or not (0 <= r1 < self.n_relations and 0 <= r2 < self.n_relations):
                raise InvalidArgument(
                    f"correlated={self.correlated} must name two different relations "
                    f"in 0..{self.n_relations - 1}"
                )
            if self.n_objects < 2:
                raise InvalidArgument(
                    "a correlated world binarizes two relations: n_objects must be >= 2"
                )
        needed = sum(sum(entity_factors(n, k)) for n, k in self.token_spaces().values())
        if needed + N_FILLERS > FOUR_DIGIT_SPACE:
            raise InvalidArgument(
                f"this world needs {needed} entity tokens plus {N_FILLERS} fillers, more than the "
                f"{FOUR_DIGIT_SPACE} four-digit tokens: use fewer entities or more tokens per entity"
            )

    @property
    def n_relations_total(self) -> int:
        """Relation ids in the world: R, or 3R for nested worlds (base, object-level, implied)."""
        return 3 * self.n_relations if self.distribution == "nested" else self.n_relations

    def token_spaces(self) -> dict[EntitySpace, tuple[int, int]]:
        """Entity spaces as {space: (number of entities, tokens per entity)}."""
        spaces: dict[EntitySpace, tuple[int, int]] = {
            "subject": (self.n_subjects, self.subject_tokens),
            "relation": (self.n_relations_total, self.relation_tokens),
            "object": (self.n_objects, self.object_tokens),
        }
        if self.distribution == "nested":
            spaces["nested"] = (self.n_nested_objects, self.nested_tokens)
        return spaces


class World:
    """A generated world: its config and its facts, with exact ground-truth queries.

    `objects[s, r]` is the object of base relation r for subject s; nested worlds also hold
    `nested_map[r, o]`, the nested object of object o under relation r.
    """

    def __init__(
        self, config: WorldConfig, objects: np.ndarray, nested_map: np.ndarray | None = None
    ):
        self.config = config
        self.objects = np.ascontiguousarray(objects, dtype=np.int32)
        self.nested_map = None if nested_map is None else np.ascontiguousarray(nested_map, np.int32)
        self._validate()
        self.objects.setflags(write=False)
        if self.nested_map is not None:
            self.nested_map.setflags(write=False)

    @classmethod
    def generate(cls, config: WorldConfig) -> World:
        """Draw the world's facts from `config` with its seed."""
        c = config
        rng = np.random.default_rng(c.seed)
        objects = rng.integers(0, c.n_objects, size=(c.n_subjects, c.n_relations), dtype=np.int32)
        nested_map = None
        if c.distribution == "correlated":
            r1, r2 = c.correlated
            objects[:, r1] = rng.integers(0, 2, size=c.n_subjects, dtype=np.int32)
            objects[:, r2] = objects[:, r1]
        elif c.distribution == "nested":
            nested_map = rng.integers(
                0, c.n_nested_objects, size=(c.n_relations, c.n_objects), dtype=np.int32
            )
        return cls(c, objects, nested_map)

    def _validate(self) -> None:
        c = self.config
        if self.objects.shape != (c.n_subjects, c.n_relations):
            raise InvalidArgument(
                f"objects table has shape {self.objects.shape}, the config says "
                f"({c.n_subjects}, {c.n_relations})"
            )
        if self.objects.min() < 0 or self.objects.max() >= c.n_objects:
            raise InvalidArgument(f"objects must lie in 0..{c.n_objects - 1}")
        if (self.nested_map is None) != (c.distribution != "nested"):
            raise InvalidArgument(
                "a nested world needs a nested map, and only a nested world has one"
            )
        if self.nested_map is not None:
            if self.nested_map.shape != (c.n_relations, c.n_objects):
                raise InvalidArgument(
                    f"nested map must have shape ({c.n_relations}, {c.n_objects})"
                )
            if self.nested_map.min() < 0 or self.nested_map.max() >= c.n_nested_objects:
                raise InvalidArgument(f"nested objects must lie in 0..{c.n_nested_objects - 1}")

    # ------------------------------------------------------------------ relations and spaces
    @property
    def n_relations(self) -> int:
        """All relation ids (base, and for nested worlds object-level and implied)."""
        return self.config.n_relations_total

    def relation_kind(self, relation: int) -> TupleKind:
        """'base' for r < R; in nested worlds 'nested' for R..2R-1 and 'implied' for 2R..3R-1."""
        self._check_relation(relation)
        return ("base", "nested", "implied")[relation // self.config.n_relations]

    def relation_name(self, relation: int) -> str:
        base = relation % self.config.n_relations
        return {"base": f"r{base}", "nested": f"r{base}^", "implied": f"r{base}~"}[
            self.relation_kind(relation)
        ]

    def subject_space(self, relation: int) -> EntitySpace:
        """The entity space of the relation's subjects: objects are subjects of r^ tuples."""
        return "object" if self.relation_kind(relation) == "nested" else "subject"

    def object_space(self, relation: int) -> EntitySpace:
        return "object" if self.relation_kind(relation) == "base" else "nested"

    def n_subjects_of(self, relation: int) -> int:
        c = self.config
        return c.n_objects if self.subject_space(relation) == "object" else c.n_subjects

    def candidate_objects(self, relation: int) -> np.ndarray:
        """Objects a tuple of `relation` may take (binarized relations have two)."""
        c = self.config
        if c.distribution == "correlated" and relation in c.correlated:
            return np.arange(2)
        n = c.n_objects if self.object_space(relation) == "object" else c.n_nested_objects
        return np.arange(n)

    def _check_relation(self, relation: int) -> None:
        if not 0 <= relation < self.n_relations:
            raise InvalidArgument(
                f"relation {relation} is not in this world: it has relations 0..{self.n_relations - 1}"
            )

    # ------------------------------------------------------------------ ground truth
    def objects_of(self, subjects: np.ndarray, relations: np.ndarray) -> np.ndarray:
        """Vectorized ground truth: the object of each (subject, relation) pair."""
        s = np.asarray(subjects, dtype=np.int64)
        r = np.asarray(relations, dtype=np.int64)
        s, r = np.broadcast_arrays(s, r)
        if r.size and (r.min() < 0 or r.max() >= self.n_relations):
            bad = int(r[(r < 0) | (r >= self.n_relations)][0])
            self._check_relation(bad)
        R = self.config.n_relations
        kind = r // R
        base = r % R
        n_subj = np.where(kind == 1, self.config.n_objects, self.config.n_subjects)
        if s.size and ((s < 0) | (s >= n_subj)).any():
            i = int(np.flatnonzero(((s < 0) | (s >= n_subj)).ravel())[0])
            rel = int(r.ravel()[i])
            raise InvalidArgument(
                f"subject {int(s.ravel()[i])} is not in this world for relation "
                f"{self.relation_name(rel)}: it has subjects 0..{self.n_subjects_of(rel) - 1}"
            )
        out = np.empty(s.shape, dtype=np.int32)
        m0, m1, m2 = kind == 0, kind == 1, kind == 2
        out[m0] = self.objects[s[m0], base[m0]]
        if self.nested_map is not None:
            out[m1] = self.nested_map[base[m1], s[m1]]
            out[m2] = self.nested_map[base[m2], self.objects[s[m2], base[m2]]]
        return out

    def object_of(self, subject: int, relation: int) -> int:
        return int(self.objects_of(np.array([subject]), np.array([relation]))[0])

    def fact(self, subject: int, relation: int, obj: int | None = None) -> Fact:
        """The world's tuple for (subject, relation); if `obj` is given it must be the true one."""
        true = self.object_of(subject, relation)
        if obj is not None and obj != true:
            raise InvalidArgument(
                f"tuple (s={subject}, r={relation}, o={obj}) is not in this world: "
                f"({subject}, {self.relation_name(relation)}) has object {true}"
            )
        return Fact(int(subject), int(relation), true)

    def facts(
        self, relations: int | list[int] | None = None, kind: TupleKind | None = None
    ) -> np.ndarray:
        """All tuples as an int32 array [n, 3] (subject, relation, object), relation-major.

        Filter by relation id(s) or by kind ('base', 'nested', 'implied').
        """
        rels = range(self.n_relations) if relations is None else np.atleast_1d(relations).tolist()
        blocks = []
        for r in rels:
            self._check_relation(int(r))
            if kind is not None and self.relation_kind(int(r)) != kind:
                continue
            s = np.arange(self.n_subjects_of(int(r)), dtype=np.int32)
            o = self.objects_of(s, np.full_like(s, r))
            blocks.append(np.stack([s, np.full_like(s, r), o], axis=1))
        return np.concatenate(blocks) if blocks else np.zeros((0, 3), dtype=np.int32)

    @property
    def n_facts(self) -> int:
        return sum(self.n_subjects_of(r) for r in range(self.n_relations))

    def dependents(self, fact: Fact | tuple[int, ...]) -> list[Fact]:
        """Tuples whose truth is tied to `fact`: the correlated partner, or implied tuples.

        Correlated worlds: (s, r1) and (s, r2) depend on each other. Nested worlds: a base
        tuple (s, r, o) implies (s, r~, N_r(o)); an object-level tuple (o, r^, o^) implies
        (s, r~, o^) for every subject s whose r-object is o. Implied tuples have no dependents.
        """
        f = self.fact(*fact)
        c = self.config
        if c.distribution == "correlated" and f.relation in c.correlated:
            r1, r2 = c.correlated
            partner = r2 if f.relation == r1 else r1
            return [self.fact(f.subject, partner)]
        if c.distribution != "nested":
            return []
        kind = self.relation_kind(f.relation)
        R = c.n_relations
        if kind == "base":
            return [self.fact(f.subject, 2 * R + f.relation)]
        if kind == "nested":
            base = f.relation - R
            subjects = np.flatnonzero(self.objects[:, base] == f.subject)
            return [Fact(int(s), 2 * R + base, f.object) for s in subjects]
        return []

    def sharing_object(self, fact: Fact | tuple[int, ...]) -> list[Fact]:
        """The other tuples of the same relation whose object is the same as `fact`'s."""
        f = self.fact(*fact)
        s = np.arange(self.n_subjects_of(f.relation))
        o = self.objects_of(s, np.full_like(s, f.relation))
        return [Fact(int(x), f.relation, f.object) for x in s[(o == f.object) & (s != f.subject)]]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write `world.json` (config) and `facts.parquet` (every tuple) into directory `path`."""
        return write_dir(path, self.write_into, overwrite=overwrite)

    def write_into(self, path: Path) -> None:
        """Write the world's two files into an existing directory (used by save and corpora)."""
        write_json(path / "world.json", {"format": WORLD_FORMAT, "config": self.config.to_dict()})
        f = self.facts()
        table = pa.table({"subject": f[:, 0], "relation": f[:, 1], "object": f[:, 2]})
        pq.write_table(table, path / "facts.parquet", compression="zstd")

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Read a world directory written by `save`, checking the facts against the config."""
        path = Path(path)
        meta = read_json(
            path / "world.json", what="world description (world.json)", format=WORLD_FORMAT
        )
        config = WorldConfig.from_dict(meta["config"])
        facts_path = path / "facts.parquet"
        if not facts_path.is_file():
            raise MissingInput(f"{facts_path} is missing: the world's facts table belongs there")
        try:
            t = pq.read_table(facts_path)
        except (pa.ArrowInvalid, OSError) as err:
            raise CorruptFile(f"{facts_path} cannot be read as a facts table ({err})") from None
        s, r, o = (
            t.column(n).to_numpy().astype(np.int64) for n in ("subject", "relation", "object")
        )
        R = config.n_relations
        kind = r // R
        objects = np.full((config.n_subjects, R), -1, dtype=np.int32)
        b = kind == 0
        objects[s[b], r[b]] = o[b]
        nested_map = None
        if config.distribution == "nested":
            nested_map = np.full((R, config.n_objects), -1, dtype=np.int32)
            n = kind == 1
            nested_map[r[n] - R, s[n]] = o[n]
        world = cls(config, objects, nested_map)
        if not np.array_equal(world.facts(), np.stack([s, r, o], axis=1)):
            raise InvalidArgument(
                f"{facts_path} does not match its config: a tuple is missing, duplicated, "
                "or an implied tuple disagrees with its base and nested tuples"
            )
        return world

    def with_objects(self, facts: np.ndarray, objects: np.ndarray) -> World:
        """This world with the base tuples `facts` [n, 3] given the new `objects` [n]: the world
        an edit says should be. Implied (nested) tuples follow by construction; a correlated
        partner keeps its object unless it is edited too."""
        facts = np.asarray(facts, dtype=np.int64).reshape(-1, 3)
        objects = np.asarray(objects, dtype=np.int64).reshape(-1)
        if len(objects) != len(facts):
            raise InvalidArgument(f"{len(facts)} tuples but {len(objects)} objects: one each")
        if len(facts) and facts[:, 1].max() >= self.config.n_relations:
            raise InvalidArgument("only base tuples can be changed: their dependents follow")
        self.objects_of(facts[:, 0], facts[:, 1])  # validates subjects and relations
        if len(objects) and (objects.min() < 0 or objects.max() >= self.config.n_objects):
            raise InvalidArgument(f"objects must lie in 0..{self.config.n_objects - 1}")
        table = self.objects.copy()
        table[facts[:, 0], facts[:, 1]] = objects
        return World(self.config, table, self.nested_map)

    @property
    def fingerprint(self) -> str:
        """sha256 of the config and every fact: equal fingerprints mean the same world.

        Checkpoints record it, so a model is never evaluated or edited against a world it was
        not trained on."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            h.update(self.objects.tobytes())
            if self.nested_map is not None:
                h.update(self.nested_map.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, World):
            return NotImplemented
        return (
            self.config == other.config
            and np.array_equal(self.objects, other.objects)
            and (
                (self.nested_map is None and other.nested_map is None)
                or np.array_equal(self.nested_map, other.nested_map)
            )
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"World({c.distribution}, subjects={c.n_subjects}, relations={self.n_relations}, "
            f"objects={c.n_objects}, facts={self.n_facts}, seed={c.seed})"
        )
