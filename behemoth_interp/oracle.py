"""Exact oracles of edits: the model trained from scratch on the world as the edit says it
should be, with the recipe, corpus and seed of the model being edited.

open-unlearning's "retain model" is the inexact analogue on real data; in a synthetic world the
counterfactual training set is known exactly, so the distance of an edited model to its oracle
says how far the edit is from the truth. Oracles are cached under a key of the changed world's
fingerprint, the corpus config and the training config: the same oracle is trained once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import output_lock, read_json
from behemoth_interp.corpus import CorpusConfig, write_world
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import CheckpointMismatch, MissingInput
from behemoth_interp.model import load_hf
from behemoth_interp.train import TRAIN_LOG, TrainConfig, train

DEFAULT_CACHE = Path.home() / ".cache" / "behemoth-interp" / "oracles"


def oracle(
    model_dir: str | Path,
    task: EditTask,
    *,
    cache: str | Path = DEFAULT_CACHE,
    device: str = "cpu",
    progress: bool = False,
) -> GPTNeoXForCausalLM:
    """The oracle of `task` for the checkpoint in `model_dir`: trained from scratch on the
    task's world with the edited tuples given their new objects (nested implied tuples follow),
    with the corpus config, training config and seed recorded in the checkpoint's training log;
    loaded from `cache` when it was trained before. Returns the HF model (its world attached
    to the config's fingerprint, as every checkpoint's)."""
    path = oracle_path(model_dir, task, cache)
    with output_lock(path):
        if not (path / "model" / TRAIN_LOG).is_file() or "final" not in read_json(
            path / "model" / TRAIN_LOG, what="oracle training log"
        ):  # fmt: skip
            corpus, config = _recipe(model_dir, task)
            changed = task.world.with_objects(task.facts, task.targets)
            if not (path / "world" / "corpus" / "corpus.json").is_file():
                write_world(changed, corpus, path / "world", overwrite=True)
            resume = (path / "model" / "training_state.pt").is_file()
            train(path / "world", path / "model", config, device=device, resume=resume,
                  overwrite=not resume, progress=progress)  # fmt: skip
        return load_hf(path / "model", device)[0]


def oracle_path(model_dir: str | Path, task: EditTask, cache: str | Path = DEFAULT_CACHE) -> Path:
    """Where the oracle of `task` for `model_dir`'s recipe lives in `cache`."""
    corpus, config = _recipe(model_dir, task)
    changed = task.world.with_objects(task.facts, task.targets)
    key = json.dumps({"world": changed.fingerprint, "corpus": corpus.to_dict(),
                      "train": config.to_dict()}, sort_keys=True)  # fmt: skip
    return Path(cache) / hashlib.sha256(key.encode()).hexdigest()[:16]


def _recipe(model_dir: str | Path, task: EditTask) -> tuple[CorpusConfig, TrainConfig]:
    """The corpus and training configs the checkpoint was trained with (its training log)."""
    log_file = Path(model_dir) / TRAIN_LOG
    if not log_file.is_file():
        raise MissingInput(
            f"{log_file} is missing: an oracle repeats the checkpoint's training, so it needs a "
            "checkpoint written by `train` (an edited checkpoint has no recipe of its own)"
        )
    log = read_json(log_file, what="training log")
    if log["world"] != task.world.config.to_dict():
        raise CheckpointMismatch(
            f"{model_dir} was trained on another world than the task's: draw the task from it"
        )
    config = TrainConfig.from_dict(log["train"])
    return CorpusConfig.from_dict(log["corpus"]), config
