"""The sweep tables of docs/experiments.md: a store's figures as markdown, read with the store's
own selection rule (the best learning rate per cell on training-time data).

- blocks (Figures 4 and 8): per component setting and number of tuned blocks, the best block
  subset's success and remaining accuracy, and the spread over all subsets of that size;
- correlation (Figures 5, 6 and 9): per component setting, the correlation over subsets of
  "block b was tuned" with remaining accuracy (and success, where it varies);
- move rank (Figure 12): every block tuned, each block's move rank per matrix; and a tuned
  block's move rank relative to that, averaged over the subsets of each size;
- dependents (Figures 2 and 3): each method's success, dependents followed / kept and
  remaining accuracy, means over seeds with bootstrap intervals;
- retention (the retention paper's Figure 2 and Table 1): per method, downstream task and freeze
  setting, edited and intrinsic retention after the fine-tune and their gap, means over seeds
  with bootstrap intervals;
- distribution (its Figure 4 end points): per method, downstream task and freeze setting, where
  each set's probability sits after the fine-tune (the object it should say, the edited facts'
  original object, the relation's other objects, anything else), means over seeds;
- battery (Mechanistic Unlearning Figures 2-6 and Table 1, Dissecting Figure 1): per
  localization (or method variant) and task, each residual-knowledge number with the unedited
  model's beside it, means over seeds with bootstrap intervals (battery_settings: every
  setting the rule selects over, e.g. each learning rate, not only its pick).

    python experiments/sweep_tables.py STORE [--tables blocks,correlation,move_rank,dependents]
        [--columns 'edit: maintain,window 3']   # battery tables: only these columns
"""

from __future__ import annotations

import argparse

import pandas as pd

import behemoth_interp as bi
from behemoth_interp.rank import COMPONENTS
from behemoth_interp.sweep.retention import DISTRIBUTION_COLUMNS

TABLES = (
    "blocks",
    "correlation",
    "move_rank",
    "dependents",
    "retention",
    "distribution",
    "battery",
)


def blocks_table(result: bi.SweepResult) -> str:
    best = result.best()
    rows = []
    for (task, variant, comps, n), g in best.groupby(
        ["task", "variant", "components", "n_blocks"], sort=True
    ):
        means = g.groupby("cell").agg(
            success=("success_top1", "mean"), remaining=("remaining", "mean"),
            blocks=("blocks", "first"),
        )  # fmt: skip
        top = means.sort_values(["success", "remaining"], ascending=False).iloc[0]
        rows.append({"task": task, "method": variant, "components": comps, "blocks tuned": n,
                     "subsets": len(means),
                     "best subset": _blocks(top.blocks), "success": f"{top.success:.2f}",
                     "remaining": f"{top.remaining:.4f}",
                     "success (all subsets)": _spread(means.success, 2),
                     "remaining (all subsets)": _spread(means.remaining, 4)})  # fmt: skip
    return pd.DataFrame(rows).to_markdown(index=False)


def correlation_table(result: bi.SweepResult) -> str:
    table = result.correlations(["success_top1", "remaining"])
    table = table[table.correlation.notna()]
    if not len(table):
        return "(no correlation: no block is tuned in some and left out of others of 3+ subsets)"
    wide = table.pivot_table(index=["task", "metric", "components"], columns="block",
                             values="correlation")  # fmt: skip
    wide.columns = [f"block {b}" for b in wide.columns]
    return wide.round(2).reset_index().to_markdown(index=False)


def move_rank_tables(result: bi.SweepResult) -> str:
    best = result.best()
    ranks = result.move_ranks(best).merge(
        best[["key", "task", "variant", "components", "blocks", "n_blocks", "n_layers", "seed"]],
        on="key",
    )
    ranks = ranks[[b in blocks for b, blocks in zip(ranks.block, ranks.blocks)]]
    full = ranks[ranks.n_blocks == ranks.n_layers]
    top = full.pivot_table(index=["task", "variant", "components", "block"], columns="matrix",
                           values="rank").reindex(columns=list(COMPONENTS))  # fmt: skip
    index = ["task", "variant", "components", "seed", "block", "matrix"]
    reference = full.set_index(index)["rank"]
    ranks = ranks.assign(
        all_blocks=reference.reindex(pd.MultiIndex.from_frame(ranks[index])).values
    )
    part = ranks[(ranks.n_blocks < ranks.n_layers) & (ranks.all_blocks > 0)]
    part = part.assign(relative=part["rank"] / part.all_blocks)
    bottom = part.pivot_table(index=["task", "variant", "components", "n_blocks"], columns="matrix",
                              values="relative").reindex(columns=list(COMPONENTS))  # fmt: skip
    full_rank = int(full.full_rank.max()) if len(full) else 0
    return (f"Every block tuned: move rank (95% of ‖ΔW‖², full rank {full_rank})\n\n"
            + top.round(1).reset_index().to_markdown(index=False)
            + "\n\nFewer blocks tuned: a tuned block's move rank / its rank with every block "
            "tuned, mean over the subsets of each size\n\n"
            + bottom.round(2).reset_index().to_markdown(index=False))  # fmt: skip


def dependents_table(result: bi.SweepResult) -> str:
    metrics = ("success_top1", "dependent_followed", "dependent_kept", "remaining")
    table = result.summary(metrics)
    rows = []
    for _, r in table.iterrows():
        row = {"model": _model(r.model), "task": r.task, "method": r.variant,
               "blocks": _blocks(r.blocks), "components": r.components, "seeds": r.seeds}  # fmt: skip
        for m in metrics:
            row[m] = _interval(r, m, 3)
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


def retention_table(result: bi.SweepResult) -> str:
    table = result.retention_summary()
    rows = []
    for _, r in table.iterrows():
        row = {"model": _model(r.model), "method": r.variant, "blocks": _blocks(r.blocks),
               "downstream": r.downstream, "frozen": r.freeze, "seeds": r.seeds,
               "undefined": r.undefined}  # fmt: skip
        for m, name in (("edited_retention", "edited"), ("intrinsic_retention", "intrinsic"),
                        ("gap", "edited − intrinsic")):  # fmt: skip
            row[name] = _interval(r, m, 2)
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


def distribution_table(result: bi.SweepResult) -> str:
    table = result.retention_summary()
    rows = []
    for _, r in table.iterrows():
        row = {"model": _model(r.model), "method": r.variant, "downstream": r.downstream,
               "frozen": r.freeze, "seeds": r.seeds}  # fmt: skip
        for column in DISTRIBUTION_COLUMNS:
            name, kind = column.split("_p_")
            row[f"{name}: {kind}"] = "–" if pd.isna(r[column]) else f"{r[column]:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


def battery_table(result: bi.SweepResult, every: bool = False, columns: str = "") -> str:
    """A row per localization (or variant) and task, a column per battery number (those naming
    one of the comma-separated `columns`, when given); first the `before` row: the unedited
    model's values (for the relearning attack: the edited model's, before the attack)."""
    table = result.battery_summary(every=every)
    table["series"] = [(loc if isinstance(loc, str) else var) + (f" {s}" if s else "")
                       for loc, var, s in zip(table.localization, table.variant, table.setting)]  # fmt: skip
    table["column"] = table.part + ": " + table.metric.str.replace(" (best centre)", "")
    if columns:
        table = table[[any(c in name for c in columns.split(",")) for name in table.column]]
    table["cell"] = [_interval(r, "value", 3) for _, r in table.iterrows()]
    wide = table.pivot_table(index=["task", "series"], columns="column", values="cell",
                             aggfunc="first", sort=False).sort_index()  # fmt: skip
    before = table.groupby("column", sort=False).before.first()
    wide.loc[("", "before"), :] = before.map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    wide = wide.loc[[("", "before"), *wide.index[:-1]]]
    params = table.groupby("series", sort=False).n_parameters.first()
    wide.insert(0, "weights", [f"{params[s]:,.0f}" if s in params and pd.notna(params[s]) else ""
                               for _, s in wide.index])  # fmt: skip
    return (f"Means over {int(table.seeds.max())} seeds [95% bootstrap interval]; the first row "
            "is the unedited model (relearn: the edited model before the attack)\n\n"
            + wide.reset_index().to_markdown(index=False))  # fmt: skip


def _interval(row, metric: str, digits: int) -> str:
    """'mean [lo, hi]' of a summary row's metric, or '–' where it is undefined."""
    if pd.isna(row[metric]):
        return "–"
    lo, mean, hi = (row[f"{metric}_lo"], row[metric], row[f"{metric}_hi"])
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _model(path) -> str:
    return str(path).rsplit("/", 1)[-1]


def _blocks(blocks) -> str:
    return (
        "default"
        if blocks is None or (isinstance(blocks, float) and pd.isna(blocks))
        else (",".join(str(b) for b in blocks))
    )


def _spread(values: pd.Series, digits: int) -> str:
    return f"{values.min():.{digits}f}–{values.max():.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--tables", default=",".join(TABLES), help="of: " + ", ".join(TABLES))
    p.add_argument("--columns", default="", help="battery tables: the columns naming one of these")
    a = p.parse_args()
    result = bi.SweepResult.load(a.store)
    print(f"{result!r}; selection: {result.selection.to_dict()}\n")
    makers = {"blocks": blocks_table, "correlation": correlation_table,
              "move_rank": move_rank_tables, "dependents": dependents_table,
              "retention": retention_table, "distribution": distribution_table,
              "battery": lambda r: battery_table(r, columns=a.columns),
              "battery_settings": lambda r: battery_table(r, every=True, columns=a.columns)}  # fmt: skip
    for name in a.tables.split(","):
        print(f"## {name}\n\n{makers[name](result)}\n")


if __name__ == "__main__":
    main()
