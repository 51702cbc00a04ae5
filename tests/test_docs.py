"""The docs site: every page is linked from the index and the nav, and `mkdocs build --strict`
builds it with the tutorials (notebooks/, executed) and the API reference (the docstrings); the
tutorials' figures draw in headless Chromium with the site served locally and no other network."""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from behemoth_interp.report import plotly_js_name

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ("tracing", "editing", "probes", "restore", "sweeps", "retention", "unlearning")


def _pages() -> set[str]:
    return {
        str(p.relative_to(DOCS))
        for p in DOCS.rglob("*")
        if p.suffix in (".md", ".ipynb") and "hooks" not in p.parts
    }


def _nav(items) -> set[str]:
    out: set[str] = set()
    for item in items:
        for value in item.values() if isinstance(item, dict) else [item]:
            out |= _nav(value) if isinstance(value, list) else {value}
    return out


class _Env(yaml.SafeLoader):
    """mkdocs.yml's `!ENV [NAME, default]`, read as its default."""


_Env.add_constructor("!ENV", lambda loader, node: loader.construct_sequence(node)[-1])


def test_every_page_is_in_the_nav_and_linked_from_the_index():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Env)
    assert _nav(config["nav"]) == _pages()
    index = (DOCS / "index.md").read_text()
    linked = set(re.findall(r"\]\(([^)#]+)", index))
    assert _pages() - {"index.md"} <= linked, sorted(_pages() - {"index.md"} - linked)
    for name in TUTORIALS:  # the tutorials are the notebooks CI runs, not copies
        link = DOCS / "tutorials" / f"{name}.ipynb"
        assert link.is_symlink() and link.resolve() == ROOT / "notebooks" / f"{name}.ipynb"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it: strict, every tutorial executed."""
    site = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "DOCS_EXECUTE": "true"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def test_the_site_builds_strictly_with_executed_tutorials_and_api(site):
    for name in TUTORIALS:
        page = (site / "tutorials" / name / "index.html").read_text()
        assert "import behemoth_interp as bi" in page, name  # the notebook's code, rendered
        assert "jp-OutputArea-output" in page, name  # and what it printed, executed
        assert "cdn.plot.ly" not in page and len(page) < 3_000_000, name  # no plotly.js inline
    tracing = (site / "tutorials" / "tracing" / "index.html").read_text()
    assert "TraceResult(" in tracing and tracing.count("Plotly.newPlot(") >= 2
    assert (site / "assets" / plotly_js_name()).is_file()
    assert "hooks" not in {p.name for p in site.iterdir()}  # the build's hooks are not pages
    api = (site / "api" / "tracing" / "index.html").read_text()
    assert "behemoth_interp.trace.trace" in api  # the function's anchor
    assert "Causal tracing of" in api and "TraceResult" in api  # its docstring and types
    report = (site / "api" / "report" / "index.html").read_text()
    assert "One report page" in report or "one builder" in report
    assert (site / "img" / "trace-report.png").is_file()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(site):
    """The built site on a local HTTP server (as a docs host serves it): its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=site))  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_draws_in_chromium(browser, site, served, name, tmp_path):
    text = (site / "tutorials" / name / "index.html").read_text()
    n_figures = text.count("Plotly.newPlot(")
    loaded, tab = browser.open(f"{served}tutorials/{name}/")
    try:
        assert loaded.errors == []
        assert loaded.requests and all(u.startswith((served, "data:")) for u in loaded.requests)
        assert len(loaded.figures) == n_figures
        undrawn = [f for f in loaded.figures if not (f["marks"] and f["width"] and f["height"])]
        assert undrawn == []
        pixels = browser.screenshot(tab, tmp_path / f"{name}.png")
    finally:
        browser.close(tab)
    assert pixels["ink"] > 0.02 and pixels["colours"] > 50, pixels
