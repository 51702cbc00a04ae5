"""The command line: `world new`, `world show`, and one-line errors with exit code 2."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from behemoth_interp import TEMPLATES, Corpus, World, WorldConfig, load_world
from behemoth_interp.cli import app, main

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
                                    "['compact', 'fronted', 'mcq', 'paper', 'relation_first']"),
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
        f"error: {out} exists and is not empty: pass overwrite=True or --force\n",
    )
    code, _, _ = _main(
        monkeypatch, capsys, "world", "new", "--out", str(out), "--force", *SMALL_ARGS
    )
    assert code == 0
    code, _, stderr = _main(monkeypatch, capsys, "world", "show", str(tmp_path / "nowhere"))
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("error: ") and "world.json is missing" in stderr


def test_demo_on_the_shipped_model(tmp_path):
    """`make demo`: accuracy of the shipped model, then tracing, with an HTML report."""
    out = tmp_path / "trace.html"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "4"])
    assert result.exit_code == 0, result.output
    assert "top1/r0" in result.output and "causal tracing of 4 tuples" in result.output
    report = out.read_text()
    assert "<html>" in report and "plotly" in report.lower() and "resid_pre" in report
