"""The retention paper's Table 2 in a synthetic world: one fact's most probable objects before
the edit, after it, and through a downstream fine-tune, with each object's kind (target: the
edit's new object; original: the true one; related: another object of the relation), and
the probability of each kind (the paper's Figure 4 categories; "no object": tokens that start
no object).

A single override by ROME on a shipped model, then fine-tuning on general text (the paper's
unstructured data; a tenth of the eligible subjects, 200 steps), as the paper's case study
edits with ROME and fine-tunes on unstructured text. Everything is exact: the probabilities are
each object's teacher-forced probability over its tokens (`bi.evaluate.object_distribution`).

    python experiments/retention_tokens.py [--model data/models/independent-formats] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import numpy as np
import pandas as pd

import behemoth_interp as bi
from behemoth_interp.evaluate import object_distribution
from behemoth_interp.retention import FINE_TUNE, DownstreamConfig, retention

STEPS, EVAL_EVERY, SHOWN = 200, 20, (0, 20, 40, 80, 120, 200)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="data/models/independent-formats")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    hf, world, tok = bi.load_hf(a.model)
    task = bi.EditTask.draw(world, "single", seed=a.seed)
    fact = task.edited[task.changed][0]
    original = int(task.facts[task.changed][0, 2])
    edited = bi.edit(hf, task, method="rome", seed=a.seed, evaluate=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = retention(edited, out=f"{tmp}/r", seed=a.seed,
                           config=DownstreamConfig("general", subjects=0.1, seed=a.seed),
                           train_config=dataclasses.replace(FINE_TUNE, steps=STEPS,
                                                            eval_every=EVAL_EVERY, seed=a.seed))  # fmt: skip
    candidates = set(world.candidate_objects(int(fact[1])).tolist())
    before = np.exp(object_distribution(hf, world, tok, fact[None]))[0]
    top = result.top_objects(0)
    facts = result.facts_dataframe().query("set == 'edited' and subject == @fact[0]")
    related = np.array(
        [o in candidates and o not in (original, fact[2]) for o in range(len(before))]
    )
    rows = [{"model": "original model",
             "top 3 objects": _cells((o, before[o]) for o in np.argsort(-before)[:3]),
             "p(target)": before[fact[2]], "p(original)": before[original],
             "p(related)": before[related].sum(), "p(no object)": 1 - before.sum()}]  # fmt: skip
    for step in SHOWN:
        at, f = top[top.step == step], facts[facts.step == step].iloc[0]
        rows.append({"model": "edited model" if step == 0 else f"fine-tuned {step} steps",
                     "top 3 objects": _cells(zip(at.object, at.probability)),
                     "p(target)": f.p_target, "p(original)": f.p_original,
                     "p(related)": f.p_related, "p(no object)": f.p_other})  # fmt: skip
    print(f"{a.model}, seed {a.seed}: ({world.relation_name(int(fact[1]))}, subject {fact[0]}) "
          f"edited from object {original} (original) to {fact[2]} (target); every other "
          f"object of the relation is related ({len(candidates) - 2} of them)\n")  # fmt: skip

    def kind(o: int) -> str:
        return ("target" if o == fact[2] else "original" if o == original
                else "related" if o in candidates else "other")  # fmt: skip

    for row in rows:
        row["top 3 objects"] = ", ".join(
            f"{o} ({kind(o)}) {p:.3f}" for o, p in row["top 3 objects"]
        )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


def _cells(pairs) -> list[tuple[int, float]]:
    return [(int(o), float(p)) for o, p in pairs]


if __name__ == "__main__":
    main()
