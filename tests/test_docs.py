"""The docs site: every page is linked from the index and the nav, and `mkdocs build --strict`
builds it with the tutorials (notebooks/) and the API reference (the docstrings)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ("tracing", "editing", "probes", "restore", "sweeps")


def _pages() -> set[str]:
    return {str(p.relative_to(DOCS)) for p in DOCS.rglob("*") if p.suffix in (".md", ".ipynb")}


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


def test_the_site_builds_strictly_with_tutorials_and_api(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "DOCS_EXECUTE": "false"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in TUTORIALS:
        page = (site / "tutorials" / name / "index.html").read_text()
        assert "import behemoth_interp as bi" in page, name  # the notebook's code, rendered
    api = (site / "api" / "tracing" / "index.html").read_text()
    assert "behemoth_interp.trace.trace" in api  # the function's anchor
    assert "Causal tracing of" in api and "TraceResult" in api  # its docstring and types
    report = (site / "api" / "report" / "index.html").read_text()
    assert "One report page" in report
    assert (site / "img" / "trace-report.png").is_file()
