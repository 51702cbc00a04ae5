"""The `behemoth-interp` command line: worlds now; training and analyses as they land."""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from behemoth_interp._io import is_report
from behemoth_interp.capacity import capacity_search
from behemoth_interp.corpus import Corpus, CorpusConfig, build_world, load_world
from behemoth_interp.edit import METHODS, OBJECTIVES
from behemoth_interp.errors import BehemothError, InvalidArgument, check_int
from behemoth_interp.evaluate import accuracy_by_format, evaluate_facts
from behemoth_interp.grammar import TEMPLATES, render
from behemoth_interp.model import load_hf
from behemoth_interp.oracle import DEFAULT_CACHE, oracle, oracle_path
from behemoth_interp.report import Page, RunInfo, check_plotly_js
from behemoth_interp.retention.downstream import FINE_TUNE
from behemoth_interp.train import TRAIN_LOG, TrainConfig, train
from behemoth_interp.world import SPACE_NAMES, WorldConfig

app = typer.Typer(
    help="Synthetic fact worlds, models trained on them, and tools to study them.",
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="Create and inspect synthetic worlds.")
app.add_typer(world_app, name="world")


@world_app.command("new")
def world_new(
    out: Path = typer.Option(..., "--out", help="Directory to write the world into."),
    distribution: str = typer.Option("independent", help="independent, correlated or nested."),
    subjects: int = typer.Option(1000, help="Number of subjects."),
    relations: int = typer.Option(6, help="Number of base relations."),
    objects: int = typer.Option(400, help="Objects per relation."),
    nested_objects: int = typer.Option(40, help="Nested objects (nested worlds)."),
    correlated: str = typer.Option("0,1", help="The two correlated relations (correlated worlds)."),
    subject_tokens: int = typer.Option(2, help="Tokens per subject."),
    object_tokens: int = typer.Option(2, help="Tokens per object."),
    seed: int = typer.Option(0, help="Seed of the world and its corpus."),
    grammar: str = typer.Option("paper=1", help="Corpus grammar mix, e.g. 'paper=1,mcq=0.25'."),
    copies: int = typer.Option(1, help="Times each tuple appears in the corpus."),
    block_len: int = typer.Option(512, help="Corpus block length in tokens."),
    force: bool = typer.Option(False, "--force", help="Replace an existing directory."),
) -> None:
    """Generate a world, its tokenizer and its packed corpus into OUT."""
    config = WorldConfig(
        distribution=distribution,  # type: ignore[arg-type]
        n_subjects=subjects,
        n_relations=relations,
        n_objects=objects,
        n_nested_objects=nested_objects,
        correlated=tuple(parse_ints(correlated, "--correlated")),  # type: ignore[arg-type]
        subject_tokens=subject_tokens,
        object_tokens=object_tokens,
        seed=seed,
    )
    corpus = CorpusConfig(CorpusConfig.parse_mix(grammar), copies, block_len, seed=seed)
    with claim(out, force):
        world, _, packed = build_world(config, corpus, out, overwrite=force)
    typer.echo(f"wrote {world!r} and a corpus of {packed.n_blocks} blocks to {out}")


@world_app.command("show")
def world_show(
    path: Path = typer.Argument(..., help="A world directory written by `world new`."),
    samples: int = typer.Option(2, help="Sample sentences per grammar."),
) -> None:
    """Print a world's sizes, vocabulary and sample sentences in each grammar."""
    typer.echo(describe_world(path, samples))


def describe_world(path: Path, samples: int = 2) -> str:
    """The text `world show` prints."""
    world, tok = load_world(path)
    c = world.config
    lines = [repr(world), ""]
    lines.append(
        "relations: " + ", ".join(world.relation_name(r) for r in range(world.n_relations))
    )
    lines.append(f"vocabulary: {tok.vocab_size} tokens")
    for space in SPACE_NAMES:
        if space in tok.factors:
            n, k = c.token_spaces()[space]
            sizes = " x ".join(str(len(p)) for p in tok.positions[space])
            lines.append(f"  {space:<9}{n:>8} entities, {k} token(s) each, position sets {sizes}")
    lines.append(f"  {'filler':<9}{len(tok.fillers):>8} tokens")
    rng = np.random.default_rng(0)
    facts = world.facts()
    rows = facts[rng.choice(len(facts), size=min(samples, len(facts)), replace=False)]
    for name, template in TEMPLATES.items():
        lines += ["", f"{name}: {template.description}"]
        sent = render(world, tok, rows, name)
        for i, (s, r, o) in enumerate(sent.facts):
            lines.append(f"  ({s}, {world.relation_name(int(r))}, {o})  {sent.text(tok, i)}")
    corpus_dir = Path(path) / "corpus"
    if (corpus_dir / "corpus.json").is_file():
        corpus = Corpus.load(corpus_dir)
        mix = ", ".join(f"{k}={v:g}" for k, v in corpus.config.grammar_mix)
        lines += ["", f"corpus: {corpus.sentences.num_rows} sentences, {corpus.n_tokens} tokens in "
                  f"{corpus.n_blocks} blocks of {corpus.config.block_len} (grammar {mix})"]  # fmt: skip
    return "\n".join(lines)


@app.command("train")
def train_cmd(
    world_dir: Path = typer.Argument(..., help="A world directory written by `world new`."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    preset: str = typer.Option("pythia-31m", help="Model size preset (pythia-31m, small, tiny)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    batch_size: int = typer.Option(16, help="Blocks per optimizer step."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the corpus."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    warmup: int = typer.Option(0, help="Linear learning-rate warmup steps."),
    warm_steps: int = typer.Option(0, help="Curriculum: first steps on a few subjects only."),
    warm_fraction: float = typer.Option(0.1, help="Curriculum: fraction of subjects first."),
    fresh_choices: bool = typer.Option(
        False, "--fresh-choices", help="Multiple-choice candidates drawn anew every epoch."
    ),
    schedule: str = typer.Option("constant", help="constant (the paper) or cosine."),
    min_lr_ratio: float = typer.Option(0.0, help="Cosine floor as a fraction of --lr."),
    loss_on: str = typer.Option("all", help="all tokens (the paper) or object tokens only."),
    seed: int = typer.Option(0, help="Seed of initialization and data order."),
    eval_every: int = typer.Option(1000, help="Steps between fact-accuracy evaluations."),
    save_every: int = typer.Option(0, help="Steps between checkpoints (0: only at the end)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    init_from: Optional[Path] = typer.Option(
        None, help="Continue training this checkpoint (same vocabulary) instead of a fresh model."
    ),
    freeze: str = typer.Option(
        "", help="Blocks that never change, e.g. '0,1'; with 'embed' and 'unembed' for those."
    ),
    stop_loss: Optional[float] = typer.Option(
        None, help="Stop at the first evaluation whose validation loss is at most this."
    ),
    stop_accuracy: Optional[float] = typer.Option(
        None, help="Stop at the first evaluation whose fact accuracy is at least this."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    no_optimizer: bool = typer.Option(
        False, "--no-optimizer", help="Do not keep optimizer state at the end."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace a checkpoint in --out (never another kind of folder)."
    ),
) -> None:
    """Train a model on a world's corpus and write a checkpoint."""
    import sys

    if resume and force:
        raise InvalidArgument(
            "--resume continues the run in --out and --force replaces it: pick one"
        )
    config = TrainConfig(
        preset=preset, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
        epochs=epochs if epochs is not None or steps is not None else 10, steps=steps,
        warmup_steps=warmup, warm_steps=warm_steps, warm_fraction=warm_fraction, fresh_choices=fresh_choices, schedule=schedule, min_lr_ratio=min_lr_ratio, loss_on=loss_on, seed=seed,  # type: ignore[arg-type]
        eval_every=eval_every, save_every=save_every, save_optimizer=not no_optimizer,
        init_from=None if init_from is None else str(init_from), stop_loss=stop_loss,
        stop_accuracy=stop_accuracy, **parse_freeze(freeze),
    )  # fmt: skip
    command = "behemoth-interp " + " ".join(sys.argv[1:])
    log = train(world_dir, out, config, device=device, resume=resume, overwrite=force,
                command=command)  # fmt: skip
    typer.echo(f"wrote {out} after {log['step']} steps in {log['wall_seconds']:.0f} s")
    if "stopped" in log:
        typer.echo(f"stopped early at step {log['stopped']['step']}: {log['stopped']['reason']}")
    typer.echo(format_accuracy(log["final"]))


def parse_freeze(text: str) -> dict[str, object]:
    """--freeze '0,1,embed,unembed' as TrainConfig's freeze_blocks / freeze_embeddings /
    freeze_unembedding."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    names = {"embed": "freeze_embeddings", "unembed": "freeze_unembedding"}
    blocks = [t for t in items if t not in names]
    return {"freeze_blocks": tuple(parse_ints(",".join(blocks), "--freeze")) if blocks else (),
            **{names[t]: True for t in items if t in names}}  # fmt: skip


@app.command("evaluate")
def evaluate_cmd(
    model_dir: Path = typer.Argument(..., help="A checkpoint directory."),
    template: str = typer.Option(
        "paper", help="Grammar template(s) to ask in: a name, 'a,b', or 'all' (a table)."
    ),
) -> None:
    """Exact fact accuracy of a checkpoint on every tuple of its world, per relation."""
    hf, world, tok = load_hf(model_dir)
    names = list(TEMPLATES) if template == "all" else [t.strip() for t in template.split(",")]
    if len(names) == 1:
        typer.echo(format_accuracy(evaluate_facts(hf, world, tok, template=names[0]).summary()))
        return
    typer.echo(format_table(accuracy_by_format(hf, world, tok, names)))


def format_table(table) -> str:
    return table.T.to_string(float_format=lambda v: f"{v:.4f}")


@app.command("capacity")
def capacity_cmd(
    distribution: str = typer.Option("independent", help="independent, correlated or nested."),
    relations: int = typer.Option(6, help="Base relations."),
    objects: int = typer.Option(400, help="Objects per relation."),
    low: int = typer.Option(100, help="Smallest number of subjects to consider."),
    high: int = typer.Option(120_000, help="Largest number of subjects to consider."),
    iterations: int = typer.Option(6, help="Bisection steps."),
    target: float = typer.Option(0.95, help="Accuracy the world must reach."),
    preset: str = typer.Option("pythia-31m", help="Model size preset."),
    epochs: Optional[int] = typer.Option(None, help="The fixed budget in epochs (the paper: 460)."),
    steps: Optional[int] = typer.Option(None, help="The fixed budget in optimizer steps instead."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    warmup: int = typer.Option(0, help="Linear learning-rate warmup steps."),
    schedule: str = typer.Option("constant", help="constant (the paper) or cosine."),
    min_lr_ratio: float = typer.Option(0.0, help="Cosine floor as a fraction of --lr."),
    loss_on: str = typer.Option("all", help="all tokens (the paper) or object tokens only."),
    warm_steps: int = typer.Option(0, help="Curriculum: first steps on a few subjects only."),
    block_len: int = typer.Option(512, help="Corpus block length."),
    grammar: str = typer.Option("paper=1", help="Corpus grammar mix, e.g. 'paper=1,mcq=0.25'."),
    copies: int = typer.Option(1, help="Times each tuple appears in the corpus."),
    save_every: int = typer.Option(0, help="Steps between a probe's resumable checkpoints."),
    workdir: Optional[Path] = typer.Option(
        None, help="Record probes here; run again with the same settings to continue."
    ),
    keep: bool = typer.Option(False, "--keep", help="Keep each probe's world and model."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Binary search for the largest world (in subjects) that trains to --target accuracy."""
    budget = {"epochs": None, "steps": steps} if steps is not None else {"epochs": epochs or 460}
    probes = capacity_search(
        WorldConfig(distribution, n_relations=relations, n_objects=objects),  # type: ignore[arg-type]
        CorpusConfig(CorpusConfig.parse_mix(grammar), copies, block_len),
        TrainConfig(preset=preset, lr=lr, warmup_steps=warmup, schedule=schedule,  # type: ignore[arg-type]
                    min_lr_ratio=min_lr_ratio, loss_on=loss_on, warm_steps=warm_steps,  # type: ignore[arg-type]
                    save_every=save_every, **budget),
        target=target, low=low, high=high, iterations=iterations, device=device,
        workdir=workdir, keep=keep, progress=True,
    )  # fmt: skip
    for p in probes:
        typer.echo(
            f"{p['n_subjects']:>8} subjects  accuracy {p['accuracy']:.4f}  "
            f"{'reached' if p['reached'] else 'missed'}  ({p['steps']} steps, {p['seconds']:.0f} s)"
        )


def format_accuracy(summary: dict[str, float]) -> str:
    return "\n".join(f"{k:>14}  {v:.4f}" for k, v in summary.items())


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "models"


EDITED_DIR = typer.Argument(
    ..., help="An edited checkpoint (`edit --out`), which records its task."
)
OFFLINE_HELP = "Put plotly.js inside the page (one file to share; 4.8 MB more)."


@app.command()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("trace.html"), help="Where to write the tracing report."),
    model: str = typer.Option(
        "independent", help="Shipped model: independent, correlated, nested."
    ),
    n: int = typer.Option(4, help="Tuples of each relation to trace."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """The main job on a shipped default model: its fact accuracy, then causal tracing of every
    relation (sites per layer and position, heads at the subject and the last position, each
    exact and by attribution) on one report page."""
    from behemoth_interp.model import load_model
    from behemoth_interp.report import trace_page
    from behemoth_interp.trace import sample_tuples, trace

    path = SHIPPED / model
    # the demo's page is regenerated on every run: it replaces a page it wrote, never another file
    with claim(out, force=True, offline=offline):
        hooked = load_model(path)
        typer.echo(f"{path}: {hooked.world!r}")
        acc = evaluate_facts(hooked, hooked.world, hooked.world_tokenizer)
        typer.echo(format_accuracy(acc.summary()))
        tuples = sample_tuples(hooked.world, n, seed=0)
        exact = [trace(hooked, tuples), trace(hooked, tuples, sites="head",
                                              positions=("subject", "last"))]  # fmt: skip
        estimates = [attribution_of(hooked, tuples, r) for r in exact]
        page = trace_page(exact, attribution=estimates, accuracy=acc, run=run_info(ctx, hooked))
        page.write(out, offline=offline)
    typer.echo(f"\ncausal tracing of {len(tuples)} tuples, {n} per relation with a partner "
               "(IOI metric, Behemoth eq. 1):")  # fmt: skip
    typer.echo(exact[0].top(10).to_string(index=False))
    typer.echo(f"\nreport: {out.resolve()}")


def attribution_of(model, tuples, exact):
    """The attribution-patching estimate of the exact trace `exact` (same settings)."""
    from behemoth_interp.trace import trace

    return trace(model, tuples, **(exact.config.to_dict() | {"method": "attribution"}))


def run_info(
    ctx: typer.Context, model=None, *, checkpoint: Optional[Path] = None, world=None
) -> RunInfo:
    """The page header's facts: a loaded model's checkpoint and world (or those given), and
    the command line of `ctx`, the running command."""
    info = RunInfo.of(model) if model is not None else RunInfo()
    return RunInfo(str(checkpoint) if checkpoint is not None else info.model,
                   world if world is not None else info.world, command_line(ctx))  # fmt: skip


def command_line(ctx: typer.Context) -> str:
    """The running command as a shell line, with every option at the value it has (defaults
    included), so a page says exactly what made it."""
    words = ["behemoth-interp", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            words += [str(value)] if value is not None else []
        elif getattr(param, "is_flag", False) and not param.secondary_opts:
            words += [param.opts[0]] if value else []
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                words += [param.opts[0], str(v)]
        elif value is not None:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


@contextmanager
def claim(
    out: Path, force: bool, html: Optional[Path] = None, offline: bool = False
) -> Iterator[None]:
    """Check --out (a directory, or a .html page) and --html before any work, and hold their
    locks until the command has written them: a second process writing the same path is
    refused, and a bad path fails now, not after a long run. A page written without
    `offline` also needs the shared plotly.js beside it (or room for it)."""
    from behemoth_interp._io import check_output, output_lock

    paths = [("--out", out), *([("--html", html)] if html is not None else [])]
    with ExitStack() as stack:
        for option, path in paths:
            page = path.suffix == ".html"
            check = partial(check_output, path, overwrite=force, directory=not page, what=option,
                            **({"replaceable": is_report} if page else {}))  # fmt: skip
            check()  # before the lock, which creates the parent directories
            if page and not offline:
                check_plotly_js(path)
            stack.enter_context(output_lock(path))
            check()  # and again under it: another writer may have finished meanwhile
        yield


def parse_ints(text: str, option: str) -> list[int]:
    """'0,2' -> [0, 2], or a one-line error naming the option."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(
            f"{option} takes integers separated by commas (e.g. '0,2'), got {text!r}"
        ) from None


def write_result(
    result, out: Path, html: Optional[Path], force: bool, page: Callable[[], Page], offline: bool
) -> None:
    """An analysis result to `out`: its report `page()` if `out` ends in .html, else the saved
    result (and then the page to `html`, if given)."""
    if out.suffix == ".html":
        html = out
    else:
        result.save(out, overwrite=force)
    if html is not None:
        page().write(html, offline=offline)
    typer.echo(f"wrote {result!r} to {out}")


@app.command("trace")
def trace_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="A checkpoint directory."),
    out: Path = typer.Option(
        ..., "--out", help="A .html file for the heatmap report, or a directory for the result."
    ),
    per_relation: int = typer.Option(
        50, "--n", "--per-relation", help="Tuples per relation (those with a corruption partner)."
    ),
    relations: Optional[str] = typer.Option(
        None, "--relation", "--relations", help="Relation ids to trace, e.g. '0,2' (default: all)."
    ),
    sites: str = typer.Option(
        "resid_pre,attn_out,mlp_post",
        help="Site kinds: resid_pre, attn_out, mlp_post, mlp_out, head.",
    ),
    positions: str = typer.Option(
        "each", help="'each', or names and indices, e.g. 'subject,relation,last'."
    ),
    corruption: str = typer.Option(
        "swap", help="swap (another subject, the paper) or noise (on the subject)."
    ),
    metric: str = typer.Option("ioi", help="ioi (Behemoth eq. 1), logit_diff or prob."),
    method: str = typer.Option(
        "exact", help="exact (patched runs) or attribution (gradient estimate)."
    ),
    object_token: int = typer.Option(
        -1, help="Object token the metric reads (-1: last, 0: first)."
    ),
    seed: int = typer.Option(0, help="Seed of the tuple sample, partners and noise."),
    attribution: bool = typer.Option(
        False, "--attribution", help="Also estimate by attribution patching; the page compares."
    ),
    html: Optional[Path] = typer.Option(None, help="Also write the report page to this file."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
) -> None:
    """Causal tracing of a checkpoint's facts: restoration scores per site, layer and position."""
    from behemoth_interp.model import load_model
    from behemoth_interp.report import trace_page
    from behemoth_interp.trace import sample_tuples, trace

    if attribution and method != "exact":
        raise InvalidArgument("--attribution compares with the exact trace: leave out --method")
    with claim(out, force, html, offline):
        model = load_model(model_dir)
        chosen = parse_ints(relations, "--relation") if relations else None
        tuples = sample_tuples(
            model.world, per_relation, relations=chosen, object_token=object_token, seed=seed
        )
        pos = [
            int(p) if p.strip().lstrip("-").isdigit() else p.strip() for p in positions.split(",")
        ]
        result = trace(model, tuples, sites=tuple(s.strip() for s in sites.split(",")), positions=tuple(pos),
                       corruption=corruption, metric=metric, method=method, object_token=object_token,  # type: ignore[arg-type]
                       seed=seed)  # fmt: skip

        def page() -> Page:
            facts = model.world.facts(sorted(set(tuples[:, 1].tolist())))
            acc = evaluate_facts(model, model.world, model.world_tokenizer, facts)
            estimates = [attribution_of(model, tuples, result)] if attribution else []
            return trace_page(result, attribution=estimates, accuracy=acc, run=run_info(ctx, model))

        write_result(result, out, html, force, page, offline)
        typer.echo("top 10 by mean score:")
        typer.echo(result.top(10).to_string(index=False))


@app.command("edit")
def edit_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="A checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Directory for the edited checkpoint."),
    task: str = typer.Option("single", help="single, ten_same, ten_different or forget."),
    method: str = typer.Option("finetune", help="An edit method: " + ", ".join(METHODS)),
    blocks: Optional[str] = typer.Option(
        None, help="Blocks to edit, e.g. '5' or '2,3' (default: the method's)."
    ),
    components: Optional[str] = typer.Option(
        None, help="mlp, attn or both (default: both; ROME, MEMIT, AlphaEdit: mlp)."
    ),
    mode: Optional[str] = typer.Option(
        None, help="batched or sequential (default: batched where the method allows it)."
    ),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default 32)."),
    rome_position: Optional[str] = typer.Option(
        None, help="ROME's key: object (default) or last_subject (ROME's own site; --blocks 0)."
    ),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the method's)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: one epoch)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs over the edit dataset (default 1)."),
    objective: Optional[str] = typer.Option(
        None, help="Fine-tuning loss: " + ", ".join(OBJECTIVES) + " (default ce)."
    ),
    option: list[str] = typer.Option(
        [], "--set", help="Any method or objective setting, KEY=VALUE (e.g. beta=0.05), repeatable."
    ),
    relation: int = typer.Option(0, help="The base relation the task edits."),
    n: int = typer.Option(10, help="Tuples of ten_same / ten_different."),
    forget_fraction: Optional[float] = typer.Option(
        None, help="Share of the relation's tuples a forget dataset trains on (the paper: 5%)."
    ),
    seed: int = typer.Option(0, help="Seed of the task, the dataset and the training."),
    max_remaining: Optional[int] = typer.Option(
        None, help="Score remaining accuracy on this many tuples (default: all)."
    ),
    html: Optional[Path] = typer.Option(None, help="Also write the report page to this file."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
) -> None:
    """Edit a checkpoint with one of the paper's tasks; save the edited checkpoint and report."""
    from behemoth_interp.edit import EditDataConfig, EditTask, edit
    from behemoth_interp.report import edit_page

    if rome_position is not None and method != "rome":
        raise InvalidArgument(f"--rome-position is for --method rome, not {method}: leave it out")
    given = {"rank": rank, "lr": lr, "steps": steps, "epochs": epochs,
             "position": rome_position}  # fmt: skip
    options = {k: v for k, v in given.items() if v is not None} | parse_settings(option)
    if forget_fraction is not None:
        options["data"] = EditDataConfig(forget_fraction=forget_fraction)
    with claim(out, force, html, offline):
        hf, world, _ = load_hf(model_dir)
        drawn = EditTask.draw(world, task, seed=seed, relation=relation, n=n, correct=hf)
        chosen = parse_ints(blocks, "--blocks") if blocks else None
        result = edit(hf, drawn, method=method, blocks=chosen, components=components, mode=mode,
                      objective=objective, seed=seed, max_remaining=max_remaining, **options)  # fmt: skip
        result.save(out, overwrite=force)
        if html is not None:
            info = run_info(ctx, checkpoint=model_dir, world=world)
            edit_page(result.report, run=info, task=repr(drawn)).write(html, offline=offline)
        typer.echo(f"{drawn!r} by {method}: wrote the edited checkpoint to {out}")
        typer.echo(result.report.to_dataframe()[["metric", "value"]].to_string(index=False))


def parse_settings(items: list[str]) -> dict[str, object]:
    """['beta=0.05', 'retain=kl'] -> {'beta': 0.05, 'retain': 'kl'}: each value read as JSON
    (numbers, true/false, null, lists), else kept as text."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@app.command("oracle")
def oracle_cmd(
    model_dir: Path = typer.Argument(..., help="A checkpoint written by `train`."),
    task: str = typer.Option("single", help="single, ten_same, ten_different or forget."),
    relation: int = typer.Option(0, help="The base relation the task edits."),
    n: int = typer.Option(10, help="Tuples of ten_same / ten_different."),
    seed: int = typer.Option(0, help="Seed of the task (as `edit --seed`)."),
    cache: Path = typer.Option(DEFAULT_CACHE, help="Where oracles are kept (see data/oracles)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
) -> None:
    """The exact oracle of a task drawn as `edit` draws it: the checkpoint's recipe and seed
    trained from scratch on the world the edit makes, or read from --cache when trained before;
    prints where it is and how far the unedited checkpoint is from it."""
    from behemoth_interp.edit import EditTask, oracle_distance

    hf, world, _ = load_hf(model_dir)
    drawn = EditTask.draw(world, task, seed=seed, relation=relation, n=n, correct=hf)
    path = oracle_path(model_dir, drawn, cache)
    cached = (path / "model" / TRAIN_LOG).is_file()
    truth = oracle(model_dir, drawn, cache=cache, device=device, progress=not cached)
    d = oracle_distance(hf, truth.to("cpu"), drawn)
    typer.echo(f"{drawn!r}: oracle {'read from' if cached else 'trained into'} {path}")
    typer.echo(f"the unedited checkpoint agrees with it on {d['agreement']:.4f} of the tuples "
               f"(KL {d['kl']:.4f})")  # fmt: skip


@app.command("retention")
def retention_cmd(
    ctx: typer.Context,
    edited_dir: Path = EDITED_DIR,
    out: Path = typer.Option(..., "--out", help="Directory for the run and its result."),
    downstream: str = typer.Option(
        "general", help="Downstream task: general, new_facts, classification or instruction."
    ),
    subjects: float = typer.Option(1.0, help="Share of the eligible subjects the task uses."),
    copies: int = typer.Option(4, help="Times each downstream fact is stated."),
    disjoint: str = typer.Option(
        "tokens",
        help="Keep out every object sharing a token with the edit's (tokens) or only "
        "those objects (objects: edits of many tuples).",
    ),
    per_edit: int = typer.Option(2, help="Intrinsic facts matched to each edited one."),
    min_margin: float = typer.Option(0.1, help="Least confidence margin of a measured fact."),
    lr: float = typer.Option(FINE_TUNE.lr, help="Fine-tuning learning rate."),
    steps: int = typer.Option(
        FINE_TUNE.steps, help="Most fine-tuning steps (the task's accuracy stops it)."
    ),
    eval_every: int = typer.Option(FINE_TUNE.eval_every, help="Steps between retention scores."),
    freeze: str = typer.Option("", help="Blocks that never change (as `train --freeze`)."),
    seed: int = typer.Option(0, help="Seed of the downstream data, the sets and the fine-tune."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    html: Optional[Path] = typer.Option(None, help="Also write the report page to this file."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a retention run in --out."),
) -> None:
    """Fine-tune an edited checkpoint on a downstream task that never names the edit, and
    measure how much of the edited and of matched intrinsic knowledge is retained (Wen & Zhang)."""
    from behemoth_interp.report import retention_page
    from behemoth_interp.retention import DownstreamConfig, retention

    if resume and force:
        raise InvalidArgument(
            "--resume continues the run in --out and --force replaces it: pick one"
        )
    config = DownstreamConfig(downstream, subjects=subjects, copies=copies, disjoint=disjoint,  # type: ignore[arg-type]
                              seed=seed)  # fmt: skip
    base = dataclasses.replace(
        FINE_TUNE, lr=lr, steps=steps, eval_every=eval_every, seed=seed, **parse_freeze(freeze)
    )
    with claim(out, force or resume, html, offline):
        result = retention(edited_dir, out=out, config=config, train_config=base,
                           per_edit=per_edit, min_margin=min_margin, seed=seed, device=device,
                           overwrite=force, resume=resume)  # fmt: skip
        if html is not None:
            info = run_info(ctx, checkpoint=edited_dir, world=result.facts.world)
            retention_page(result, run=info).write(html, offline=offline)
        s = result.summary()
        typer.echo(f"wrote {out}: {s['steps']} steps"
                   + ("" if s["stopped"] is None else f" (stopped: {s['stopped']})"))  # fmt: skip
        typer.echo(f"retention: edited {s['edited_retention']:.3f} (n={s['n_edited']}), "
                   f"intrinsic {s['intrinsic_retention']:.3f} (n={s['n_intrinsic']})")  # fmt: skip


@app.command("residual")
def residual_cmd(
    ctx: typer.Context,
    edited_dir: Path = EDITED_DIR,
    before: Path = typer.Option(..., "--before", help="The unedited checkpoint it was made from."),
    out: Path = typer.Option(..., "--out", help="The report page to write (.html)."),
    oracle_cache: Optional[Path] = typer.Option(
        None,
        "--oracle",
        help="Oracle cache: add the distance to the task's oracle and attack it as the "
        "never-knew baseline (trained there if missing: a full training run).",
    ),
    probes: bool = typer.Option(True, help="Fit probes on --before and read latent knowledge."),
    attack_steps: int = typer.Option(20, help="Relearning attack steps (0: no attack)."),
    krs: bool = typer.Option(True, help="Knowledge recovery (the four settings, windows 1, 3)."),
    max_remaining: Optional[int] = typer.Option(
        500, help="Unchanged tuples scored for maintain accuracy."
    ),
    seed: int = typer.Option(0, help="Seed of every sample and of the attack."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out page."),
) -> None:
    """Is the knowledge removed or hidden? The residual-knowledge battery of an edited
    checkpoint against its original, as a report page."""
    from behemoth_interp.edit.report import EDIT_REPORT, EditReport, load_edited
    from behemoth_interp.model import check_world, hooked_in_world
    from behemoth_interp.report import residual_page
    from behemoth_interp.residual import (
        BatteryConfig,
        RelearnConfig,
        residual_knowledge,
        unedited_probes,
    )

    if out.suffix != ".html":
        raise InvalidArgument(f"--out is the report page: name a .html file, got {out}")
    check_int("attack_steps", attack_steps, 0)
    attack = RelearnConfig(steps=attack_steps, seed=seed) if attack_steps else None
    config = BatteryConfig(max_remaining=max_remaining, attack=attack, seed=seed,
                           **({} if krs else {"krs_settings": ()}))  # fmt: skip
    with claim(out, force, offline=offline):
        edited, task = load_edited(edited_dir)
        original, world, _ = load_hf(before)
        check_world(original, task.world)
        truth = None
        if oracle_cache is not None:
            truth = oracle(before, task, cache=oracle_cache, progress=True).to("cpu")
        fitted = unedited_probes(hooked_in_world(original, world), task, seed) if probes else None
        settings = EditReport.load(edited_dir / EDIT_REPORT).settings
        result = residual_knowledge(edited, task, before=original, oracle=truth, probes=fitted,
                                    settings=settings, config=config)  # fmt: skip
        info = run_info(ctx, checkpoint=edited_dir, world=world)
        residual_page(result, run=info).write(out, offline=offline)
    typer.echo(f"wrote {out}")
    typer.echo(result.to_dataframe().to_string(index=False))
    for part, why in result.undefined.items():
        typer.echo(f"{part}: {why}")


@app.command("restore")
def restore_cmd(
    ctx: typer.Context,
    vanilla_dir: Path = typer.Argument(..., help="The vanilla checkpoint directory."),
    edited_dir: Optional[Path] = typer.Argument(
        None, help="The edited checkpoint (same format); leave out to edit with --task."
    ),
    out: Path = typer.Option(
        ..., "--out", help="A .html file for the KRS plot, or a directory for the result."
    ),
    relation: int = typer.Option(
        0, "--relation", help="Relation whose prompts are scored (and edited, with --task)."
    ),
    task: Optional[str] = typer.Option(
        None, "--task", help="Edit VANILLA_DIR first: forget, single, ten_same, ten_different."
    ),
    settings: str = typer.Option(
        "coefficients,values,attention,coefficients+attention",
        help="Parts joined by '+' (coefficients, values, attention), comma-separated.",
    ),
    windows: str = typer.Option("1,3", help="Window sizes, each centred on every layer."),
    n: int = typer.Option(100, "--n", help="Prompts N (a seeded sample of the tuples)."),
    tokens: int = typer.Option(2, "--tokens", help="Vanilla continuation tokens I scored."),
    objective: str = typer.Option("ce", help="Edit objective with --task (see `edit`)."),
    forget_fraction: float = typer.Option(
        0.5, help="With --task forget: share of the relation's tuples the edit trains on."
    ),
    epochs: int = typer.Option(2, "--edit-epochs", help="Edit epochs with --task."),
    steps: Optional[int] = typer.Option(None, "--edit-steps", help="Edit steps (overrides)."),
    lr: Optional[float] = typer.Option(None, "--edit-lr", help="Edit learning rate."),
    seed: int = typer.Option(0, help="Seed of the edit task, the edit and the prompt sample."),
    html: Optional[Path] = typer.Option(None, help="Also write the report page to this file."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
) -> None:
    """Knowledge Recovery Scores: restore the vanilla model's MLP coefficients, value vectors
    and attention outputs into an edited model, window by window (Dissecting, Figure 1)."""
    from behemoth_interp.edit import EditDataConfig, EditTask, edit
    from behemoth_interp.model import hooked_in_world, load_model
    from behemoth_interp.report import restore_page
    from behemoth_interp.restore import restore

    if (edited_dir is None) == (task is None):
        raise InvalidArgument(
            "give the edited checkpoint EDITED_DIR or an edit to make with --task"
        )
    with claim(out, force, html, offline):
        hf, world, _ = load_hf(vanilla_dir)
        vanilla = hooked_in_world(hf, world)
        if task is None:
            edited = load_model(edited_dir)
            prompts = world.facts(relation)
            made = f"The edited model is the checkpoint {edited_dir}."
        else:
            drawn = EditTask.draw(world, task, seed=seed, relation=relation, correct=hf)
            result = edit(hf, drawn, objective=objective, epochs=epochs, steps=steps, seed=seed,
                          data=EditDataConfig(forget_fraction=forget_fraction), hooked=True,
                          max_remaining=2000, **({} if lr is None else {"lr": lr}))  # fmt: skip
            r = result.report
            made = (f"edit {drawn!r}: forget rate {r.forget_rate:.3f}, success {r.success_top1:.3f}"
                    f", remaining {r.remaining:.3f} (before {r.remaining_before:.3f})")  # fmt: skip
            typer.echo(made)
            edited, prompts = result.hooked, drawn
        krs = restore(vanilla, edited, prompts, settings=tuple(settings.split(",")),
                      windows=tuple(parse_ints(windows, "--windows")), n_tokens=tokens,
                      n_prompts=n, seed=seed)  # fmt: skip
        info = run_info(ctx, checkpoint=vanilla_dir, world=world)
        write_result(krs, out, html, force, lambda: restore_page(krs, run=info, edit=made), offline)
        table = krs.to_dataframe().pivot_table(index=["window", "setting"], columns="layer",
                                               values="krs", sort=False)  # fmt: skip
        typer.echo("KRS (eq. 3 on losses averaged over prompts) per window centre (layer):")
        typer.echo(table.round(3).to_string())


@app.command("probe")
def probe_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="A checkpoint directory."),
    out: Path = typer.Option(
        ..., "--out", help="A .html file for the accuracy plot, or a directory for the probes."
    ),
    relation: int = typer.Option(0, "--relation", help="The relation whose objects to probe."),
    sites: str = typer.Option(
        "resid", help="'resid' (the residual stream) and hook sites, e.g. 'resid,mlp_out'."
    ),
    position: str = typer.Option(
        "last", help="One input position: 'last', 'last_subject', a token label or an index."
    ),
    object_token: int = typer.Option(
        0, help="The object token to predict (0: first; -1: last, the ones before fed)."
    ),
    multiclass: str = typer.Option("multinomial", help="multinomial, or ovr (one-vs-rest)."),
    test_size: float = typer.Option(0.25, help="Share of each class's subjects held out."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
    html: Optional[Path] = typer.Option(None, help="Also write the report page to this file."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
) -> None:
    """Linear probes for a relation's objects at every layer, and the FLU localization."""
    from behemoth_interp.model import load_model
    from behemoth_interp.probe import flu_layers, probe
    from behemoth_interp.report import probe_page

    with claim(out, force, html, offline):
        model = load_model(model_dir)
        pos = int(position) if position.lstrip("-").isdigit() else position
        result = probe(model, relation, sites=tuple(s.strip() for s in sites.split(",")),
                       position=pos, object_token=object_token, multiclass=multiclass,  # type: ignore[arg-type]
                       test_size=test_size, seed=seed)  # fmt: skip
        flu = None
        if "resid" in result.sites:
            try:
                flu = f"FLU localization: blocks {list(flu_layers(result))}"
            except ValueError as err:
                flu = f"no FLU localization: {err}"
        page = partial(probe_page, result, run=run_info(ctx, model), flu=flu)
        write_result(result, out, html, force, page, offline)
        table = result.to_dataframe().pivot(index="layer", columns="site", values="accuracy")
        typer.echo("held-out accuracy per layer:")
        typer.echo(table.round(3).to_string())
        if flu is not None:
            typer.echo(flu)


@app.command("sweep")
def sweep_cmd(
    spec: Path = typer.Argument(..., help="A sweep spec (.yaml or .json)."),
    out: Path = typer.Option(..., "--out", help="The store directory (a rerun resumes it)."),
    executor: str = typer.Option("ray", help="ray (workers in parallel) or local (in process)."),
    workers: int = typer.Option(1, help="Ray workers (actors), each with the spec's threads."),
    address: Optional[str] = typer.Option(None, help="A running Ray cluster (default: embedded)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count and time the runs; run none."),
    calibrate: bool = typer.Option(
        True, help="--dry-run: time one run per model/method/task the store has no cost for."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed runs again."),
) -> None:
    """Run a sweep spec into a content-addressed store; runs already stored are skipped."""
    from behemoth_interp import sweep

    if dry_run:
        typer.echo(sweep.dry_run(spec, out, workers=workers, calibrate=calibrate,
                                 retry_failed=retry_failed))  # fmt: skip
        return
    summary = sweep.run_sweep(spec, out, executor=executor, workers=workers, address=address,
                              retry_failed=retry_failed)  # fmt: skip
    typer.echo(summary)


@app.command("report")
def report_cmd(
    ctx: typer.Context,
    store: Path = typer.Argument(..., help="A sweep store written by `sweep`."),
    out: Path = typer.Option(..., "--out", help="The .html page to write."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a report page written before."),
) -> None:
    """The paper's sweep figures of a store, on one HTML page."""
    from behemoth_interp.sweep import SweepResult, sweep_page

    if out.suffix != ".html":
        raise InvalidArgument(f"--out is an .html page, got {out}: e.g. --out report.html")
    with claim(out, force, offline=offline):
        result = SweepResult.load(store)
        sweep_page(result, run=run_info(ctx)).write(out, offline=offline)
    typer.echo(f"wrote {result!r} to {out}")


@app.command("reproduce")
def reproduce_cmd(
    paper: str = typer.Argument(
        ...,
        help="The paper whose experiments to run: behemoth, retention, "
        "mechanistic-unlearning or dissecting.",
    ),
    scale: str = typer.Option("quick", help="quick (minutes on one core) or paper (full grid)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Directory of the stores and report (default: reproduce/PAPER-SCALE)."
    ),
    executor: str = typer.Option("ray", help="ray (workers in parallel) or local (in process)."),
    workers: int = typer.Option(1, help="Ray workers (actors), each with the spec's threads."),
    address: Optional[str] = typer.Option(None, help="A running Ray cluster (default: embedded)."),
) -> None:
    """Run a paper's committed sweep specs (experiments/sweeps/*-SCALE.yaml) and write one
    report; a rerun into the same --out resumes."""
    from behemoth_interp.sweep.reproduce import reproduce

    out = out or Path("reproduce") / f"{paper}-{scale}"
    typer.echo(reproduce(paper, out, scale=scale, executor=executor, workers=workers,
                         address=address))  # fmt: skip


def main() -> None:
    """Console entry point: a user's mistake (a `BehemothError`) prints one line and exits 2;
    anything else is a bug and keeps its traceback."""
    try:
        app()
    except BehemothError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
