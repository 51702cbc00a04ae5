"""Report pages: the page builder (header, tables, plotly.js once, inline or shared), the trace
report's content, and every command's page opened in headless Chromium."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from typer.testing import CliRunner

import behemoth_interp as bi
from behemoth_interp._io import REPORT_MARK, is_report
from behemoth_interp.cli import app
from behemoth_interp.errors import InvalidArgument, OutputExists
from behemoth_interp.report import (
    Html,
    Page,
    RunInfo,
    plotly_js_name,
    trace_page,
    write_plotly_js,
)

runner = CliRunner()


def _figure(title: str = "f") -> go.Figure:
    return go.Figure(go.Heatmap(z=[[0.0, 1.0], [-1.0, 0.5]]), layout={"title": title})


# ---------------------------------------------------------------------------------- the builder
def test_page_has_header_sections_settings_and_plotly_once(tmp_path, worlds):
    world, _ = worlds["independent"]
    run = RunInfo("models/m", world, "behemoth-interp trace models/m --out t.html")
    page = Page(
        "A <title>", run=run, about=["Read <this>."], settings={"seed": 3, "sites": ("a", "b")}
    )
    page.section("Two figures", "x < y", _figure("one"), _figure("two"))
    page.section("A table", pd.DataFrame({"a": [1.5, 2.0]}), Html("<p id='raw'>raw</p>"), level=3)
    shared = page.write(tmp_path / "p.html")
    text = shared.read_text()
    assert text.startswith(REPORT_MARK + "\n<!DOCTYPE html>") and is_report(shared)
    assert "<h1>A &lt;title&gt;</h1>" in text and "<p>Read &lt;this&gt;.</p>" in text
    for fact in ("models/m", repr(world), world.fingerprint, "behemoth-interp trace models/m",
                 " UTC", "0.1.0"):  # fmt: skip
        assert fact in text, fact
    assert text.index("How to read this") < text.index("Two figures") < text.index("Settings")
    assert (
        "<p>x &lt; y</p>" in text and "<h3>A table</h3>" in text and "<p id='raw'>raw</p>" in text
    )
    assert (
        "a, b" in text
        and text.count("class='plotly-graph-div") + text.count('class="plotly-graph-div') == 2
    )
    assert text.count(f"<script src='{plotly_js_name()}'></script>") == 1
    assert len(text) < 50_000  # the page itself; plotly.js lies beside it
    script = tmp_path / plotly_js_name()
    assert script.read_bytes().startswith(b"/**") and script.stat().st_size > 3_000_000
    offline = page.write(tmp_path / "offline.html", offline=True).read_text()
    assert plotly_js_name() not in offline and offline.count("<script>/**") == 1
    assert len(offline) > 3_000_000
    with pytest.raises(InvalidArgument, match="a page item is text"):
        Page("x").add(object())


def test_shared_script_is_written_once_and_a_foreign_file_is_kept(tmp_path):
    first = write_plotly_js(tmp_path)
    before = first.stat().st_mtime_ns
    assert write_plotly_js(tmp_path) == first and first.stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    other = tmp_path / "other"
    other.mkdir()
    (other / plotly_js_name()).write_text("alert('mine')")
    with pytest.raises(OutputExists, match="pass --offline"):
        Page("p").add(_figure()).write(other / "p.html")
    assert (other / plotly_js_name()).read_text() == "alert('mine')"
    assert not (other / "p.html").exists()
    Page("p").add(_figure()).write(other / "p.html", offline=True)  # inline needs no script file
    assert (other / plotly_js_name()).read_text() == "alert('mine')"
    nested = Page("p").add(_figure()).write(tmp_path / "new" / "dir" / "p.html")
    assert (nested.parent / plotly_js_name()).read_bytes() == first.read_bytes()
    assert "<script" not in Page("no figures").add("text").html()  # plotly.js only when drawn


def test_a_foreign_script_fails_the_command_before_any_work(micro_checkpoint, tmp_path):
    (tmp_path / plotly_js_name()).write_text("mine")
    out = tmp_path / "probe.html"
    result = runner.invoke(app, ["probe", str(micro_checkpoint), "--out", str(out)])
    assert result.exit_code != 0 and isinstance(result.exception, OutputExists)
    assert not out.exists() and (tmp_path / plotly_js_name()).read_text() == "mine"
    done = runner.invoke(app, ["probe", str(micro_checkpoint), "--out", str(out), "--offline"])
    assert done.exit_code == 0, done.output


# ---------------------------------------------------------------------------------- trace
@pytest.fixture(scope="module")
def micro_traces(micro_checkpoint):
    model = bi.load_model(micro_checkpoint)
    tuples = bi.sample_tuples(model.world, 3, seed=0)
    exact = bi.trace(model, tuples, sites=("resid_pre", "head"))
    attribution = bi.trace(model, tuples, sites=("resid_pre", "head"), method="attribution")
    acc = bi.evaluate_facts(model, model.world, model.world_tokenizer)
    return model, exact, attribution, acc


def test_trace_page_content(micro_traces):
    model, exact, attribution, acc = micro_traces
    page = trace_page(exact, attribution=[attribution], accuracy=acc, run=RunInfo.of(model))
    text = page.html()
    assert "Fact accuracy per relation" in text and "Top components" in text
    # resid_pre: one map; heads at 'each' positions: the subject's tokens and the last position
    assert page.n_figures == 1 + 1 + 3 + 1
    assert "Heads at 'subject[0]'" in text and "Heads at the last position" in text
    assert text.count("<tr>") >= 6  # the tuples table has a row per tuple
    means = exact.to_dataframe().merge(attribution.to_dataframe(), on=["site", "layer",
                                       "position", "head"])  # fmt: skip
    for site, d in means.groupby("site"):
        r = np.corrcoef(d.score_x, d.score_y)[0, 1]
        assert f"{r:.4g}" in text, site  # the correlation table is measured, not invented
    with pytest.raises(InvalidArgument, match="same tuples"):
        trace_page([exact, exact.subset([0, 1])])
    other = bi.trace(model, exact.tuples, sites="resid_pre", positions="last",
                     method="attribution")  # fmt: skip
    with pytest.raises(InvalidArgument, match="no exact trace with the same"):
        trace_page(exact, attribution=[other])


def test_signed_maps_are_centred_on_zero(micro_traces):
    from behemoth_interp.report.trace import _site_figures

    _, exact, _, _ = micro_traces
    (fig,) = _site_figures(exact, "resid_pre")
    axis = fig.layout.coloraxis
    # one scale for the mean and every relation's map, so the selector compares like with like
    maps = [exact, exact.for_relation(0), exact.for_relation(1)]
    peak = max(float(np.abs(r.mean["resid_pre"].numpy()).max()) for r in maps)
    assert axis.cmin == -axis.cmax and axis.cmax == pytest.approx(peak, rel=1e-6)
    assert fig.layout.xaxis.title.text == "input position (token role)"
    assert list(fig.data[0].x) == list(exact.positions) and fig.data[0].y[0] == "L0"
    assert "n=6 tuples" in fig.layout.title.text and "IOI" in fig.layout.title.text
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["all relations", "r0", "r1"]
    assert fig.layout.updatemenus[0].buttons[1].args[1]["title.text"].endswith("— r0, n=3 tuples")


# ---------------------------------------------------------------------------------- in a browser
def _commands(micro_checkpoint, sweep_store, out):
    m = str(micro_checkpoint)
    return {
        "trace": ["trace", m, "--n", "3", "--sites", "resid_pre,mlp_post,head", "--attribution",
                  "--out", str(out / "trace.html")],
        "edit": ["edit", m, "--task", "single", "--method", "lora", "--rank", "4", "--blocks",
                 "1", "--steps", "5", "--max-remaining", "20", "--out", str(out / "edited"),
                 "--html", str(out / "edit.html")],
        "restore": ["restore", m, "--task", "forget", "--relation", "1", "--edit-steps", "3",
                    "--n", "6", "--out", str(out / "restore.html")],
        "probe": ["probe", m, "--relation", "0", "--out", str(out / "probe.html")],
        "report": ["report", str(sweep_store), "--out", str(out / "report.html")],
        "retention": ["retention", str(out / "edited-ft"), "--downstream", "new_facts",
                      "--disjoint", "objects", "--out", str(out / "retention"), "--html",
                      str(out / "retention.html")],
        "offline": ["probe", m, "--relation", "1", "--offline", "--out",
                    str(out / "offline" / "probe.html")],
    }  # fmt: skip


@pytest.fixture(scope="module")
def sweep_store(micro_checkpoint, tmp_path_factory):
    spec = {"name": "tiny", "models": [str(micro_checkpoint)], "tasks": ["single"],
            "methods": [{"method": "finetune", "grid": {"lr": [3e-3]}}],
            "blocks": [[0], [0, 1]], "components": ["mlp"], "seeds": [0]}  # fmt: skip
    out = tmp_path_factory.mktemp("sweep") / "store"
    bi.run_sweep(bi.SweepSpec.from_dict(spec), out, executor="local", progress=False)
    return out


@pytest.fixture(scope="module")
def pages(micro_checkpoint, sweep_store, demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages")
    written = {"demo": demo_run[1]}
    fine_tuned = ["edit", str(micro_checkpoint), "--blocks", "1", "--out", str(out / "edited-ft")]
    assert runner.invoke(app, fine_tuned).exit_code == 0  # what `retention` fine-tunes
    for name, args in _commands(micro_checkpoint, sweep_store, out).items():
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (name, result.output)
        written[name] = next(Path(a) for a in args if a.endswith(".html"))
    return written


@pytest.mark.parametrize("command", ["demo", "trace", "edit", "restore", "probe", "report",
                                     "retention", "offline"])  # fmt: skip
def test_report_draws_in_chromium(browser, pages, command, tmp_path):
    page = pages[command]
    text = page.read_text()
    n_figures = len(re.findall(r"Plotly\.newPlot\(", text))
    assert n_figures >= 1
    if command == "offline":
        assert plotly_js_name() not in text and not (page.parent / plotly_js_name()).exists()
    else:
        assert text.count(plotly_js_name()) == 1 and len(text) < 2_000_000
    loaded, tab = browser.open(page)
    try:
        assert loaded.errors == []
        assert loaded.requests and all(u.startswith(("file://", "data:")) for u in loaded.requests)
        assert len(loaded.figures) == n_figures
        undrawn = [f for f in loaded.figures if not (f["marks"] and f["width"] and f["height"])]
        assert undrawn == []
        shot = tmp_path / f"{command}.png"
        pixels = browser.screenshot(tab, shot)
    finally:
        browser.close(tab)
    assert shot.stat().st_size > 10_000 and pixels["width"] >= 1000
    assert pixels["ink"] > 0.02 and pixels["colours"] > 50, pixels


SELECTOR_STATE_JS = """(() => { const gd = document.getElementById(%s);
  const title = gd.querySelector('.gtitle'), image = gd.querySelector('.heatmaplayer image');
  return {title: gd.layout.title.text, drawn: title ? title.textContent : '',
          visible: gd.data.map(t => t.visible),
          image: image ? (image.getAttribute('href') || '').length : 0}; })()"""


def test_the_relation_selector_shows_that_relations_map(browser, pages):
    """Clicking a relation in a heatmap's selector (real mouse events) shows that relation's
    map, alone, under its title; the colour scale stays the one shared by every choice."""
    loaded, tab = browser.open(pages["trace"])
    try:
        assert loaded.errors == []
        gd = browser.evaluate("document.querySelector('.updatemenu-header')"
                              ".closest('.plotly-graph-div').id", tab.session)  # fmt: skip
        state = SELECTOR_STATE_JS % repr(gd)
        before = browser.evaluate(state, tab.session)
        assert before["visible"] == [True, False, False] and "all relations" in before["drawn"]
        browser.click(tab, f"#{gd} .updatemenu-header")
        browser.click(tab, f"#{gd} .updatemenu-dropdown-button:nth-of-type(3)")
        for _ in range(50):  # the restyle is asynchronous
            after = browser.evaluate(state, tab.session)
            if after["visible"] != before["visible"] and after["drawn"] and after["image"]:
                break
            time.sleep(0.1)
        errors = browser.errors(tab)
    finally:
        browser.close(tab)
    assert errors == []
    assert after["visible"] == [False, False, True]
    assert after["title"].split(" — ")[1].startswith("r1,") and "r1," in after["drawn"]
    assert after["image"] > 100  # r1's map drew


def test_command_line_in_the_header(pages):
    text = pages["demo"].read_text()
    assert "behemoth-interp demo --out " in text and "--model independent --n 2" in text
