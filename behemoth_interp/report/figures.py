"""Figures the pages share: signed heatmaps with a selector, on a colour scale centred at 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from behemoth_interp.report.page import FIGURE_HEIGHT

SIGNED_SCALE = "RdBu_r"
"""Signed scores: red restores, blue works against, white is 0 (the range is symmetric)."""


def signed_heatmap(
    maps: Mapping[str, tuple[str, np.ndarray]],
    *,
    x: Sequence[str],
    y: Sequence[str],
    title: str,
    x_title: str,
    y_title: str,
    score: str,
):
    """A heatmap of signed scores with a selector: `maps` is choice -> (what the title adds
    for it, map [y, x]); every map shares one colour scale symmetric around 0. Row 0 on top."""
    import plotly.graph_objects as go

    names = list(maps)
    titles = [f"{title} — {maps[n][0]}" for n in names]
    peak = max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0
               for _, z in maps.values())  # fmt: skip
    peak = peak or 1.0
    hover = f"{y_title} %{{y}}, {x_title} %{{x}}: {score} %{{z:.3f}}<extra></extra>"
    fig = go.Figure([
        go.Heatmap(z=maps[n][1], x=list(x), y=list(y), coloraxis="coloraxis", visible=i == 0,
                   hovertemplate=hover, name=n)
        for i, n in enumerate(names)
    ])  # fmt: skip
    fig.update_layout(
        title=titles[0], coloraxis={"colorscale": SIGNED_SCALE, "cmin": -peak, "cmax": peak,
                                    "colorbar": {"title": score}},
        height=max(FIGURE_HEIGHT, 28 * len(y) + 160), xaxis_title=x_title, yaxis_title=y_title,
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    if len(names) > 1:
        buttons = [
            {"label": n, "method": "update",
             "args": [{"visible": [j == i for j in range(len(names))]}, {"title.text": titles[i]}]}
            for i, n in enumerate(names)
        ]  # fmt: skip
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right",
                                        "y": 1.12, "yanchor": "bottom"}])  # fmt: skip
    return fig
