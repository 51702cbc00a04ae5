"""Run by every tutorial's kernel in the docs build (PYTHONSTARTUP, set by `plotly_site.py`).

A figure a cell shows becomes HTML, drawn by the site's copy of plotly.js: the first figure of
the notebook loads it from the URL in BEHEMOTH_DOCS_PLOTLY_JS (the hook makes it relative to
the page); no figure inlines plotly.js or loads anything from a CDN.
"""

import os

import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer


class SiteFigures(MimetypeRenderer):
    """Figures as `text/html`; the first one loads plotly.js from the `script` URL."""

    script: list[str] = [os.environ["BEHEMOTH_DOCS_PLOTLY_JS"]]
    """Emptied by the first figure (a class attribute: plotly renders with copies of us)."""

    def to_mimebundle(self, fig_dict):
        script = self.script.pop() if self.script else False
        html = pio.to_html(fig_dict, include_plotlyjs=script, full_html=False,
                           default_width="100%", validate=False,
                           config={"displaylogo": False, "responsive": True})  # fmt: skip
        return {"text/html": html}


pio.renderers["site"] = SiteFigures()
pio.renderers.default = "site"
