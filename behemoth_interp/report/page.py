"""The page builder: a header (what was run), "how to read this", sections of figures, tables
and text, and the settings at the bottom.

plotly.js is loaded once per page: inline with `offline=True` (one file to share), else from
`plotly-<version>.min.js` written once beside the page, so many pages in one directory stay
small. Either way a page opens from the file system with no network.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from behemoth_interp._io import FILE_MODE, write_page
from behemoth_interp.errors import InvalidArgument, OutputExists

if TYPE_CHECKING:
    from behemoth_interp.world import World

FIGURE_HEIGHT = 420
"""Pixels of a figure's plotting height unless it needs more (one row per layer and head)."""


class Html(str):
    """Markup built by this module, put on a page as it is (plain `str` items are escaped)."""


@dataclass(frozen=True)
class RunInfo:
    """What a page reports on, for its header: the checkpoint, its world, the command line."""

    model: str | None = None
    world: World | None = None
    command: str | None = None

    @classmethod
    def of(cls, model, command: str | None = None) -> RunInfo:
        """From a model as `load_model` gives it (its `checkpoint` path and `world`)."""
        path = getattr(model, "checkpoint", None)
        return cls(None if path is None else str(path), getattr(model, "world", None), command)

    def rows(self, date: str) -> dict[str, str]:
        w = self.world
        return {
            "model": self.model or "(a model not loaded from a checkpoint)",
            "world": repr(w) if w is not None else "(not given)",
            "world fingerprint": w.fingerprint if w is not None else "(not given)",
            "command": self.command or "(called from Python)",
            "date": date,
            "behemoth-interp": version("behemoth-interp"),
        }


def plotly_js_name() -> str:
    """The file name of the shared plotly.js: its version is in it, so pages written by
    another plotly never load a script they were not made for."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js"


class Page:
    """One report page: `section(...)` adds a heading and its items, `write(path)` writes it.

    Items are text (a paragraph, escaped), `Html`, a pandas DataFrame (a table) or a plotly
    figure (drawn at its layout's height, `FIGURE_HEIGHT` by default).
    """

    def __init__(
        self,
        title: str,
        *,
        run: RunInfo | None = None,
        about: Sequence[str] = (),
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.title = title
        self.run = run or RunInfo()
        self.about = tuple(about)
        self.settings = dict(settings or {})
        self.date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self._body: list[str] = []
        self.n_figures = 0

    def section(self, heading: str, *items: Any, level: int = 2) -> Page:
        """Append `heading` (an `<h{level}>`) and its items; returns the page."""
        self._body.append(f"<h{level}>{html.escape(heading)}</h{level}>")
        return self.add(*items)

    def add(self, *items: Any) -> Page:
        """Append items without a heading; returns the page."""
        self._body += [self._item(item) for item in items]
        return self

    def _item(self, item: Any) -> str:
        if isinstance(item, Html):
            return str(item)
        if isinstance(item, str):
            return f"<p>{html.escape(item)}</p>"
        if isinstance(item, pd.DataFrame):
            return table_html(item)
        if hasattr(item, "to_html") and hasattr(item, "layout"):
            self.n_figures += 1
            div = item.to_html(full_html=False, include_plotlyjs=False,
                               div_id=f"figure-{self.n_figures}",
                               default_height=f"{item.layout.height or FIGURE_HEIGHT}px",
                               config={"displaylogo": False, "responsive": True})  # fmt: skip
            return f"<div class='figure'>{div}</div>"
        raise InvalidArgument(
            f"a page item is text, Html, a DataFrame or a plotly figure, got {type(item).__name__}"
        )

    def html(self, plotly_js: str | None = None) -> str:
        """The page as HTML: plotly.js inline when `plotly_js` is None, else loaded from that
        relative URL."""
        from plotly.offline import get_plotlyjs

        if not self.n_figures:
            script = ""
        elif plotly_js is None:
            script = f"<script>{get_plotlyjs()}</script>"
        else:
            script = f"<script src='{html.escape(plotly_js)}'></script>"
        rows = self.run.rows(self.date)
        header = pd.DataFrame({"": list(rows.values())}, index=list(rows))
        parts = [f"<h1>{html.escape(self.title)}</h1>", table_html(header, header=False)]
        if self.about:
            parts.append("<h2>How to read this</h2>")
            parts += [f"<p>{html.escape(p)}</p>" for p in self.about]
        parts += self._body
        if self.settings:
            rows = {k: _setting(v) for k, v in self.settings.items()}
            table = pd.DataFrame({"value": list(rows.values())}, index=list(rows))
            parts += ["<h2>Settings</h2>", table_html(table, header=False)]
        body = "\n".join(parts)
        return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style>{script}"
                f"</head><body>\n{body}\n</body></html>\n")  # fmt: skip

    def write(self, path: str | os.PathLike, *, offline: bool = False) -> Path:
        """Write the page atomically (marked as ours, so --force may replace it). plotly.js goes
        inline with `offline`, else into `plotly_js_name()` beside the page, written once."""
        path = Path(path)
        name = None if offline or not self.n_figures else plotly_js_name()
        if name is not None:
            write_plotly_js(path.parent)
        write_page(path, self.html(name))
        return path


def check_plotly_js(page: str | os.PathLike) -> None:
    """Refuse, before any work, a file of the shared plotly.js's name beside `page` that is not
    that script (a user's file is never replaced)."""
    target = Path(page).parent / plotly_js_name()
    if target.exists() and not _is_plotly_js(target):
        raise OutputExists(
            f"{target} exists and is not plotly.js {plotly_js_name()[7:-7]}, which the page "
            "would load from there: move that file, or pass --offline (plotly.js inside the page)"
        )


def write_plotly_js(directory: str | os.PathLike) -> Path:
    """`plotly_js_name()` in `directory`, created once: an equal file is kept, another refused.

    Created by a hard link from a complete temporary file, so a reader never sees half of it
    and a concurrent writer of the same script never replaces anything."""
    from plotly.offline import get_plotlyjs

    target = Path(directory) / plotly_js_name()
    check_plotly_js(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(get_plotlyjs().encode())
        os.chmod(tmp, FILE_MODE)
        try:
            os.link(tmp, target)
        except FileExistsError:  # another page's writer made it meanwhile
            check_plotly_js(target)
    finally:
        os.unlink(tmp)
    return target


def _is_plotly_js(path: Path) -> bool:
    from plotly.offline import get_plotlyjs

    return path.is_file() and path.read_bytes() == get_plotlyjs().encode()


def table_html(df: pd.DataFrame, *, header: bool = True) -> str:
    """A DataFrame as a plain HTML table; floats to 4 significant digits, the index kept when
    it names something (not 0..n-1). Without `header`, a table of facts (text, left-aligned)."""
    index = not isinstance(df.index, pd.RangeIndex)
    return df.to_html(index=index, header=header, border=0, na_rep="",
                      classes="table" if header else "table facts",
                      float_format=lambda v: f"{v:.4g}", escape=True)  # fmt: skip


def _setting(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value) or "(none)"
    return str(value)


_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;"
    "max-width:1150px;padding:0 1em;color:#222;line-height:1.45}"
    "h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}"
    "table.table{border-collapse:collapse;margin:.6em 0;font-size:.9em}"
    "table.table td,table.table th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
    "table.table th{background:#f4f4f4}table.facts td{text-align:left}.figure{margin:1em 0}p{max-width:60em}"
)
