"""Exact fact accuracy with and without shared prefixes, and the two-core ceiling.

`evaluate_facts` on an HF model runs a subject's tuples' common prefix once (key-value cache);
this times it against every row run whole (the same batches of 512), per template, on one
thread, in one run, and checks the ranks are equal. Then the machine's ceiling for two sweep
workers: the same single-threaded matmul loop in 1 and in 2 processes at once.

    python benchmarks/evaluate.py [--model DIR] [--templates paper,relation_first,mcq]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import behemoth_interp as bi
from behemoth_interp import evaluate as ev

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "independent"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def matmuls_per_second(queue, seconds: float = 8.0) -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(176, 256), torch.randn(3072, 256)  # a fine-tuning batch x fused QKV+MLP
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            torch.nn.functional.linear(a, b)
        n += 50
    queue.put(n / (time.perf_counter() - start))


def core_scaling() -> tuple[float, float]:
    rates = []
    for k in (1, 2):
        queue = mp.Queue()
        procs = [mp.Process(target=matmuls_per_second, args=(queue,)) for _ in range(k)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        rates.append(sum(queue.get() for _ in procs))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--templates", default="paper,relation_first,mcq")
    a = p.parse_args()
    torch.set_num_threads(1)
    hf, world, tok = bi.load_hf(a.model)
    bi.evaluate_facts(hf, world, tok, world.facts()[:512])  # warm up
    whole = ev._prefix_split
    for template in a.templates.split(","):
        score = partial(bi.evaluate_facts, hf, world, tok, template=template)
        shared, t_shared = timed(score)
        ev._prefix_split = lambda x: 0  # every row whole
        try:
            plain, t_plain = timed(score)
        finally:
            ev._prefix_split = whole
        same = np.array_equal(shared.rank, plain.rank)
        print(f"{template:15s} {len(shared.rank)} tuples: whole rows {t_plain:5.2f} s, shared "
              f"prefixes {t_shared:5.2f} s ({t_plain / t_shared:.2f}x), ranks equal: {same}")  # fmt: skip
    one, two = core_scaling()
    print(f"single-threaded matmuls/s: 1 process {one:.0f}, 2 processes {two:.0f} "
          f"({two / one:.2f}x: the ceiling of 2 sweep workers)")  # fmt: skip


if __name__ == "__main__":
    main()
