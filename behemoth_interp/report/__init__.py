"""Report pages: one builder (`Page`) for every command that writes HTML, and the pages of
trace, probe, restoration, edit, retention and residual-knowledge results, one module each.

`report_page(result, ...)` picks the page of a result by its type (the `PAGES` registry), so
a notebook writes any result's report as the command line does:
`bi.report_page(trace_result).write(path)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from behemoth_interp.errors import InvalidArgument
from behemoth_interp.report.edit import edit_page
from behemoth_interp.report.figures import SIGNED_SCALE, signed_heatmap
from behemoth_interp.report.page import (
    FIGURE_HEIGHT,
    Html,
    Page,
    RunInfo,
    check_plotly_js,
    plotly_js_name,
    table_html,
    write_plotly_js,
)
from behemoth_interp.report.probe import probe_page
from behemoth_interp.report.residual import residual_page
from behemoth_interp.report.restore import restore_page
from behemoth_interp.report.retention import retention_page
from behemoth_interp.report.trace import trace_page

PAGES: dict[str, Callable[..., Page]] = {
    "TraceResult": trace_page,
    "ProbeResult": probe_page,
    "KRSResult": restore_page,
    "EditReport": edit_page,
    "RetentionResult": retention_page,
    "ResidualKnowledge": residual_page,
}
"""The page of each result type, by the type's name."""


def report_page(result: Any, **kwargs: Any) -> Page:
    """The report page of `result` (a trace, probe, KRS, edit, retention or
    residual-knowledge result); `kwargs` go to its
    page function (e.g. `run=RunInfo.of(model)`)."""
    name = type(result).__name__
    if name not in PAGES:
        raise InvalidArgument(
            f"no report page for a {name}: pass one of {', '.join(PAGES)}, or build a Page"
        )
    return PAGES[name](result, **kwargs)


__all__ = [
    "FIGURE_HEIGHT",
    "PAGES",
    "SIGNED_SCALE",
    "Html",
    "Page",
    "RunInfo",
    "check_plotly_js",
    "edit_page",
    "report_page",
    "plotly_js_name",
    "probe_page",
    "residual_page",
    "restore_page",
    "retention_page",
    "signed_heatmap",
    "table_html",
    "trace_page",
    "write_plotly_js",
]
