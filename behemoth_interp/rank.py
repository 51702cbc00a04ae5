"""Move rank: how many dimensions an edit moved each weight matrix (Behemoth section 6.2).

For every block and component (W_Q, W_K, W_V, W_O, W_in, W_out) of two GPT-NeoX models of one
shape, ΔW = W_after - W_before is decomposed by SVD and its move rank is the smallest k whose
top-k squared singular values hold `threshold` of ΔW's energy (sum of squared singular values).
An unchanged matrix has move rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import read_json, write_json
from behemoth_interp.errors import InvalidArgument, WrongType

COMPONENTS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
"""Weight matrices of a block, in the paper's names (Figure 12)."""
_ENERGY_TOL = 1e-6
"""Energy fractions this close below the threshold count as reaching it (float rounding)."""


def block_matrices(hf: GPTNeoXForCausalLM, layer: int) -> dict[str, Float[Tensor, "out in"]]:
    """The six weight matrices of block `layer` of an HF GPT-NeoX model, by component name.

    NeoX stores Q, K and V in one `query_key_value` matrix whose output rows are ordered
    (head, qkv, d_head); W_Q/W_K/W_V are its rows for q, k and v, head by head.
    """
    c = hf.config
    block = hf.gpt_neox.layers[layer]
    d_head = c.hidden_size // c.num_attention_heads
    qkv = block.attention.query_key_value.weight.detach()
    qkv = qkv.view(c.num_attention_heads, 3, d_head, c.hidden_size)
    return {
        "W_Q": qkv[:, 0].reshape(-1, c.hidden_size),
        "W_K": qkv[:, 1].reshape(-1, c.hidden_size),
        "W_V": qkv[:, 2].reshape(-1, c.hidden_size),
        "W_O": block.attention.dense.weight.detach(),
        "W_in": block.mlp.dense_h_to_4h.weight.detach(),
        "W_out": block.mlp.dense_4h_to_h.weight.detach(),
    }


def energy_rank(singular_values: np.ndarray, threshold: float) -> int:
    """Smallest k whose top-k squared singular values reach `threshold` of the total (0 if none)."""
    energy = np.asarray(singular_values, dtype=np.float64) ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = np.cumsum(np.sort(energy)[::-1]) / total
    return int(min(np.searchsorted(cumulative, threshold - _ENERGY_TOL) + 1, len(energy)))


@dataclass
class MoveRank:
    """Move ranks `rank[layer, component]`, the full rank of each matrix, and ΔW's Frobenius norm.

    `singular_values[(layer, component)]` keeps each ΔW's spectrum (descending) for plots of
    its own.
    """

    rank: np.ndarray
    full_rank: np.ndarray
    norm: np.ndarray
    threshold: float
    components: tuple[str, ...] = COMPONENTS
    singular_values: dict[tuple[int, str], np.ndarray] | None = None

    @property
    def n_layers(self) -> int:
        return self.rank.shape[0]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (block, component): rank, full_rank, relative rank, norm of ΔW."""
        layer, comp = np.meshgrid(
            np.arange(self.n_layers), np.arange(len(self.components)), indexing="ij"
        )
        return pd.DataFrame(
            {
                "block": layer.ravel(),
                "component": np.array(self.components, dtype=object)[comp.ravel()],
                "rank": self.rank.ravel(),
                "full_rank": self.full_rank.ravel(),
                "relative_rank": (self.rank / self.full_rank).ravel(),
                "delta_norm": self.norm.ravel(),
            }
        )

    def plot(self):
        """Grouped bars: move rank per block, one bar per component (the paper's Figure 12, top)."""
        import plotly.express as px

        df = self.to_dataframe()
        fig = px.bar(df, x="block", y="rank", color="component", barmode="group",
                     hover_data=["full_rank", "delta_norm"],
                     title=f"Move rank ({self.threshold:.0%} of ΔW energy)")  # fmt: skip
        fig.update_xaxes(dtick=1)
        return fig

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (spectra are not kept)."""
        path = Path(path)
        write_json(path, {"format": "behemoth-move-rank/1", "threshold": self.threshold,
                          "components": list(self.components), "rank": self.rank.tolist(),
                          "full_rank": self.full_rank.tolist(), "norm": self.norm.tolist()})  # fmt: skip
        return path

    @classmethod
    def load(cls, path: str | Path) -> MoveRank:
        d = read_json(
            path, what="move-rank table written by MoveRank.save", format="behemoth-move-rank/1"
        )
        return cls(np.array(d["rank"]), np.array(d["full_rank"]), np.array(d["norm"]),
                   d["threshold"], tuple(d["components"]))  # fmt: skip


def _as_hf(model) -> GPTNeoXForCausalLM:
    if isinstance(model, GPTNeoXForCausalLM):
        return model
    if isinstance(model, str | Path):
        from behemoth_interp.model import load_hf

        return load_hf(model)[0]
    raise WrongType(
        f"move_rank takes HF GPT-NeoX models or checkpoint directories, got {type(model).__name__}: "
        "edit() returns the HF model; bi.load_hf(path)[0] loads one"
    )


@torch.no_grad()
def move_rank(before, after, threshold: float = 0.95, *, keep_spectra: bool = False) -> MoveRank:
    """Move rank of every block's W_Q, W_K, W_V, W_O, W_in, W_out between two models.

    `before` and `after` are HF GPT-NeoX models (or checkpoint directories) of one shape,
    e.g. a checkpoint and its edited copy. The SVD runs in float64 on the CPU.
    Returns a `MoveRank` (Behemoth section 6.2, Figure 12).
    """
    if not 0 < threshold <= 1:
        raise InvalidArgument(
            f"threshold is a fraction of ΔW's energy: it must be in (0, 1], got {threshold}"
        )
    a, b = _as_hf(before), _as_hf(after)
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    shape_a = {k: getattr(a.config, k) for k in keys}
    shape_b = {k: getattr(b.config, k) for k in keys}
    if shape_a != shape_b:
        raise InvalidArgument(
            f"the models have different shapes ({shape_a} before, {shape_b} after): "
            "compare a model with an edited copy of itself"
        )
    n = shape_a["num_hidden_layers"]
    rank = np.zeros((n, len(COMPONENTS)), dtype=np.int64)
    full = np.zeros_like(rank)
    norm = np.zeros((n, len(COMPONENTS)))
    spectra: dict[tuple[int, str], np.ndarray] = {}
    for layer in range(n):
        wa, wb = block_matrices(a, layer), block_matrices(b, layer)
        for j, name in enumerate(COMPONENTS):
            delta = wb[name].double().cpu() - wa[name].double().cpu()
            # an untouched matrix (most of them, when an edit tunes a few blocks): no SVD
            s = torch.linalg.svdvals(delta).numpy() if delta.any() else np.zeros(min(delta.shape))
            rank[layer, j] = energy_rank(s, threshold)
            full[layer, j] = min(delta.shape)
            norm[layer, j] = float(np.sqrt((s**2).sum()))
            if keep_spectra:
                spectra[(layer, name)] = s
    return MoveRank(rank, full, norm, threshold, COMPONENTS, spectra if keep_spectra else None)
