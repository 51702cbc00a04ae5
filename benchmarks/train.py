"""Training throughput against this machine's dense-matmul peak, and evaluation speed.

Prints, from one run on one machine:
- the dense fp32 matmul FLOP/s (2048^3 products, the reference peak);
- training tokens/s of Pythia-31M on a world's corpus and the achieved FLOP/s as a fraction
  of that peak (goal >= 0.7 on the 2-core CPU);
- fact evaluation speed (facts/s, teacher-forced, batched).

    python benchmarks/train.py [--steps 30] [--block-len 80] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from behemoth_interp import CorpusConfig, WorldConfig, build_world, evaluate_facts
from behemoth_interp.corpus import Corpus
from behemoth_interp.grammar import PAD_ROLE
from behemoth_interp.model import PRESETS, build_model
from behemoth_interp.train import EpochBatches


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def train_flops_per_step(shape, vocab: int, batch: int, pos: int) -> float:
    """Matmul FLOPs of one optimizer step: 3x the forward (forward + backward)."""
    d, m, L = shape.d_model, shape.d_mlp, shape.n_layers
    dense = L * (4 * d * d + 2 * d * m) + d * vocab  # weights applied to every token
    attention = L * 2 * pos * d  # QK^T and AV, full (unmasked) products as computed
    return 3 * 2 * batch * pos * (dense + attention)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--block-len", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        world, tok, _ = build_world(
            WorldConfig(n_subjects=500), CorpusConfig(block_len=a.block_len), Path(tmp) / "w"
        )
        corpus = Corpus.load(Path(tmp) / "w" / "corpus")
    shape = PRESETS["pythia-31m"]
    model = build_model(shape, tok, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batches = EpochBatches(corpus, a.batch_size, 0, tok.pad_id, tok.eot_id)

    def step(i: int) -> int:
        tokens, roles = batches.batch(i)
        x = torch.as_tensor(tokens.astype(np.int64))
        mask = torch.as_tensor(roles[:, 1:]) != PAD_ROLE
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits[mask], x[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return x.shape[0] * (x.shape[1] - 1)

    peak = matmul_peak()
    for i in range(3):
        step(i)
    t = time.perf_counter()
    tokens = sum(step(i) for i in range(3, 3 + a.steps))
    seconds = time.perf_counter() - t
    flops = (
        train_flops_per_step(shape, tok.vocab_size, a.batch_size, a.block_len - 1)
        * a.steps
        / seconds
    )
    model.eval()
    facts = world.facts()
    evaluate_facts(model, world, tok, facts[:256])
    t = time.perf_counter()
    evaluate_facts(model, world, tok, facts)
    eval_seconds = time.perf_counter() - t
    print(f"threads                 {torch.get_num_threads()}")
    print(f"dense matmul peak       {peak / 1e9:8.1f} GFLOP/s (fp32, 2048^3)")
    print(f"training                {tokens / seconds:8.0f} tokens/s  {a.steps / seconds:.2f} steps/s "
          f"(batch {a.batch_size} x {a.block_len})")  # fmt: skip
    print(
        f"achieved                {flops / 1e9:8.1f} GFLOP/s = {flops / peak:.2f} of the matmul peak"
    )
    print(f"evaluation              {len(facts) / eval_seconds:8.0f} facts/s ({len(facts)} facts)")


if __name__ == "__main__":
    main()
