"""Retention as a sweep axis (Wen & Zhang): each edit of a sweep, fine-tuned downstream.

A spec's `retention` block names the downstream tasks and the freezing settings; every run of
the sweep then fine-tunes its edited model on each task under each setting (`bi.retention`)
and stores the retention of the edited and matched intrinsic facts in its record:

    retention:
      downstream: [general, new_facts, classification, instruction]
      freeze: [none, edited]     # or block lists, e.g. [0, 1]; 'edited': the blocks the run edits
      settings: {subjects: 0.25, steps: 600, lr: 2e-4}

The paper's second remedy (paraphrase-augmented edits) is a method setting
(`settings: {paraphrases: 5}`, or a grid over it); its first ("fine-tuning with frozen layers")
is `freeze`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from behemoth_interp.errors import BehemothError, InvalidArgument, check_int, check_range
from behemoth_interp.retention import DOWNSTREAM_TASKS, FINE_TUNE, DownstreamConfig, retention
from behemoth_interp.retention.result import CATEGORIES

FREEZE_KEYWORDS = ("none", "edited")


def _error(where: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"sweep spec retention.{where}: {message}")


@dataclass(frozen=True)
class RetentionSpec:
    """The downstream fine-tunes of every run: `downstream` tasks (`bi.DOWNSTREAM_TASKS`),
    `freeze` settings ('none', 'edited', or a list of blocks), and the shared settings of the
    downstream data (`subjects`, `copies`, `disjoint`), the retention sets (`per_edit`,
    `min_margin`) and the fine-tune (`lr`, `steps`, `eval_every`); each run's seed seeds them."""

    downstream: tuple[str, ...] = ("general",)
    freeze: tuple[Any, ...] = ("none",)
    subjects: float = 1.0
    copies: int = 4
    disjoint: str = "tokens"
    per_edit: int = 2
    min_margin: float = 0.1
    lr: float = FINE_TUNE.lr
    steps: int = FINE_TUNE.steps  # type: ignore[assignment]
    eval_every: int = FINE_TUNE.eval_every

    def __post_init__(self) -> None:
        if isinstance(self.downstream, str) or not self.downstream:
            raise _error("downstream", f"is a list of tasks of {sorted(DOWNSTREAM_TASKS)}")
        for name in self.downstream:
            if name not in DOWNSTREAM_TASKS:
                raise _error(
                    "downstream", f"unknown task {name!r}: choose of {sorted(DOWNSTREAM_TASKS)}"
                )
        if isinstance(self.freeze, str) or not self.freeze:
            raise _error(
                "freeze", "is a list of 'none', 'edited' or block lists, e.g. [none, edited]"
            )
        for f in self.freeze:
            ok = f in FREEZE_KEYWORDS if isinstance(f, str) else (
                isinstance(f, list | tuple) and all(isinstance(b, int) and b >= 0 for b in f))  # fmt: skip
            if not ok:
                raise _error("freeze", f"{f!r} is not 'none', 'edited' or a list of blocks")
        object.__setattr__(self, "downstream", tuple(self.downstream))
        object.__setattr__(self, "freeze", tuple(f if isinstance(f, str) else tuple(f)
                                                 for f in self.freeze))  # fmt: skip
        try:
            DownstreamConfig(subjects=self.subjects, copies=self.copies, disjoint=self.disjoint)  # type: ignore[arg-type]
            check_int("per_edit", self.per_edit, 1)
            check_range("min_margin", self.min_margin, 0, 1)
            check_range("lr", self.lr, 0, low_open=True)
            check_int("steps", self.steps, 1)
            check_int("eval_every", self.eval_every, 1)
        except InvalidArgument as err:
            raise _error("settings", str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["downstream"] = list(self.downstream)
        d["freeze"] = [f if isinstance(f, str) else list(f) for f in self.freeze]
        settings = {k: d.pop(k) for k in list(d) if k not in ("downstream", "freeze")}
        return {**d, "settings": settings}

    @classmethod
    def from_dict(cls, d: Any) -> RetentionSpec:
        if not isinstance(d, Mapping):
            raise _error("", f"is a mapping of downstream, freeze and settings, got {d!r}")
        d = dict(d)
        unknown = sorted(set(d) - {"downstream", "freeze", "settings"})
        if unknown:
            raise _error(unknown[0], "is not a field: retention has downstream, freeze, settings")
        settings = dict(d.get("settings") or {})
        fields = {f.name for f in dataclasses.fields(cls)} - {"downstream", "freeze"}
        bad = sorted(set(settings) - fields)
        if bad:
            raise _error(f"settings.{bad[0]}", f"is not a setting: choose of {sorted(fields)}")
        return cls(downstream=tuple(_listed(d.get("downstream", ["general"]))),
                   freeze=tuple(_listed(d.get("freeze", ["none"]))), **settings)  # fmt: skip

    def blocks(self, freeze: Any, edited: tuple[int, ...]) -> tuple[int, ...]:
        """The blocks one `freeze` setting freezes in a run that edited blocks `edited`."""
        if freeze == "none":
            return ()
        return tuple(edited) if freeze == "edited" else tuple(freeze)


def _listed(x: Any) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]


def run_retention(result, spec: dict[str, Any], seed: int, edited_blocks) -> list[dict[str, Any]]:
    """Every downstream fine-tune of one edited model (`result`, an `EditResult`) under
    `spec` (a `RetentionSpec` dict), in a scratch directory: per task and freeze setting its
    summary and retention curve, or the error that made it undefined (an edit that did not take)."""
    rs = RetentionSpec.from_dict(spec)
    out = []
    with tempfile.TemporaryDirectory(prefix="behemoth-retention-") as tmp:
        for i, (name, freeze) in enumerate((n, f) for n in rs.downstream for f in rs.freeze):
            blocks = rs.blocks(freeze, tuple(edited_blocks or ()))
            item: dict[str, Any] = {"downstream": name, "freeze": _freeze_name(freeze),
                                    "freeze_blocks": list(blocks)}  # fmt: skip
            config = DownstreamConfig(
                name, subjects=rs.subjects, copies=rs.copies, disjoint=rs.disjoint, seed=seed
            )  # type: ignore[arg-type]
            train = dataclasses.replace(
                FINE_TUNE,
                lr=rs.lr,
                steps=rs.steps,
                seed=seed,
                eval_every=rs.eval_every,
                freeze_blocks=blocks,
            )
            try:
                r = retention(result, out=Path(tmp) / str(i), config=config, train_config=train,
                              per_edit=rs.per_edit, min_margin=rs.min_margin, seed=seed)  # fmt: skip
            except BehemothError as err:
                item["error"] = {"type": type(err).__name__, "message": str(err)}
            else:
                curve = r.to_dataframe()[["step", "set", "retention", *CATEGORIES]]
                item.update(
                    r.summary(), error=None, curve=curve.replace({np.nan: None}).to_dict("records")
                )
            out.append(item)
    return out


def _freeze_name(freeze: Any) -> str:
    return freeze if isinstance(freeze, str) else "blocks " + ",".join(map(str, freeze))


# the Figure 4 categories a retention row carries for each set, after the fine-tune
DISTRIBUTION_COLUMNS = tuple(f"{name}_{c}" for name in ("edited", "intrinsic")
                             for c in CATEGORIES if (name, c) != ("intrinsic", "p_original"))  # fmt: skip
ROW_COLUMNS = ("key", "downstream", "freeze", "edited_retention", "intrinsic_retention",
               "n_edited", "n_intrinsic", "steps", "stopped", "error", *DISTRIBUTION_COLUMNS)  # fmt: skip


def retention_rows(records: list[dict[str, Any]], keys: set[str] | None = None) -> pd.DataFrame:
    """One row per run (of `keys`, default all) and downstream fine-tune: key, downstream,
    freeze, edited_retention, intrinsic_retention, n_edited, n_intrinsic, steps, stopped, error,
    and each set's mean probability by object kind after the fine-tune (`DISTRIBUTION_COLUMNS`,
    e.g. edited_p_related; NaN in records written before the distribution was kept)."""
    rows = []
    for r in records:
        if keys is not None and r["key"] not in keys:
            continue
        for item in r.get("retention") or []:
            error = item.get("error") or {}
            row = {"key": r["key"], "downstream": item["downstream"], "freeze": item["freeze"],
                   **{k: item.get(k, np.nan) for k in ("edited_retention", "intrinsic_retention",
                                                      "n_edited", "n_intrinsic", "steps")},
                   "stopped": item.get("stopped"), "error": error.get("message")}  # fmt: skip
            last = _last_step(item.get("curve") or [])
            for column in DISTRIBUTION_COLUMNS:
                name, c = column.split("_", 1)
                value = last.get(name, {}).get(c)
                row[column] = np.nan if value is None else value
            rows.append(row)
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def _last_step(curve: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{set: its curve entry} at the fine-tune's last evaluation."""
    if not curve:
        return {}
    end = max(c["step"] for c in curve)
    return {c["set"]: c for c in curve if c["step"] == end}
