"""The residual-knowledge battery as a sweep axis (Mechanistic Unlearning sections 3.1-3.3):
every edited model of a sweep is tested for whether it removed the facts or hid them.

A spec's `battery` block holds `bi.BatteryConfig`'s settings (each run's seed replaces its
seed), whether to fit latent-knowledge `probes` on the unedited model (once per model and
relation), and an `oracle` cache: a run whose task has a trained oracle there is measured
against it and attacks it as the never-knew baseline. A sweep never trains an oracle (a full
training run); a missing one leaves those parts undefined, with the command that makes it:

    battery:
      attack: {steps: 20, lr: 3e-4}     # null: no relearning attack
      krs_settings: []                  # no KRS: the costliest part
      probes: true
      oracle: data/oracles
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behemoth_interp._io import read_json
from behemoth_interp.errors import BehemothError, InvalidArgument
from behemoth_interp.residual import BatteryConfig, residual_knowledge
from behemoth_interp.train import TRAIN_LOG


def _error(where: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"sweep spec battery{where}: {message}")


@dataclass(frozen=True)
class BatterySpec:
    """`config` (its seed is each run's), `probes` for latent knowledge, `oracle` cache."""

    config: BatteryConfig = BatteryConfig()
    probes: bool = False
    oracle: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.probes, bool):
            raise _error(".probes", f"is true or false, got {self.probes!r}")
        if self.oracle is not None and not isinstance(self.oracle, str):
            raise _error(".oracle", f"is an oracle cache directory, got {self.oracle!r}")

    def to_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.pop("seed")
        return {**d, "probes": self.probes, "oracle": self.oracle}

    @classmethod
    def from_dict(cls, d: Any) -> BatterySpec:
        if not isinstance(d, Mapping):
            raise _error("", f"is a mapping of battery settings, got {d!r}")
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(BatteryConfig)} - {"seed"}
        unknown = sorted(set(d) - fields - {"probes", "oracle"})
        if unknown:
            raise _error(f".{unknown[0]}", f"is not a setting: choose of "
                         f"{sorted(fields | {'probes', 'oracle'})}")  # fmt: skip
        probes, oracle = d.pop("probes", False), d.pop("oracle", None)
        try:
            config = BatteryConfig.from_dict(d)
        except (BehemothError, TypeError) as err:
            raise _error("", str(err)) from None
        return cls(config, probes, oracle)


def run_oracle(model: str, task, cache: str | None) -> dict[str, Any] | None:
    """The oracle of `task` for the checkpoint `model` as a run records it: None (no cache
    asked for), its path and weights if `cache` holds a trained one, else {'missing': cache}."""
    from behemoth_interp.model import weights_sha256
    from behemoth_interp.oracle import oracle_path

    if cache is None:
        return None
    path = oracle_path(model, task, cache) / "model"
    log = path / TRAIN_LOG
    if not log.is_file() or "final" not in read_json(log, what="oracle training log"):
        return {"missing": cache}
    return {"path": str(path), "sha256": weights_sha256(path)}


def battery_config(spec: dict[str, Any], seed: int) -> BatteryConfig:
    """The `BatteryConfig` of a run's battery dict (`BatterySpec.to_dict()` with the oracle
    resolved), seeded with the run's seed."""
    d = {k: v for k, v in spec.items() if k not in ("oracle", "probes")}
    return dataclasses.replace(BatteryConfig.from_dict(d), seed=seed)


def run_battery(result, task, before, spec: dict[str, Any], seed: int, probes=None,
                baseline=None, scores=None) -> dict:  # fmt: skip
    """The battery of one edited model (`result`, an `EditResult` of `task` on `before`) under
    `spec` (a run's battery dict): its rows (`ResidualKnowledge.to_dataframe()`) and the parts
    left undefined, with why. `probes`, `baseline` and `scores` are the worker's, shared with
    its other runs and with the run's own report (see `residual_knowledge`)."""
    from behemoth_interp.model import load_hf

    found = spec["oracle"]
    truth = load_hf(Path(found["path"]))[0] if found and "path" in found else None
    battery = residual_knowledge(result.model, task, before=before, oracle=truth, probes=probes,
                                 settings=result.report.settings,
                                 config=battery_config(spec, seed), baseline=baseline,
                                 scores=scores)  # fmt: skip
    undefined = dict(battery.undefined)
    if found and "missing" in found:
        undefined["oracle"] = (f"no trained oracle of this task in {found['missing']}: train it "
                               "with `behemoth-interp oracle` and rerun the sweep")  # fmt: skip
    rows = battery.to_dataframe().astype(object).where(lambda df: df.notna(), None)
    return {"rows": rows.to_dict("records"), "undefined": undefined}
