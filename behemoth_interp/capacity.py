"""Capacity search (Behemoth section 4.5): the largest world a recipe learns to a target
accuracy within a fixed budget, found by bisection over the number of subjects. Resumable:
every finished probe is recorded in the work directory, and a killed search continues where
it stopped (a probe's own training resumes too when it saves intermediate states)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from behemoth_interp._io import output_lock, read_json, write_json
from behemoth_interp.corpus import CorpusConfig, build_world
from behemoth_interp.errors import InvalidArgument, check_int, check_range
from behemoth_interp.train import TRAIN_LOG, TRAIN_STATE, TrainConfig, train
from behemoth_interp.world import WorldConfig

CAPACITY_FORMAT = "behemoth-capacity/1"
RECORD = "capacity.json"


def capacity_search(
    world: WorldConfig,
    corpus: CorpusConfig,
    config: TrainConfig,
    *,
    target: float = 0.95,
    low: int = 100,
    high: int = 120_000,
    iterations: int = 6,
    device: str = "auto",
    workdir: str | Path | None = None,
    keep: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Binary search for the largest number of subjects that reaches `target` accuracy.

    Each probe builds a world with that many subjects (other settings from `world`), trains
    with `config` (the fixed budget: epochs or steps) and scores every tuple. With `workdir`
    the probes are recorded in `workdir/capacity.json` as they finish, and a search started
    again with the same settings replays them instead of training again (more `iterations`
    continue the bisection); `keep` keeps each probe's world and model there. Returns the
    probes in order, each {'n_subjects', 'accuracy', 'reached', 'steps', 'seconds'}.
    """
    if not 1 <= low <= high:
        raise InvalidArgument(f"need 1 <= low <= high, got low={low}, high={high}")
    check_int("iterations", iterations, 1)
    check_range("target", target, 0, 1, low_open=True)
    settings = {"world": world.to_dict(), "corpus": corpus.to_dict(), "train": config.to_dict(),
                "target": target, "low": low, "high": high}  # fmt: skip
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return _search(Path(tmp), settings, world, corpus, config, iterations, device,
                           keep=False, progress=progress)  # fmt: skip
    workdir = Path(workdir)
    with output_lock(workdir / RECORD):
        return _search(workdir, settings, world, corpus, config, iterations, device, keep=keep,
                       progress=progress)  # fmt: skip


def _search(workdir: Path, settings: dict, world: WorldConfig, corpus: CorpusConfig,
            config: TrainConfig, iterations: int, device: str, *, keep: bool,
            progress: bool) -> list[dict[str, Any]]:  # fmt: skip
    record = workdir / RECORD
    probes: list[dict[str, Any]] = []
    if record.is_file():
        saved = read_json(record, what="capacity search record", format=CAPACITY_FORMAT)
        if saved["settings"] != settings:
            raise InvalidArgument(
                f"{workdir} holds a capacity search with other settings: continue it with the "
                "same ones, or give another --workdir"
            )
        probes = saved["probes"]
    low, high, target = settings["low"], settings["high"], settings["target"]
    done: list[dict[str, Any]] = []
    for i in range(iterations):
        if low > high:
            break
        n = (low + high) // 2
        if i < len(probes):
            probe = probes[i]
            if probe["n_subjects"] != n:
                raise InvalidArgument(f"{record} does not follow the bisection: edit nothing in it")
        else:
            probe = _probe(workdir, n, world, corpus, config, target, device, keep, progress)
            write_json(record, {"format": CAPACITY_FORMAT, "settings": settings,
                                "probes": [*done, probe]})  # fmt: skip
        done.append(probe)
        low, high = (n + 1, high) if probe["reached"] else (low, n - 1)
    return done


def _probe(workdir: Path, n: int, world: WorldConfig, corpus: CorpusConfig, config: TrainConfig,
           target: float, device: str, keep: bool, progress: bool) -> dict[str, Any]:  # fmt: skip
    """Train one probe of `n` subjects, resuming its training or reading its finished log."""
    wdir, mdir = workdir / f"world-{n}", workdir / f"model-{n}"
    if not (wdir / "corpus" / "corpus.json").is_file():
        build_world(dataclasses.replace(world, n_subjects=n), corpus, wdir, overwrite=True)
    log_file = mdir / TRAIN_LOG
    log = read_json(log_file, what="training log") if log_file.is_file() else {}
    if "final" not in log:
        resume = (mdir / TRAIN_STATE).is_file()
        log = train(wdir, mdir, dataclasses.replace(config, save_optimizer=False), device=device,
                    resume=resume, overwrite=not resume, progress=progress)  # fmt: skip
    accuracy = log["final"]["top1"]
    if not keep:
        shutil.rmtree(mdir, ignore_errors=True)
        shutil.rmtree(wdir, ignore_errors=True)
    return {"n_subjects": n, "accuracy": accuracy, "reached": accuracy >= target,
            "steps": log["step"], "seconds": log["wall_seconds"]}  # fmt: skip


def bits_per_parameter(world: WorldConfig, n_parameters: int) -> float:
    """The Behemoth paper's estimate of the information a model holds per parameter (its
    section 4.5): every base fact as the bits of its subject, relation and object ids (each
    rounded up to whole bits; 17 + 3 + 9 = 29 for 120,000 subjects, 6 relations and 400 objects),
    times the facts, over the parameters. Its Pythia-31M at 120,000 subjects: 0.65."""
    check_int("n_parameters", n_parameters, 1)
    bits = sum(max(1, math.ceil(math.log2(n)))
               for n in (world.n_subjects, world.n_relations, world.n_objects))  # fmt: skip
    return bits * world.n_subjects * world.n_relations / n_parameters
