"""The trace report: accuracy per relation, a heatmap per traced site (heads too), averaged and
per relation, the top components, attribution against exact, and the tuples traced."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from behemoth_interp.errors import InvalidArgument
from behemoth_interp.report.figures import signed_heatmap
from behemoth_interp.report.page import Page, RunInfo

if TYPE_CHECKING:
    from behemoth_interp.evaluate import FactAccuracy
    from behemoth_interp.trace import TraceResult

METRIC_TEXT = {
    "ioi": "Each cell is the IOI metric (Behemoth eq. 1), M = (LD_restored − LD_corrupted) / "
    "(LD_clean − LD_corrupted), averaged over the tuples, where LD is the logit of the correct "
    "object token minus that of the partner's. M = 1: putting back that one clean activation "
    "brings the fact back entirely; 0: it does nothing; below 0: it pushes further towards "
    "the wrong answer.",
    "logit_diff": "Each cell is LD_restored − LD_corrupted in logits, averaged over the tuples "
    "(LD: the logit of the correct object token minus that of the partner's), not normalized: "
    "compare it with the clean − corrupted gap in the tuples table.",
    "prob": "Each cell is eq. 1 on the correct object token's probability, (p_restored − "
    "p_corrupted) / (p_clean − p_corrupted), averaged over the tuples: 1 restores the clean "
    "probability, 0 does nothing.",
}
CORRUPTION_TEXT = {
    "swap": "The corrupted run is the prompt of another subject of the same relation (its "
    "partner, listed with each tuple below); one clean activation at a time is put back into "
    "it at one site, layer and input position (and head).",
    "noise": "The corrupted run is the clean prompt with Gaussian noise on the subject's "
    "embeddings; one clean activation at a time is put back into it at one site, layer and "
    "input position (and head).",
}
SITE_TEXT = {
    "resid_pre": "the residual stream entering the block",
    "attn_out": "the attention output of the block",
    "mlp_post": "the MLP's hidden activations (coefficients)",
    "mlp_out": "the MLP output of the block",
    "head": "one attention head's output",
}


def trace_page(
    traces: TraceResult | Sequence[TraceResult],
    *,
    attribution: Sequence[TraceResult] = (),
    accuracy: FactAccuracy | None = None,
    run: RunInfo | None = None,
    top: int = 15,
    max_rows: int = 200,
) -> Page:
    """The trace report: fact accuracy per relation (when `accuracy` is given), a heatmap per
    traced site (layers x token roles; heads: layers x heads at the subject and the last
    position) averaged and per relation (a selector), the top components, attribution against
    exact (for each `attribution` result traced like one of `exact`), and the tuples traced
    with their partners (the first `max_rows`). All `traces` (exact, or attribution estimates
    drawn as maps) must trace the same tuples; `attribution` estimates of exact ones among
    them are compared with them."""
    results = [traces] if hasattr(traces, "scores") else list(traces)
    if not results:
        raise InvalidArgument("trace_page needs at least one trace result")
    first = results[0]
    for r in [*results, *attribution]:
        same = np.array_equal(r.tuples, first.tuples) and np.array_equal(r.partners, first.partners)
        if not same:
            raise InvalidArgument(
                "every trace on one page must trace the same tuples with the same partners: "
                "trace them with the same tuples and seed"
            )
    pairs = [(_twin(a, results), a) for a in attribution]
    cfg = first.config
    about = [METRIC_TEXT[cfg.metric], CORRUPTION_TEXT[cfg.corruption],
             f"The metric reads the {_object_token(cfg.object_token)} object token "
             f"(object_token={cfg.object_token}) of the {cfg.template} template at the last input "
             "position (the object tokens before it are fed). Rows are layers "
             "(layer 0 on top); columns are the input positions, named by their role in the "
             "sentence: EOT the leading <|endoftext|>, SS, RR and OO the markers before the "
             "subject, relation and object, F0, F1, ... fillers, subject[i] the subject's i-th "
             "token. Red restores the fact, blue works against it, white is 0; every map's "
             "colour scale is symmetric around 0."]  # fmt: skip
    if first.n_excluded:
        about.append(f"{first.n_excluded} of {len(first.tuples)} tuples are left out of every "
                     f"mean: their clean − corrupted metric (the denominator) is below "
                     f"{cfg.min_denominator:g}, so the corruption did not remove the fact.")  # fmt: skip
    settings = {"tuples": len(first.tuples)}
    for r in [*results, *attribution]:
        settings[f"{r.config.method} trace of {', '.join(r.sites)}"] = r.config.to_dict()
    title = f"Causal tracing: {first.counted()}, {_score_name(first)} metric"
    page = Page(title, run=run, about=about, settings=settings)
    if accuracy is not None:
        page.section("Fact accuracy per relation", *_accuracy_items(accuracy))
    for r in results:
        for kind in r.sites:
            page.section(f"{kind}: {SITE_TEXT[kind]}", *_site_figures(r, kind), level=3)
    page.section("Top components", f"The {top} (site, layer, position, head) indices with the "
                 "highest mean score over all traced sites.", _top_table(results, pairs, top))  # fmt: skip
    if pairs:
        page.section("Attribution patching against exact", *_attribution_items(pairs))
    page.section("Tuples traced", *_tuple_items(first, max_rows))
    return page


def _object_token(j: int) -> str:
    return {0: "first", -1: "last"}.get(j, f"number {j} (from 0)")


def _twin(attr: TraceResult, exact: Sequence[TraceResult]) -> TraceResult:
    """The exact trace `attr` estimates: same config but the method."""
    want = {**attr.config.to_dict(), "method": "exact"}
    for r in exact:
        if r.config.to_dict() == want:
            return r
    raise InvalidArgument(
        f"attribution trace of {', '.join(attr.sites)} has no exact trace with the same sites, "
        "positions and settings to compare with: trace both with the same arguments"
    )


def _accuracy_items(acc: FactAccuracy) -> list:
    import plotly.express as px

    df = acc.to_dataframe().groupby("relation_name", sort=False)[["top1", "top2"]].mean()
    n = acc.to_dataframe().groupby("relation_name", sort=False).size()
    table = df.assign(tuples=n).rename(columns={"top1": "top-1", "top2": "top-2"})
    table.loc["all"] = [acc.accuracy, float(acc.top(2).mean()), len(acc.rank)]
    table["tuples"] = table["tuples"].astype(int)
    table.index.name = "relation"
    long = df.reset_index().melt("relation_name", var_name="metric", value_name="accuracy")
    fig = px.bar(long, x="relation_name", y="accuracy", color="metric", barmode="group",
                 range_y=[0, 1.02], labels={"relation_name": "relation"},
                 title=f"Teacher-forced accuracy on every tuple of each relation "
                       f"({acc.template} template, n={len(acc.rank)})")  # fmt: skip
    fig.update_layout(height=340)
    text = ("Top-k: every object token of the tuple is among the model's k highest logits "
            "(teacher-forced; a tie counts against the true token).")  # fmt: skip
    return [text, fig, table]


def _relations_of(r: TraceResult) -> dict[str, TraceResult]:
    """'all relations' and each traced relation with a tuple left in the means."""
    out = {"all relations": r}
    names = [r.relation_names[i] for i in np.unique(r.tuples[:, 1])]
    if len(names) > 1:
        for name in names:
            sub = r.for_relation(name)
            if sub.n_excluded < len(sub.tuples):
                out[name] = sub
    return out


def _score_name(r: TraceResult) -> str:
    return {"ioi": "IOI", "logit_diff": "logit diff", "prob": "prob. IOI"}[r.config.metric]


def _site_figures(r: TraceResult, kind: str) -> list:
    """The heatmaps of one site: layers x positions; for heads, layers x heads per position
    group shown (all groups when at most four, else the subject's tokens and the last)."""
    subsets = _relations_of(r)
    layers = [f"L{layer}" for layer in range(r.n_layers)]
    what = f"{r.config.method} {r.config.corruption} trace"
    caption = {k: f"{k}, {s.counted()}" for k, s in subsets.items()}
    if kind != "head":
        maps = {k: (caption[k], s.mean[kind].numpy()) for k, s in subsets.items()}
        fig = signed_heatmap(maps, x=r.positions, y=layers, x_title="input position (token role)",
                             y_title="layer", score=_score_name(r),
                             title=f"{kind}: mean {_score_name(r)} per layer and position, {what}")  # fmt: skip
        return [fig]
    groups = list(range(len(r.positions)))
    if len(groups) > 4:
        groups = [g for g, p in enumerate(r.positions) if p.startswith("subject")] + [groups[-1]]
    figs = []
    for g in groups:
        maps = {k: (caption[k], s.mean[kind][:, g].numpy()) for k, s in subsets.items()}
        heads = [f"H{h}" for h in range(r.scores[kind].shape[-1])]
        last = r.positions[g] == "last" or (
            g == len(r.positions) - 1 and "each" in r.config.positions
        )
        where = "the last position" if last else f"'{r.positions[g]}'"
        figs.append(signed_heatmap(
            maps, x=heads, y=layers, x_title="head", y_title="layer", score=_score_name(r),
            title=f"Heads at {where}: mean {_score_name(r)} per layer and head, {what}",
        ))  # fmt: skip
    return figs


def _top_table(results, pairs, k: int) -> pd.DataFrame:
    keys = ["site", "layer", "position", "head"]
    df = pd.concat([r.to_dataframe() for r in results], ignore_index=True)
    df = df.sort_values("score", ascending=False, kind="stable").head(k)
    if pairs:
        est = pd.concat([a.to_dataframe() for _, a in pairs], ignore_index=True)
        df = df.merge(est[[*keys, "score"]].rename(columns={"score": "attribution"}), on=keys,
                      how="left")  # fmt: skip
    df["head"] = ["" if pd.isna(h) else f"H{h}" for h in df["head"]]
    return df.reset_index(drop=True).rename(columns={"score": "mean score"})


def _attribution_items(pairs) -> list:
    """Scatter of attribution against exact mean scores, and their correlations per site (of
    the mean maps, and of every tuple's scores), over the tuples the exact trace keeps."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = []
    for exact, attr in pairs:
        labels = exact.to_dataframe()  # the index rows, in the order of the flattened maps
        keep = torch.as_tensor(~exact.excluded)
        for site in exact.sites:
            e, a = exact.mean[site].flatten().numpy(), attr.mean[site].flatten().numpy()
            d = labels[labels["site"] == site]
            head = ["" if pd.isna(h) else f" H{h}" for h in d["head"]]
            fig.add_trace(go.Scatter(
                x=e, y=a, mode="markers", name=site,
                text=[f"L{la} {p}{h}" for la, p, h in zip(d["layer"], d["position"], head)],
                hovertemplate="%{text}: exact %{x:.3f}, attribution %{y:.3f}<extra></extra>",
            ))  # fmt: skip
            per_tuple = _r(exact.scores[site][keep].flatten(), attr.scores[site][keep].flatten())
            rows.append({"site": site, "indices": len(e), "r (mean maps)": _r(e, a),
                         "r (per tuple and index)": per_tuple,
                         "max |attribution − exact| (means)": float(np.abs(a - e).max())})  # fmt: skip
    xs = np.concatenate([np.concatenate([t.x, t.y]) for t in fig.data])
    lo, hi = float(min(xs.min(), 0)), float(max(xs.max(), 0))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="attribution = exact",
                             line={"dash": "dot", "color": "grey"}, hoverinfo="skip"))  # fmt: skip
    exact = pairs[0][0]
    fig.update_layout(title=f"Attribution estimate against the exact mean {_score_name(exact)} "
                            f"per index, {exact.counted()}", xaxis_title="exact mean score",
                      yaxis_title="attribution estimate", height=520)  # fmt: skip
    text = ("Attribution patching estimates every restoration at once from one forward and "
            "backward pass of the corrupted run: (clean − corrupted activation) · ∂metric/∂"
            "activation, over the same tuples. Points on the dotted line are estimated exactly; "
            "r is Pearson's correlation.")  # fmt: skip
    return [text, fig, pd.DataFrame(rows)]


def _r(a: Iterable[float], b: Iterable[float]) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _tuple_items(r: TraceResult, max_rows: int) -> list:
    cfg = r.config
    names = np.asarray(r.relation_names, dtype=object)
    table = pd.DataFrame({
        "subject": r.tuples[:, 0], "relation": names[r.tuples[:, 1]], "object": r.tuples[:, 2],
        "partner subject": r.partners[:, 0], "partner object": r.partners[:, 2],
        "clean": r.clean, "corrupted": r.corrupted,
    })  # fmt: skip
    if r.denominator is not None:
        table["clean − corrupted"] = r.denominator
    table["excluded"] = np.where(r.excluded, "yes", "")
    value = {"prob": "probability of the correct token"}.get(
        cfg.metric, "logit difference LD (correct − partner's object token)"
    )
    text = [f"{len(r.tuples)} tuples, drawn with seed {cfg.seed} among those with a corruption "
            f"partner; 'clean' and 'corrupted' are the {value} of the two reference runs."]  # fmt: skip
    if (r.partners[:, 0] >= 0).any():
        text.append(f"Partners were drawn uniformly (seed {cfg.seed}) among the tuples of the "
                    "same relation with another subject whose object shares the object tokens "
                    "before the one measured and differs at it (Behemoth section 6.1, "
                    "bi.find_partners), so the metric compares two answers that part at that "
                    "token.")  # fmt: skip
    if len(table) > max_rows:
        text.append(f"The first {max_rows} of {len(table)} tuples are listed.")
    return [*text, table.head(max_rows)]
