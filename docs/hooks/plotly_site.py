"""mkdocs hook: the executed tutorials' plotly figures draw offline, from one copy of plotly.js.

Each tutorial's kernel runs `kernel_startup.py` (PYTHONSTARTUP, set here), which shows figures
as HTML (plotly's default in a kernel is a mimetype the HTML export drops) and has the first
figure of a notebook load plotly.js from a placeholder URL. This hook points that URL at
`assets/plotly-<version>.min.js`, relative to each page, and writes that file once into the
site, so the tutorials stay small and open with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

from mkdocs.utils import get_relative_url

from behemoth_interp.report import plotly_js_name, write_plotly_js

PLACEHOLDER = "behemoth-docs-plotly.js"
"""The URL the kernel's first figure loads plotly.js from, until this hook rewrites it."""


def on_config(config):
    os.environ["PYTHONSTARTUP"] = str(Path(__file__).with_name("kernel_startup.py"))
    os.environ["BEHEMOTH_DOCS_PLOTLY_JS"] = PLACEHOLDER
    return config


def on_page_content(html, page, config, files):
    url = get_relative_url(f"assets/{plotly_js_name()}", page.url)
    return html.replace(f'src="{PLACEHOLDER}"', f'src="{url}"')


def on_post_build(config):
    write_plotly_js(Path(config.site_dir) / "assets")
