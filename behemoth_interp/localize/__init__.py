"""Localizations as objects: which components (MLPs, attentions, single heads) an edit may
change, where that choice came from, and parameter matching (Mechanistic Unlearning 2.2).

- `components`: `Component`, the unit of localization, and the HF weights it owns;
- `localization`: `ComponentSet`, a localization with its source and scores, `match`ed to a
  parameter budget;
- `sources`: the constructors (output tracing, FLU, random, random MLPs, all MLPs,
  nonlocalized), registered in `LOCALIZATIONS`.
"""

from behemoth_interp.localize.components import COMPONENT_KINDS, Component
from behemoth_interp.localize.localization import ComponentSet
from behemoth_interp.localize.sources import (
    LOCALIZATIONS,
    all_mlps,
    from_flu,
    from_trace,
    nonlocalized,
    random_components,
    random_mlps,
)

__all__ = [
    "COMPONENT_KINDS", "LOCALIZATIONS", "Component", "ComponentSet", "all_mlps", "from_flu",
    "from_trace", "nonlocalized", "random_components", "random_mlps",
]  # fmt: skip
