"""Report pages: the one HTML page builder of every command that writes a page, and the pages
of trace, probe, restoration and edit results.

A `Page` has a header (what was run: model, world and its fingerprint, command line, date,
package version), a short "how to read this", sections of figures (plotly), tables (pandas)
and text, and the settings at the bottom. plotly.js is loaded once per page: inline with
`offline=True` (one file to share), else from `plotly-<version>.min.js` written once beside the
page, so many pages in one directory stay small. Either way a page opens from the file system
with no network.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from behemoth_interp._io import FILE_MODE, write_page
from behemoth_interp.errors import InvalidArgument, OutputExists

if TYPE_CHECKING:
    from behemoth_interp.edit.report import EditReport
    from behemoth_interp.evaluate import FactAccuracy
    from behemoth_interp.probe import ProbeResult
    from behemoth_interp.restore import KRSResult
    from behemoth_interp.trace import TraceResult
    from behemoth_interp.world import World

FIGURE_HEIGHT = 420
"""Pixels of a figure's plotting height unless it needs more (one row per layer and head)."""
SIGNED_SCALE = "RdBu_r"
"""Signed scores: red restores, blue works against, white is 0 (the range is symmetric)."""


class Html(str):
    """Markup built by this module, put on a page as it is (plain `str` items are escaped)."""


@dataclass(frozen=True)
class RunInfo:
    """What a page reports on, for its header: the checkpoint, its world, the command line."""

    model: str | None = None
    world: World | None = None
    command: str | None = None

    @classmethod
    def of(cls, model, command: str | None = None) -> RunInfo:
        """From a model as `load_model` gives it (its `checkpoint` path and `world`)."""
        path = getattr(model, "checkpoint", None)
        return cls(None if path is None else str(path), getattr(model, "world", None), command)

    def rows(self, date: str) -> dict[str, str]:
        w = self.world
        return {
            "model": self.model or "(a model not loaded from a checkpoint)",
            "world": repr(w) if w is not None else "(not given)",
            "world fingerprint": w.fingerprint if w is not None else "(not given)",
            "command": self.command or "(called from Python)",
            "date": date,
            "behemoth-interp": version("behemoth-interp"),
        }


def plotly_js_name() -> str:
    """The file name of the shared plotly.js: its version is in it, so pages written by
    another plotly never load a script they were not made for."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js"


class Page:
    """One report page: `section(...)` adds a heading and its items, `write(path)` writes it.

    Items are text (a paragraph, escaped), `Html`, a pandas DataFrame (a table) or a plotly
    figure (drawn at its layout's height, `FIGURE_HEIGHT` by default).
    """

    def __init__(
        self,
        title: str,
        *,
        run: RunInfo | None = None,
        about: Sequence[str] = (),
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.title = title
        self.run = run or RunInfo()
        self.about = tuple(about)
        self.settings = dict(settings or {})
        self.date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self._body: list[str] = []
        self.n_figures = 0

    def section(self, heading: str, *items: Any, level: int = 2) -> Page:
        """Append `heading` (an `<h{level}>`) and its items; returns the page."""
        self._body.append(f"<h{level}>{html.escape(heading)}</h{level}>")
        return self.add(*items)

    def add(self, *items: Any) -> Page:
        """Append items without a heading; returns the page."""
        self._body += [self._item(item) for item in items]
        return self

    def _item(self, item: Any) -> str:
        if isinstance(item, Html):
            return str(item)
        if isinstance(item, str):
            return f"<p>{html.escape(item)}</p>"
        if isinstance(item, pd.DataFrame):
            return table_html(item)
        if hasattr(item, "to_html") and hasattr(item, "layout"):
            self.n_figures += 1
            div = item.to_html(full_html=False, include_plotlyjs=False,
                               div_id=f"figure-{self.n_figures}",
                               default_height=f"{item.layout.height or FIGURE_HEIGHT}px",
                               config={"displaylogo": False, "responsive": True})  # fmt: skip
            return f"<div class='figure'>{div}</div>"
        raise InvalidArgument(
            f"a page item is text, Html, a DataFrame or a plotly figure, got {type(item).__name__}"
        )

    def html(self, plotly_js: str | None = None) -> str:
        """The page as HTML: plotly.js inline when `plotly_js` is None, else loaded from that
        relative URL."""
        from plotly.offline import get_plotlyjs

        if not self.n_figures:
            script = ""
        elif plotly_js is None:
            script = f"<script>{get_plotlyjs()}</script>"
        else:
            script = f"<script src='{html.escape(plotly_js)}'></script>"
        rows = self.run.rows(self.date)
        header = pd.DataFrame({"": list(rows.values())}, index=list(rows))
        parts = [f"<h1>{html.escape(self.title)}</h1>", table_html(header, header=False)]
        if self.about:
            parts.append("<h2>How to read this</h2>")
            parts += [f"<p>{html.escape(p)}</p>" for p in self.about]
        parts += self._body
        if self.settings:
            rows = {k: _setting(v) for k, v in self.settings.items()}
            table = pd.DataFrame({"value": list(rows.values())}, index=list(rows))
            parts += ["<h2>Settings</h2>", table_html(table, header=False)]
        body = "\n".join(parts)
        return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style>{script}"
                f"</head><body>\n{body}\n</body></html>\n")  # fmt: skip

    def write(self, path: str | os.PathLike, *, offline: bool = False) -> Path:
        """Write the page atomically (marked as ours, so --force may replace it). plotly.js goes
        inline with `offline`, else into `plotly_js_name()` beside the page, written once."""
        path = Path(path)
        name = None if offline or not self.n_figures else plotly_js_name()
        if name is not None:
            write_plotly_js(path.parent)
        write_page(path, self.html(name))
        return path


def check_plotly_js(page: str | os.PathLike) -> None:
    """Refuse, before any work, a file of the shared plotly.js's name beside `page` that is not
    that script (a user's file is never replaced)."""
    target = Path(page).parent / plotly_js_name()
    if target.exists() and not _is_plotly_js(target):
        raise OutputExists(
            f"{target} exists and is not plotly.js {plotly_js_name()[7:-7]}, which the page "
            "would load from there: move that file, or pass --offline (plotly.js inside the page)"
        )


def write_plotly_js(directory: str | os.PathLike) -> Path:
    """`plotly_js_name()` in `directory`, created once: an equal file is kept, another refused.

    Created by a hard link from a complete temporary file, so a reader never sees half of it
    and a concurrent writer of the same script never replaces anything."""
    from plotly.offline import get_plotlyjs

    target = Path(directory) / plotly_js_name()
    check_plotly_js(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(get_plotlyjs().encode())
        os.chmod(tmp, FILE_MODE)
        try:
            os.link(tmp, target)
        except FileExistsError:  # another page's writer made it meanwhile
            check_plotly_js(target)
    finally:
        os.unlink(tmp)
    return target


def _is_plotly_js(path: Path) -> bool:
    from plotly.offline import get_plotlyjs

    return path.is_file() and path.read_bytes() == get_plotlyjs().encode()


def table_html(df: pd.DataFrame, *, header: bool = True) -> str:
    """A DataFrame as a plain HTML table; floats to 4 significant digits, the index kept when
    it names something (not 0..n-1). Without `header`, a table of facts (text, left-aligned)."""
    index = not isinstance(df.index, pd.RangeIndex)
    return df.to_html(index=index, header=header, border=0, na_rep="",
                      classes="table" if header else "table facts",
                      float_format=lambda v: f"{v:.4g}", escape=True)  # fmt: skip


def _setting(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value) or "(none)"
    return str(value)


_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;"
    "max-width:1150px;padding:0 1em;color:#222;line-height:1.45}"
    "h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}"
    "table.table{border-collapse:collapse;margin:.6em 0;font-size:.9em}"
    "table.table td,table.table th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
    "table.table th{background:#f4f4f4}table.facts td{text-align:left}.figure{margin:1em 0}p{max-width:60em}"
)


# ---------------------------------------------------------------------------------- figures
def signed_heatmap(
    maps: Mapping[str, tuple[str, np.ndarray]],
    *,
    x: Sequence[str],
    y: Sequence[str],
    title: str,
    x_title: str,
    y_title: str,
    score: str,
):
    """A heatmap of signed scores with a selector: `maps` is choice -> (what the title adds
    for it, map [y, x]); every map shares one colour scale symmetric around 0. Row 0 on top."""
    import plotly.graph_objects as go

    names = list(maps)
    titles = [f"{title} — {maps[n][0]}" for n in names]
    peak = max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0
               for _, z in maps.values())  # fmt: skip
    peak = peak or 1.0
    hover = f"{y_title} %{{y}}, {x_title} %{{x}}: {score} %{{z:.3f}}<extra></extra>"
    fig = go.Figure([
        go.Heatmap(z=maps[n][1], x=list(x), y=list(y), coloraxis="coloraxis", visible=i == 0,
                   hovertemplate=hover, name=n)
        for i, n in enumerate(names)
    ])  # fmt: skip
    fig.update_layout(
        title=titles[0], coloraxis={"colorscale": SIGNED_SCALE, "cmin": -peak, "cmax": peak,
                                    "colorbar": {"title": score}},
        height=max(FIGURE_HEIGHT, 28 * len(y) + 160), xaxis_title=x_title, yaxis_title=y_title,
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    if len(names) > 1:
        buttons = [
            {"label": n, "method": "update",
             "args": [{"visible": [j == i for j in range(len(names))]}, {"title": titles[i]}]}
            for i, n in enumerate(names)
        ]  # fmt: skip
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right",
                                        "y": 1.12, "yanchor": "bottom"}])  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------- trace
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


# ---------------------------------------------------------------------------------- probe
def probe_page(result: ProbeResult, *, run: RunInfo | None = None, flu: str | None = None) -> Page:
    """The probe report: held-out accuracy per layer and site with chance, the table of it,
    and the FLU localization (`flu`, a sentence) when one was computed."""
    c = result.config
    about = [f"A linear probe (multinomial logistic regression) is fitted at each layer to read "
             f"object token {c.object_token} of relation {result.relation_name} from the "
             f"activation at position '{c.position}', on {int(result.train.sum())} training "
             f"subjects; each point is its accuracy on {int(result.test.sum())} held-out "
             f"subjects. The dotted line is chance ({result.chance:.3f}): always answering the "
             "training set's most frequent class."]  # fmt: skip
    page = Page(f"Probes: {result.relation_name}, object token {c.object_token}", run=run,
                about=about, settings=c.to_dict())  # fmt: skip
    table = result.to_dataframe().pivot(index="layer", columns="site", values="accuracy")
    fig = result.plot()
    fig.update_layout(xaxis_title="layer (the residual stream entering it)",
                      yaxis_title="held-out accuracy")  # fmt: skip
    page.section("Held-out accuracy per layer", fig, table)
    if flu is not None:
        page.section("Fact-lookup (FLU) localization", flu)
    return page


# ---------------------------------------------------------------------------------- restore
def restore_page(result: KRSResult, *, run: RunInfo | None = None, edit: str | None = None) -> Page:
    """The restoration report: KRS per window centre and setting, its table, and the edit
    that made the edited model (`edit`, a sentence) when the command made it."""
    n = len(result.edited_loss) - result.n_excluded
    about = ["Each point restores the vanilla model's activations of one setting (MLP "
             "coefficients, value vectors, attention outputs, or several) into the edited model, "
             "in a window of layers centred on the layer on the x axis, and scores the "
             "Knowledge Recovery Score (Dissecting eq. 3): KRS = 1 − mean restored loss / mean "
             f"edited loss, the loss being the MSE to the vanilla logits over "
             f"{result.config.n_tokens} continuation tokens, averaged over {n} prompts. 1: the "
             "window alone undoes the edit; 0: it recovers nothing; below 0: it moves further "
             "away."]  # fmt: skip
    if result.n_excluded:
        about.append(f"{result.n_excluded} prompts the edit left unchanged are left out.")
    page = Page("Knowledge Recovery Scores", run=run, about=about,
                settings=result.config.to_dict())  # fmt: skip
    if edit is not None:
        page.section("The edit", edit)
    fig = result.plot()
    fig.update_layout(height=FIGURE_HEIGHT + 40)
    fig.update_yaxes(title_text="KRS", col=1)
    fig.update_xaxes(title_text="window centre (layer)")
    table = result.to_dataframe().pivot_table(index=["window", "setting"], columns="layer",
                                              values="krs", sort=False)  # fmt: skip
    table.columns = [f"L{c}" for c in table.columns]
    page.section("KRS per window", fig, table.reset_index())
    return page


# ---------------------------------------------------------------------------------- edit
def edit_page(report: EditReport, *, run: RunInfo | None = None, task: str | None = None) -> Page:
    """The edit report: every rate as bars and as a table, the task (`task`, a sentence)."""
    about = ["Every rate is exact, over the world's ground truth. success: edited tuples whose "
             "new object is now top-1 (top-2); forget rate: edited tuples whose old object is no "
             "longer top-1; remaining: top-1 accuracy on the tuples the edit must not change, "
             "after the edit (before it: remaining_before); dependent: tuples implied by an "
             "edited one (correlated partner, nested tuple); success/<template>: success in "
             "other phrasings and the multiple-choice format, before/<template> the unedited "
             "model's accuracy there."]  # fmt: skip
    page = Page(f"Edit '{report.task}' by {report.method}", run=run, about=about,
                settings=report.settings)  # fmt: skip
    if task is not None:
        page.section("The task", task)
    fig = report.plot()
    fig.update_layout(xaxis_title="metric", yaxis_title="rate")
    page.section("Rates", fig, report.to_dataframe()[["metric", "value"]])
    changed = pd.DataFrame({"parameter": list(report.changed),
                            "elements changed": list(report.changed.values())})  # fmt: skip
    page.section("Parameters changed", f"{report.params_changed:,} elements in "
                 f"{len(report.changed)} tensors.", changed)  # fmt: skip
    return page
