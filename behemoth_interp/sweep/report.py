"""The sweep report: every figure a store can draw, per model, on one self-contained page."""

from __future__ import annotations

import html
from pathlib import Path

from behemoth_interp.errors import BehemothError

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
)  # fmt: skip


def report_html(result) -> str:
    """A `SweepResult` as one HTML page: counts of runs, failures, the selection rule, then
    each figure of each model (a figure the store has no runs for is named and skipped)."""
    title = f"Sweep report: {html.escape(result.source or 'records')}"
    return _page([f"<h1>{title}</h1>", *_sections(result, 2, [True])])


def reproduce_html(results: dict, title: str) -> str:
    """Several stores (spec name -> `SweepResult`) on one page, a section each."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<ul>"]
    parts += [f"<li><a href='#{html.escape(n)}'>{html.escape(n)}</a></li>" for n in results]
    parts.append("</ul>")
    first_js = [True]
    for name, result in results.items():
        parts.append(f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>")
        parts += _sections(result, 3, first_js)
    return _page(parts)


def _sections(result, level: int, first_js: list[bool]) -> list[str]:
    """The body of one store's report, its headings from `<h{level}>` down; plotly.js goes
    inline into the first figure of the page (`first_js` is the page's flag)."""
    h, h2 = f"h{level}", f"h{level + 1}"
    df = result.to_dataframe()
    if not len(df):
        return ["<p>The store holds no runs yet.</p>"]
    counts = df.groupby(["task", "method", "status"]).size().unstack(fill_value=0)
    sel = result.selection
    parts = [
        f"<p>{len(df)} runs: {int((df.status == 'ok').sum())} ok, "
        f"{int((df.status == 'failed').sum())} failed. Best run per cell: highest "
        f"{sel.criterion}, then remaining accuracy, on {sel.data} data, over "
        f"{', '.join(sel.over)}, per {sel.per}.</p>",
        counts.to_html(),
    ]
    failed = df[df.status == "failed"]
    if len(failed):
        parts.append(f"<{h}>Failed runs</{h}>")
        parts.append(failed[["key", "task", "method", "blocks", "components", "seed",
                             "error_type", "error"]].head(50).to_html(index=False))  # fmt: skip
    for model in dict.fromkeys(df.model):
        parts.append(f"<{h}>{html.escape(str(model))}</{h}>")
        for name, caption in FIGURES:
            try:
                fig = getattr(result, name)(model=model)
            except BehemothError as err:
                parts.append(f"<p><em>{name}: not drawn ({html.escape(str(err))})</em></p>")
                continue
            parts.append(f"<{h2}>{name}</{h2}><p>{html.escape(caption)}</p>")
            parts.append(fig.to_html(full_html=False,
                                     include_plotlyjs="inline" if first_js[0] else False))  # fmt: skip
            first_js[0] = False
    return parts


def _page(parts: list[str]) -> str:
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>\n{body}\n"
            f"</body></html>\n")  # fmt: skip


def write_report(result, path: str | Path) -> Path:
    """Write `report_html(result)` to `path` atomically, marked as ours."""
    from behemoth_interp._io import write_page

    path = Path(path)
    write_page(path, report_html(result))
    return path
