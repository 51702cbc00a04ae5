"""Localization against editability (Behemoth section 6, Mechanistic Unlearning section 4):
does the component a localization method scores highest edit best?

Read from a sweep over single components (`blocks: singletons`, `components: [mlp, attn]`):
each run edits one MLP or one attention, and its outcomes (success, remaining accuracy,
paraphrase and MCQ success, battery numbers) are that component's editability. Each
localization (`ComponentSet` with scores: trace, attribution, FLU) scores the same components;
the Spearman rank correlation of the two, over components, says whether the localization
predicts where an edit works.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import PARAPHRASES
from behemoth_interp.localize import Component, ComponentSet

METRICS = ("success_top1", "remaining", "paraphrase", "success/mcq")
"""Edit success, remaining accuracy, and success in the paraphrase templates (their mean) and
in MCQ: the robustness of the edit."""


@dataclass
class Editability:
    """`components`: per task, variant, component and localization, the component's score and
    its outcomes (means over seeds of the best runs); `correlations`: per task, variant,
    localization and metric, Spearman's rho over components, its p-value and the count."""

    components: pd.DataFrame
    correlations: pd.DataFrame

    def to_dataframe(self) -> pd.DataFrame:
        return self.correlations.copy()

    def plot(self):
        """Rho per localization (bars) for each metric (panels), per task and variant."""
        import plotly.express as px

        df = self.correlations.assign(series=lambda d: d.task + " · " + d.variant)
        fig = px.bar(df, x="localization", y="rho", color="series", barmode="group",
                     facet_col="metric", hover_data=["p", "n"],
                     title="Rank correlation of localization scores with per-component "
                           "edit outcomes (Spearman, over components)")  # fmt: skip
        fig.update_yaxes(range=[-1.05, 1.05])
        return fig


def component_score(localization: ComponentSet, component: Component) -> float:
    """`component`'s score in `localization`: its own, or for a whole attention scored by
    heads the largest of its heads' (a component's score is its largest |score|); NaN when
    the localization does not score it."""
    if localization.scores is None:
        raise InvalidArgument(
            f"the {localization.source!r} localization has no scores: correlate scored "
            "localizations (trace, attribution, flu)"
        )
    scores = dict(zip(localization.candidates, localization.scores))
    if component in scores:
        return abs(scores[component])
    heads = [abs(s) for c, s in scores.items()
             if component.kind == "attn" and c.kind == "head" and c.layer == component.layer]  # fmt: skip
    return max(heads) if heads else float("nan")


def editability(result, localizations: Mapping[str, ComponentSet], metrics=METRICS, *,
                selection=None) -> Editability:  # fmt: skip
    """Editability of each single component in `result` (a `SweepResult`) against the scores
    of `localizations` (name -> scored `ComponentSet` of the same model): see the module."""
    best = result.best(selection)
    single = (
        best[(best.n_blocks == 1) & best.components.isin(["mlp", "attn"])] if len(best) else best
    )
    if not len(single):
        raise InvalidArgument(
            "no selected run edits a single MLP or attention: sweep blocks: singletons with "
            "components: [mlp, attn]"
        )
    paraphrases = [f"success/{t}" for t in PARAPHRASES if f"success/{t}" in single]
    if paraphrases:
        single = single.assign(paraphrase=single[paraphrases].mean(axis=1))
    metrics = [m for m in metrics if m in single and single[m].notna().any()]
    names = [str(Component(c, b[0])) for c, b in zip(single.components, single.blocks)]
    outcome = (single.assign(component=names)
               .groupby(["task", "variant", "component"], sort=True)[metrics].mean().reset_index())  # fmt: skip
    rows, pairs = [], []
    for name, loc in localizations.items():
        scores = [component_score(loc, Component.parse(c)) for c in outcome.component]
        scored = outcome.assign(localization=name, score=scores)
        rows.append(scored)
        for (task, variant), g in scored.dropna(subset=["score"]).groupby(["task", "variant"]):
            for m in metrics:
                ok = g[m].notna()
                x, y = g.score[ok].to_numpy(float), g[m][ok].to_numpy(float)
                rho, p = (spearmanr(x, y) if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
                          else (np.nan, np.nan))  # fmt: skip
                pairs.append({"task": task, "variant": variant, "localization": name,
                              "metric": m, "rho": float(rho), "p": float(p), "n": len(x)})  # fmt: skip
    return Editability(pd.concat(rows, ignore_index=True), pd.DataFrame(pairs))
