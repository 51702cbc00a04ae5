"""`SweepResult`: a store's runs as a DataFrame, the best run per cell by the spec's selection
rule, bootstrap intervals over seeds, and the paper's sweep figures (Behemoth sections 5, 6.2).

A cell is everything that defines an experiment except the settings the rule selects over
(`Selection.over`: by default lr, steps, epochs) and, with `per='seed'`, the seed: model,
task, method, the rest of its config (e.g. the LoRA rank), blocks and components. Selection
happens here, on stored raw runs, so one store can be re-aggregated under another rule.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from behemoth_interp.edit.report import RATE_METRICS
from behemoth_interp.edit.tasks import TASKS
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.retention.downstream import DOWNSTREAM_TASKS
from behemoth_interp.sweep.retention import DISTRIBUTION_COLUMNS, retention_rows
from behemoth_interp.sweep.spec import Selection, canonical_json
from behemoth_interp.sweep.store import Store

BASE_COLUMNS = ("key", "status", "error_type", "error", "model", "model_sha", "distribution",
                "n_layers", "task", "relation", "n", "seed", "method", "mode", "blocks",
                "n_blocks", "components", "localization", "n_parameters", "max_remaining")  # fmt: skip
CELL_COLUMNS = ("model_sha", "task", "relation", "n", "method", "mode", "blocks", "components",
                "localization", "max_remaining", "config_rest")  # fmt: skip
TIMING_COLUMNS = ("run_s", "setup_s", "edit_s", "fit_s", "evaluate_s", "train_eval_s",
                  "move_rank_s", "retention_s", "battery_s")  # fmt: skip
SUMMARY_KEYS = ("cell", "variant", "model", "model_sha", "task", "method", "blocks", "n_blocks",
                "components", "localization", "n_parameters")  # fmt: skip
"""What a summary row of a cell says it is (`summary`, `retention_summary`)."""
METRIC_NAMES = {"success_top1": "success", "success_top2": "success (top-2)",
                "forget_rate": "forget rate", "remaining": "remaining accuracy",
                "dependent_followed": "dependent followed", "dependent_kept": "dependent kept"}  # fmt: skip


class SweepResult:
    """The records of a sweep store and the selection rule to read them with (default: that of
    the last spec run into the store)."""

    def __init__(self, records: list[dict[str, Any]], selection: Selection | None = None,
                 source: str = "") -> None:  # fmt: skip
        self.records = records
        self.selection = selection or Selection()
        self.source = source
        self._df: pd.DataFrame | None = None

    @classmethod
    def load(cls, store: str | Path, selection: Selection | None = None) -> SweepResult:
        s = Store.open(store, create=False)
        specs = s.specs()
        chosen = selection or (specs[-1].select if specs else None)
        return cls(list(s.records()), chosen, str(store))

    def __repr__(self) -> str:
        df = self.to_dataframe()
        failed = int((df.status == "failed").sum()) if len(df) else 0
        return f"SweepResult({len(df)} runs, {failed} failed, from {self.source or 'records'})"

    # ------------------------------------------------------------------ tables
    def to_dataframe(self) -> pd.DataFrame:
        """One row per stored run: what it was (model, task, seed, method, its config fields by
        name, blocks, components), its status and error, every EditReport metric, the
        training-time scores (`train_success`, `train_forget`, `train_remaining`) and timings."""
        if self._df is None:
            df = pd.DataFrame([_row(r) for r in self.records])
            if len(df):
                df = df.sort_values(["model_sha", "task", "method", "seed", "key"], kind="stable")
            # config fields by their own names (lr, rank, objective.beta, data.repeats, ...)
            # unless one is a column already
            names = {c: c[7:] if c[7:] not in df.columns else c
                     for c in df.columns if c.startswith("config:")}  # fmt: skip
            self._config_columns = list(names.values())
            self._df = df.rename(columns=names).reset_index(drop=True)
        return self._df.copy()

    def move_ranks(self, rows: pd.DataFrame | None = None) -> pd.DataFrame:
        """Long table of move ranks (section 6.2) of `rows` (default: every ok run): key, block,
        component (W_Q ... W_out), rank, full_rank, relative_rank, delta_norm."""
        keys = set((self.to_dataframe() if rows is None else rows).key)
        out = []
        for r in self.records:
            mr = r.get("move_rank")
            if r["key"] not in keys or not mr:
                continue
            rank, full, norm = (np.array(mr[k]) for k in ("rank", "full_rank", "norm"))
            for b in range(rank.shape[0]):
                for j, c in enumerate(mr["components"]):
                    out.append({"key": r["key"], "block": b, "matrix": c, "rank": int(rank[b, j]),
                                "full_rank": int(full[b, j]), "relative_rank": rank[b, j] / full[b, j],
                                "delta_norm": float(norm[b, j])})  # fmt: skip
        return pd.DataFrame(out, columns=["key", "block", "matrix", "rank", "full_rank",
                                          "relative_rank", "delta_norm"])  # fmt: skip

    def best(self, selection: Selection | None = None) -> pd.DataFrame:
        """The selected run of every cell (per seed, or one setting for all seeds of a cell),
        by the rule: highest criterion, then highest remaining accuracy (both on training-time
        data unless the rule says 'report'), then the smallest values of the selected settings.
        Failed runs are never selected. Adds `cell` and `variant` (method and the config values
        that tell its cells apart, e.g. 'lora rank=32')."""
        sel = selection or self.selection
        df = self._ok_cells(sel)
        if not len(df):
            return df
        crit, rem = _score_columns(sel)
        over = [c for c in sel.over if c in df]
        df["_setting"] = [canonical_json([_plain(r[c]) for c in over]) for _, r in df.iterrows()]
        if sel.per == "seed":
            chosen = [min(g.index, key=lambda i: _order(df.loc[i, crit], df.loc[i, rem],
                                                        [df.loc[i, c] for c in over]))
                      for _, g in df.groupby(["cell", "seed"], sort=False)]  # fmt: skip
            out = df.loc[chosen]
        else:
            means = df.groupby(["cell", "_setting"], sort=False)[[crit, rem]].mean()
            first = df.drop_duplicates(["cell", "_setting"]).set_index(["cell", "_setting"])
            pick = {}
            for (cell, setting), m in means.iterrows():
                key = _order(m[crit], m[rem], [first.loc[(cell, setting), c] for c in over])
                if cell not in pick or key < pick[cell][0]:
                    pick[cell] = (key, setting)
            out = df[[pick[c][1] == s for c, s in zip(df.cell, df._setting)]]
        return out.drop(columns="_setting").reset_index(drop=True)

    def summary(self, metrics=("success_top1", "remaining", "dependent_followed"), *,
                ci: float = 0.95, n_boot: int = 2000, seed: int = 0,
                selection: Selection | None = None) -> pd.DataFrame:  # fmt: skip
        """Per cell of the best runs: for each metric its mean over seeds and a percentile
        bootstrap interval of that mean (`ci`, `n_boot` resamples, seeded), and `seeds`."""
        best = self.best(selection)
        if not len(best):
            return pd.DataFrame()
        keys = list(SUMMARY_KEYS)
        rng = np.random.default_rng(seed)
        rows = []
        for _, g in best.groupby("cell", sort=False):
            row = {k: g[k].iloc[0] for k in keys}
            row["seeds"] = g.seed.nunique()
            for m in metrics:
                x = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(float) if m in g else []
                mean, lo, hi = bootstrap_mean(x, ci=ci, n_boot=n_boot, rng=rng)
                row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
            rows.append(row)
        return pd.DataFrame(rows)

    def retention_summary(self, *, ci: float = 0.95, n_boot: int = 2000, seed: int = 0,
                          selection: Selection | None = None) -> pd.DataFrame:  # fmt: skip
        """Per cell of the best runs, downstream task and freeze setting: edited and intrinsic
        retention after the fine-tune (means over seeds with percentile bootstrap intervals),
        `gap` (edited - intrinsic, per seed, then averaged), each set's mean probability by object
        kind after the fine-tune (`DISTRIBUTION_COLUMNS`: the paper's Figure 4 end points),
        `seeds`, and `undefined`: seeds whose edit did not take (no edited fact to retain; see
        `retention_set`)."""
        best = self.best(selection)
        rows = retention_rows(self.records, set(best.key) if len(best) else set())
        if not len(rows):
            raise InvalidArgument("no selected run of this store was fine-tuned downstream: add a "
                                  "retention block to the spec (see behemoth_interp.sweep.retention)")  # fmt: skip
        keys = list(SUMMARY_KEYS)
        df = rows.merge(best[[*keys, "key", "seed"]], on="key")
        df["gap"] = df.edited_retention - df.intrinsic_retention
        # cells in a fixed order (downstream tasks in theirs, nothing frozen first), each
        # bootstrapped with its own seeded draws: a cell's interval does not depend on what
        # else the store holds or the order it is read in
        order = {name: i for i, name in enumerate(DOWNSTREAM_TASKS)}
        df = df.assign(
            _task=df.downstream.map(order),
            _freeze=df.freeze.map(str),
            _frozen=df.freeze.map(lambda f: {"none": 0, "edited": 1}.get(str(f), 2)),
        )
        df = df.sort_values(["cell", "_task", "_frozen", "_freeze", "seed"], kind="stable")
        out = []
        for (cell, task, freeze), g in df.groupby(["cell", "downstream", "_freeze"], sort=False):
            ok = g[g.error.isna()]
            row = {k: g[k].iloc[0] for k in [*keys, "downstream", "freeze"]}
            row.update(seeds=ok.seed.nunique(), undefined=int(g.error.notna().sum()))
            metrics = ("edited_retention", "intrinsic_retention", "gap", *DISTRIBUTION_COLUMNS)
            row.update(_intervals(ok, metrics, f"{cell}|{task}|{freeze}", seed, ci, n_boot))
            out.append(row)
        return pd.DataFrame(out)

    def battery_summary(self, *, ci: float = 0.95, n_boot: int = 2000, seed: int = 0,
                        selection: Selection | None = None, every: bool = False) -> pd.DataFrame:  # fmt: skip
        """Per cell of the best runs and residual-knowledge number (part, metric): its value
        after the edit and the unedited model's (`before`), means over seeds with percentile
        bootstrap intervals, and `seeds`; the runs of a spec with a `battery` block. With
        `every`, every ok run instead, per cell and `setting` of the selected-over values (e.g.
        each learning rate): the whole trade-off, not only the rule's pick."""
        sel = selection or self.selection
        runs = self._ok_cells(sel) if every else self.best(sel)
        rows = battery_rows(self.records, set(runs.key) if len(runs) else set())
        if not len(rows):
            raise InvalidArgument("no selected run of this store ran the residual-knowledge "
                                  "battery: add a battery block to the spec (see "
                                  "behemoth_interp.sweep.battery)")  # fmt: skip
        over = [c for c in sel.over if c in runs]
        runs = runs.assign(setting=[", ".join(f"{c}={_fmt(r[c])}" for c in over if not _na(r[c]))
                                    if every else "" for _, r in runs.iterrows()])  # fmt: skip
        keys = [*SUMMARY_KEYS, "setting"]
        df = rows.merge(runs[[*keys, "key", "seed"]], on="key")
        out = []
        groups = df.groupby(["cell", "setting", "part", "metric"], sort=False)
        for (cell, setting, part, metric), g in groups:
            row = {k: g[k].iloc[0] for k in [*keys, "part", "metric"]}
            row["seeds"] = g.seed.nunique()
            row.update(_intervals(g, ("value", "before"), f"{cell}|{setting}|{part}|{metric}",
                                  seed, ci, n_boot))  # fmt: skip
            out.append(row)
        return pd.DataFrame(out)

    # ------------------------------------------------------------------ figures
    def retention(self, *, model: str | None = None, ci: float = 0.95,
                  selection: Selection | None = None):  # fmt: skip
        """The retention paper's Figure 2 / Table 1: for each downstream task (columns), each
        variant's edited and intrinsic retention after the fine-tune (bars; per freeze setting
        when there are several), means over seeds with bootstrap intervals."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        table = _one_model(self.retention_summary(ci=ci, selection=selection), model)
        tasks = list(dict.fromkeys(table.downstream))
        several = table.freeze.nunique() > 1
        label = [f"{v} ({c})" + (f", frozen: {f}" if several else "")
                 for v, c, f in zip(table.variant, table.components, table.freeze)]  # fmt: skip
        table = table.assign(label=label)
        fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
        for k, (m, name) in enumerate((("edited_retention", "edited"),
                                       ("intrinsic_retention", "intrinsic"))):  # fmt: skip
            for j, task in enumerate(tasks):
                s = table[table.downstream == task]
                fig.add_trace(go.Bar(x=s.label, y=s[m], name=name, marker_color=_color(k),
                                     legendgroup=name, showlegend=(j == 0),
                                     error_y={"type": "data", "symmetric": False,
                                              "array": s[f"{m}_hi"] - s[m],
                                              "arrayminus": s[m] - s[f"{m}_lo"]}),
                              row=1, col=j + 1)  # fmt: skip
        fig.update_layout(barmode="group", title=_title(
            f"Edited vs intrinsic retention after downstream fine-tuning (mean over seeds, "
            f"{ci:.0%} bootstrap)", table))  # fmt: skip
        fig.update_yaxes(range=[0, 1.05])
        return fig

    def figure_blocks(self, metrics=None, *, model: str | None = None, variant: str | None = None,
                      selection: Selection | None = None):  # fmt: skip
        """Figures 4 and 8: each metric (rows) of each task (columns) against the number of
        tuned blocks, one colour per component setting: the line is the best cell of that many
        blocks (seed means), the band the spread over all block subsets of that size."""
        cells = self._cell_means(selection, model, variant)
        metrics = _default_metrics(cells, metrics)
        tasks = _tasks(cells)
        fig = _grid(metrics, tasks, "blocks tuned")
        for ci, (series, g) in enumerate(cells.groupby(["variant", "components"], sort=True)):
            name = _series_name(series, cells)
            for j, task in enumerate(tasks):
                gt = g[g.task == task]
                for i, m in enumerate(metrics):
                    agg = gt.groupby("n_blocks")[m].agg(["max", "min"]).dropna()
                    _band(fig, agg.index, agg["max"], agg["min"], ci, name, i + 1, j + 1,
                          legend=(i == 0 and j == 0))  # fmt: skip
        fig.update_layout(title=_title("Best and spread over block subsets", cells))
        return fig

    def block_correlation(self, metrics=None, *, model: str | None = None,
                          variant: str | None = None, selection: Selection | None = None):  # fmt: skip
        """Figures 5, 6 and 9: the correlation over block subsets (seed means) of "block b was
        tuned" with each metric (rows), per task (columns), bars per component setting."""
        table = self.correlations(metrics, model=model, variant=variant, selection=selection)
        metrics = list(dict.fromkeys(table.metric))
        tasks = [t for t in (*TASKS, *sorted(set(table.task) - set(TASKS))) if t in set(table.task)]
        fig = _grid(metrics, tasks, "block")
        import plotly.graph_objects as go

        for ci, (series, g) in enumerate(table.groupby(["variant", "components"], sort=True)):
            for j, task in enumerate(tasks):
                for i, m in enumerate(metrics):
                    s = g[(g.task == task) & (g.metric == m)]
                    fig.add_trace(go.Bar(x=s.block, y=s.correlation, name=_series_name(series, table),
                                         marker_color=_color(ci), legendgroup=str(series),
                                         showlegend=(i == 0 and j == 0)), row=i + 1, col=j + 1)  # fmt: skip
        fig.update_layout(
            barmode="group", title=_title("Correlation of tuning a block with", table)
        )
        fig.update_yaxes(range=[-1, 1])
        fig.update_xaxes(dtick=1)
        return fig

    def correlations(self, metrics=None, *, model: str | None = None, variant: str | None = None,
                     selection: Selection | None = None) -> pd.DataFrame:  # fmt: skip
        """The table behind `block_correlation`: task, variant, components, metric, block,
        correlation (NaN where the block is in every subset or none, or the metric is constant),
        subsets."""
        cells = self._cell_means(selection, model, variant)
        metrics = _default_metrics(cells, metrics)
        rows = []
        n_layers = int(cells.n_layers.max())
        for (task, var, comps), g in cells.groupby(["task", "variant", "components"], sort=True):
            for m in metrics:
                y = pd.to_numeric(g[m], errors="coerce").to_numpy(float)
                for b in range(n_layers):
                    x = np.array([b in blocks for blocks in g.blocks], dtype=float)
                    rows.append({"task": task, "variant": var, "components": comps, "metric": m,
                                 "block": b, "correlation": _pearson(x, y), "subsets": len(g)})  # fmt: skip
        return pd.DataFrame(rows)

    def lora_ranks(self, metrics=("success_top1", "remaining"), *, field: str = "rank",
                   model: str | None = None, selection: Selection | None = None):  # fmt: skip
        """Figures 7 and 10: runs with a `field` setting (LoRA's rank): for each metric (rows)
        and task (columns) the best cell against the number of tuned blocks, one colour per
        rank, one dash per component setting."""
        cells = self._cell_means(selection, model, None)
        if field not in cells or cells[field].isna().all():
            raise InvalidArgument(f"no run in this store has a {field!r} setting: sweep LoRA ranks")
        cells = cells[cells[field].notna()]
        metrics, tasks = list(metrics), _tasks(cells)
        fig = _grid(metrics, tasks, "blocks tuned")
        import plotly.graph_objects as go

        dashes = {
            c: d for c, d in zip(sorted(set(cells.components)), ("solid", "dash", "dot", "dashdot"))
        }
        for ci, (rank, g) in enumerate(cells.groupby(field, sort=True)):
            for comps, gc in g.groupby("components", sort=True):
                for j, task in enumerate(tasks):
                    for i, m in enumerate(metrics):
                        best = gc[gc.task == task].groupby("n_blocks")[m].max().dropna()
                        fig.add_trace(go.Scatter(x=best.index, y=best.values, mode="lines+markers",
                                                 name=f"{field} {_fmt(rank)}, {comps}",
                                                 line={"color": _color(ci), "dash": dashes[comps]},
                                                 legendgroup=f"{rank}{comps}",
                                                 showlegend=(i == 0 and j == 0)), row=i + 1, col=j + 1)  # fmt: skip
        fig.update_layout(title=_title(f"Best cell per LoRA {field}", cells))
        return fig

    def dependents(self, metrics=("success_top1", "dependent_followed", "dependent_kept",
                                  "remaining"), *, model: str | None = None, ci: float = 0.95,
                   selection: Selection | None = None):  # fmt: skip
        """Figures 2 and 3: for each task (columns), each variant's success, dependent tuples
        followed / kept and remaining accuracy (bars), means over seeds with bootstrap intervals,
        for the cells that tune the most blocks and components of each variant (the whole
        model, or the method's own default)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        table = self.summary(metrics, ci=ci, selection=selection)
        table = _one_model(table, model)
        widest = table.groupby("variant").n_blocks.transform("max")
        table = table[table.n_blocks == widest]
        tasks = _tasks(table)
        fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
        labels = [f"{v} ({c})" for v, c in zip(table.variant, table.components)]
        table = table.assign(label=labels)
        for ci_, m in enumerate(metrics):
            for j, task in enumerate(tasks):
                s = table[table.task == task]
                fig.add_trace(go.Bar(x=s.label, y=s[m], name=METRIC_NAMES.get(m, m),
                                     marker_color=_color(ci_), legendgroup=m,
                                     error_y={"type": "data", "symmetric": False,
                                              "array": s[f"{m}_hi"] - s[m],
                                              "arrayminus": s[m] - s[f"{m}_lo"]},
                                     showlegend=(j == 0)), row=1, col=j + 1)  # fmt: skip
        fig.update_layout(barmode="group", title=_title(
            f"Success, dependents and remaining accuracy (mean over seeds, {ci:.0%} bootstrap)",
            table))  # fmt: skip
        fig.update_yaxes(range=[0, 1.05])
        return fig

    def residual(self, *, model: str | None = None, ci: float = 0.95,
                 selection: Selection | None = None):  # fmt: skip
        """The residual-knowledge battery of the best runs (Mechanistic Unlearning Figures 2-6,
        Dissecting Figure 1): a panel per part, a bar per metric and series (localization, or
        variant, per task), means over seeds with bootstrap intervals; the unedited model's
        value, where the battery has one, as a black marker."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        table = _one_model(self.battery_summary(ci=ci, selection=selection), model)
        table = table.assign(series=[f"{loc if isinstance(loc, str) else var} ({task})"
                                     for loc, var, task in zip(table.localization, table.variant,
                                                               table.task)])  # fmt: skip
        parts = list(dict.fromkeys(table.part))
        fig = make_subplots(rows=len(parts), cols=1, subplot_titles=parts)
        for i, series in enumerate(dict.fromkeys(table.series)):
            for row, part in enumerate(parts, 1):
                s = table[(table.series == series) & (table.part == part)]
                fig.add_trace(go.Bar(x=s.metric, y=s.value, name=series, legendgroup=series,
                                     marker_color=_color(i), showlegend=row == 1,
                                     error_y={"type": "data", "symmetric": False,
                                              "array": s.value_hi - s.value,
                                              "arrayminus": s.value - s.value_lo}),
                              row=row, col=1)  # fmt: skip
                if i == 0 and s.before.notna().any():
                    fig.add_trace(go.Scatter(x=s.metric, y=s.before, mode="markers",
                                             marker={"color": "black", "symbol": "line-ew-open",
                                                     "size": 18},
                                             name="unedited", legendgroup="unedited",
                                             showlegend=row == 1), row=row, col=1)  # fmt: skip
        fig.update_layout(barmode="group", height=260 * len(parts), title=_title(
            f"Residual knowledge (mean over seeds, {ci:.0%} bootstrap)", table))  # fmt: skip
        return fig

    def tradeoff(self, *, model: str | None = None):
        """Dissecting Figure 2: forget rate against maintain (remaining) accuracy of every run,
        one colour per series (localization or variant, and task): the trade-off the settings
        the rule selects over trace out."""
        import plotly.graph_objects as go

        df = self.to_dataframe()
        df = df[(df.status == "ok") & (df.task == "forget")] if len(df) else df
        if not len(df):
            raise InvalidArgument("no successful run of a forget task in this store")
        df = _one_model(df, model)
        cells = self._ok_cells(self.selection).set_index("key").variant
        labels = [
            loc if isinstance(loc, str) else cells[k] for loc, k in zip(df.localization, df.key)
        ]
        fig = go.Figure()
        for i, label in enumerate(dict.fromkeys(labels)):
            s = df[[lab == label for lab in labels]]
            fig.add_trace(go.Scatter(x=s.remaining, y=s.forget_rate, mode="markers", name=label,
                                     marker={"color": _color(i), "size": 9},
                                     text=[f"seed {r.seed}, {self._setting(r)}"
                                           for r in s.itertuples()]))  # fmt: skip
        fig.update_layout(title=_title("Forget rate against maintain accuracy, every run", df),
                          xaxis_title="maintain (remaining accuracy)", yaxis_title="forget rate")  # fmt: skip
        return fig

    def _setting(self, row) -> str:
        return ", ".join(f"{c}={_fmt(getattr(row, c))}" for c in self.selection.over
                         if c in row._fields and not _na(getattr(row, c)))  # fmt: skip

    def move_rank(self, *, model: str | None = None, variant: str | None = None,
                  selection: Selection | None = None):  # fmt: skip
        """Figure 12. Top: the move rank of each block's matrices when every block is tuned
        (mean over seeds of the best runs), per task. Bottom: the move rank of a tuned block's
        matrices relative to the same matrix when every block is tuned (same task, variant,
        components and seed), averaged over the subsets of each size."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        best = self._best_of(selection, model, variant)
        ranks = self.move_ranks(best)
        if not len(ranks):
            raise InvalidArgument("no run in this store has a move-rank summary: set move_rank")
        ranks = ranks.merge(best[["key", "task", "seed", "variant", "components", "blocks",
                                  "n_blocks", "n_layers"]], on="key")  # fmt: skip
        ranks = ranks[[b in blocks for b, blocks in zip(ranks.block, ranks.blocks)]]
        full = ranks[ranks.n_blocks == ranks.n_layers]
        if not len(full):
            raise InvalidArgument(
                "the move-rank figure compares each run with the one that tunes every block, "
                "and no run here does: add all the model's blocks to the spec's blocks"
            )
        tasks = _tasks(best)
        fig = make_subplots(rows=2, cols=len(tasks), subplot_titles=tasks, vertical_spacing=0.15)
        matrices = list(dict.fromkeys(ranks.matrix))
        ref = full.set_index(["task", "variant", "components", "seed", "block", "matrix"])["rank"]
        idx = pd.MultiIndex.from_frame(ranks[["task", "variant", "components", "seed", "block",
                                              "matrix"]])  # fmt: skip
        ranks = ranks.assign(all_blocks=ref.reindex(idx).to_numpy())
        rel = ranks[(ranks.all_blocks > 0) & (ranks.n_blocks < ranks.n_layers)]
        rel = rel.assign(relative=rel["rank"] / rel.all_blocks)
        for ci, mat in enumerate(matrices):
            for j, task in enumerate(tasks):
                top = (
                    full[(full.task == task) & (full.matrix == mat)].groupby("block")["rank"].mean()
                )
                fig.add_trace(go.Bar(x=top.index, y=top.values, name=mat, marker_color=_color(ci),
                                     legendgroup=mat, showlegend=(j == 0)), row=1, col=j + 1)  # fmt: skip
                bottom = (
                    rel[(rel.task == task) & (rel.matrix == mat)]
                    .groupby("n_blocks")["relative"]
                    .mean()
                )
                fig.add_trace(go.Scatter(x=bottom.index, y=bottom.values, mode="lines+markers",
                                         name=mat, line={"color": _color(ci)}, legendgroup=mat,
                                         showlegend=False), row=2, col=j + 1)  # fmt: skip
        fig.update_layout(
            barmode="group",
            title=_title(
                "Move rank: every block tuned (top); relative to that, by blocks tuned (bottom)",
                best,
            ),
        )
        fig.update_yaxes(title_text="move rank", row=1, col=1)
        fig.update_yaxes(title_text="relative move rank", row=2, col=1)
        fig.update_xaxes(dtick=1)
        return fig

    def report_html(self) -> str:
        """Every figure this store can draw, per model, with a table of runs, on one page."""
        from behemoth_interp.sweep.report import report_html

        return report_html(self)

    # ------------------------------------------------------------------ internals
    def _ok_cells(self, sel: Selection) -> pd.DataFrame:
        df = self.to_dataframe()
        if not len(df):
            return df
        df = df[df.status == "ok"].copy()
        rest = [c for c in self._config_columns if c not in sel.over]
        df["config_rest"] = [canonical_json({c: _plain(r[c]) for c in rest if not _na(r[c])})
                             for _, r in df.iterrows()]  # fmt: skip
        df["cell"] = [canonical_json([_plain(r[c]) for c in CELL_COLUMNS])
                      for _, r in df.iterrows()]  # fmt: skip
        df["variant"] = _variants(df, rest)
        return df

    def _best_of(self, selection, model, variant) -> pd.DataFrame:
        best = _one_model(self.best(selection), model)
        if variant is not None:
            if variant not in set(best.variant):
                raise InvalidArgument(
                    f"no variant {variant!r}: this store has {sorted(set(best.variant))}"
                )
            best = best[best.variant == variant]
        return best

    def _cell_means(self, selection, model, variant) -> pd.DataFrame:
        """The best runs averaged over seeds: one row per cell."""
        best = self._best_of(selection, model, variant)
        numeric = [c for c in best.columns if c in RATE_METRICS or c.startswith("success/")]
        keep = [c for c in best.columns if c not in numeric and c not in ("key", "seed")]
        means = best.groupby("cell", sort=False)[numeric].mean()
        first = best.drop_duplicates("cell").set_index("cell")[[c for c in keep if c != "cell"]]
        return first.join(means).reset_index()


# ------------------------------------------------------------------ rows
def _row(record: dict[str, Any]) -> dict[str, Any]:
    run, rep = record["run"], record.get("report") or {}
    settings = rep.get("settings", {})
    method = run["method"]
    blocks = settings.get("blocks", method["blocks"])
    comps = settings.get("components")
    error = record.get("error") or {}
    row: dict[str, Any] = {
        "key": record["key"], "status": record["status"], "error_type": error.get("type"),
        "error": error.get("message"), "model": run["model_path"], "model_sha": run["model"][:12],
        "distribution": run.get("distribution"), "n_layers": run.get("n_layers"),
        "task": run["task_spec"]["kind"], "relation": run["task_spec"]["relation"],
        "n": run["task_spec"]["n"], "seed": run["seed"], "method": method["name"],
        "mode": settings.get("mode", method["mode"]),
        "blocks": None if blocks is None else tuple(blocks),
        "n_blocks": len(blocks) if blocks is not None else np.nan,
        "components": _components(comps or method["components"]),
        # a localized run: the spec's name of its localization and its trainable weights
        "localization": run.get("localization"),
        "n_parameters": _num(settings.get("localization_parameters")),
        "max_remaining": run["evaluation"]["max_remaining"],
    }  # fmt: skip
    config = {k: v for k, v in method["config"].items() if k != "localization"}
    row.update({f"config:{k}": v for k, v in _flatten(config).items()})
    for m in RATE_METRICS:
        row[m] = _num(rep.get(m))
    row["params_changed"] = sum((rep.get("changed") or {}).values()) if rep else np.nan
    for t, v in (rep.get("template_success") or {}).items():
        row[f"success/{t}"] = _num(v)
    train = record.get("train") or {}
    for k in ("success", "forget", "remaining"):
        row[f"train_{k}"] = _num(train.get(k))
    timings = record.get("timings") or {}
    row.update({k: _num(timings.get(k)) for k in TIMING_COLUMNS})
    return row


def _components(comps) -> str:
    comps = tuple(comps)
    return "both" if set(comps) == {"mlp", "attn"} else "+".join(comps)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            if "name" in v and k == "objective":
                out[name] = v["name"]
            out.update(_flatten({kk: vv for kk, vv in v.items() if kk != "name"}, f"{name}."))
        else:
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


def _variants(df: pd.DataFrame, config_columns: list[str]) -> list[str]:
    """'method' plus the config values that differ between that method's cells (a setting
    only some of its cells have, e.g. one objective's, is named where it is set)."""
    out = pd.Series("", index=df.index, dtype=object)
    for method, g in df.groupby("method", sort=False):
        varying = [c for c in config_columns
                   if g[c][~g[c].map(_na)].map(lambda v: canonical_json(_plain(v))).nunique() > 1]  # fmt: skip
        for i, r in g.iterrows():
            out[i] = " ".join([method, *(f"{c}={_fmt(r[c])}" for c in varying if not _na(r[c]))])
    return out.tolist()


# ------------------------------------------------------------------ selection and statistics
def _score_columns(sel: Selection) -> tuple[str, str]:
    if sel.data == "training":
        return f"train_{sel.criterion}", "train_remaining"
    return ("success_top1" if sel.criterion == "success" else "forget_rate"), "remaining"


def _order(crit, rem, over_values) -> tuple:
    """Sort key of a candidate: best criterion, then best remaining, then smallest settings."""

    def high_first(x):
        return -x if _finite(x) else math.inf

    def small_first(v):
        if _na(v):
            return (0, 0.0, "")
        return (1, float(v), "") if isinstance(v, int | float) else (2, 0.0, str(v))

    return (high_first(crit), high_first(rem), tuple(small_first(v) for v in over_values))


def battery_rows(records: list[dict[str, Any]], keys: set[str] | None = None) -> pd.DataFrame:
    """One row per run (of `keys`, default all) and residual-knowledge number: key, part,
    metric, value, before (`ResidualKnowledge.to_dataframe()`, as the record keeps it)."""
    rows = [{"key": r["key"], **row} for r in records
            if keys is None or r["key"] in keys for row in (r.get("battery") or {}).get("rows", [])]  # fmt: skip
    df = pd.DataFrame(rows, columns=["key", "part", "metric", "value", "before"])
    return df.astype({"value": float, "before": float})


def _intervals(g: pd.DataFrame, metrics, name: str, seed: int, ci: float, n_boot: int) -> dict:
    """Each metric's mean over the rows of `g` and its bootstrap interval, drawn with a seed of
    its own (`name`): a group's interval does not depend on what else the store holds."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = {}
    for m in metrics:
        mean, lo, hi = bootstrap_mean(g[m].dropna().to_numpy(float), ci=ci, n_boot=n_boot, rng=rng)
        out.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
    return out


def bootstrap_mean(
    x, *, ci: float = 0.95, n_boot: int = 2000, rng=None
) -> tuple[float, float, float]:
    """Mean of `x` and the percentile bootstrap interval of the mean (NaN for no values; the
    mean itself for one)."""
    x = np.asarray(x, dtype=float)
    if not len(x):
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(0) if rng is None else rng
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return mean, float(lo), float(hi)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------------ figure helpers
def _one_model(df: pd.DataFrame, model: str | None) -> pd.DataFrame:
    if not len(df):
        raise InvalidArgument("no successful run in this store to draw: run the sweep first")
    if model is None:
        models = list(dict.fromkeys(df.model_sha))
        if len(models) > 1:
            raise InvalidArgument(
                f"this store holds runs of {len(models)} models ({', '.join(models)}): pass "
                "model= (a weights sha prefix or a checkpoint path)"
            )
        return df
    keep = df[[m.startswith(model) or p == model or Path(p).name == model
               for m, p in zip(df.model_sha, df.model)]]  # fmt: skip
    if not len(keep):
        raise InvalidArgument(f"no run of model {model!r}: this store has {sorted(set(df.model))}")
    return keep


def _default_metrics(cells: pd.DataFrame, metrics) -> list[str]:
    """Success, dependents followed (where the world has dependents) and remaining accuracy."""
    if metrics is not None:
        return list(metrics)
    out = ["success_top1"]
    if "dependent_followed" in cells and cells.dependent_followed.notna().any():
        out.append("dependent_followed")
    return [*out, "remaining"]


def _tasks(df: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(df.task))
    return [t for t in TASKS if t in present] + [t for t in present if t not in TASKS]


def _grid(metrics: list[str], tasks: list[str], x_title: str):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(metrics), cols=len(tasks), shared_xaxes=True,
                        column_titles=tasks, row_titles=[METRIC_NAMES.get(m, m) for m in metrics],
                        vertical_spacing=0.08)  # fmt: skip
    fig.update_xaxes(title_text=x_title, dtick=1, row=len(metrics))
    fig.update_layout(height=260 * len(metrics) + 120)
    return fig


def _band(fig, x, upper, lower, ci: int, name: str, row: int, col: int, legend: bool) -> None:
    import plotly.graph_objects as go

    x = list(x)
    color = _color(ci)
    fig.add_trace(go.Scatter(x=x + x[::-1], y=list(upper) + list(lower)[::-1], fill="toself",
                             fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                             legendgroup=name, showlegend=False), row=row, col=col)  # fmt: skip
    fig.add_trace(go.Scatter(x=x, y=list(upper), mode="lines+markers", name=name,
                             line={"color": color}, legendgroup=name, showlegend=legend),
                  row=row, col=col)  # fmt: skip


def _series_name(series: tuple, df: pd.DataFrame) -> str:
    variant, comps = series
    return comps if df.variant.nunique() == 1 else f"{variant}, {comps}"


def _title(text: str, df: pd.DataFrame) -> str:
    models = ", ".join(dict.fromkeys(Path(p).name for p in df.model)) if "model" in df else ""
    return f"{text} — {models}" if models else text


def _color(i: int) -> str:
    from plotly.colors import qualitative

    return qualitative.Plotly[i % len(qualitative.Plotly)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# ------------------------------------------------------------------ values
def _na(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _finite(v) -> bool:
    return isinstance(v, int | float | np.number) and math.isfinite(v)


def _num(v) -> float:
    return np.nan if v is None else v


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
