"""The residual-knowledge report: every part of the battery, its numbers beside the unedited
model's, the relearning attack, latent knowledge and KRS, and what could not be measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from behemoth_interp.report.page import Page, RunInfo

if TYPE_CHECKING:
    from behemoth_interp.residual.battery import ResidualKnowledge


def residual_page(result: ResidualKnowledge, *, run: RunInfo | None = None) -> Page:
    """The battery's page: the overview bars and table, then each part's own figure."""
    r = result.report
    about = ["Is the knowledge removed, or hidden at the output? Every number is exact, over the "
             "world's ground truth. edit: forget rate (changed tuples whose original object is no "
             "longer top-1), edit success (the new object top-1), maintain (top-1 on tuples the "
             "edit must not change), paraphrase and MCQ success (the new object in other "
             "formats; before: the unedited model's accuracy on the original objects there). "
             "oracle: agreement and KL with the model trained on the world as the edit says it "
             "should be. neighbourhood: the edited subjects' other facts and the edited "
             "relation's facts of subjects sharing a token, kept (accuracy) or answering the edit "
             "(edit error). relearn: top-1 on the true objects of changed tuples the attack never "
             "trained on, after (before) it, on the edited model and on the never-knew oracle. "
             "latent: probes fitted on the unedited model decoding the original or new object on "
             "the edited one. krs: the best Knowledge Recovery Score over window centres."]  # fmt: skip
    page = Page(f"Residual knowledge after {r.method} on '{r.task}'", run=run, about=about,
                settings={"battery": result.config.to_dict(), "edit": r.settings})  # fmt: skip
    page.section("Overview", result.plot(), result.to_dataframe())
    if result.undefined:
        page.section("Not measured", pd.DataFrame({"part": list(result.undefined),
                                                   "why": list(result.undefined.values())}))  # fmt: skip
    if result.attack is not None:
        page.section("Relearning attack", f"{result.attack.config.sentences} training sentences "
                     f"on {len(result.attack.trained)} tuples with their true objects; chance on "
                     f"the held-out ones is {result.attack.chance:.3f}.", result.attack.plot(),
                     result.attack.to_dataframe())  # fmt: skip
    if result.latent is not None:
        page.section("Latent knowledge", result.latent.plot())
    if result.krs is not None:
        page.section("Knowledge recovery", result.krs.plot(), result.krs.to_dataframe())
    return page
