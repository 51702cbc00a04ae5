"""The edit report: every rate of an `EditReport` as bars and a table, the parameters changed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from behemoth_interp.report.page import Page, RunInfo

if TYPE_CHECKING:
    from behemoth_interp.edit.report import EditReport


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
