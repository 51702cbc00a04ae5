"""The residual-knowledge battery: every test of whether an edit removed a fact or hid it, on
one edited model against its original, as one result (Mechanistic Unlearning sections 3.1-3.3,
Dissecting Fine-Tuning Unlearning section 3).

- the edit report: forget and edit accuracy, maintain accuracy, paraphrase and MCQ accuracy
  beside the unedited model's, and the distance to the exact oracle when one is given;
- the neighbourhood (`neighbourhood.py`): near facts kept, and not answering the edit;
- the relearning attack (`relearn.py`), against the oracle when one is given;
- latent knowledge: probes fitted on the unedited model, read on the edited one, per layer;
- KRS: how much of the unedited output restoring its activations brings back, per setting.

A part that cannot be measured is recorded in `undefined` with the reason, never as a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.evaluation import EditBaseline, evaluate_edit
from behemoth_interp.edit.report import EditReport
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import check_int
from behemoth_interp.evaluate import FactScores
from behemoth_interp.grammar import PARAPHRASES
from behemoth_interp.model import hooked_in_world
from behemoth_interp.probe import LatentKnowledge, ProbeResult, latent_knowledge, probe
from behemoth_interp.residual.neighbourhood import neighbourhood_scores
from behemoth_interp.residual.relearn import RelearnConfig, RelearnResult, relearn
from behemoth_interp.restore import SETTINGS, KRSResult, restore


@dataclass(frozen=True)
class BatteryConfig(JsonConfig):
    """What the battery runs: `max_remaining` unchanged tuples scored for maintain accuracy
    (None: all), `neighbours` per neighbourhood, the `attack` (None: no relearning), KRS
    `krs_settings` over windows `krs_windows` on `krs_prompts` edited prompts (no settings: no
    KRS), and the `seed` of every sample."""

    max_remaining: int | None = 500
    neighbours: int = 500
    attack: RelearnConfig | None = field(default_factory=RelearnConfig)
    krs_settings: tuple[str, ...] = SETTINGS
    krs_windows: tuple[int, ...] = (1, 3)
    krs_prompts: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_remaining is not None:
            check_int("max_remaining", self.max_remaining, 1)
        check_int("neighbours", self.neighbours, 1)
        check_int("krs_prompts", self.krs_prompts, 1)
        object.__setattr__(self, "krs_settings", tuple(self.krs_settings))
        object.__setattr__(self, "krs_windows", tuple(int(w) for w in self.krs_windows))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["attack"] = None if self.attack is None else self.attack.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["attack"] = None if d.get("attack") is None else RelearnConfig.from_dict(d["attack"])
        return super().from_dict(d)


@dataclass
class ResidualKnowledge:
    """The battery's parts (see the module docstring); `undefined` maps a part that has no
    number to the reason."""

    report: EditReport
    neighbourhood: pd.DataFrame
    attack: RelearnResult | None
    latent: LatentKnowledge | None
    krs: KRSResult | None
    undefined: dict[str, str]
    config: BatteryConfig

    def to_dataframe(self) -> pd.DataFrame:
        """One row per measured number: part, metric, value, and `before` (the unedited model's
        value where the battery has one)."""
        r = self.report
        rows = [("edit", "forget rate", r.forget_rate, 0.0),
                ("edit", "edit success", r.success_top1, None),
                ("edit", "maintain", r.remaining, r.remaining_before)]  # fmt: skip
        paraphrase = [t for t in PARAPHRASES if t in r.template_success]
        if paraphrase:
            rows.append(("edit", "paraphrase success",
                         np.mean([r.template_success[t] for t in paraphrase]),
                         _mean_or_none([r.template_before.get(t) for t in paraphrase])))  # fmt: skip
        if "mcq" in r.template_success:
            rows.append(("edit", "MCQ success", r.template_success["mcq"],
                         r.template_before.get("mcq")))  # fmt: skip
        if r.oracle_agreement is not None:
            rows += [("oracle", "agreement", r.oracle_agreement, None),
                     ("oracle", "KL", r.oracle_kl, None)]  # fmt: skip
        for n in self.neighbourhood.to_dict("records"):
            for metric in ("accuracy", "edit_error"):
                rows.append(("neighbourhood", f"{n['neighbourhood']} {metric}", n[metric],
                             n.get(f"{metric}_before")))  # fmt: skip
        if self.attack is not None:
            acc = self.attack.accuracy
            for model in acc.index.get_level_values("model").unique():
                for split in ("heldout", "remaining"):
                    rows.append(("relearn", f"{model} {split}", acc.loc[(model, split), "after"],
                                 acc.loc[(model, split), "before"]))  # fmt: skip
        if self.latent is not None:
            for site in self.latent.original:
                rows += [("latent", f"{site} original (last layer)", self.latent.original[site][-1],
                          None),
                         ("latent", f"{site} new (last layer)", self.latent.new[site][-1], None)]  # fmt: skip
        if self.krs is not None:
            best = self.krs.to_dataframe().groupby(["setting", "window"]).krs.max()
            for (setting, window), v in best.items():
                rows.append(("krs", f"{setting} window {window} (best centre)", v, None))
        df = pd.DataFrame(rows, columns=["part", "metric", "value", "before"])
        return df.astype({"value": float})

    def plot(self):
        """Every number of the battery as bars, one panel per part, the unedited model's beside
        where it has one."""
        import plotly.express as px

        df = self.to_dataframe()
        long = pd.concat([df.assign(model="edited"),
                          df.dropna(subset=["before"]).assign(value=lambda d: d["before"],
                                                              model="unedited")])  # fmt: skip
        fig = px.bar(long, x="metric", y="value", color="model", barmode="group",
                     facet_col="part", facet_col_wrap=3,
                     title=f"Residual knowledge after {self.report.method} on "
                           f"'{self.report.task}'")  # fmt: skip
        fig.update_xaxes(matches=None, showticklabels=True)
        return fig


def unedited_probes(model, task: EditTask, seed: int = 0) -> ProbeResult:
    """Probes of the unedited `model` (a HookedTransformer of the task's world) for the
    battery's latent knowledge: on every subject for a forget task, holding out the edited
    subjects otherwise (their new objects must not be what the probes learned)."""
    exclude = () if task.kind == "forget" else task.facts[:, 0]
    return probe(model, task.relation, exclude=exclude, seed=seed)


def _mean_or_none(values) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def residual_knowledge(
    edited: GPTNeoXForCausalLM,
    task: EditTask,
    *,
    before: GPTNeoXForCausalLM,
    oracle: GPTNeoXForCausalLM | None = None,
    probes: ProbeResult | None = None,
    settings: dict[str, Any] | None = None,
    config: BatteryConfig = BatteryConfig(),
    baseline: EditBaseline | None = None,
    scores: FactScores | None = None,
) -> ResidualKnowledge:
    """Run the battery on `edited`, an edit of `task` of the unedited model `before` (both HF
    models of the task's world). `oracle` (`bi.oracle`) adds the distance to it and is the
    relearning attack's never-knew baseline; `probes` (`bi.probe` on `before`, e.g.
    `unedited_probes`) add latent knowledge; `settings` (the edit's, e.g.
    `EditResult.report.settings`) name its method. `baseline` (`edit_baseline(before, task,
    max_remaining=config.max_remaining, seed=config.seed)`) and `scores` (a `FactScores` of
    `edited`) let a caller that already computed them (a sweep worker) skip recomputing them.
    Returns a `ResidualKnowledge`."""
    w, seed = task.world, config.seed
    undefined: dict[str, str] = {}
    report = evaluate_edit(edited, task, before=before, oracle=oracle, settings=settings,
                           max_remaining=config.max_remaining, seed=seed, baseline=baseline,
                           scores=scores)  # fmt: skip
    near = neighbourhood_scores(edited, task, before=before, limit=config.neighbours, seed=seed)
    if near.empty:
        undefined["neighbourhood"] = "the edit has no untouched facts near it"
    attack = None
    if config.attack is None:
        undefined["relearn"] = "not run (config.attack is None)"
    elif task.changed.sum() < 2:
        undefined["relearn"] = (f"the task changes {int(task.changed.sum())} tuple: the attack "
                                "needs some to train on and others to score")  # fmt: skip
    else:
        attack = relearn(edited, task, config=config.attack, baseline=oracle)
    unchanged = all(torch.equal(a, b) for a, b in zip(before.parameters(), edited.parameters()))
    run_krs = bool(config.krs_settings) and not unchanged
    # both the probes and KRS read the edited model as a HookedTransformer: convert it once
    hooked = hooked_in_world(edited, w) if probes is not None or run_krs else None
    latent = None
    if probes is None:
        undefined["latent"] = "no probes given: fit bi.probe on the unedited model and pass them"
    else:
        latent = latent_knowledge(probes, hooked, task)
    krs = None
    if not config.krs_settings:
        undefined["krs"] = "not run (no krs_settings)"
    elif unchanged:
        undefined["krs"] = ("undefined: the edited model has the unedited model's parameters, "
                            "so restoring them recovers nothing of nothing")  # fmt: skip
    else:
        krs = restore(hooked_in_world(before, w), hooked, task,
                      settings=config.krs_settings, windows=config.krs_windows,
                      n_prompts=config.krs_prompts, seed=seed)  # fmt: skip
    return ResidualKnowledge(report, near, attack, latent, krs, undefined, config)
