"""Edit, then fine-tune downstream, then measure what is left: one call, one directory.

`retention(edited, out=...)` draws the retention set on the edited model, builds the downstream
task around it, fine-tunes from the edited weights (`train(init_from=)`) with the retention
set scored at every evaluation, and writes everything to `out`:

    out/run.json          what is being run (written first: marks the directory as ours)
    out/world/            the edit's world (the retention set's facts are its tuples)
    out/edited/           the edited checkpoint (when an `EditResult` was given)
    out/downstream/       the downstream world and corpus
    out/model/            the fine-tuned checkpoint and its training log
    out/retention.json    the `RetentionResult` (written last: the run is complete)

A run killed part-way continues with `resume=True`: finished parts are kept (and checked to be
the ones this run would write), the fine-tune starts again from the edited weights, and the
result is the same, bit for bit (training is deterministic for a config and seed).
"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

from behemoth_interp._io import check_output, output_lock, read_json, write_json
from behemoth_interp.edit.report import EditResult, load_edited
from behemoth_interp.errors import InvalidArgument, MissingInput
from behemoth_interp.model import is_checkpoint, parameters_sha256
from behemoth_interp.retention.downstream import DownstreamConfig, downstream
from behemoth_interp.retention.result import RetentionResult
from behemoth_interp.retention.sets import retention_set
from behemoth_interp.train import TrainConfig, train
from behemoth_interp.world import World

RUN_FORMAT = "behemoth-retention-run/1"
RESULT_FILE = "retention.json"


def retention(
    edited: EditResult | str | Path,
    *,
    out: str | Path,
    config: DownstreamConfig = DownstreamConfig(),
    train_config: TrainConfig | None = None,
    per_edit: int = 2,
    min_margin: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> RetentionResult:
    """Fine-tune the edited model (an `EditResult`, or a checkpoint written by
    `EditResult.save` / `edit --out`, which holds its task) on downstream task `config` and
    measure edited vs intrinsic retention over the fine-tune (`retention_set(per_edit=,
    min_margin=, seed=)`). `train_config`: the fine-tune's settings before the task's own
    (see `Downstream.train_config`; its `init_from` is set here). `out` must be empty or absent
    (`overwrite=True` replaces a directory this function wrote; `resume=True` continues one)."""
    out = Path(out)
    with output_lock(out):
        resuming = resume and (out / "run.json").is_file()
        if not resuming:
            check_output(out, overwrite=overwrite, what="--out")
        source = edited if isinstance(edited, EditResult) else Path(edited)
        model, task = _edited(source)
        facts = retention_set(model, task, per_edit=per_edit, min_margin=min_margin, seed=seed)
        data = downstream(task, config, keep_out=facts.intrinsic)
        checkpoint = out / "edited" if isinstance(source, EditResult) else source
        tc = data.train_config(train_config, init_from=str(checkpoint))
        settings = {"edited": str(checkpoint), "task": task.to_dict(),
                    "downstream": config.to_dict(), "train": tc.to_dict(), "per_edit": per_edit,
                    "min_margin": min_margin, "seed": seed, "version": version("behemoth-interp"),
                    "edited_sha256": parameters_sha256(model)}  # fmt: skip
        _start(out, settings, resuming)
        if not (out / "world" / "world.json").is_file():
            task.world.save(out / "world", overwrite=True)
        if isinstance(source, EditResult) and not is_checkpoint(checkpoint):
            source.save(checkpoint, overwrite=True)
        if not (out / "downstream" / "corpus" / "corpus.json").is_file():
            data.write(out / "downstream", overwrite=True)
        start = {"step": 0, "track": facts.score(model)}
        log = train(out / "downstream", out / "model", tc, device=device, overwrite=True,
                    progress=progress, track=facts.score)  # fmt: skip
        result = RetentionResult(facts, [start, *log["history"]], log.get("stopped"), settings)
        result.save(out / RESULT_FILE)
        return result


def load_retention(path: str | Path) -> RetentionResult:
    """Read the result of a finished `retention` run from its directory."""
    path = Path(path)
    if not (path / RESULT_FILE).is_file():
        raise MissingInput(f"{path} holds no finished retention run ({RESULT_FILE} is missing): "
                           "run it, or continue it with resume=True (--resume)")  # fmt: skip
    return RetentionResult.load(path / RESULT_FILE, World.load(path / "world"))


def _edited(source: EditResult | Path):
    """The edited HF model and its task."""
    if isinstance(source, EditResult):
        if source.task is None:
            raise InvalidArgument("this EditResult has no task: build it with edit()")
        return source.model, source.task
    return load_edited(source)


def _start(out: Path, settings: dict, resuming: bool) -> None:
    """Write `run.json` into a fresh `out` (a replaced run's parts are removed: `check_output`
    found the directory to be ours), or, resuming, check that it describes this same run."""
    marker = out / "run.json"
    if resuming:
        if read_json(marker, what="retention run")["settings"] != settings:
            raise InvalidArgument(f"--resume: {out} is another retention run (other settings): "
                                  "continue it with the settings it was started with")  # fmt: skip
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_json(marker, {"format": RUN_FORMAT, "settings": settings})
