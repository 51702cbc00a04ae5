"""The restoration report: KRS per window centre and setting, and the edit it undoes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from behemoth_interp.report.page import FIGURE_HEIGHT, Page, RunInfo

if TYPE_CHECKING:
    from behemoth_interp.restore import KRSResult


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
