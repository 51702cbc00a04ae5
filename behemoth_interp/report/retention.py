"""The retention report: edited vs intrinsic retention over a downstream fine-tune."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from behemoth_interp.report.page import Page, RunInfo

if TYPE_CHECKING:
    from behemoth_interp.retention.result import RetentionResult


def retention_page(result: RetentionResult, *, run: RunInfo | None = None) -> Page:
    """Retention curves of both sets, the per-fact answers before and after, the settings."""
    s = result.summary()
    task = result.settings.get("downstream", {}).get("task")
    about = [
        "Retention is the fraction of a set of facts the model still predicts (top-1 at every "
        "object token, teacher-forced): 1 is everything kept, 0 nothing. The edited set holds "
        "the edited tuples with their new objects; the intrinsic set, true tuples of the same "
        "relation the edit did not touch, matched to them by confidence margin. Both are kept "
        f"only if the edited model predicts them with a margin of {result.facts.min_margin} or "
        f"more ({s['dropped']} edited tuples fell below it). Step 0 is the edited model before "
        f"the downstream fine-tune ({task}), whose data names none of these subjects, their "
        "relation, or their objects.",
    ]
    page = Page(f"Retention after {task} fine-tuning", run=run, about=about,
                settings=result.settings)  # fmt: skip
    ended = "ran all its steps" if s["stopped"] is None else f"stopped: {s['stopped']}"
    summary = pd.DataFrame([{"set": name, "facts": s[f"n_{name}"],
                             "retention after": s[f"{name}_retention"]}
                            for name in ("edited", "intrinsic")])  # fmt: skip
    page.section("Retention over the fine-tune",
                 f"{s['steps']} steps; the fine-tune {ended}.", result.plot(), summary)  # fmt: skip
    facts = result.facts_dataframe()
    ends = facts[facts.step.isin([0, facts.step.max()])]
    page.section("Each fact, before and after", "rank 0 is predicted; p_target is the "
                 "probability of the object it should say, p_original (edited facts) that of "
                 "its object before the edit, p_related that of the relation's other objects, "
                 "p_other the rest (tokens that start no object).", ends)  # fmt: skip
    if all("top" in e["track"]["edited"] for e in result.history):
        top = result.top_objects(0)
        page.section("The first edited fact's most probable objects", "At every evaluation "
                     "(the retention paper's Table 2, exact): which objects the model says, "
                     "with their probability and kind (target: the edit's new object; "
                     "original: the one before it; related: another object of the relation).",
                     top)  # fmt: skip
    return page
