"""Batched causal tracing against TransformerLens' looping patching functions, same run.

For each site kind, traces the same tuples with `trace` (every patch index of every tuple in
stacked batches) and with `transformer_lens.patching` (one forward pass per patch index, the
metric averaged over tuples), and prints both times, their ratio and the largest difference of
the mean scores. Then times attribution patching and prints its correlation with the exact map.
The model is data/models/independent when it exists (any training step), else an untrained
Pythia-31M on the default world's layout (timings do not depend on training).

    python benchmarks/trace.py [--model DIR] [--per-relation 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformer_lens import patching

from behemoth_interp import SITE_KINDS, World, WorldConfig, WorldTokenizer, build_inputs
from behemoth_interp.model import PRESETS, build_model, load_model, to_hooked
from behemoth_interp.trace import sample_tuples, trace

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "independent"
TL_FUNCTIONS = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
    "head": patching.get_act_patch_attn_head_out_by_pos,
}


def _model(path: Path):
    if (path / "model.safetensors").is_file():
        return load_model(path), f"{path} (step {_step(path)})"
    config = WorldConfig(n_subjects=500)
    tok = WorldTokenizer(config)
    model = to_hooked(build_model(PRESETS["pythia-31m"], tok, seed=0), tok)
    model.world = World.generate(config)
    return model, "untrained Pythia-31M (no checkpoint found)"


def _step(path: Path) -> str:
    import json

    log = path / "train_log.json"
    return str(json.loads(log.read_text()).get("step", "?")) if log.is_file() else "?"


def _tl_trace(model, tuples, partners, kind: str) -> torch.Tensor:
    """The mean IOI metric per patch index, from TransformerLens' patching functions."""
    world, tok = model.world, model.world_tokenizer
    clean = build_inputs(world, tok, tuples, object_tokens=1).tokens
    corrupted = build_inputs(world, tok, partners, object_tokens=1).tokens
    right = torch.as_tensor(tok.entity_tokens("object", tuples[:, 2])[:, 1])
    wrong = torch.as_tensor(tok.entity_tokens("object", partners[:, 2])[:, 1])

    def diff(logits):
        last = logits[:, -1]
        return last.gather(1, right[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]

    with torch.inference_mode():
        logits, cache = model.run_with_cache(clean)
        d_clean, d_corrupt = diff(logits), diff(model(corrupted))

        def metric(logits):
            return ((diff(logits) - d_corrupt) / (d_clean - d_corrupt)).mean()

        if kind == "mlp_post":
            return patching.generic_activation_patch(
                model, corrupted, cache, metric, patch_setter=patching.layer_pos_patch_setter,
                activation_name="post", index_axis_names=("layer", "pos"),
            )  # fmt: skip
        return TL_FUNCTIONS[kind](model, corrupted, cache, metric)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--per-relation", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, what = _model(a.model)
    tuples = sample_tuples(model.world, a.per_relation, seed=0)
    trace(model, tuples[:2], sites="resid_pre")  # warm up
    c = model.cfg
    print(f"model      {what}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads")
    print(
        f"tuples     {len(tuples)} ({a.per_relation} per relation), threads {torch.get_num_threads()}"
    )
    print(f"{'site':<10} {'trace s':>8} {'TL s':>8} {'TL/trace':>9} {'max |diff|':>11}  patch runs")
    exact = {}
    ours_total = tl_total = 0.0
    for kind in SITE_KINDS:
        # every tuple, as TransformerLens averages them (an untrained fallback model may have
        # tiny denominators that the default threshold would leave out)
        result, ours = _timed(
            lambda kind=kind: trace(model, tuples, sites=(kind,), min_denominator=float("-inf"))
        )
        reference, tl = _timed(
            lambda kind=kind, partners=result.partners: _tl_trace(model, tuples, partners, kind)
        )
        exact[kind] = result.mean[kind]
        diff = (result.mean[kind] - reference.cpu()).abs().max().item()
        runs = int(np.prod(result.scores[kind].shape[1:]))
        print(f"{kind:<10} {ours:8.2f} {tl:8.2f} {tl / ours:9.1f} {diff:11.2e}  "
              f"{runs} x {len(tuples)} rows")  # fmt: skip
        ours_total, tl_total = ours_total + ours, tl_total + tl
    print(f"{'all':<10} {ours_total:8.2f} {tl_total:8.2f} {tl_total / ours_total:9.1f}")

    approx, seconds = _timed(lambda: trace(model, tuples, sites=SITE_KINDS, method="attribution"))
    print(f"\nattribution, all sites in one pass: {seconds:.2f} s ({ours_total / seconds:.0f}x "
          "faster than exact)")  # fmt: skip
    for kind in SITE_KINDS:
        x, y = exact[kind].flatten(), approx.mean[kind].flatten()
        r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        print(f"  {kind:<10} corr(attribution, exact) = {r:.3f}")
    x = torch.cat([exact[k].flatten() for k in SITE_KINDS])
    y = torch.cat([approx.mean[k].flatten() for k in SITE_KINDS])
    print(
        f"  {'all':<10} corr(attribution, exact) = {torch.corrcoef(torch.stack([x, y]))[0, 1]:.3f}"
    )


if __name__ == "__main__":
    main()
