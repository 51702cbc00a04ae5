"""Train a GPT-NeoX model on a world's corpus; resumable bit for bit; capacity search.

Defaults follow the Behemoth paper (section 4.5: AdamW, lr 1e-3, weight decay 0.01, batch 16,
loss on every token). The data order is a pure function of (seed, epoch), the learning rate a
pure function of the step, and checkpoints carry the optimizer state, so a run resumed from a
checkpoint continues exactly as an uninterrupted one would (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import (
    JsonConfig,
    check_output,
    output_lock,
    read_json,
    write_dir,
    write_json,
)
from behemoth_interp.corpus import Corpus, count_blocks, load_world
from behemoth_interp.errors import (
    CheckpointMismatch,
    Diverged,
    InvalidArgument,
    MissingInput,
    check_int,
    check_range,
)
from behemoth_interp.evaluate import evaluate_facts
from behemoth_interp.grammar import OBJECT, PAD_ROLE, get_template
from behemoth_interp.model import (
    build_model,
    file_sha256,
    get_preset,
    is_checkpoint,
    load_hf,
    shape_of,
    write_checkpoint,
)
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import World

TRAIN_STATE = "training_state.pt"
TRAIN_LOG = "train_log.json"


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Optimization settings. Give `epochs` or `steps` (steps wins when both are set).

    fresh_choices: multiple-choice sentences list newly drawn candidates every epoch (a
    fixed list per sentence is memorized as a shortcut; see `Corpus.shuffled`).
    loss_on: 'all' trains on every non-pad token (the paper); 'object' only on object tokens,
    which spends the whole gradient on the facts (subject tokens are unpredictable by design).
    schedule: 'constant' (the paper) or 'cosine' decay to `min_lr_ratio * lr` after warmup.

    Continued training (the downstream fine-tuning of the retention paper, Wen & Zhang):
    init_from: a checkpoint whose weights the run starts from instead of a fresh initialization
    (its shape, not `preset`, is the model's; its vocabulary must be the world's).
    freeze_blocks / freeze_embeddings / freeze_unembedding: parameters that never change
    (whole blocks with their layer norms; the token embedding; the final layer norm and the
    unembedding), left out of the optimizer. stop_loss / stop_accuracy: end the run at the
    first evaluation (every `eval_every` steps) whose loss on `validation` sentences sampled
    from the corpus is at most `stop_loss`, or whose fact accuracy is at least
    `stop_accuracy` (the paper's stopping rules, section A). The fact accuracy is measured on
    up to `eval_facts` of the tuples the corpus states, asked in `eval_template`.
    """

    preset: str = "pythia-31m"
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    epochs: int | None = 10
    steps: int | None = None
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    loss_on: Literal["all", "object"] = "all"
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 1000
    eval_facts: int = 2000
    save_every: int = 0
    save_optimizer: bool = True
    warm_steps: int = 0
    warm_fraction: float = 0.1
    fresh_choices: bool = False
    init_from: str | None = None
    freeze_blocks: tuple[int, ...] = ()
    freeze_embeddings: bool = False
    freeze_unembedding: bool = False
    stop_loss: float | None = None
    stop_accuracy: float | None = None
    validation: int = 1000
    eval_template: str = "paper"

    def __post_init__(self) -> None:
        get_preset(self.preset)
        get_template(self.eval_template)
        object.__setattr__(
            self, "freeze_blocks", tuple(sorted({int(b) for b in self.freeze_blocks}))
        )
        if any(b < 0 for b in self.freeze_blocks):
            raise InvalidArgument(f"freeze_blocks are block indices >= 0, got {self.freeze_blocks}")
        if self.init_from is not None:
            object.__setattr__(self, "init_from", str(self.init_from))
        if self.stop_loss is not None:
            check_range("stop_loss", self.stop_loss, 0, low_open=True)
        if self.stop_accuracy is not None:
            check_range("stop_accuracy", self.stop_accuracy, 0, 1, low_open=True)
        check_int("validation", self.validation, 1)
        if self.epochs is None and self.steps is None:
            raise InvalidArgument("give epochs or steps: the run needs a length")
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_range("lr", self.lr, 0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_range("weight_decay", self.weight_decay, 0)
        check_int("warmup_steps", self.warmup_steps, 0, option="--warmup")
        check_range("grad_clip", self.grad_clip, 0)
        check_int("eval_every", self.eval_every, 1)
        check_int("eval_facts", self.eval_facts, 1)
        check_int("save_every", self.save_every, 0)
        check_int("warm_steps", self.warm_steps, 0)
        check_range("warm_fraction", self.warm_fraction, 0, 1, low_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.schedule not in ("constant", "cosine"):
            raise InvalidArgument(
                f"unknown schedule {self.schedule!r}: choose 'constant' or 'cosine'"
            )
        if self.loss_on not in ("all", "object"):
            raise InvalidArgument(f"unknown loss_on {self.loss_on!r}: choose 'all' or 'object'")

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step `step` (0-based) in a run of `total` steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        t = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(
            f"device {device!r} asked for but CUDA is not available: use --device cpu"
        )
    return torch.device(device)


class EpochBatches:
    """Batches of each epoch: the corpus re-packed with seed (seed, epoch), blocks permuted.

    A pure function of (corpus, batch size, seed, step), so a resumed run sees exactly the
    batches an uninterrupted one would. The last batch of an epoch may be partial. `keep`
    restricts the epochs to a subset of the sentences (the warm-up curriculum).
    """

    def __init__(
        self, corpus: Corpus, batch_size: int, seed: int | list[int], pad_id: int, eot_id: int,
        keep: np.ndarray | None = None, redraw=None,
    ):  # fmt: skip
        self.corpus, self.batch_size, self.keep, self.redraw = corpus, batch_size, keep, redraw
        self.seed = list(np.atleast_1d(seed).tolist())
        self.pad_id, self.eot_id = pad_id, eot_id
        lengths = corpus.sentences.column("length").to_numpy()
        self._lengths = lengths if keep is None else lengths[keep]
        self._steps: list[int] = []
        self._epoch: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _seed(self, epoch: int) -> list[int]:
        return [*self.seed, epoch]

    def steps_in(self, epoch: int) -> int:
        while len(self._steps) <= epoch:
            e = len(self._steps)
            order = np.random.default_rng(self._seed(e)).permutation(len(self._lengths))
            blocks = count_blocks(self._lengths[order], self.corpus.config.block_len)
            self._steps.append(math.ceil(blocks / self.batch_size))
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of step `step` of these batches."""
        epoch = 0
        while step >= self.steps_in(epoch):
            step -= self.steps_in(epoch)
            epoch += 1
        return epoch, step

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and roles [batch, block_len] of step `step` of these batches."""
        epoch, i = self.locate(step)
        if self._epoch is None or self._epoch[0] != epoch:
            seed = self._seed(epoch)
            tokens, roles = self.corpus.shuffled(seed, self.pad_id, self.eot_id, self.keep,
                                                 self.redraw)  # fmt: skip
            perm = np.random.default_rng([*seed, 1]).permutation(len(tokens))
            self._epoch = (epoch, tokens, roles, perm)
        _, tokens, roles, perm = self._epoch
        rows = perm[i * self.batch_size : (i + 1) * self.batch_size]
        return tokens[rows], roles[rows]


class Schedule:
    """The run's batches: `warm_steps` on the warm-up subset of subjects, then every sentence.

    Zucchet et al. (2025, "How do language models learn facts?") find that the loss plateau
    before facts are learned grows with the number of individuals, and that first training on
    a few of them shortens it; `warm_fraction` of each relation's subjects is that few.
    """

    def __init__(self, corpus: Corpus, world: World, config: TrainConfig, pad_id: int, eot_id: int):
        self.warm_steps = config.warm_steps
        redraw = (world, WorldTokenizer(world.config)) if config.fresh_choices else None
        self.main = EpochBatches(corpus, config.batch_size, config.seed, pad_id, eot_id,
                                 redraw=redraw)  # fmt: skip
        self.warm = None
        if config.warm_steps:
            s = corpus.sentences
            subject, relation = s.column("subject").to_numpy(), s.column("relation").to_numpy()
            limit = np.array([world.n_subjects_of(r) for r in range(world.n_relations)])
            keep = subject < np.ceil(config.warm_fraction * limit[relation])
            if not keep.any():
                raise InvalidArgument(
                    "warm_fraction keeps no sentence: raise it or set warm_steps=0"
                )
            self.warm = EpochBatches(
                corpus, config.batch_size, [config.seed, 2], pad_id, eot_id, keep, redraw
            )
        self.total = config.steps if config.steps is not None else (
            config.warm_steps + sum(self.main.steps_in(e) for e in range(config.epochs))
        )  # fmt: skip

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if step < self.warm_steps:
            return self.warm.batch(step)
        return self.main.batch(step - self.warm_steps)

    def epoch(self, step: int) -> float:
        """Fractional epoch over the whole corpus after `step` steps (warm-up counts as 0)."""
        if step <= self.warm_steps:
            return 0.0
        epoch, index = self.main.locate(step - self.warm_steps - 1)
        return epoch + (index + 1) / self.main.steps_in(epoch)


def train(
    world_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    command: str | None = None,
    track: Callable[[GPTNeoXForCausalLM], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train on the corpus in `world_dir/corpus` and write a checkpoint directory to `out`.

    `out` must be empty or absent; `overwrite=True` replaces a checkpoint there (never a
    directory that is not a checkpoint). With `resume=True`, `out` must hold a checkpoint with
    optimizer state (written by `save_every` or `stop_at`), and training continues from its
    step exactly. `stop_at` ends the run after that step with a resumable checkpoint, as an
    interruption would (for running long trainings in chunks). The process holds `out`'s
    lock throughout: a second writer is refused. A non-finite loss stops the run with
    `Diverged`. `track(model)`, when given, runs at every evaluation (the model in eval mode)
    and its JSON-able result is the history entry's `track` (the retention of edited facts
    during a downstream fine-tune). Returns the training log (also `out/train_log.json`).
    """
    out = Path(out)
    with output_lock(out):
        if resume:
            _check_resumable(out)
        else:
            check_output(out, overwrite=overwrite, replaceable=is_checkpoint, what="--out")
        return _train(world_dir, out, config, device=device, resume=resume, stop_at=stop_at,
                      progress=progress, command=command, track=track)  # fmt: skip


def _check_resumable(out: Path) -> None:
    if not (out / TRAIN_LOG).is_file():
        raise MissingInput(
            f"--resume: {out} holds no training run to resume (no {TRAIN_LOG}): leave out "
            "--resume to start one"
        )
    if not (out / TRAIN_STATE).is_file():
        raise InvalidArgument(
            f"--resume: {out} was saved without optimizer state (a final checkpoint written with "
            "--no-optimizer), so it cannot continue exactly: train a new run (--force replaces "
            "it), or keep intermediate states with --save-every"
        )


def _train(world_dir, out: Path, config: TrainConfig, *, device: str, resume: bool,
           stop_at: int | None, progress: bool, command: str | None,
           track: Callable[[GPTNeoXForCausalLM], dict[str, Any]] | None) -> dict[str, Any]:  # fmt: skip
    world, tokenizer = load_world(world_dir)
    corpus = Corpus.load(Path(world_dir) / "corpus")
    dev = resolve_device(device)
    init = None
    if config.init_from is not None:
        model, init = _initial_model(config.init_from, world, tokenizer, corpus)
        shape = shape_of(model)
    else:
        shape = dataclasses.replace(get_preset(config.preset),
                                    n_ctx=max(corpus.config.block_len, 64))  # fmt: skip
        model = build_model(shape, tokenizer, config.seed)
    model = model.to(dev)
    model.config.behemoth_world = world.fingerprint
    trainable = _trainable(model, config)
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        fused=dev.type == "cuda",
    )
    log: dict[str, Any] = {"train": config.to_dict(), "model": shape.to_dict(),
                           "world": world.config.to_dict(), "corpus": corpus.config.to_dict(),
                           "command": command, "device": str(dev), "history": [], "wall_seconds": 0.0,
                           "init": init}  # fmt: skip
    step = 0
    if resume:
        step, log = _restore(out, model, opt, config, world, init)
        if "stopped" in log:
            return log
    batches = Schedule(corpus, world, config, tokenizer.pad_id, tokenizer.eot_id)
    total = batches.total
    stated = corpus.facts()  # a world's every tuple, or a downstream corpus's part of it
    eval_rows = np.random.default_rng(config.seed).choice(
        len(stated), size=min(config.eval_facts, len(stated)), replace=False
    )
    eval_facts = stated[np.sort(eval_rows)]
    validation = _validation_blocks(corpus, config, tokenizer) if config.stop_loss else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else contextlib.nullcontext()
    )
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    started = time.perf_counter() - log["wall_seconds"]
    running, count = 0.0, 0
    model.train()
    while step < total:
        tokens, roles = batches.batch(step)
        x = torch.as_tensor(tokens.astype(np.int64), device=dev)
        mask = _loss_mask(roles, config.loss_on, dev)
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step, total)
        with autocast:
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float()[mask], x[:, 1:][mask])
        if not torch.isfinite(loss):
            bar.close()
            raise Diverged(
                f"training diverged: the loss is {loss.item()} at step {step + 1} (lr "
                f"{config.lr_at(step, total):g}); nothing was saved for this step. Lower --lr "
                "(the shipped models use 2e-3 with --warmup 200)"
            )
        if trainable:  # with every parameter frozen the run changes nothing, by design
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
            opt.step()
        step += 1
        running, count = running + loss.item(), count + 1
        bar.update(1)
        if step % config.eval_every == 0 or step == total:
            model.eval()
            acc = evaluate_facts(model, world, tokenizer, eval_facts,
                                 template=config.eval_template)  # fmt: skip
            entry = {"step": step, "epoch": batches.epoch(step),
                     "loss": running / count, "lr": config.lr_at(step - 1, total),
                     "accuracy": acc.accuracy, "seconds": time.perf_counter() - started}  # fmt: skip
            if validation is not None:
                entry["validation_loss"] = _validation_loss(model, validation, config.loss_on)
            if track is not None:
                entry["track"] = track(model)
            model.train()
            log["history"].append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{acc.accuracy:.3f}")
            running, count = 0.0, 0
            reason = _stop_reason(entry, config)
            if reason is not None:
                log["stopped"] = {"step": step, "reason": reason}
        done = step == total or "stopped" in log
        interrupted = step == stop_at and not done
        if done or interrupted or (config.save_every and step % config.save_every == 0):
            log["wall_seconds"] = time.perf_counter() - started
            log["step"] = step
            if done:
                model.eval()
                final = evaluate_facts(model, world, tokenizer)
                log["final"] = final.summary()
            _save(out, model, opt, world, log, config.save_optimizer or not done)
            model.train()
        if interrupted or done:
            break
    bar.close()
    return log


def _save(out: Path, model, opt, world, log: dict, with_state: bool) -> None:
    step = log["step"]
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Diverged(
            f"training diverged: weights are NaN or infinite at step {step}; the checkpoint in "
            f"{out} was left as it was. Lower --lr"
        )

    def fill(tmp: Path) -> None:
        write_checkpoint(tmp, model, world)
        log["weights_sha256"] = file_sha256(tmp / "model.safetensors")
        if with_state:
            torch.save({"step": step, "optimizer": opt.state_dict()}, tmp / TRAIN_STATE)
        write_json(tmp / TRAIN_LOG, log)

    write_dir(out, fill, overwrite=True, replaceable=is_checkpoint)


def _restore(out: Path, model, opt, config: TrainConfig, world, init) -> tuple[int, dict]:
    log = read_json(out / TRAIN_LOG, what="training log")
    if log.get("init") != init:
        raise InvalidArgument(
            f"{out} started from other weights ({(log.get('init') or {}).get('weights_sha256')}"
            f" against {(init or {}).get('weights_sha256')}): resume with the --init-from it used"
        )
    if log["world"] != world.config.to_dict():
        raise InvalidArgument(
            f"{out} was trained on another world: resume with the world it came from"
        )
    length = {"steps": None, "epochs": None}  # the only settings a resumed run may change
    saved_config = TrainConfig.from_dict(log["train"]).to_dict()  # older logs lack new fields
    if {**saved_config, **length} != {**config.to_dict(), **length}:
        raise InvalidArgument(
            f"{out} was trained with other settings: resume only changes the run length"
        )
    # load_hf, not the raw file: it checks the files' hashes, and HF renames some weights on
    # save (lm_head <-> embed_out)
    saved_model, saved_world, _ = load_hf(out)
    if saved_world != world:
        raise CheckpointMismatch(
            f"{out} was trained on another world: resume with the world it came from"
        )
    try:
        model.load_state_dict(saved_model.state_dict())
    except RuntimeError as err:
        raise InvalidArgument(
            f"{out}/model.safetensors is not a checkpoint of this model shape: {err}"
        ) from None
    saved = torch.load(out / TRAIN_STATE, map_location=next(model.parameters()).device)
    opt.load_state_dict(saved["optimizer"])
    log["train"] = config.to_dict()
    return int(saved["step"]), log


def _initial_model(path: str, world: World, tokenizer: WorldTokenizer, corpus: Corpus):
    """The checkpoint a continued run starts from, checked against the world it trains on,
    and its record for the log (path and weights hash, which a resume must match)."""
    model, _, saved = load_hf(path)
    if saved.tokens != tokenizer.tokens or not np.array_equal(saved.token_space,
                                                              tokenizer.token_space):  # fmt: skip
        raise CheckpointMismatch(
            f"--init-from {path} has another vocabulary than the world it would train on "
            f"({saved.vocab_size} tokens against {tokenizer.vocab_size}, or other entity spaces):"
            " continued training needs a world with the same entity counts and tokens per entity"
        )
    if model.config.max_position_embeddings < corpus.config.block_len:
        raise InvalidArgument(
            f"--init-from {path} reads {model.config.max_position_embeddings} positions, fewer "
            f"than the corpus's blocks of {corpus.config.block_len}: build the world with "
            f"--block-len {model.config.max_position_embeddings} or less"
        )
    return model, {
        "path": str(path),
        "weights_sha256": file_sha256(Path(path) / "model.safetensors"),
    }


def _trainable(model, config: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs a run trains: all but the frozen ones, which are marked
    as needing no gradient."""
    n = model.config.num_hidden_layers
    if config.freeze_blocks and config.freeze_blocks[-1] >= n:
        raise InvalidArgument(
            f"freeze_blocks {list(config.freeze_blocks)} are not all in this model: it has "
            f"blocks 0..{n - 1}"
        )
    frozen = tuple(f"gpt_neox.layers.{b}." for b in config.freeze_blocks)
    if config.freeze_embeddings:
        frozen += ("gpt_neox.embed_in.",)
    if config.freeze_unembedding:
        frozen += ("gpt_neox.final_layer_norm.", "lm_head.")  # saved as embed_out
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        if p.requires_grad:
            out.append((name, p))
    return out


def _validation_blocks(corpus: Corpus, config: TrainConfig, tokenizer: WorldTokenizer):
    """Blocks of `validation` sentences sampled (seeded) from the corpus, as the retention
    paper samples its validation sets from the training data."""
    n = len(corpus.sentences)
    keep = np.zeros(n, dtype=bool)
    keep[
        np.random.default_rng([config.seed, 5]).choice(n, min(config.validation, n), replace=False)
    ] = True
    return corpus.shuffled([config.seed, 5], tokenizer.pad_id, tokenizer.eot_id, keep)


@torch.inference_mode()
def _validation_loss(model, blocks, loss_on: str, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over the validation blocks' trained tokens."""
    tokens, roles = blocks
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = torch.as_tensor(tokens[i : i + batch_size].astype(np.int64), device=device)
        mask = _loss_mask(roles[i : i + batch_size], loss_on, device)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits[mask], x[:, 1:][mask], reduction="sum").item()
        count += int(mask.sum())
    return total / max(count, 1)


def _loss_mask(roles: np.ndarray, loss_on: str, device) -> Tensor:
    """Which next-token targets x[:, 1:] of blocks with these `roles` carry the loss: the
    object tokens ('object') or every non-pad token ('all')."""
    role = torch.as_tensor(roles[:, 1:], device=device)
    return role == OBJECT if loss_on == "object" else role != PAD_ROLE


def _stop_reason(entry: dict[str, Any], config: TrainConfig) -> str | None:
    """Why the run stops at this evaluation (the stopping rules of `TrainConfig`), or None."""
    if config.stop_loss is not None and entry["validation_loss"] <= config.stop_loss:
        return f"validation loss {entry['validation_loss']:.4f} <= {config.stop_loss}"
    if config.stop_accuracy is not None and entry["accuracy"] >= config.stop_accuracy:
        return f"fact accuracy {entry['accuracy']:.4f} >= {config.stop_accuracy}"
    return None
