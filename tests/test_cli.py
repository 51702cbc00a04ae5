"""The command line: `world new`, `world show`, and one-line errors with exit code 2."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from behemoth_interp import TEMPLATES, Corpus, World, WorldConfig, load_world
from behemoth_interp.cli import app, main
from behemoth_interp.report import plotly_js_name

runner = CliRunner()
SMALL_ARGS = ["--subjects", "20", "--relations", "3", "--objects", "9", "--block-len", "64"]


def test_world_new_then_show(tmp_path):
    out = tmp_path / "w"
    result = runner.invoke(app, ["world", "new", "--out", str(out), *SMALL_ARGS, "--seed", "4",
                                 "--copies", "2", "--grammar", "paper=1,mcq=0.5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    world, tok = load_world(out)
    assert world == World.generate(WorldConfig(n_subjects=20, n_relations=3, n_objects=9, seed=4))
    corpus = Corpus.load(out / "corpus")
    assert corpus.sentences.num_rows == 2 * 60 and corpus.config.block_len == 64
    assert corpus.config.grammar_mix == (("mcq", 0.5), ("paper", 1.0))
    assert result.output == f"wrote {world!r} and a corpus of {corpus.n_blocks} blocks to {out}\n"

    shown = runner.invoke(app, ["world", "show", str(out), "--samples", "3"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == "World(independent, subjects=20, relations=3, objects=9, facts=60, seed=4)"
    assert "relations: r0, r1, r2" in lines
    assert f"vocabulary: {tok.vocab_size} tokens" in lines
    assert "  subject        20 entities, 2 token(s) each, position sets 5 x 4" in lines
    for name, template in TEMPLATES.items():
        i = lines.index(f"{name}: {template.description}")
        samples = lines[i + 1 : i + 4]
        assert len(samples) == 3 and all(s.endswith(".<|endoftext|>") for s in samples)
    assert lines[-1] == (f"corpus: 120 sentences, {corpus.n_tokens} tokens in {corpus.n_blocks} "
                         "blocks of 64 (grammar mcq=0.5, paper=1)")  # fmt: skip


@pytest.mark.parametrize("distribution", ["correlated", "nested"])
def test_world_new_other_distributions(tmp_path, distribution):
    out = tmp_path / distribution
    args = ["world", "new", "--out", str(out), *SMALL_ARGS, "--distribution", distribution,
            "--correlated", "0,2", "--nested-objects", "4", "--grammar", "paper,mcq"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    world, _ = load_world(out)
    assert world.config.distribution == distribution
    if distribution == "correlated":
        assert world.config.correlated == (0, 2)
        assert (world.objects[:, 0] == world.objects[:, 2]).all()
    else:
        assert world.n_relations == 9 and world.config.n_nested_objects == 4
    shown = runner.invoke(app, ["world", "show", str(out)])
    assert shown.exit_code == 0, shown.output


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["behemoth-interp", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subjects", "0"], "error: n_subjects must be at least 1, got 0"),
        (["--distribution", "zipf"], "error: unknown distribution 'zipf': choose 'independent', "
                                     "'correlated' or 'nested'"),
        (["--distribution", "correlated", "--relations", "1"],
         "error: a correlated world needs at least 2 relations, got n_relations=1"),
        (["--grammar", "sonnet=1"], "error: unknown template 'sonnet': choose one of "
                                    f"{sorted(TEMPLATES)}"),
    ],
)  # fmt: skip
def test_bad_config_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "w"
    code, stdout, stderr = _main(monkeypatch, capsys, "world", "new", "--out", str(out), *args)
    assert code == 2
    assert stderr == message + "\n"
    assert stdout == ""
    assert not out.exists()


def test_existing_directory_and_missing_world_exit_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "w"
    code, _, _ = _main(monkeypatch, capsys, "world", "new", "--out", str(out), *SMALL_ARGS)
    assert code == 0
    code, _, stderr = _main(monkeypatch, capsys, "world", "new", "--out", str(out), *SMALL_ARGS)
    assert (code, stderr) == (
        2,
        f"error: --out {out} exists and is not empty: choose another path, or pass --force "
        "(overwrite=True) to replace it\n",
    )
    code, _, _ = _main(
        monkeypatch, capsys, "world", "new", "--out", str(out), "--force", *SMALL_ARGS
    )
    assert code == 0
    code, _, stderr = _main(monkeypatch, capsys, "world", "show", str(tmp_path / "nowhere"))
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("error: ") and "world.json is missing" in stderr


def test_demo_on_the_shipped_model(demo_run):
    """`make demo`: accuracy of the shipped model, then tracing of every relation, with the
    report page (its plotly.js beside it)."""
    output, out = demo_run
    assert "top1/r5" in output and "causal tracing of 12 tuples" in output
    report = out.read_text()
    assert "<html lang='en'>" in report and "resid_pre" in report and "Heads at" in report
    assert "Fact accuracy per relation" in report and "Attribution patching" in report
    assert (out.parent / plotly_js_name()).is_file() and len(report) < 500_000


# ------------------------------------------------------------------ arguments mean what they say
@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "w"
    assert runner.invoke(app, ["world", "new", "--out", str(out), *SMALL_ARGS]).exit_code == 0
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "epochs (--epochs) must be >= 1, got 0"),
        (["--steps", "0"], "steps (--steps) must be >= 1, got 0"),
        (["--eval-every", "0"], "eval_every (--eval-every) must be >= 1, got 0"),
        (["--save-every", "-1"], "save_every (--save-every) must be >= 0, got -1"),
        (["--warmup", "-5"], "warmup_steps (--warmup) must be >= 0, got -5"),
        (["--weight-decay", "-0.1"], "weight_decay (--weight-decay) must be >= 0, got -0.1"),
        (["--warm-fraction", "0"], "warm_fraction (--warm-fraction) must be > 0 and <= 1, got 0.0"),
        (["--lr", "0"], "lr (--lr) must be > 0, got 0.0"),
        (["--resume", "--force"], "--resume continues the run in --out and --force replaces it: pick one"),
        (["--freeze", "0,top"], "--freeze takes integers separated by commas (e.g. '0,2'), got '0,top'"),
        (["--stop-accuracy", "0"], "stop_accuracy (--stop-accuracy) must be > 0 and <= 1, got 0.0"),
        (["--init-from", "nowhere"], "nowhere is not a directory: pass a checkpoint written by `train`"),
    ],
)  # fmt: skip
def test_bad_train_arguments(micro_world, tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "m"
    code, stdout, stderr = _main(monkeypatch, capsys, "train", str(micro_world), "--out",
                                 str(out), "--preset", "tiny", *args)  # fmt: skip
    assert (code, stderr) == (2, f"error: {message}\n")
    assert not out.exists()


def test_train_continues_a_checkpoint_with_frozen_parts(micro_world, tmp_path, monkeypatch, capsys):
    base, frozen = tmp_path / "base", tmp_path / "frozen"
    args = ("--preset", "tiny", "--steps", "3", "--eval-every", "3")
    assert _main(monkeypatch, capsys, "train", str(micro_world), "--out", str(base), *args)[0] == 0
    code, stdout, _ = _main(monkeypatch, capsys, "train", str(micro_world), "--out", str(frozen),
                            *args, "--init-from", str(base), "--freeze", "0,1,embed,unembed",
                            "--stop-accuracy", "0.001")  # fmt: skip
    assert code == 0 and "stopped early at step 3: fact accuracy" in stdout
    assert (frozen / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


def test_train_leaves_an_occupied_out_untouched(micro_world, tmp_path, monkeypatch, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.csv").write_text("1,2,3")
    for extra in ([], ["--force"]):
        code, _, stderr = _main(monkeypatch, capsys, "train", str(micro_world), "--out",
                                str(user), "--preset", "tiny", "--steps", "2", *extra)  # fmt: skip
        assert code == 2 and stderr.startswith(f"error: --out {user}") and stderr.count("\n") == 1
    assert [p.name for p in user.iterdir()] == ["data.csv"]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["trace", "--relation", "a"], "--relation takes integers separated by commas"),
        (["trace", "--n", "-3"], "n_per_relation (--n) must be >= 1, got -3"),
        (["edit", "--n", "0"], "n (--n) must be >= 1, got 0"),
        (["edit", "--max-remaining", "0"], "max_remaining (--max-remaining) must be >= 1, got 0"),
        (["edit", "--blocks", "1.5"], "--blocks takes integers separated by commas"),
        (["edit", "--task", "ten_same", "--n", "50"], "no object of relation r0 is shared by 50"),
    ],
)  # fmt: skip
def test_bad_analysis_arguments(micro_checkpoint, tmp_path, monkeypatch, capsys, command, message):
    name, *rest = command
    out = tmp_path / ("out.html" if name == "trace" else "out")
    code, _, stderr = _main(monkeypatch, capsys, name, str(micro_checkpoint), "--out", str(out),
                            *rest)  # fmt: skip
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not out.exists()


def test_html_outputs_are_checked_before_the_work(micro_checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "page.html").write_text("<html>a user's page</html>")
    for html in (tmp_path / "page.html", tmp_path / "page.html" / "x.html"):
        code, _, stderr = _main(monkeypatch, capsys, "edit", str(micro_checkpoint), "--out",
                                str(tmp_path / "e"), "--html", str(html))  # fmt: skip
        assert code == 2 and "--html" in stderr, stderr
    assert (tmp_path / "page.html").read_text() == "<html>a user's page</html>"
    assert not (tmp_path / "e").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    import behemoth_interp.cli as cli

    def broken() -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main()


def test_evaluate_prints_the_per_format_table(micro_checkpoint, monkeypatch, capsys):
    code, stdout, stderr = _main(monkeypatch, capsys, "evaluate", str(micro_checkpoint),
                                 "--template", "all")  # fmt: skip
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].split() == ["r0", "r1", "all"]
    assert [line.split()[0] for line in lines[1:]] == list(TEMPLATES)
    paper = lines[1 + list(TEMPLATES).index("paper")].split()
    assert paper[1:] == ["1.0000", "1.0000", "1.0000"]  # the micro model knows its template
