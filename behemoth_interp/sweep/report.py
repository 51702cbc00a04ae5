"""The sweep report: every figure a store can draw, per model, on one report page."""

from __future__ import annotations

import html
from pathlib import Path

from behemoth_interp.errors import BehemothError
from behemoth_interp.report import Html, Page, RunInfo

FIGURES = (
    ("figure_blocks", "Success and remaining accuracy against the number of tuned blocks "
     "(Figures 4 and 8): line, the best block subset of that size; band, all of them."),
    ("block_correlation", "Correlation of \u201cblock b was tuned\u201d with each metric over "
     "block subsets (Figures 5, 6 and 9)."),
    ("lora_ranks", "LoRA at each rank: the best block subset of each size (Figures 7 and 10)."),
    ("dependents", "Success, dependent tuples and remaining accuracy of the widest selection "
     "of each method (Figures 2 and 3), mean over seeds with bootstrap intervals."),
    ("move_rank", "Move rank per block and matrix with every block tuned, and relative to it "
     "when fewer are (Figure 12)."),
    ("retention", "Retention of the edited facts and of matched intrinsic facts after each "
     "downstream fine-tune (the retention paper's Figure 2 and Table 1)."),
    ("residual", "The residual-knowledge battery of each localization or variant: edit, "
     "neighbourhood, relearning attack, latent knowledge and KRS (Mechanistic Unlearning "
     "Figures 2-6, Dissecting Figure 1), mean over seeds with bootstrap intervals."),
    ("tradeoff", "Forget rate against maintain accuracy of every forget run (Dissecting "
     "Figure 2)."),
)  # fmt: skip
ABOUT = (
    "Each run of the store is one edit of one model (task, method, its settings, the blocks "
    "and components tuned, a seed), scored over the world's exact ground truth. The figures "
    "show the best run of each cell under the selection rule stated per store: success is the "
    "share of edited tuples whose new object is top-1, remaining accuracy the top-1 accuracy "
    "on the tuples the edit must not change.",
)


def sweep_page(result, *, run: RunInfo | None = None) -> Page:
    """A `SweepResult` as a report page: counts of runs, failures, the selection rule, then
    each figure of each model (a figure the store has no runs for is named and skipped)."""
    page = Page(f"Sweep report: {result.source or 'records'}", run=run, about=ABOUT,
                settings={"store": result.source or "(records)", **_selection(result)})  # fmt: skip
    _sections(page, result, 2)
    return page


def reproduce_page(results: dict, title: str, *, run: RunInfo | None = None) -> Page:
    """Several stores (spec name -> `SweepResult`) on one page, a section each."""
    page = Page(title, run=run, about=ABOUT, settings={"stores": list(results)})
    links = "".join(f"<li><a href='#{html.escape(n)}'>{html.escape(n)}</a></li>" for n in results)
    page.add(Html(f"<ul>{links}</ul>"))
    for name, result in results.items():
        page.add(Html(f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>"))
        _sections(page, result, 3)
    return page


def report_html(result) -> str:
    """`sweep_page(result)` as HTML with plotly.js inline."""
    return sweep_page(result).html()


def reproduce_html(results: dict, title: str) -> str:
    """`reproduce_page(results, title)` as HTML with plotly.js inline."""
    return reproduce_page(results, title).html()


def _selection(result) -> dict[str, str]:
    sel = result.selection
    return {"selection": f"highest {sel.criterion}, then remaining accuracy, on {sel.data} "
                         f"data, over {', '.join(sel.over)}, per {sel.per}"}  # fmt: skip


def _sections(page: Page, result, level: int) -> None:
    """The body of one store's report, its headings from `<h{level}>` down."""
    df = result.to_dataframe()
    if not len(df):
        page.add("The store holds no runs yet.")
        return
    counts = df.groupby(["task", "method", "status"]).size().unstack(fill_value=0)
    page.add(f"{len(df)} runs: {int((df.status == 'ok').sum())} ok, "
             f"{int((df.status == 'failed').sum())} failed. Best run per cell: "
             f"{_selection(result)['selection']}.", counts)  # fmt: skip
    failed = df[df.status == "failed"]
    if len(failed):
        page.section("Failed runs", failed[["key", "task", "method", "blocks", "components",
                     "seed", "error_type", "error"]].head(50), level=level)  # fmt: skip
    for model in dict.fromkeys(df.model):
        page.section(str(model), level=level)
        for name, caption in FIGURES:
            try:
                fig = getattr(result, name)(model=model)
            except BehemothError as err:
                page.add(Html(f"<p><em>{name}: not drawn ({html.escape(str(err))})</em></p>"))
                continue
            page.section(name, caption, fig, level=level + 1)


def write_report(result, path: str | Path, *, offline: bool = False) -> Path:
    """Write `sweep_page(result)` to `path` atomically, marked as ours (plotly.js beside it,
    or inline with `offline`)."""
    return sweep_page(result).write(path, offline=offline)
