"""The sweep engine: specs refused early, runs equal to direct `bi.edit` calls, the Ray and the
in-process executors agree, a killed sweep resumes to the same store, failures are recorded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import behemoth_interp as bi
from behemoth_interp._io import REPORT_MARK
from behemoth_interp.cli import app
from behemoth_interp.edit.evaluation import edit_baseline, evaluate_edit
from behemoth_interp.errors import InvalidArgument, OutputExists
from behemoth_interp.sweep import (
    Selection,
    Store,
    SweepResult,
    SweepSpec,
    block_subsets,
    bootstrap_mean,
    dry_run,
    expand,
    run_sweep,
)
from behemoth_interp.sweep.worker import jsonable

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_spec(model: Path, **changes) -> dict:
    """Six runs of about half a second on the micro model: full fine-tuning at two learning
    rates and LoRA rank 4, on block 0 and on both blocks, MLP only, one seed."""
    spec = {
        "name": "tiny",
        "models": [str(model)],
        "tasks": ["single"],
        "methods": [
            {"method": "finetune", "grid": {"lr": [1e-3, 3e-3]}},
            {"method": "lora", "grid": {"rank": [4]}},
        ],
        "blocks": [[0], [0, 1]],
        "components": ["mlp"],
        "seeds": [0],
    }
    spec.update(changes)
    return spec


def compared(store: Path) -> dict[str, dict]:
    """Every record of a store by key, without its timings (the part no rerun reproduces)."""
    out = {}
    for p in sorted((store / "runs").glob("*/*.json")):
        assert not p.name.startswith("."), p
        record = json.loads(p.read_text())
        record.pop("timings")
        out[p.stem] = record
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_store(micro_checkpoint, tmp_path_factory) -> Path:
    """The tiny sweep, uninterrupted, with the in-process executor."""
    out = tmp_path_factory.mktemp("sweep") / "store"
    summary = run_sweep(SweepSpec.from_dict(tiny_spec(micro_checkpoint)), out, executor="local",
                        progress=False)  # fmt: skip
    assert (summary.planned, summary.done, summary.failed, summary.skipped) == (6, 6, 0, 0)
    return out


# ------------------------------------------------------------------ specs
def test_spec_round_trips_through_yaml_and_json(micro_checkpoint, tmp_path):
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, blocks=["singletons", {"sample": 2}]))
    for name in ("spec.yaml", "spec.json"):
        again = SweepSpec.load(spec.save(tmp_path / name))
        assert again == spec and again.sha256 == spec.sha256
    assert SweepSpec.from_dict(tiny_spec(micro_checkpoint, seeds=3)).seeds == (0, 1, 2)


def test_block_subsets_name_the_paper_families():
    assert len(block_subsets("all", 6)) == 63
    assert block_subsets("singletons", 3) == [(0,), (1,), (2,)]
    assert block_subsets("prefixes", 3) == [(0,), (0, 1), (0, 1, 2)]
    sample = block_subsets({"sample": 10, "seed": 4}, 6)
    assert len(sample) == 10 and sample == block_subsets({"sample": 10, "seed": 4}, 6)
    assert sample != block_subsets({"sample": 10, "seed": 5}, 6)
    # a union holds each subset once, ordered by size
    assert block_subsets(["singletons", "prefixes", [2, 0]], 3) == [
        (0,), (1,), (2,), (0, 1), (0, 2), (0, 1, 2)]  # fmt: skip
    assert block_subsets(["default", [1]], 3) == [None, (1,)]


def test_expansion_is_deterministic_and_each_key_appears_once(micro_checkpoint):
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, blocks=["singletons", "prefixes"],
                                         components=["both", "default"]))  # fmt: skip
    a, b = expand(spec), expand(spec)
    assert [r.key for r in a] == [r.key for r in b]
    # subsets (0,), (1,), (0, 1) for each of 3 settings; the default components are both
    assert len(a) == 3 * 3 and a.duplicates == 9 and len({r.key for r in a}) == len(a)
    # the key is the content: another spec naming the same run gives the same key
    other = SweepSpec.from_dict(tiny_spec(micro_checkpoint, name="other", blocks=[[1]],
                                          components=["both"]))  # fmt: skip
    assert {r.key for r in expand(other)} <= {r.key for r in a}


def test_paraphrases_are_a_sweep_axis(micro_checkpoint):
    """Paraphrase augmentation as a grid axis: ROME's `paraphrases`, fine-tuning's through
    its data config."""
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, methods=[
        {"method": "rome", "grid": {"layer": [0], "paraphrases": [0, 2]}},
        {"method": "finetune", "grid": {"data": [{"paraphrases": 0}, {"paraphrases": 5}]}},
    ], blocks=[[0]]))  # fmt: skip
    runs = expand(spec).runs
    assert len({r.key for r in runs}) == 4
    got = sorted((r.method, r.config.get("paraphrases", r.config.get("data", {}).get("paraphrases")))
                 for r in runs)  # fmt: skip
    assert got == [("finetune", 0), ("finetune", 5), ("rome", 0), ("rome", 2)]


def test_localizations_are_a_sweep_axis(micro_checkpoint, tmp_path):
    """Each localization is built once per model and relation, matched ones to their target's
    parameter count, and every run is the direct `bi.edit(..., localization=)` call."""
    located = [{"source": "trace", "k": 2, "trace": "attribution"},
               {"source": "random", "match": "trace", "seed": 3}, "all_mlps"]  # fmt: skip
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, localizations=located, methods=[
        {"method": "finetune", "grid": {"lr": [3e-3]}}]))  # fmt: skip
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    run_sweep(spec, tmp_path / "store", executor="local", progress=False)
    df = SweepResult.load(tmp_path / "store").to_dataframe().set_index("localization")
    assert sorted(df.index) == ["all_mlps", "random", "trace"] and (df.status == "ok").all()
    hf, world, _ = bi.load_hf(micro_checkpoint)
    assert df.n_parameters["all_mlps"] == bi.all_mlps(hf).n_parameters(hf)
    biggest = max(c.n_parameters(hf) for c in bi.nonlocalized(hf).components)
    assert abs(df.n_parameters["random"] - df.n_parameters["trace"]) < biggest
    task = bi.EditTask.draw(world, "single", seed=0, correct=hf)
    for r in Store.open(tmp_path / "store", create=False).records():
        loc = bi.ComponentSet.from_dict(r["run"]["method"]["config"]["localization"])
        direct = bi.edit(hf, task, localization=loc, lr=3e-3, seed=0)
        expected = jsonable(direct.report.to_dict())
        expected["settings"].pop("seconds")
        assert r["report"] == expected


def test_the_battery_is_a_sweep_axis(micro_checkpoint, tmp_path):
    """Each run's battery is `bi.residual_knowledge` of its edit; a missing oracle is an
    undefined part naming the command that trains it, never a silent training run."""
    battery = {"attack": {"steps": 2}, "krs_settings": [], "neighbours": 50,
               "oracle": str(tmp_path / "oracles")}  # fmt: skip
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, battery=battery, blocks=[[0, 1]],
                                         tasks=[{"kind": "ten_same", "n": 4}], methods=[
        {"method": "finetune", "grid": {"lr": [3e-3]}}]))  # fmt: skip
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    run_sweep(spec, tmp_path / "store", executor="local", progress=False)
    (record,) = Store.open(tmp_path / "store", create=False).records()
    assert "behemoth-interp oracle" in record["battery"]["undefined"]["oracle"]
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, "ten_same", n=4, seed=0, correct=hf)
    edited = bi.edit(hf, task, blocks=[0, 1], components="mlp", lr=3e-3, seed=0)
    config = bi.BatteryConfig(neighbours=50, krs_settings=(), attack=bi.RelearnConfig(steps=2))
    direct = bi.residual_knowledge(edited.model, task, before=hf, config=config,
                                   settings=edited.report.settings).to_dataframe()  # fmt: skip
    summary = SweepResult.load(tmp_path / "store").battery_summary()
    assert summary.metric.tolist() == direct.metric.tolist() and (summary.seeds == 1).all()
    assert summary.value.to_numpy() == pytest.approx(direct.value.to_numpy(), abs=0)
    assert "relearn" in set(summary.part)
    result = SweepResult.load(tmp_path / "store")
    bars = [t for t in result.residual().data if t.type == "bar"]
    assert sorted({x for t in bars for x in t.x}) == sorted(set(summary.metric))
    with pytest.raises(InvalidArgument, match="forget task"):
        result.tradeoff()
    page = bi.sweep.write_report(result, tmp_path / "report.html").read_text()
    assert "Residual knowledge" in page and "tradeoff: not drawn" in page
    import runpy

    script = Path(__file__).resolve().parents[1] / "experiments" / "sweep_tables.py"
    table = runpy.run_path(str(script))["battery_table"](result)
    assert "relearn" in table and "| before" in table and "Means over 1 seeds" in table


def test_editability_correlates_scores_with_single_component_edits(micro_checkpoint, tmp_path):
    """A localization scoring each component by its own outcome correlates +1, the reverse
    order -1; a whole attention takes its best head's score."""
    from behemoth_interp.sweep.editability import editability

    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, blocks="singletons",
                                         components=["mlp", "attn"], methods=[
        {"method": "finetune", "grid": {"lr": [3e-3]}}]))  # fmt: skip
    run_sweep(spec, tmp_path / "store", executor="local", progress=False)
    result = SweepResult.load(tmp_path / "store")
    best = result.best().set_index("key")
    truth = {f"{c}.{b[0]}": r for c, b, r in zip(best.components, best.blocks, best.remaining)}
    assert sorted(truth) == ["attn.0", "attn.1", "mlp.0", "mlp.1"]
    names = sorted(truth)
    own = bi.ComponentSet(names[:1], "manual", names, [truth[n] for n in names])
    flipped = bi.ComponentSet(names[:1], "manual", names, [1 - truth[n] for n in names])
    heads = ["head.0.0", "head.0.1", "head.1.0", "head.1.1", "mlp.0", "mlp.1"]
    by_head = bi.ComponentSet(heads[:1], "manual", heads,
                              [truth["attn.0"], 0.0, 0.0, truth["attn.1"], truth["mlp.0"],
                               truth["mlp.1"]])  # fmt: skip
    found = editability(result, {"own": own, "flipped": flipped, "heads": by_head},
                        metrics=("remaining",)).to_dataframe().set_index("localization")  # fmt: skip
    assert len(set(truth.values())) == 4  # deterministic: the four edits keep different shares
    assert found.rho["own"] == pytest.approx(1.0) and found.rho["heads"] == pytest.approx(1.0)
    assert found.rho["flipped"] == pytest.approx(-1.0) and (found.n == 4).all()
    with pytest.raises(InvalidArgument, match="singletons"):
        editability(SweepResult([]), {"own": own})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"methods": [{"method": "nope"}]}, "methods[0].method"),
        ({"methods": [{"method": "finetune", "grid": {"lr": []}}]}, "methods[0].grid.lr"),
        ({"methods": [{"method": "finetune", "grid": {"lrr": [1e-3]}}]}, "lrr"),
        ({"methods": [{"method": "lora", "grid": {"rank": [0]}}]}, "rank"),
        ({"blocks": [[0, 2]]}, "blocks"),
        ({"blocks": "some"}, "blocks"),
        ({"components": ["mlp", "heads"]}, "components"),
        ({"tasks": ["twelve"]}, "tasks[0].kind"),
        ({"tasks": [{"kind": "single", "relation": 9}]}, "tasks[0].relation"),
        ({"seeds": []}, "seeds"),
        ({"select": {"criterion": "best"}}, "select.criterion"),
        ({"methods": [{"method": "rome", "blocks": [[0, 1]]}]}, "methods[0]"),
        ({"localizations": ["nope"]}, "localizations.source"),
        ({"localizations": ["random"]}, "localizations (random)"),
        ({"localizations": [{"source": "all_mlps", "k": 2}]}, "localizations (all_mlps)"),
        ({"localizations": [{"source": "random", "match": "flu"}]}, "localizations (random).match"),
        (
            {
                "localizations": [
                    {"source": "random", "match": "x", "name": "y"},
                    {"source": "random", "match": "y", "name": "x"},
                ]
            },
            "circular",
        ),
        ({"localizations": ["all_mlps", "all_mlps"]}, "used twice"),
        ({"localizations": ["all_mlps"], "methods": ["rome"]}, "no method of the spec"),
        ({"battery": {"atack": None}}, "battery.atack"),
        ({"battery": {"probes": "yes"}}, "battery.probes"),
        ({"battery": {"neighbours": 0}}, "battery: neighbours"),
    ],
)
def test_a_bad_spec_is_refused_before_any_run(micro_checkpoint, tmp_path, change, field):
    out = tmp_path / "store"
    with pytest.raises(InvalidArgument, match=re.escape(field)):
        run_sweep(SweepSpec.from_dict(tiny_spec(micro_checkpoint, **change)),
                  out, executor="local", progress=False)  # fmt: skip
    assert not list(out.glob("runs/*/*.json"))


def test_a_store_is_never_a_users_folder(micro_checkpoint, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match="not a sweep store"):
        run_sweep(SweepSpec.from_dict(tiny_spec(micro_checkpoint)), tmp_path / "mine",
                  executor="local", progress=False)  # fmt: skip


# ------------------------------------------------------------------ runs are direct edits
def test_each_row_equals_a_direct_edit_call(micro_checkpoint, local_store):
    hf, world, _ = bi.load_hf(micro_checkpoint)
    records = list(Store.open(local_store, create=False).records())
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    for r in records:
        method = r["run"]["method"]
        options = {"lr": method["config"]["lr"]}
        if method["name"] == "lora":
            options = {"rank": method["config"]["rank"]}
        task = bi.EditTask.draw(world, "single", seed=r["run"]["seed"], correct=hf)
        direct = bi.edit(hf, task, method=method["name"], blocks=method["blocks"],
                         components=method["components"], seed=r["run"]["seed"], **options)  # fmt: skip
        expected = jsonable(direct.report.to_dict())
        expected["settings"].pop("seconds")
        assert r["report"] == expected
        ranks = bi.move_rank(hf, direct.model)
        assert r["move_rank"]["rank"] == ranks.rank.tolist()


def test_selection_matches_select_lr(micro_checkpoint, local_store):
    """The sweep's best learning rate per cell is `select_lr`'s, from the same scores."""
    hf, world, _ = bi.load_hf(micro_checkpoint)
    best = SweepResult.load(local_store).best()
    for blocks in ([0], [0, 1]):
        task = bi.EditTask.draw(world, "single", seed=0, correct=hf)
        search = bi.select_lr(hf, task, lrs=(1e-3, 3e-3), method="finetune", blocks=blocks,
                              components="mlp", seed=0)  # fmt: skip
        df = SweepResult.load(local_store).to_dataframe()
        rows = df[(df.method == "finetune") & (df.blocks == tuple(blocks))].sort_values("lr")
        assert rows.train_success.tolist() == search.success
        assert rows.train_remaining.tolist() == search.remaining
        chosen = best[(best.method == "finetune") & (best.blocks == tuple(blocks))]
        assert chosen.lr.tolist() == [search.best_lr]


def test_the_ray_executor_gives_the_same_store(micro_checkpoint, local_store, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        summary = run_sweep(SweepSpec.from_dict(tiny_spec(micro_checkpoint)), tmp_path / "ray",
                            executor="ray", workers=2, progress=False)  # fmt: skip
    finally:
        ray.shutdown()
    errors = [r["error"] for r in compared(tmp_path / "ray").values() if r["status"] != "ok"]
    assert (summary.done, summary.failed, summary.workers) == (6, 0, 2), errors
    assert compared(tmp_path / "ray") == compared(local_store)


def test_an_embedded_clusters_workers_are_offline(monkeypatch):
    """Without a runtime environment, the embedded cluster's workers inherit the offline
    settings from the driver (nothing is ever downloaded in a run)."""
    ray = pytest.importorskip("ray")
    from behemoth_interp.sweep.ray_executor import OFFLINE, RayExecutor

    def environment(names: list[str]) -> dict[str, str | None]:  # pickled by value
        return {name: os.environ.get(name) for name in names}

    for name in OFFLINE:
        monkeypatch.delenv(name, raising=False)
    with RayExecutor(1, init_options={"object_store_memory": 80 * 1024**2}) as executor:
        executor.ready()
        seen = ray.get(ray.remote(num_cpus=0)(environment).remote(list(OFFLINE)))
    assert seen == OFFLINE
    assert not ray.is_initialized()
    assert not any(name in os.environ for name in OFFLINE)  # the driver's own are untouched


# ------------------------------------------------------------------ resuming and failures
def test_a_killed_sweep_resumes_to_the_same_store(micro_checkpoint, local_store, tmp_path):
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint)).save(tmp_path / "spec.yaml")
    out = tmp_path / "store"
    command = [sys.executable, "-m", "behemoth_interp.cli", "sweep", str(spec), "--out", str(out),
               "--executor", "local"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*/*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the sweep wrote no record in 5 minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("runs/*/*.json")))
    assert 1 <= written < 6, f"killed after {written} of 6 runs: not mid-way"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{6 - written} done, 0 failed, {written} skipped" in done.stdout
    assert compared(out) == compared(local_store)
    assert sorted(p.name for p in out.iterdir()) == ["runs", "specs", "store.json"]


def test_more_seeds_run_only_the_new_runs(micro_checkpoint, local_store, tmp_path):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(local_store, out)
    again = run_sweep(SweepSpec.from_dict(tiny_spec(micro_checkpoint)), out, executor="local",
                      progress=False)  # fmt: skip
    assert (again.done, again.skipped) == (0, 6)
    more = run_sweep(SweepSpec.from_dict(tiny_spec(micro_checkpoint, seeds=[0, 1])), out,
                     executor="local", progress=False)  # fmt: skip
    assert (more.planned, more.done, more.skipped) == (12, 6, 6)
    records = compared(out)
    assert len(records) == 12
    assert {k: v for k, v in records.items() if k in compared(local_store)} == compared(local_store)


def test_a_failing_run_is_recorded_and_the_rest_finish(micro_checkpoint, tmp_path):
    # LoRA rank 100 exceeds the micro model's 64-wide matrices: those runs fail when applied
    spec = SweepSpec.from_dict(tiny_spec(micro_checkpoint, methods=[
        {"method": "lora", "grid": {"rank": [4, 100]}}]))  # fmt: skip
    out = tmp_path / "store"
    summary = run_sweep(spec, out, executor="local", progress=False)
    assert (summary.done, summary.failed) == (2, 2)
    failed = [r for r in Store.open(out, create=False).records() if r["status"] == "failed"]
    assert {r["run"]["method"]["config"]["rank"] for r in failed} == {100}
    assert all(r["error"]["type"] == "InvalidArgument" and "LoRA rank 100" in r["error"]["message"]
               and r["report"] is None for r in failed)  # fmt: skip
    assert "failed" in str(summary) and "LoRA rank 100" in str(summary)
    # a rerun keeps the failures; retry_failed runs them again
    assert run_sweep(spec, out, executor="local", progress=False).skipped == 4
    retried = run_sweep(spec, out, executor="local", progress=False, retry_failed=True)
    assert (retried.failed, retried.skipped) == (2, 2)
    df = SweepResult.load(out).to_dataframe()
    assert (df.status == "failed").sum() == 2 and len(df) == 4


# ------------------------------------------------------------------ results
def test_dry_run_counts_and_times_from_the_store(micro_checkpoint, local_store):
    before = compared(local_store)
    plan = dry_run(SweepSpec.from_dict(tiny_spec(micro_checkpoint, seeds=[0, 1])), local_store)
    assert (plan.planned, plan.stored, plan.todo) == (12, 6, 6)
    assert plan.seconds > 0 and all("stored runs" in c["source"] for c in plan.costs.values())
    assert compared(local_store) == before
    assert "12 runs planned" in str(plan)


def test_sweep_result_figures_and_report(micro_checkpoint, local_store, tmp_path):
    result = SweepResult.load(local_store)
    df = result.to_dataframe()
    assert len(df) == 6 and {"lr", "rank", "train_success", "remaining", "fit_s"} <= set(df)
    best = result.best()
    # per seed and cell: finetune on (0,) and (0, 1) picks one lr each; lora has one setting
    assert len(best) == 4 and set(best.variant) == {"finetune", "lora"}
    per_cell = result.best(Selection(per="cell"))
    assert len(per_cell) == 4
    summary = result.summary(("success_top1", "remaining"))
    assert (summary.success_top1_lo <= summary.success_top1).all()
    for name in ("figure_blocks", "block_correlation", "lora_ranks", "dependents", "move_rank"):
        assert len(getattr(result, name)().data), name
    assert result.correlations().correlation.isna().any()  # block 0 is in every subset
    page = tmp_path / "report.html"
    out = CliRunner().invoke(app, ["report", str(local_store), "--out", str(page)])
    assert out.exit_code == 0, out.output
    text = page.read_text()
    assert text.startswith(REPORT_MARK) and text.count("<h3>") == 5


def test_move_rank_needs_the_run_that_tunes_every_block(local_store):
    """Its figure is relative to the all-blocks run: without one it says so, not an empty plot."""
    result = SweepResult.load(local_store)
    partial = SweepResult([r for r in result.records if r["run"]["method"]["blocks"] != [0, 1]])
    assert len(partial.to_dataframe()) == 3
    with pytest.raises(InvalidArgument, match="tunes every block"):
        partial.move_rank()


def test_bootstrap_mean():
    assert bootstrap_mean([0.5]) == (0.5, 0.5, 0.5)
    assert bootstrap_mean([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    mean, lo, hi = bootstrap_mean([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and 0 <= lo < 0.5 < hi <= 1


def test_a_shared_baseline_gives_the_same_report(micro_checkpoint):
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, "single", seed=1, correct=hf)
    edited = bi.edit(hf, task, lr=3e-3, blocks=[1], evaluate=False).model
    fresh = evaluate_edit(edited, task, before=hf, seed=1)
    shared = evaluate_edit(
        edited, task, before=hf, seed=1, baseline=edit_baseline(hf, task, seed=1)
    )
    assert shared == fresh
    with pytest.raises(InvalidArgument, match="another task"):
        evaluate_edit(edited, task, before=hf, seed=2, baseline=edit_baseline(hf, task, seed=1))


@pytest.mark.parametrize("kind", ["single", "forget"])
def test_training_scores_read_from_the_reports_pass_are_the_same(micro_checkpoint, kind):
    """The worker scores a run's training data from the ranks its report computed: the same
    numbers as scoring afresh, and the report the same as without shared scores."""
    hf, world, _ = bi.load_hf(micro_checkpoint)
    task = bi.EditTask.draw(world, kind, seed=1, correct=hf)
    edited = bi.edit(hf, task, lr=3e-3, blocks=[1], evaluate=False).model
    scores = bi.FactScores(edited, world)
    report = evaluate_edit(edited, task, before=hf, scores=scores)
    assert report == evaluate_edit(edited, task, before=hf)
    assert bi.training_scores(edited, task, scores=scores) == bi.training_scores(edited, task)
    with pytest.raises(InvalidArgument, match="FactScores of the model"):
        evaluate_edit(hf, task, scores=scores)


# ------------------------------------------------------------------ reproduce
def test_the_committed_specs_are_valid_and_count_as_documented():
    """Every committed spec reads and expands on the shipped models, and the quick ones plan
    the run counts docs/experiments.md states."""
    from behemoth_interp.sweep import PAPERS, paper_specs
    from behemoth_interp.sweep.reproduce import SCALES

    assert [s.name for s in paper_specs("behemoth", "paper")] == [
        f"{stem}-paper" for stem in PAPERS["behemoth"]
    ]
    counts = {s.name: dry_run(s, calibrate=False).planned for s in paper_specs("behemoth", "quick")}
    assert counts == {"figure4-single-quick": 24, "figure4-forget-quick": 24,
                      "figure7-lora-quick": 18, "figure8-correlated-quick": 24,
                      "dependents-quick": 18}  # fmt: skip
    retention = {s.name: (len(expand(s)), s.retention.downstream, s.retention.freeze)
                 for s in [*paper_specs("retention", "quick"), *paper_specs("retention", "paper")]}  # fmt: skip
    every = ("general", "new_facts", "classification", "instruction")
    assert retention == {"retention-quick": (30, every, ("none",)),
                         "retention-remedies-quick": (18, ("general",), ("none", "edited")),
                         "retention-remedies-classification-quick": (18, ("classification",),
                                                                     ("none", "edited")),
                         "retention-paper": (100, every, ("none", "edited")),
                         "retention-remedies-paper": (60, ("general",), ("none", "edited")),
                         "retention-remedies-classification-paper": (60, ("classification",),
                                                                     ("none", "edited"))}  # fmt: skip
    unlearning = {s.name: (len(s.tasks) * len(s.seeds) * sum(len(m.points()) for m in s.methods)
                           * len(s.localizations or [None]), s.battery.to_dict())
                  for p in ("mechanistic-unlearning", "dissecting") for scale in SCALES
                  for s in paper_specs(p, scale)}  # fmt: skip
    assert {k: n for k, (n, _) in unlearning.items()} == {
        "mu-localizations-quick": 15, "mu-localizations-paper": 420,
        "dissecting-krs-quick": 45, "dissecting-krs-paper": 150}  # fmt: skip
    assert unlearning["mu-localizations-quick"][1]["probes"]
    assert unlearning["dissecting-krs-quick"][1]["krs_settings"]


def test_reproduce_runs_every_spec_resumes_and_guards_its_directory(micro_checkpoint, tmp_path):
    from behemoth_interp.errors import MissingInput
    from behemoth_interp.sweep import PAPERS, reproduce

    specs = tmp_path / "repo" / "experiments" / "sweeps"
    specs.mkdir(parents=True)
    one = {"methods": [{"method": "finetune", "grid": {"lr": [3e-3]}}], "blocks": [[1]]}
    for stem in PAPERS["behemoth"]:
        SweepSpec.from_dict(tiny_spec(micro_checkpoint, name=f"{stem}-quick", **one)).save(
            specs / f"{stem}-quick.yaml"
        )
    out = tmp_path / "out"
    done = reproduce("behemoth", out, specs=specs, executor="local", progress=False)
    assert [s.done for s in done.summaries.values()] == [1] * 5
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["reproduce.json", "report.html", *(f"{stem}-quick" for stem in PAPERS["behemoth"])]
    )
    page = (out / "report.html").read_text()
    assert page.startswith(REPORT_MARK) and page.count("<script") >= 1
    assert all(f"id='{stem}-quick'" in page for stem in PAPERS["behemoth"])
    again = reproduce("behemoth", out, specs=specs, executor="local", progress=False)
    assert [(s.done, s.skipped) for s in again.summaries.values()] == [(0, 1)] * 5
    with pytest.raises(OutputExists, match="reproduces behemoth at quick"):
        reproduce("behemoth", out, scale="paper", executor="local")  # the committed specs
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match="not a reproduction"):
        reproduce("behemoth", tmp_path / "mine", specs=specs, executor="local")
    with pytest.raises(InvalidArgument, match="unknown paper"):
        reproduce("gpt4", tmp_path / "x", specs=specs)
    with pytest.raises(MissingInput, match="figure4-single-paper.yaml is missing"):
        reproduce("behemoth", tmp_path / "x", scale="paper", specs=specs)


def test_the_docs_table_script_reads_a_store(local_store):
    """experiments/sweep_tables.py, which makes docs/experiments.md's tables, runs on a store."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "experiments" / "sweep_tables.py"
    tables = runpy.run_path(str(script))
    result = SweepResult.load(local_store)
    blocks = tables["blocks_table"](result)
    # a header, its rule, and a row per method (finetune, lora) and size (1 and 2 blocks)
    assert blocks.count("\n") == 1 + 4 and blocks.count("lora") == 2
    # two subsets per cell: too few for a correlation (it needs three)
    assert "no correlation" in tables["correlation_table"](result)
    ranks = tables["move_rank_tables"](result)
    assert "full rank 64" in ranks and "W_out" in ranks
    assert tables["dependents_table"](result).count("finetune") == 2
