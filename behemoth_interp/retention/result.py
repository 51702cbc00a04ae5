"""The outcome of a downstream fine-tune after an edit: edited vs intrinsic retention over steps.

The retention rate of a set of facts is the fraction the model still predicts (top-1 at every
object token, teacher-forced) — the paper's knowledge retention rate (its eq. 1, with the
partitioned vocabulary's objects in place of first non-stop tokens). The per-fact record also
holds the probability of each edited fact's new and original object (the paper's Figure 4
distribution shift) at every evaluation, step 0 being the edited model before fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from behemoth_interp._io import read_json, write_json
from behemoth_interp.retention.sets import RetentionSet
from behemoth_interp.world import World

RETENTION_FORMAT = "behemoth-retention/1"
SETS = ("edited", "intrinsic")


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
        still predicted), p_target (mean probability of the object it should say), p_original
        (edited facts: of the object before the edit), downstream loss and accuracy."""
        rows = []
        for entry in self.history:
            for name in SETS:
                t = entry["track"][name]
                rows.append({
                    "step": entry["step"], "set": name, "n": len(t["rank"]),
                    "retention": float(np.mean(np.asarray(t["rank"]) == 0)),
                    "p_target": float(np.mean(np.exp(t["logp"]))),
                    "p_original": float(np.mean(np.exp(t["logp_original"])))
                    if "logp_original" in t else np.nan,
                    "downstream_loss": entry.get("loss", np.nan),
                    "downstream_accuracy": entry.get("accuracy", np.nan),
                })  # fmt: skip
        return pd.DataFrame(rows)

    def facts_dataframe(self) -> pd.DataFrame:
        """One row per evaluation and fact: step, set, subject, relation, object (the one it
        should say), original (edited facts), rank, p_target, p_original."""
        f = self.facts
        rows = []
        for entry in self.history:
            for name, facts in (("edited", f.edited), ("intrinsic", f.intrinsic)):
                t = entry["track"][name]
                df = pd.DataFrame({"step": entry["step"], "set": name, "subject": facts[:, 0],
                                   "relation": facts[:, 1], "object": facts[:, 2],
                                   "rank": t["rank"], "p_target": np.exp(t["logp"])})  # fmt: skip
                if name == "edited":
                    df["original"] = f.original
                    df["p_original"] = np.exp(t["logp_original"])
                rows.append(df)
        return pd.concat(rows, ignore_index=True)

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
        as curves), and the edited facts' probabilities of their new and original objects
        (its Figure 4)."""
        from plotly.subplots import make_subplots

        df = self.to_dataframe()
        s = self.summary()
        fig = make_subplots(rows=1, cols=2, subplot_titles=(
            f"Retention (n = {s['n_edited']} edited, {s['n_intrinsic']} intrinsic)",
            "Edited facts: p(new object), p(original object)"))  # fmt: skip
        for name, colour in zip(SETS, ("#d62728", "#1f77b4")):
            part = df[df.set == name]
            fig.add_scatter(x=part.step, y=part.retention, name=f"{name} retention",
                            line={"color": colour}, row=1, col=1)  # fmt: skip
        edited = df[df.set == "edited"]
        for column, dash in (("p_target", "solid"), ("p_original", "dot")):
            fig.add_scatter(x=edited.step, y=edited[column], name=column.replace("_", "(") + ")",
                            line={"color": "#d62728", "dash": dash}, row=1, col=2)  # fmt: skip
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
