"""The probe report: held-out accuracy per layer and site with chance, and the FLU localization."""

from __future__ import annotations

from typing import TYPE_CHECKING

from behemoth_interp.report.page import Page, RunInfo

if TYPE_CHECKING:
    from behemoth_interp.probe import ProbeResult


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
