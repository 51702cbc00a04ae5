"""Is the knowledge really gone? Evidence that an edit or unlearning run removed a fact rather
than hid it at the output (Mechanistic Unlearning; Dissecting Fine-Tuning Unlearning).

- `relearn`: the relearning attack, scored on tuples it never trained on, against a model that
  never knew them;
- `neighbourhood`: the facts near an edit that it must leave alone, and whether they now
  answer the edit's object;
- `battery`: all of it, with latent-knowledge probes and KRS, as one `ResidualKnowledge`.
"""

from behemoth_interp.residual.battery import (
    BatteryConfig,
    ResidualKnowledge,
    residual_knowledge,
    unedited_probes,
)
from behemoth_interp.residual.neighbourhood import NEIGHBOURHOODS, neighbourhood_scores, neighbours
from behemoth_interp.residual.relearn import SPLITS, RelearnConfig, RelearnResult, relearn

__all__ = ["NEIGHBOURHOODS", "SPLITS", "BatteryConfig", "RelearnConfig", "RelearnResult",
           "ResidualKnowledge", "neighbourhood_scores", "neighbours", "relearn",
           "residual_knowledge", "unedited_probes"]  # fmt: skip
