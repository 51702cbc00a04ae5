"""One sweep worker: runs edits and turns each into its record.

A worker keeps what runs share: each model is loaded once, and the unedited model's side of
the evaluation (`edit_baseline`: remaining accuracy before the edit and the format baselines)
is computed once per task, not once per run. A run that raises is recorded with its error;
the worker goes on with the next.
"""

from __future__ import annotations

import math
import time
import traceback
from typing import Any

import numpy as np
import torch

from behemoth_interp.edit.evaluation import edit_baseline, evaluate_edit
from behemoth_interp.edit.registry import get_method
from behemoth_interp.edit.run import edit
from behemoth_interp.edit.search import training_scores
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.evaluate import FactScores
from behemoth_interp.model import hooked_in_world, load_hf
from behemoth_interp.rank import move_rank
from behemoth_interp.residual import unedited_probes
from behemoth_interp.sweep.battery import battery_config, run_battery
from behemoth_interp.sweep.retention import run_retention
from behemoth_interp.sweep.runs import Run, check_weights, task_of

RECORD_FORMAT = "behemoth-sweep-record/1"


class Worker:
    """Runs sweep runs in this process with `threads` torch threads, caching models and
    pre-edit baselines across runs (a Ray actor wraps one per worker process)."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        torch.set_num_threads(threads)
        self._models: dict[str, Any] = {}
        self._baselines: dict[tuple, Any] = {}
        self._fitted: dict[tuple, Any] = {}

    def run(self, run: Run) -> dict[str, Any]:
        """Carry out `run` and return its record (status 'ok', or 'failed' with the error)."""
        started = time.perf_counter()
        timings: dict[str, Any] = {"threads": self.threads}
        try:
            body = self._run(run, timings)
        except Exception as err:  # recorded, never swallowed: the record carries it
            record = failed_record(run, err, traceback.format_exc())
            record["timings"].update(timings)
        else:
            record = {"format": RECORD_FORMAT, "key": run.key, "run": run.describe(),
                      "status": "ok", **body, "error": None, "timings": timings}  # fmt: skip
        record["timings"]["run_s"] = time.perf_counter() - started - timings.get("setup_s", 0.0)
        return record

    # ------------------------------------------------------------------ the parts of a run
    def _run(self, run: Run, timings: dict[str, Any]) -> dict[str, Any]:
        clock = time.perf_counter()
        hf, world = self._model(run)
        task = task_of(run, world)
        baseline = self._baseline(hf, task, run, run.max_remaining)
        timings["setup_s"] = time.perf_counter() - clock
        config = get_method(run.method).Config.from_dict(run.config)
        clock = time.perf_counter()
        # a localization says where to edit itself; run.blocks / components only describe it
        where = {} if getattr(config, "localization", None) is not None else {
            "blocks": list(run.blocks), "components": run.components}  # fmt: skip
        result = edit(hf, task, method=run.method, config=config, mode=run.mode, seed=run.seed,
                      evaluate=False, **where)  # fmt: skip
        timings["edit_s"] = time.perf_counter() - clock
        settings = dict(result.report.settings)
        timings["fit_s"] = settings.pop("seconds")
        clock = time.perf_counter()
        scores = FactScores(result.model, task.world)
        report = evaluate_edit(result.model, task, before=hf, settings=settings,
                               max_remaining=run.max_remaining, seed=run.seed, baseline=baseline,
                               scores=scores)  # fmt: skip
        timings["evaluate_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        train = training_scores(result.model, task, getattr(config, "data", None), scores=scores)
        timings["train_eval_s"] = time.perf_counter() - clock
        ranks = None
        if run.move_rank is not None:
            clock = time.perf_counter()
            mr = move_rank(hf, result.model, run.move_rank)
            ranks = {"threshold": mr.threshold, "components": list(mr.components),
                     "rank": mr.rank.tolist(), "full_rank": mr.full_rank.tolist(),
                     "norm": mr.norm.tolist()}  # fmt: skip
            timings["move_rank_s"] = time.perf_counter() - clock
        kept = None
        if run.retention is not None:
            clock = time.perf_counter()
            kept = jsonable(run_retention(result, run.retention, run.seed, run.blocks))
            timings["retention_s"] = time.perf_counter() - clock
        battery = None
        if run.battery is not None:
            clock = time.perf_counter()
            probes = self._probes(hf, world, task, run) if run.battery["probes"] else None
            # the unedited side at the battery's own sample size, and the edited model's ranks
            # from the run's report: computed once, not again inside the battery
            config = battery_config(run.battery, run.seed)
            before = self._baseline(hf, task, run, config.max_remaining)
            battery = jsonable(run_battery(result, task, hf, run.battery, run.seed, probes,
                                           before, scores))  # fmt: skip
            timings["battery_s"] = time.perf_counter() - clock
        return {"report": jsonable(report.to_dict()), "train": train, "move_rank": ranks,
                "retention": kept, "battery": battery}  # fmt: skip

    def _model(self, run: Run):
        if run.model not in self._models:
            check_weights(run)
            hf, world, _ = load_hf(run.model)
            self._models[run.model] = (hf, world)
        return self._models[run.model]

    def _probes(self, hf, world, task: EditTask, run: Run):
        """`unedited_probes` for the battery's latent knowledge, fitted once per model, task
        and seed."""
        key = (run.model_sha256, task.kind, task.relation, task.facts.tobytes(), run.seed)
        if key not in self._fitted:
            self._fitted[key] = unedited_probes(hooked_in_world(hf, world), task, run.seed)
        return self._fitted[key]

    def _baseline(self, hf, task: EditTask, run: Run, size: int | None):
        """`edit_baseline` of the run's task with `size` unchanged tuples, computed once."""
        key = (run.model_sha256, task.kind, task.seed, task.facts.tobytes(),
               task.targets.tobytes(), size, run.seed)  # fmt: skip
        if key not in self._baselines:
            self._baselines[key] = edit_baseline(hf, task, max_remaining=size, seed=run.seed)
        return self._baselines[key]


def failed_record(run: Run, err: BaseException, trace: str = "") -> dict[str, Any]:
    """The record of a run that raised `err` (its traceback kept with the timings, which are
    not part of what a rerun must reproduce)."""
    return {"format": RECORD_FORMAT, "key": run.key, "run": run.describe(), "status": "failed",
            "report": None, "train": None, "move_rank": None, "retention": None, "battery": None,
            "error": {"type": type(err).__name__, "message": str(err)},
            "timings": {"traceback": trace}}  # fmt: skip


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars and arrays as Python values and NaN as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    if isinstance(x, float | np.floating):
        x = float(x)
        return None if math.isnan(x) else x
    return x
