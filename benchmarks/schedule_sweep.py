"""Sweep training recipes (world size, learning rate, schedule, loss tokens) at a fixed step budget.

Each run builds its world, trains Pythia-31M for `--steps` optimizer steps and records the
accuracy curve and final per-relation accuracy. Runs go in parallel processes (on one GPU
they share it). This is how the default models' recipe was chosen (docs/training.md).

    python benchmarks/schedule_sweep.py --steps 10000 --jobs 8 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

RECIPES = [
    # name, world kwargs, train kwargs
    ("S1000 paper (lr1e-3 const, all)", {"n_subjects": 1000}, {"lr": 1e-3}),
    ("S1000 lr1e-3 cos, object", {"n_subjects": 1000}, {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 300, "loss_on": "object"}),
    ("S1000 lr3e-3 cos, object", {"n_subjects": 1000}, {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 300, "loss_on": "object"}),
    ("S1000 lr3e-3 cos, all", {"n_subjects": 1000}, {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 300}),
    ("S2000 lr3e-3 cos, object", {"n_subjects": 2000}, {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 300, "loss_on": "object"}),
    ("S2000 lr1e-3 cos, object", {"n_subjects": 2000}, {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 300, "loss_on": "object"}),
    ("S500 lr3e-3 cos, object", {"n_subjects": 500}, {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 300, "loss_on": "object"}),
    ("S3000 lr3e-3 cos, object", {"n_subjects": 3000}, {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 300, "loss_on": "object"}),
]  # fmt: skip


def run(args: tuple) -> dict:
    import time

    import torch

    from behemoth_interp.corpus import CorpusConfig, build_world
    from behemoth_interp.train import TrainConfig, train
    from behemoth_interp.world import WorldConfig

    name, world_kw, train_kw, steps, block_len, distribution = args
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build_world(
            WorldConfig(distribution, **world_kw),
            CorpusConfig(block_len=block_len),
            Path(tmp) / "w",
        )
        t = time.perf_counter()
        config = TrainConfig(
            steps=steps, epochs=None, eval_every=500, save_optimizer=False, **train_kw
        )
        log = train(Path(tmp) / "w", Path(tmp) / "m", config, progress=False)
    return {"name": name, "world": world_kw, "train": train_kw, "seconds": time.perf_counter() - t,
            "history": [(h["step"], round(h["epoch"], 1), round(h["loss"], 4), round(h["accuracy"], 4))
                        for h in log["history"]], "final": log["final"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--block-len", type=int, default=80)
    p.add_argument("--distribution", default="independent")
    p.add_argument("--only", default="", help="comma-separated recipe indices")
    p.add_argument("--out", default="sweep.json")
    a = p.parse_args()
    chosen = [RECIPES[int(i)] for i in a.only.split(",")] if a.only else RECIPES
    jobs = [(n, w, t, a.steps, a.block_len, a.distribution) for n, w, t in chosen]
    import multiprocessing as mp

    with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
        results = []
        for future in as_completed([pool.submit(run, job) for job in jobs]):
            r = future.result()
            results.append(r)
            print(
                json.dumps(
                    {"name": r["name"], "seconds": round(r["seconds"]), "final": r["final"]}
                ),
                flush=True,
            )
            print("   curve:", r["history"][::2], flush=True)
            Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
