"""A sweep spec: which models, tasks, methods with their grids, block subsets, components and
seeds to run, and how the best run of each cell is chosen (Behemoth sections 4.6, 5, 6.2).

A spec is a frozen dataclass that validates in `__post_init__` (every error names the spec
field and the fix, before any run starts) and round-trips to a YAML or JSON file:

    name: figure4-single-quick
    models: [data/models/independent]
    tasks: [single, {kind: ten_same, n: 6}]
    methods:
      - {method: finetune, grid: {lr: [1e-4, 3e-4, 1e-3]}}
      - {method: lora, grid: {rank: [32, 64], lr: [3e-4, 1e-3]}, settings: {epochs: 1}}
    blocks: all            # all 63 subsets; singletons, prefixes, [[0], [0, 5]], {sample: 12}
    components: [mlp, attn, both]
    seeds: [0, 1, 2]
    select: {criterion: success, over: [lr, steps, epochs], per: seed}

Methods, their settings and objectives are validated through `behemoth_interp.edit.METHODS`
and `OBJECTIVES`: a registered method is sweepable with no change here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from behemoth_interp._io import read_json
from behemoth_interp.edit.objectives import get_objective
from behemoth_interp.edit.registry import METHODS, MODES, get_method
from behemoth_interp.edit.search import CRITERIA
from behemoth_interp.edit.tasks import TASKS
from behemoth_interp.errors import (
    BehemothError,
    CorruptFile,
    InvalidArgument,
    MissingInput,
    check_int,
    is_int,
)
from behemoth_interp.sweep.battery import BatterySpec
from behemoth_interp.sweep.localizations import LocalizationSpec, check_localizations
from behemoth_interp.sweep.retention import RetentionSpec

SPEC_FORMAT = "behemoth-sweep/1"
BLOCK_KEYWORDS = ("all", "singletons", "prefixes", "default")
"""Named block-subset families: every non-empty subset, each block alone, the first k blocks,
and the method's own default (None: e.g. ROME's layer)."""
COMPONENT_SETTINGS = ("mlp", "attn", "both", "default")
SELECT_PER = ("seed", "cell")
SELECT_DATA = ("training", "report")


def spec_error(where: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"sweep spec {where}: {message}")


@dataclass(frozen=True)
class TaskSpec:
    """One of the paper's edit tasks (`bi.EditTask.draw`): `kind`, base `relation`, `n` tuples
    for ten_same / ten_different; the task is drawn anew for each seed."""

    kind: str
    relation: int = 0
    n: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method with a `grid` (setting -> values, every combination is run) and
    fixed `settings` (method config or objective fields), an `objective` for the fine-tuning
    methods, a `mode`, and optionally its own `blocks` / `components` (else the spec's)."""

    method: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()
    objective: str | None = None
    mode: str | None = None
    blocks: Any = None
    components: tuple[str, ...] | None = None

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, in the order the grid lists them (the last setting varies fastest)."""
        names = [k for k, _ in self.grid]
        return [
            dict(zip(names, values)) for values in itertools.product(*(v for _, v in self.grid))
        ]

    def options(self, point: Mapping[str, Any]) -> dict[str, Any]:
        return {**dict(self.settings), **point}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.grid:
            out["grid"] = {k: list(v) for k, v in self.grid}
        if self.settings:
            out["settings"] = dict(self.settings)
        for name in ("objective", "mode"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.blocks is not None:
            out["blocks"] = _blocks_to_json(self.blocks)
        if self.components is not None:
            out["components"] = list(self.components)
        return out


@dataclass(frozen=True)
class Selection:
    """How the best run of a cell is chosen among the settings in `over` (the paper's rule,
    section 4.6): the highest `criterion` ('success': the new objects are top-1; 'forget': the
    original objects are no longer top-1), then the highest remaining accuracy, then the
    smallest values of `over`. `data='training'` scores on the edit's own training data (the
    paper; what `select_lr` does), 'report' on the EditReport. `per='seed'` picks per seed,
    'cell' the setting with the best mean over seeds."""

    criterion: str = "success"
    over: tuple[str, ...] = ("lr", "steps", "epochs")
    per: str = "seed"
    data: str = "training"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise spec_error(
                "select.criterion", f"must be one of {CRITERIA}, got {self.criterion!r}"
            )
        if self.per not in SELECT_PER:
            raise spec_error("select.per", f"must be one of {SELECT_PER}, got {self.per!r}")
        if self.data not in SELECT_DATA:
            raise spec_error("select.data", f"must be one of {SELECT_DATA}, got {self.data!r}")
        if isinstance(self.over, str) or not all(isinstance(x, str) for x in self.over):
            raise spec_error("select.over", f"must be a list of setting names, got {self.over!r}")
        object.__setattr__(self, "over", tuple(self.over))

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "over": list(self.over), "per": self.per,
                "data": self.data}  # fmt: skip


@dataclass(frozen=True)
class SweepSpec:
    """The whole sweep; `expand(spec)` (runs.py) turns it into runs, deterministically.

    models: checkpoint directories (relative paths are read from the current directory);
    tasks, methods: `TaskSpec`s and `MethodSpec`s; blocks: 'all', 'singletons', 'prefixes',
    'default', explicit lists of blocks, {'sample': k, 'seed': s} (k of the non-empty subsets),
    or a list mixing these (their union, each subset once); components: of 'mlp', 'attn',
    'both', 'default'; seeds: each draws its own task and seeds its edit; select: `Selection`;
    max_remaining: score remaining accuracy on a seeded sample (None: every unchanged tuple);
    move_rank: the SVD threshold of each run's move-rank summary (None: not computed);
    threads: torch threads per worker; retention: downstream fine-tunes of every edited model
    (`RetentionSpec`, None: none); localizations: the components the fine-tuning methods edit
    instead of blocks x components (`LocalizationSpec`s, built per model and relation; None:
    blocks x components); battery: the residual-knowledge battery of every edited model
    (`BatterySpec`, None: none).
    """

    models: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]
    methods: tuple[MethodSpec, ...]
    blocks: Any = "all"
    components: tuple[str, ...] = ("both",)
    seeds: tuple[int, ...] = (0,)
    select: Selection = field(default_factory=Selection)
    name: str = "sweep"
    max_remaining: int | None = None
    move_rank: float | None = 0.95
    threads: int = 1
    retention: RetentionSpec | None = None
    localizations: tuple[LocalizationSpec, ...] | None = None
    battery: BatterySpec | None = None

    def __post_init__(self) -> None:
        _check_list(self.models, "models", "checkpoint directories, e.g. [data/models/independent]")
        if not all(isinstance(m, str) and m for m in self.models):
            raise spec_error(
                "models", f"must be checkpoint directory paths, got {list(self.models)}"
            )
        _check_list(self.tasks, "tasks", f"tasks of {TASKS}")
        for i, t in enumerate(self.tasks):
            if t.kind not in TASKS:
                raise spec_error(
                    f"tasks[{i}].kind", f"unknown task {t.kind!r}: choose one of {TASKS}"
                )
            _check_count(f"tasks[{i}].relation", t.relation, 0)
            _check_count(f"tasks[{i}].n", t.n, 1)
        _check_list(self.methods, "methods", f"methods of {', '.join(METHODS)}")
        for i, m in enumerate(self.methods):
            _check_method(m, f"methods[{i}]")
        _check_blocks(self.blocks, "blocks")
        _check_components(self.components, "components")
        _check_list(self.seeds, "seeds", "integers, e.g. [0, 1, 2], or a count")
        for s in self.seeds:
            _check_count("seeds", s, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise spec_error("seeds", f"lists a seed twice: {list(self.seeds)}")
        if self.max_remaining is not None:
            _check_count("max_remaining", self.max_remaining, 1)
        if self.move_rank is not None and not (
            isinstance(self.move_rank, (int, float)) and 0 < self.move_rank <= 1
        ):
            raise spec_error(
                "move_rank", f"is an energy threshold in (0, 1] or null, got {self.move_rank!r}"
            )
        _check_count("threads", self.threads, 1)
        if self.localizations is not None:
            _check_list(self.localizations, "localizations", "localizations, e.g. [{source: flu}]")
            check_localizations(self.localizations)
            if not any(localizable(m.method) for m in self.methods):
                raise spec_error("localizations", "no method of the spec takes a localization: "
                                 "add finetune or lora, or drop localizations")  # fmt: skip
        if not isinstance(self.name, str) or not self.name:
            raise spec_error("name", "must be a non-empty string")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT, "name": self.name, "models": list(self.models),
            "tasks": [t.to_dict() for t in self.tasks],
            "methods": [m.to_dict() for m in self.methods],
            "blocks": _blocks_to_json(self.blocks), "components": list(self.components),
            "seeds": list(self.seeds), "select": self.select.to_dict(),
            "max_remaining": self.max_remaining, "move_rank": self.move_rank,
            "threads": self.threads,
            # only when set: a spec without it keeps the hash it had before retention existed
            **({} if self.retention is None else {"retention": self.retention.to_dict()}),
            **({} if self.localizations is None
               else {"localizations": [loc.to_dict() for loc in self.localizations]}),
            **({} if self.battery is None else {"battery": self.battery.to_dict()}),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepSpec:
        """A spec from its dict form (as in a YAML / JSON file); unknown fields are refused."""
        if not isinstance(d, Mapping):
            raise spec_error("", f"must be a mapping of fields, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise spec_error("format", f"is {fmt!r}; this version reads {SPEC_FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise spec_error(str(unknown[0]), f"is not a field: a spec has {sorted(known)}")
        for required in ("models", "tasks", "methods"):
            if required not in d:
                raise spec_error(required, "is missing")
        seeds = d.get("seeds", [0])
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            _check_count("seeds", seeds, 1)
            seeds = list(range(seeds))
        return cls(
            models=tuple(_as_list(d["models"], "models")),
            tasks=tuple(_task(t, f"tasks[{i}]") for i, t in enumerate(_as_list(d["tasks"], "tasks"))),
            methods=tuple(_method(m, f"methods[{i}]")
                          for i, m in enumerate(_as_list(d["methods"], "methods"))),
            blocks=_blocks_from_json(d.get("blocks", "all")),
            components=tuple(_as_list(d.get("components", ["both"]), "components")),
            seeds=tuple(_as_list(seeds, "seeds")),
            select=_selection(d.get("select") or {}),
            name=d.get("name", "sweep"),
            max_remaining=d.get("max_remaining"),
            move_rank=d.get("move_rank", 0.95),
            threads=d.get("threads", 1),
            retention=None if d.get("retention") is None else RetentionSpec.from_dict(d["retention"]),
            localizations=None if d.get("localizations") is None else tuple(
                LocalizationSpec.from_dict(x) for x in _as_list(d["localizations"], "localizations")),
            battery=None if d.get("battery") is None else BatterySpec.from_dict(d["battery"]),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """Read a spec from a .yaml / .yml or .json file."""
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"{path} is missing: expected a sweep spec (.yaml or .json) here")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise CorruptFile(f"{path} is not valid YAML ({err})") from None
        else:
            data = read_json(path, what="sweep spec")
        try:
            return cls.from_dict(data)
        except BehemothError as err:
            raise type(err)(f"{path}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write the spec as YAML (.yaml / .yml) or JSON, atomically."""
        from behemoth_interp._io import write_bytes, write_json

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())
        else:
            write_json(path, self.to_dict())
        return path

    @property
    def sha256(self) -> str:
        """Content hash of the spec (its canonical JSON)."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: the text every content hash is taken of."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)


# ------------------------------------------------------------------ block subsets
def block_subsets(
    blocks: Any, n_layers: int, where: str = "blocks"
) -> list[tuple[int, ...] | None]:
    """The block subsets a `blocks` setting names for a model with `n_layers` blocks, each once,
    in a fixed order (by size, then lexicographically; None, the method's default, first).
    Out-of-range blocks are refused, naming `where`."""
    found: set[tuple[int, ...] | None] = set()
    for item in _block_items(blocks):
        if item == "default":
            found.add(None)
        elif item == "all":
            found |= {c for k in range(1, n_layers + 1)
                      for c in itertools.combinations(range(n_layers), k)}  # fmt: skip
        elif item == "singletons":
            found |= {(b,) for b in range(n_layers)}
        elif item == "prefixes":
            found |= {tuple(range(k)) for k in range(1, n_layers + 1)}
        elif isinstance(item, Mapping):
            every = [c for k in range(1, n_layers + 1)
                     for c in itertools.combinations(range(n_layers), k)]  # fmt: skip
            k = item["sample"]
            if k > len(every):
                raise spec_error(f"{where}.sample", f"asks for {k} subsets; a model of {n_layers} "
                            f"blocks has {len(every)} non-empty ones")  # fmt: skip
            rng = np.random.default_rng([int(item.get("seed", 0)), 41])
            found |= {every[i] for i in rng.choice(len(every), k, replace=False)}
        else:
            bad = [b for b in item if not 0 <= b < n_layers]
            if bad:
                raise spec_error(where, f"subset {list(item)} names blocks {bad}, but the model has "
                            f"blocks 0..{n_layers - 1}: remove them")  # fmt: skip
            found.add(tuple(sorted(set(item))))
    return sorted(found, key=lambda s: (-1, ()) if s is None else (len(s), s))


def _block_items(blocks: Any) -> list[Any]:
    """A blocks setting as a list of items: keywords, {'sample': k}, or one subset each."""
    if isinstance(blocks, (str, Mapping)):
        return [blocks]
    items = list(blocks)
    if items and all(is_int(b) for b in items):
        return [tuple(items)]  # one explicit subset, e.g. [0, 5]
    return [b if isinstance(b, str | Mapping) else tuple(b) for b in items]


def _check_blocks(blocks: Any, where: str) -> None:
    hint = ("'all', 'singletons', 'prefixes', 'default', a list of blocks, a list of such "
            "lists, or {sample: k, seed: s}")  # fmt: skip
    try:
        items = _block_items(blocks)
    except TypeError:
        raise spec_error(where, f"must be {hint}, got {blocks!r}") from None
    if not items:
        raise spec_error(where, f"is empty: give {hint}")
    for item in items:
        if isinstance(item, str):
            if item not in BLOCK_KEYWORDS:
                raise spec_error(
                    where, f"unknown subset family {item!r}: choose one of {BLOCK_KEYWORDS}"
                )
        elif isinstance(item, Mapping):
            if set(item) - {"sample", "seed"} or "sample" not in item:
                raise spec_error(where, f"a sample is {{sample: k, seed: s}}, got {dict(item)}")
            _check_count(f"{where}.sample", item["sample"], 1)
            _check_count(f"{where}.seed", item.get("seed", 0), 0)
        else:
            if not item or not all(is_int(b) for b in item):
                raise spec_error(
                    where, f"a subset is a non-empty list of block indices, got {list(item)}"
                )
            if min(item) < 0:
                raise spec_error(
                    where, f"subset {list(item)} has a negative block: blocks count from 0"
                )


def _blocks_to_json(blocks: Any) -> Any:
    if isinstance(blocks, str | Mapping):
        return blocks if isinstance(blocks, str) else dict(blocks)
    return [b if isinstance(b, str | int | Mapping) else list(b) for b in blocks]


def _blocks_from_json(blocks: Any) -> Any:
    if isinstance(blocks, str | Mapping) or blocks is None:
        return blocks
    if isinstance(blocks, list):
        return tuple(b if isinstance(b, str | int | Mapping) else tuple(b) for b in blocks)
    return blocks


# ------------------------------------------------------------------ field parsing and checks
def _check_count(where: str, value: Any, low: int) -> None:
    check_int(where, value, low, option="sweep spec")


def _check_list(items: Any, where: str, what: str) -> None:
    if not isinstance(items, tuple | list) or not items:
        raise spec_error(where, f"is empty: list {what}")


def _as_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, str | int | Mapping):
        return [value]
    if not isinstance(value, list | tuple):
        raise spec_error(where, f"must be a list, got {value!r}")
    return list(value)


def _check_components(components: Any, where: str) -> None:
    _check_list(components, where, f"components of {COMPONENT_SETTINGS}")
    for c in components:
        if c not in COMPONENT_SETTINGS:
            raise spec_error(where, f"unknown component {c!r}: choose of {COMPONENT_SETTINGS}")
    if len(set(components)) != len(components):
        raise spec_error(where, f"lists a component twice: {list(components)}")


def _task(t: Any, where: str) -> TaskSpec:
    if isinstance(t, str):
        return TaskSpec(t)
    if not isinstance(t, Mapping) or "kind" not in t:
        raise spec_error(
            where, f"is a task name of {TASKS} or {{kind: ..., relation: r, n: k}}, got {t!r}"
        )
    unknown = sorted(set(t) - {"kind", "relation", "n"})
    if unknown:
        raise spec_error(
            f"{where}.{unknown[0]}", "is not a task field: a task has kind, relation, n"
        )
    return TaskSpec(**t)


def _method(m: Any, where: str) -> MethodSpec:
    if isinstance(m, str):
        return MethodSpec(m)
    if not isinstance(m, Mapping) or "method" not in m:
        raise spec_error(f"{where}.method", f"is missing: name one of {', '.join(METHODS)}")
    known = {f.name for f in dataclasses.fields(MethodSpec)}
    unknown = sorted(set(m) - known)
    if unknown:
        raise spec_error(f"{where}.{unknown[0]}", f"is not a method field: one has {sorted(known)}")
    grid = m.get("grid") or {}
    settings = m.get("settings") or {}
    if not isinstance(grid, Mapping):
        raise spec_error(
            f"{where}.grid", f"is a mapping of setting -> list of values, got {grid!r}"
        )
    if not isinstance(settings, Mapping):
        raise spec_error(f"{where}.settings", f"is a mapping of setting -> value, got {settings!r}")
    for k, v in grid.items():
        if not isinstance(v, list | tuple):
            raise spec_error(f"{where}.grid.{k}", f"must be a list of values, got {v!r}")
    comps = m.get("components")
    return MethodSpec(
        method=m["method"],
        grid=tuple((str(k), tuple(_tuples(x) for x in v)) for k, v in grid.items()),
        settings=tuple((str(k), _tuples(v)) for k, v in settings.items()),
        objective=m.get("objective"), mode=m.get("mode"),
        blocks=_blocks_from_json(m.get("blocks")),
        components=None if comps is None else tuple(_as_list(comps, f"{where}.components")),
    )  # fmt: skip


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _selection(d: Any) -> Selection:
    if not isinstance(d, Mapping):
        raise spec_error("select", f"is a mapping (criterion, over, per, data), got {d!r}")
    unknown = sorted(set(d) - {"criterion", "over", "per", "data"})
    if unknown:
        raise spec_error(
            f"select.{unknown[0]}", "is not a field: select has criterion, over, per, data"
        )
    d = dict(d)
    if "over" in d:
        d["over"] = tuple(_as_list(d["over"], "select.over"))
    return Selection(**d)


def _check_method(m: MethodSpec, where: str) -> None:
    """The method is registered, its grid is non-empty and every grid point builds a valid
    config (unknown settings and out-of-range values are named now, not mid-sweep)."""
    if m.method not in METHODS:
        raise spec_error(f"{where}.method", f"unknown method {m.method!r}: choose one of "
                    f"{', '.join(METHODS)}")  # fmt: skip
    for name, values in m.grid:
        if not values:
            raise spec_error(f"{where}.grid.{name}", "is empty: give at least one value")
    overlap = sorted({k for k, _ in m.grid} & {k for k, _ in m.settings})
    if overlap:
        raise spec_error(
            f"{where}.settings.{overlap[0]}", "is also in the grid: set it in one place"
        )
    if m.mode is not None and m.mode not in MODES:
        raise spec_error(f"{where}.mode", f"unknown mode {m.mode!r}: choose one of {MODES}")
    if m.mode is not None and m.mode not in get_method(m.method).modes:
        raise spec_error(
            f"{where}.mode",
            f"method {m.method!r} edits {' or '.join(get_method(m.method).modes)} only",
        )
    if m.blocks is not None:
        _check_blocks(m.blocks, f"{where}.blocks")
    if m.components is not None:
        _check_components(m.components, f"{where}.components")
    for point in m.points():
        try:
            method_config(m.method, m.objective, m.options(point))
        except BehemothError as err:
            raise spec_error(f"{where} {point or ''}".rstrip(), str(err)) from None


def localizable(method: str) -> bool:
    """The method edits a config's `localization` (the fine-tuning methods)."""
    return any(f.name == "localization" for f in dataclasses.fields(get_method(method).Config))


def method_config(method: str, objective: str | None, options: Mapping[str, Any]):
    """The method's config for these options: fields of its config dataclass, and for methods
    with an `objective` field the objective's own fields (as `bi.edit(..., **options)` reads
    them). Unknown settings raise `InvalidArgument` naming them."""
    m = get_method(method)
    fields = {f.name for f in dataclasses.fields(m.Config)}
    own = {k: v for k, v in options.items() if k in fields}
    rest = {k: v for k, v in options.items() if k not in fields}
    for f in dataclasses.fields(m.Config):  # a nested config (e.g. data) given as a mapping
        if f.name != "objective" and isinstance(own.get(f.name), Mapping):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            if hasattr(default, "from_dict"):
                own[f.name] = type(default).from_dict({**default.to_dict(), **own[f.name]})
    if "objective" in fields:
        base = m.config_from(None, own)
        chosen = get_objective(base.objective if objective is None else objective, **rest)
        return dataclasses.replace(base, objective=chosen)
    if objective is not None:
        raise InvalidArgument(f"method {method!r} has no training objective: leave objective out")
    return m.config_from(None, options)
