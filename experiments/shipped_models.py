"""The table of shipped models in docs/training.md: each model's world, preset, training length
and wall time (from its training log), its parameters and the Behemoth paper's bits per
parameter, and its top-1 on every tuple in every grammar template: the paper template, the
lowest and the mean over the other non-choice templates, and MCQ (each the lowest relation's).

    python experiments/shipped_models.py [data/models/NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import behemoth_interp as bi


def row(path: Path) -> dict:
    hf, world, tok = bi.load_hf(path)
    log = json.loads((path / "train_log.json").read_text())
    c = world.config
    n = sum(p.numel() for p in hf.parameters())
    table = bi.accuracy_by_format(hf, world, tok).drop(index="all").min()  # lowest relation
    others = table.drop(["paper", "mcq"])
    return {"model": path.name, "world": f"{c.distribution}, {c.n_subjects} × {c.n_relations} × "
            f"{c.n_objects}", "preset": log["train"]["preset"], "steps": log["step"],
            "wall (min)": f"{log['wall_seconds'] / 60:.0f}", "parameters": f"{n / 1e6:.2f} M",
            "bits / parameter": f"{bi.bits_per_parameter(c, n):.4f}",
            "paper": f"{table['paper']:.3f}",
            "other templates (lowest, mean)": f"{others.min():.3f}, {others.mean():.3f}",
            "mcq": f"{table['mcq']:.3f}"}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", type=Path)
    a = p.parse_args()
    models = a.models or sorted(d for d in Path("data/models").iterdir() if d.is_dir())
    print(pd.DataFrame([row(m) for m in models]).to_markdown(index=False))


if __name__ == "__main__":
    main()
