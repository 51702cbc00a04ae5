"""KRS restoration: exact recovery where the edit is fully restored, exact zeros where the
restored part was never edited, windows, excluded prompts, the hook layer, the result object,
the CLI and the bad-input cases, all on the micro model."""

from __future__ import annotations

import copy
import importlib
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from behemoth_interp import EditTask, load_hf
from behemoth_interp.cli import app, main
from behemoth_interp.edit import edit
from behemoth_interp.restore import (
    SETTINGS,
    KRSResult,
    RestoreConfig,
    parse_setting,
    restore,
    window_layers,
)

EVERY_PART = "coefficients+values+attention"
restore_module = importlib.import_module("behemoth_interp.restore")  # bi.restore is the function


@pytest.fixture(scope="module")
def vanilla(micro_model):
    torch.set_num_threads(1)  # a 2-layer model gains nothing from threads (see conftest)
    return micro_model


@pytest.fixture(scope="module")
def everywhere(vanilla) -> int:
    """A window size that covers every layer whatever its centre."""
    return 2 * vanilla.cfg.n_layers - 1


def _perturbed(model, names: tuple[str, ...], seed: int = 0, scale: float = 0.1):
    """A copy of `model` with every parameter whose name contains one of `names` perturbed."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if any(n in name for n in names):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def finetuned(micro_checkpoint):
    """Forget-relation-1 edits by fine-tuning, hooked: attention only, and whole blocks."""
    hf, world, _ = load_hf(micro_checkpoint)
    task = EditTask.draw(world, "forget", relation=1)
    return {
        components: edit(hf, task, components=components, steps=5, hooked=True, evaluate=False)
        for components in ("attn", "both")
    }


def _assert_all(scores: dict[str, torch.Tensor], value: float, atol: float) -> None:
    for setting, s in scores.items():
        torch.testing.assert_close(s, torch.full_like(s, value), atol=atol, rtol=0, msg=setting)


# ---------------------------------------------------------------------------------- exactness
def test_coefficients_and_attention_undo_an_attention_and_w_in_edit(vanilla, everywhere, finetuned):
    """An edit confined to attention weights and MLP W_in (b_in) leaves W_out as it was:
    restoring every layer's coefficients and attention outputs gives back the vanilla logits."""
    constructed = _perturbed(vanilla, (".attn.", "mlp.W_in", "mlp.b_in"))
    for edited in (constructed, finetuned["attn"].hooked):
        result = restore(vanilla, edited, vanilla.world.facts(), windows=everywhere,
                         settings="coefficients+attention", n_prompts=None)  # fmt: skip
        assert result.n_excluded == 0 and float(result.edited_loss.min()) > 1e-4
        _assert_all(result.prompt_krs, 1.0, atol=1e-5)
        _assert_all(result.krs, 1.0, atol=1e-5)


def test_coefficients_values_and_attention_undo_any_block_edit(vanilla, everywhere, finetuned):
    """Every parameter of every block changed (layer norms too): restoring coefficients, value
    vectors (W_out, b_out) and attention outputs everywhere recovers the vanilla logits."""
    constructed = _perturbed(vanilla, ("blocks.",))
    for edited in (constructed, finetuned["both"].hooked):
        result = restore(vanilla, edited, vanilla.world.facts(1), windows=everywhere,
                         settings=EVERY_PART)  # fmt: skip
        _assert_all(result.prompt_krs, 1.0, atol=1e-5)
    # without the values, a W_out edit stays: restoration is incomplete
    partial = restore(vanilla, constructed, vanilla.world.facts(1), windows=everywhere,
                      settings="coefficients+attention")  # fmt: skip
    assert float(partial.krs["coefficients+attention"].max()) < 0.99


def test_values_after_an_attention_only_edit_restore_nothing(vanilla, finetuned):
    """W_out and b_out are untouched by an attention edit: swapping them in changes nothing.
    Blocks are parallel, so layer 0's MLP reads the (unchanged) embeddings: its coefficients
    are already the vanilla ones."""
    result = restore(vanilla, finetuned["attn"].hooked, vanilla.world.facts(1), windows=(1, 3))
    _assert_all({"values": result.prompt_krs["values"]}, 0.0, atol=1e-6)
    _assert_all({"coefficients": result.prompt_krs["coefficients"][0, 0]}, 0.0, atol=1e-6)
    assert float(result.krs["attention"].max()) > 0.1


def test_a_window_restores_exactly_its_layers(vanilla):
    """An edit of layer 1's attention only: restoring layer 1's attention output recovers
    everything, restoring layer 0's recovers nothing."""
    edited = _perturbed(vanilla, ("blocks.1.attn.",))
    result = restore(vanilla, edited, vanilla.world.facts(0), settings="attention", windows=1)
    scores = result.prompt_krs["attention"][0]
    _assert_all({"layer 1": scores[1]}, 1.0, atol=1e-5)
    _assert_all({"layer 0": scores[0]}, 0.0, atol=1e-6)


def test_window_layers_are_centred_and_truncated():
    assert list(window_layers(0, 5, 6)) == [0, 1, 2]
    assert list(window_layers(3, 5, 6)) == [1, 2, 3, 4, 5]
    assert list(window_layers(5, 5, 6)) == [3, 4, 5]
    assert list(window_layers(2, 1, 6)) == [2]
    assert list(window_layers(2, 4, 6)) == [0, 1, 2, 3]
    assert list(window_layers(1, 99, 2)) == [0, 1]
    with pytest.raises(ValueError, match="window sizes must be at least 1"):
        window_layers(0, 0, 6)
    with pytest.raises(ValueError, match="window centre 6 is not a layer: the model has 0..5"):
        window_layers(6, 3, 6)


# ---------------------------------------------------------------------------------- zero losses
def test_restoring_into_the_vanilla_model_raises(vanilla):
    for same in (vanilla, copy.deepcopy(vanilla)):
        with pytest.raises(ValueError, match="vanilla model's parameters: there is nothing to"):
            restore(vanilla, same, vanilla.world.facts(0))


def test_prompts_the_edit_left_unchanged_are_excluded(vanilla):
    """Perturbing one subject token's embedding changes exactly the prompts containing it."""
    world, tok = vanilla.world, vanilla.world_tokenizer
    token = int(tok.entity_tokens("subject", np.array([3]))[0, 0])
    edited = copy.deepcopy(vanilla)
    with torch.no_grad():
        edited.W_E[token] += 1.0
    facts = world.facts()
    result = restore(vanilla, edited, facts, windows=1, n_prompts=None)
    touched = (result.prompts == token).any(1)
    assert 0 < int(touched.sum()) < len(facts)
    assert torch.equal(result.excluded, ~touched) and result.n_excluded == int((~touched).sum())
    for setting, s in result.prompt_krs.items():
        assert s[..., ~touched].isnan().all() and not s[..., touched].isnan().any()
        torch.testing.assert_close(result.prompt_mean[setting], s[..., touched].mean(-1))
        restored, base = result.losses[setting][..., touched], result.edited_loss[touched]
        torch.testing.assert_close(result.krs[setting], 1 - restored.mean(-1) / base.mean())
    assert (result.to_dataframe()["n_prompts"] == int(touched.sum())).all()
    untouched = facts[~touched.numpy()]
    with pytest.raises(ValueError, match=r"logits equal the vanilla model's on all \d+ prompts"):
        restore(vanilla, edited, untouched, n_prompts=None)


# ---------------------------------------------------------------------------------- hook layer
def test_restore_uses_the_hook_layer_and_matches_plain_transformer_lens(vanilla, monkeypatch):
    """restore touches the models only through hooks.capture / patch / swap_params (the layer
    trace uses), and agrees with a reference built from TransformerLens hooks directly."""
    edited = _perturbed(vanilla, ("blocks.",), seed=1)
    facts = vanilla.world.facts(0)[:6]
    calls: dict[str, int] = {}
    for name in ("capture", "patch", "swap_params"):
        real = getattr(restore_module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(restore_module, name, spy)
    result = restore(vanilla, edited, facts, settings=("coefficients", "values"), windows=1)
    monkeypatch.undo()
    n_layers = vanilla.cfg.n_layers
    assert calls["capture"] == 2 and calls["swap_params"] == n_layers
    assert calls["patch"] == 2 * n_layers + result.config.n_tokens

    # the vanilla model knows every fact: its greedy continuation is the object's tokens
    objects = vanilla.world_tokenizer.entity_tokens("object", facts[:, 2])
    assert np.array_equal(result.continuation.numpy(), objects)
    x = torch.cat([result.prompts, result.continuation[:, :-1]], 1)
    read = slice(result.prompts.shape[1] - 1, None)
    layer = n_layers - 1
    swapped = copy.deepcopy(edited)
    with torch.no_grad():
        logits_v, cache = vanilla.run_with_cache(x)

        def mse(logits):
            return ((logits[:, read] - logits_v[:, read]) ** 2).mean((1, 2))

        base = mse(edited(x))
        hook = (f"blocks.{layer}.mlp.hook_post", lambda act, hook: cache[hook.name])
        coefficients = 1 - mse(edited.run_with_hooks(x, fwd_hooks=[hook])) / base
        for name in ("W_out", "b_out"):
            getattr(swapped.blocks[layer].mlp, name).copy_(getattr(vanilla.blocks[layer].mlp, name))
        values = 1 - mse(swapped(x)) / base
    torch.testing.assert_close(result.edited_loss, base)
    torch.testing.assert_close(
        result.prompt_krs["coefficients"][0, layer], coefficients, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(result.prompt_krs["values"][0, layer], values, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- inputs
def test_tasks_tokens_samples_and_batches_agree(vanilla, finetuned):
    edited = finetuned["both"].hooked
    world = vanilla.world
    task = EditTask.draw(world, "forget", relation=1)
    kw = dict(settings=("attention", "values"), windows=1)
    by_task = restore(vanilla, edited, task, n_prompts=None, **kw)
    assert np.array_equal(by_task.tuples, task.facts)
    by_tokens = restore(vanilla, edited, by_task.prompts, n_prompts=None, batch_size=7, **kw)
    assert by_tokens.tuples is None and torch.equal(by_tokens.prompts, by_task.prompts)
    for s in by_task.settings:
        torch.testing.assert_close(by_tokens.losses[s], by_task.losses[s], atol=1e-6, rtol=1e-5)
    sample = restore(vanilla, edited, task, n_prompts=10, seed=4, **kw)
    again = restore(vanilla, edited, task, n_prompts=10, seed=4, **kw)
    assert len(sample.tuples) == 10 and np.array_equal(sample.tuples, again.tuples)
    rows = [int(np.flatnonzero((task.facts == t).all(1))[0]) for t in sample.tuples]
    torch.testing.assert_close(sample.losses["values"], by_task.losses["values"][..., rows])
    longer = restore(vanilla, edited, task, n_tokens=3, n_prompts=5, **kw)
    assert longer.continuation.shape == (5, 3)


def test_bad_inputs_are_named(vanilla, worlds):
    edited = _perturbed(vanilla, ("blocks.0.attn.",))
    facts = vanilla.world.facts(0)
    with pytest.raises(ValueError, match="unknown restore setting 'keys'"):
        restore(vanilla, edited, facts, settings="keys")
    with pytest.raises(ValueError, match="names a part twice"):
        parse_setting("attention+attention")
    with pytest.raises(ValueError, match="window sizes must be integers >= 1"):
        restore(vanilla, edited, facts, windows=(0,))
    with pytest.raises(ValueError, match=r"n_tokens \(I\) must be at least 1"):
        restore(vanilla, edited, facts, n_tokens=0)
    with pytest.raises(ValueError, match="is not in this world"):
        restore(vanilla, edited, np.array([[0, 0, (facts[0, 2] + 1) % 16]]))
    with pytest.raises(ValueError, match="task was drawn from another world"):
        restore(vanilla, edited, EditTask.draw(worlds["independent"][0], "forget"))
    with pytest.raises(ValueError, match=r"prompt tokens must be ids in 0\.\."):
        restore(vanilla, edited, torch.full((2, 5), 10_000))
    bigger = copy.deepcopy(vanilla)
    bigger.cfg = copy.copy(vanilla.cfg)
    bigger.cfg.d_mlp = 2 * vanilla.cfg.d_mlp
    with pytest.raises(ValueError, match="the models have different shapes"):
        restore(vanilla, bigger, facts)


# ---------------------------------------------------------------------------------- result
def test_config_round_trip_and_canonical_settings():
    config = RestoreConfig(("attention+coefficients", "values"), windows=(5, 1), n_prompts=None)
    assert config.settings == ("coefficients+attention", "values")
    assert RestoreConfig.from_dict(config.to_dict()) == config
    assert RestoreConfig().settings == SETTINGS
    with pytest.raises(ValueError, match="repeat a size"):
        RestoreConfig(windows=(3, 3))
    with pytest.raises(ValueError, match="unknown RestoreConfig fields"):
        RestoreConfig.from_dict({**config.to_dict(), "layers": 3})


@pytest.fixture(scope="module")
def krs_result(vanilla, finetuned) -> KRSResult:
    return restore(vanilla, finetuned["both"].hooked, vanilla.world.facts(1), windows=(1, 3),
                   n_prompts=12)  # fmt: skip


def test_the_headline_is_eq3_on_losses_averaged_over_prompts(krs_result):
    """`krs` is Dissecting eq. 3 as the paper defines it, 1 - mean(restored) / mean(edited);
    `krs_prompt_mean` is the mean of the per-prompt ratios. Both by hand from the losses."""
    df = krs_result.to_dataframe()
    edited = krs_result.edited_loss.double().numpy()
    assert (edited > 0).all()
    gaps = []
    for row in df.itertuples():
        wi = krs_result.windows.index(row.window)
        restored = krs_result.losses[row.setting][wi, row.layer].double().numpy()
        assert row.krs == pytest.approx(1 - restored.mean() / edited.mean(), abs=1e-6)
        assert row.krs_prompt_mean == pytest.approx(np.mean(1 - restored / edited), abs=1e-6)
        assert row.n_prompts == len(edited)
        gaps.append(abs(row.krs - row.krs_prompt_mean))
    assert max(gaps) > 1e-3  # the two aggregates do differ on this edit: the test tells them apart
    per = krs_result.to_dataframe(per_prompt=True)
    means = per.groupby(["setting", "window", "layer"], sort=False).prompt_krs.mean()
    np.testing.assert_allclose(means.to_numpy(), df.krs_prompt_mean.to_numpy(), atol=1e-6)
    fig = krs_result.plot()
    for trace in fig.data:  # the plotted lines are the headline
        window = int(trace.xaxis[1:] or 1)
        rows = df[(df.setting == trace.name) & (df.window == krs_result.windows[window - 1])]
        np.testing.assert_allclose(trace.y, rows.krs.to_numpy())


def test_result_dataframe_plot_and_round_trip(vanilla, krs_result, tmp_path):
    result = krs_result
    n_layers, n = vanilla.cfg.n_layers, 12
    df = result.to_dataframe()
    assert len(df) == len(SETTINGS) * 2 * n_layers
    row = df[(df.setting == "attention") & (df.window == 3) & (df.layer == 0)].iloc[0]
    assert (row.first_layer, row.last_layer) == (0, 1)
    assert row.krs == pytest.approx(float(result.krs["attention"][1, 0]))
    assert row.krs_prompt_mean == pytest.approx(float(result.prompt_mean["attention"][1, 0]))
    per = result.to_dataframe(per_prompt=True)
    assert len(per) == len(df) * n and {"subject", "relation", "object"} <= set(per.columns)
    fig = result.plot()
    assert len(fig.data) == len(SETTINGS) * 2 and fig.layout.title.text.startswith("Knowledge")
    assert "eq. 3 on losses averaged over 12 prompts" in fig.layout.title.text
    back = KRSResult.load(result.save(tmp_path / "krs"))
    assert back.config == result.config and np.array_equal(back.tuples, result.tuples)
    for s in result.settings:
        assert torch.equal(back.losses[s], result.losses[s])
    assert torch.equal(back.continuation, result.continuation) and "12 prompts" in repr(back)
    with pytest.raises(FileExistsError):
        result.save(tmp_path / "krs")


# ---------------------------------------------------------------------------------- CLI
def test_restore_command(micro_checkpoint, finetuned, tmp_path, monkeypatch, capsys):
    edited_dir = finetuned["attn"].save(tmp_path / "edited")  # as `behemoth-interp edit` saves
    args = ["restore", str(micro_checkpoint), str(edited_dir), "--relation", "1", "--n", "8",
            "--windows", "1", "--settings", "values,attention"]  # fmt: skip
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "krs.html")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "krs.html").is_file() and "attention" in done.output
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "krs")])
    assert done.exit_code == 0, done.output
    saved = KRSResult.load(tmp_path / "krs")
    _assert_all({"values": saved.prompt_krs["values"]}, 0.0, atol=1e-6)
    assert (saved.tuples[:, 1] == 1).all() and len(saved.tuples) == 8
    on_the_fly = ["restore", str(micro_checkpoint), "--task", "forget", "--relation", "1",
                  "--edit-steps", "3", "--n", "6", "--out", str(tmp_path / "fly.html")]  # fmt: skip
    done = CliRunner().invoke(app, on_the_fly)
    assert done.exit_code == 0, done.output
    assert "forget rate" in done.output and (tmp_path / "fly.html").is_file()
    for bad, message in [
        ([str(micro_checkpoint)], "error: there is nothing to recover"),
        ([], "error: give the edited checkpoint EDITED_DIR or an edit to make with --task"),
    ]:
        argv = ["behemoth-interp", "restore", str(micro_checkpoint), *bad, "--out", "x.html"]
        monkeypatch.setattr(sys, "argv", argv)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith(message.split(":")[0]) and message.split(": ")[1] in err
