"""Localization against editability (docs/unlearning.md): the Spearman correlation, over single
components, of each localization's scores with the outcomes of editing that component alone.

Reads a store of the editability spec (`blocks: singletons`, `components: [mlp, attn]`),
builds the trace (causal tracing), attribution (attribution patching) and FLU (probe gains of
each block, MLP and attention) localizations of its model on its relation, as a sweep's
`localizations` axis would, and prints both tables as markdown.

    python experiments/editability.py experiments/stores/editability-quick [--csv rho.csv]
"""

from __future__ import annotations

import argparse

import torch

import behemoth_interp as bi
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.sweep.editability import editability
from behemoth_interp.sweep.localizations import LocalizationSpec, build_localizations
from behemoth_interp.tokenizer import WorldTokenizer

SOURCES = (
    LocalizationSpec("trace", k=1),
    LocalizationSpec("trace", name="attribution", k=1, trace="attribution"),
    LocalizationSpec("flu", components="both"),
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--csv", help="also write the correlations here")
    a = p.parse_args()
    torch.set_num_threads(1)
    result = bi.SweepResult.load(a.store)
    df = result.to_dataframe()
    (model,), (relation,) = df.model.unique(), df.relation.unique()
    hf, world, _ = bi.load_hf(model)
    known = evaluate_facts(hf, world, WorldTokenizer(world.config), world.facts(relation))
    located = build_localizations(SOURCES, hf, world, int(relation), known)
    found = editability(result, located)
    print(f"{result!r}; {model}, relation {relation}\n")
    table = found.components.pivot_table(index=["component"], columns="localization",
                                         values="score").round(3)  # fmt: skip
    outcomes = found.components.drop_duplicates("component").set_index("component")
    print(table.join(outcomes[[c for c in found.correlations.metric.unique()]].round(3))
          .to_markdown(), "\n")  # fmt: skip
    rho = found.correlations.round(3)
    print(rho.to_markdown(index=False))
    if a.csv:
        rho.to_csv(a.csv, index=False)


if __name__ == "__main__":
    main()
