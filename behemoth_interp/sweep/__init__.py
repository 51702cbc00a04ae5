"""Sweeps: many edits of a grid, run on Ray or in process, stored one record per run, and
read back as the paper's figures (Behemoth sections 4.6-4.10, 5, 6.2, appendix B).

- `spec`: `SweepSpec` (models, tasks, methods with grids, block subsets, components, seeds,
  the selection rule), read from YAML / JSON and validated before any run;
- `localizations`, `battery`: the localization axis (`LocalizationSpec`) and the
  residual-knowledge battery of every run (`BatterySpec`);
- `runs`: `expand(spec)` -> the runs, each with its content-addressed key;
- `worker`: `Worker`, which runs edits and caches models and pre-edit baselines;
- `store`: `Store`, one atomic JSON record per run under its key;
- `local`, `ray_executor`: the in-process and the Ray executors;
- `runner`: `run_sweep` (resumable) and `dry_run`;
- `result`: `SweepResult` (DataFrame, best per cell, bootstrap intervals, figures);
- `editability`: localization scores against single-component edit outcomes (`editability`);
- `report`: the sweep's report page (built with `behemoth_interp.report.Page`);
- `reproduce`: a paper's committed specs at one scale, run and reported in one directory.
"""

from behemoth_interp.sweep.battery import BatterySpec
from behemoth_interp.sweep.editability import Editability, editability
from behemoth_interp.sweep.local import LocalExecutor
from behemoth_interp.sweep.localizations import LocalizationSpec
from behemoth_interp.sweep.ray_executor import RayExecutor
from behemoth_interp.sweep.report import (
    report_html,
    reproduce_html,
    reproduce_page,
    sweep_page,
    write_report,
)
from behemoth_interp.sweep.reproduce import PAPERS, Reproduction, paper_specs, reproduce
from behemoth_interp.sweep.result import SweepResult, bootstrap_mean
from behemoth_interp.sweep.runner import EXECUTORS, DryRun, SweepSummary, dry_run, run_sweep
from behemoth_interp.sweep.runs import Plan, Run, expand, weights_sha256
from behemoth_interp.sweep.spec import MethodSpec, Selection, SweepSpec, TaskSpec, block_subsets
from behemoth_interp.sweep.store import Store
from behemoth_interp.sweep.worker import Worker

__all__ = [
    "EXECUTORS", "PAPERS", "BatterySpec", "DryRun", "Editability", "LocalExecutor",
    "LocalizationSpec", "MethodSpec", "Plan", "RayExecutor",
    "Reproduction", "Run", "Selection", "Store", "SweepResult", "SweepSpec", "SweepSummary",
    "TaskSpec", "Worker", "block_subsets", "bootstrap_mean", "dry_run", "editability", "expand",
    "paper_specs",
    "report_html", "reproduce", "reproduce_html", "reproduce_page", "run_sweep", "sweep_page",
    "weights_sha256", "write_report",
]  # fmt: skip
