"""The outcome of a downstream fine-tune after an edit: edited vs intrinsic retention over steps.

The retention rate of a set of facts is the fraction the model still predicts (top-1 at every
object token, teacher-forced) — the paper's knowledge retention rate (its eq. 1, with the
partitioned vocabulary's objects in place of first non-stop tokens). The per-fact record also
holds where the probability sits at every evaluation, step 0 being the edited model before
fine-tuning: on the new object, the original one, the relation's other objects, anything else
(the paper's Figure 4 distribution shift), and the most probable objects (its Table 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from behemoth_interp._io import read_json, write_json
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.retention.sets import RetentionSet
from behemoth_interp.world import World

RETENTION_FORMAT = "behemoth-retention/1"
SETS = ("edited", "intrinsic")
# where a fact's probability sits (the paper's Figure 3 token types, exact in a world)
CATEGORIES = ("p_target", "p_original", "p_related", "p_other")


@dataclass
class RetentionResult:
    """`history`: one entry per evaluation (step 0 first) with the downstream `loss` and
    `accuracy` and `track`, the per-fact answers of `RetentionSet.score`; `stopped`: why the
    fine-tune ended early (None: it ran its steps); `settings`: what was run."""

    facts: RetentionSet
    history: list[dict[str, Any]]
    stopped: dict[str, Any] | None
    settings: dict[str, Any]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per evaluation and set ('edited', 'intrinsic'): step, retention (the fraction
        still predicted), and the mean probability of the object it should say (p_target), of
        the object before the edit (p_original, edited facts), of the relation's other objects
        (p_related) and of everything else (p_other): the paper's Figure 4 categories; then the
        downstream loss and accuracy. Records written before the distribution was kept have
        NaN for p_related and p_other."""
        df = self.facts_dataframe()
        means = df.groupby(["step", "set"], sort=False)[list(CATEGORIES)].mean()
        out = (
            df.groupby(["step", "set"], sort=False)
            .agg(n=("rank", "size"), retention=("rank", lambda r: float(np.mean(r == 0))))
            .join(means)
            .reset_index()
        )
        losses = pd.DataFrame([{"step": e["step"], "downstream_loss": e.get("loss", np.nan),
                                "downstream_accuracy": e.get("accuracy", np.nan)}
                               for e in self.history])  # fmt: skip
        return out.merge(losses, on="step", how="left")

    def facts_dataframe(self) -> pd.DataFrame:
        """One row per evaluation and fact: step, set, subject, relation, object (the one it
        should say), original (edited facts), rank, p_target, p_original, p_related, p_other."""
        f = self.facts
        rows = []
        for entry in self.history:
            for name, facts in (("edited", f.edited), ("intrinsic", f.intrinsic)):
                t = entry["track"][name]
                df = pd.DataFrame({"step": entry["step"], "set": name, "subject": facts[:, 0],
                                   "relation": facts[:, 1], "object": facts[:, 2],
                                   "original": f.original if name == "edited" else -1,
                                   "rank": t["rank"], "p_target": np.exp(t["logp"]),
                                   "p_original": np.exp(t["logp_original"]) if name == "edited"
                                   else 0.0,
                                   "p_related": t.get("p_related", np.nan)})  # fmt: skip
                df["p_other"] = (1 - df.p_target - df.p_original - df.p_related).clip(lower=0)
                if name == "intrinsic":
                    df["p_original"] = np.nan
                rows.append(df)
        return pd.concat(rows, ignore_index=True)

    def top_objects(self, fact: int = 0, which: str = "edited") -> pd.DataFrame:
        """The most probable objects of one fact (`fact`-th of set `which`) at every evaluation,
        each with its probability and kind (target, original, related, other): the paper's
        Table 2, exactly. Needs a record that kept the distribution."""
        facts = {"edited": self.facts.edited, "intrinsic": self.facts.intrinsic}[which]
        target, relation = int(facts[fact, 2]), int(facts[fact, 1])
        original = int(self.facts.original[fact]) if which == "edited" else -1
        candidates = set(self.facts.world.candidate_objects(relation).tolist())
        rows = []
        for entry in self.history:
            t = entry["track"][which]
            if "top" not in t:
                raise InvalidArgument("this retention record predates the object distribution: "
                                      "run the fine-tune again to see its top objects")  # fmt: skip
            for rank, (obj, p) in enumerate(t["top"][fact], start=1):
                kind = ("target" if obj == target else "original" if obj == original
                        else "related" if obj in candidates else "other")  # fmt: skip
                rows.append({"step": entry["step"], "rank": rank, "object": obj,
                             "probability": p, "kind": kind})  # fmt: skip
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """Retention of both sets after the fine-tune, its length and why it ended."""
        df = self.to_dataframe()
        last = df[df.step == df.step.max()].set_index("set")
        return {"edited_retention": float(last.loc["edited", "retention"]),
                "intrinsic_retention": float(last.loc["intrinsic", "retention"]),
                "n_edited": int(last.loc["edited", "n"]), "n_intrinsic": int(last.loc["intrinsic", "n"]),
                "dropped": self.facts.dropped, "steps": int(df.step.max()),
                "stopped": None if self.stopped is None else self.stopped["reason"]}  # fmt: skip

    def plot(self):
        """Retention of edited and intrinsic facts over fine-tuning steps (the paper's Figure 2
        as curves), and where each set's probability sits (its Figure 4: the object it should
        say, the object before the edit, the relation's other objects, everything else)."""
        from plotly.subplots import make_subplots

        df = self.to_dataframe()
        s = self.summary()
        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            f"Retention (n = {s['n_edited']} edited, {s['n_intrinsic']} intrinsic)",
            "Edited facts: probability by object kind",
            "Intrinsic facts: probability by object kind"))  # fmt: skip
        for name, colour in zip(SETS, ("#d62728", "#1f77b4")):
            part = df[df.set == name]
            fig.add_scatter(x=part.step, y=part.retention, name=f"{name} retention",
                            line={"color": colour}, row=1, col=1)  # fmt: skip
        styles = {"p_target": ("#2ca02c", "target"), "p_original": ("#9467bd", "original"),
                  "p_related": ("#ff7f0e", "related"), "p_other": ("#7f7f7f", "other")}  # fmt: skip
        for col, name in ((2, "edited"), (3, "intrinsic")):
            part = df[df.set == name]
            for column, (colour, label) in styles.items():
                if part[column].notna().any():
                    fig.add_scatter(x=part.step, y=part[column], name=f"{name}: {label}",
                                    line={"color": colour, "dash": "solid" if name == "edited"
                                          else "dot"}, row=1, col=col)  # fmt: skip
        fig.update_yaxes(range=[0, 1.02])
        fig.update_xaxes(title_text="downstream fine-tuning step")
        fig.update_layout(title=f"Retention after {self.settings.get('downstream', {}).get('task')}"
                          " fine-tuning", height=420)  # fmt: skip
        return fig

    def save(self, path: str | Path) -> None:
        write_json(path, {"format": RETENTION_FORMAT, "facts": self.facts.to_dict(),
                          "history": self.history, "stopped": self.stopped,
                          "settings": self.settings})  # fmt: skip

    @classmethod
    def load(cls, path: str | Path, world: World) -> RetentionResult:
        d = read_json(path, what="retention result", format=RETENTION_FORMAT)
        return cls(RetentionSet.from_dict(d["facts"], world), d["history"], d["stopped"],
                   d["settings"])  # fmt: skip
