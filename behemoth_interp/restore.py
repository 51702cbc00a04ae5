"""Knowledge restoration: put the vanilla model's MLP coefficients, MLP value vectors or
attention outputs back into an edited model, a window of layers at a time, and score how much
of the vanilla output returns (Hong et al., "Dissecting fine-tuning unlearning", section 3).

Each prompt is continued greedily by the vanilla model for `n_tokens` (I) tokens; every run is
teacher-forced on that sequence and compared with the vanilla run by the mean squared error
between the logit vectors that predict the I continuation tokens:

    KRS = 1 - mean MSE(restored, vanilla) / mean MSE(edited, vanilla)      (Dissecting eq. 3)

with both losses averaged over the prompts first, as the paper defines it: that is the
headline (`KRSResult.krs`, the data frame's `krs`, the plot). The same ratio per prompt is
`prompt_krs`, and its mean over prompts `prompt_mean` (`krs_prompt_mean`), which weighs a prompt
the edit barely changed as much as one it changed a lot. Restoring is done with the hook layer
only: 'coefficients' patches `mlp_post`, 'attention' patches `attn_out` (both captured from the
vanilla run, at every position), 'values' swaps in the vanilla `W_out` and `b_out` of the
window's MLPs; settings join these with '+'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from behemoth_interp._io import JsonConfig, read_tensor_dir, write_tensor_dir
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument
from behemoth_interp.grammar import get_template
from behemoth_interp.hooks import Patch, Site, build_inputs, capture, patch, swap_params
from behemoth_interp.trace import _world_of, check_tuples
from behemoth_interp.world import World

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

RESTORE_FORMAT = "behemoth-restore/1"
PARTS = ("coefficients", "values", "attention")
"""What can be restored: MLP coefficients (mlp_post), MLP value vectors (W_out, b_out),
attention outputs (attn_out)."""
SETTINGS = ("coefficients", "values", "attention", "coefficients+attention")
"""The four settings of Dissecting Figure 1."""


def parse_setting(setting: str) -> str:
    """A setting in canonical form: parts of `PARTS` joined by '+', in `PARTS` order."""
    parts = [p.strip() for p in str(setting).split("+")]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise InvalidArgument(
            f"unknown restore setting {setting!r}: join parts of {', '.join(PARTS)} with '+', "
            "e.g. 'coefficients+attention'"
        )
    if len(set(parts)) != len(parts):
        raise InvalidArgument(f"restore setting {setting!r} names a part twice")
    return "+".join(p for p in PARTS if p in parts)


def window_layers(centre: int, size: int, n_layers: int) -> range:
    """The layers of a window of `size` centred on `centre`, truncated at the model's edges
    (Meng et al. 2022's causal-tracing windows, used by Dissecting: size 5 is centre ± 2)."""
    if size < 1:
        raise InvalidArgument(f"window sizes must be at least 1, got {size}")
    if not 0 <= centre < n_layers:
        raise InvalidArgument(
            f"window centre {centre} is not a layer: the model has 0..{n_layers - 1}"
        )
    return range(max(0, centre - size // 2), min(n_layers, centre - (-size // 2)))


@dataclass(frozen=True)
class RestoreConfig(JsonConfig):
    """What a restoration measures. `restore` builds one from its keyword arguments.

    settings: parts joined by '+' (see `PARTS`); windows: window sizes, each centred on every
    layer; n_tokens: I, the vanilla continuation scored; n_prompts: N, a seeded sample of the
    given tuples (None: all); template: the grammar prompts are rendered in; batch_size:
    prompts per forward pass.
    """

    settings: tuple[str, ...] = SETTINGS
    windows: tuple[int, ...] = (1, 3)
    n_tokens: int = 2
    n_prompts: int | None = 100
    seed: int = 0
    batch_size: int = 256
    template: str = "paper"

    def __post_init__(self) -> None:
        settings = (self.settings,) if isinstance(self.settings, str) else tuple(self.settings)
        windows = (self.windows,) if isinstance(self.windows, int) else tuple(self.windows)
        if not settings:
            raise InvalidArgument(
                f"no restore settings given: choose some of {', '.join(SETTINGS)}"
            )
        settings = tuple(parse_setting(s) for s in settings)
        if len(set(settings)) != len(settings):
            raise InvalidArgument(f"settings {settings} name a setting twice")
        if not windows or any(int(w) != w or w < 1 for w in windows):
            raise InvalidArgument(f"window sizes must be integers >= 1, got {windows}")
        if len(set(windows)) != len(windows):
            raise InvalidArgument(f"window sizes {windows} repeat a size")
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "windows", tuple(int(w) for w in windows))
        if self.n_tokens < 1:
            raise InvalidArgument(f"n_tokens (I) must be at least 1, got {self.n_tokens}")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise InvalidArgument(
                f"n_prompts (N) must be at least 1 or None (all), got {self.n_prompts}"
            )
        if self.batch_size < 1:
            raise InvalidArgument(f"batch_size must be at least 1, got {self.batch_size}")
        get_template(self.template)


# ---------------------------------------------------------------------------------- results
@dataclass
class KRSResult:
    """Losses of every restoration with their axes, and the Knowledge Recovery Scores.

    `losses[setting]` is MSE(restored, vanilla) [window, layer, prompt]: window sizes
    `config.windows`, window centred on `layer`; `edited_loss` [prompt] is MSE(edited,
    vanilla). `prompts` [prompt, pos] are the input tokens, `continuation` [prompt, I] the
    vanilla model's greedy tokens, `tuples` [prompt, 3] the facts prompted (None for raw tokens).
    `krs` is the score (eq. 3 on losses averaged over prompts); `prompt_krs` and `prompt_mean`
    are the per-prompt ratios and their mean. Prompts the edit did not change (edited_loss ==
    0) have no KRS: they are `excluded` from all three.
    """

    losses: dict[str, Tensor]
    edited_loss: Tensor
    prompts: Tensor
    continuation: Tensor
    tuples: np.ndarray | None
    config: RestoreConfig

    @property
    def settings(self) -> tuple[str, ...]:
        return tuple(self.losses)

    @property
    def windows(self) -> tuple[int, ...]:
        return self.config.windows

    @property
    def n_layers(self) -> int:
        return next(iter(self.losses.values())).shape[1]

    @property
    def excluded(self) -> Tensor:
        """Boolean [prompt]: the edit left the prompt's logits unchanged, so KRS is undefined."""
        return self.edited_loss == 0

    @property
    def n_excluded(self) -> int:
        return int(self.excluded.sum())

    @property
    def krs(self) -> dict[str, Tensor]:
        """The Knowledge Recovery Score, [window, layer]: Dissecting eq. 3 on losses averaged
        over the prompts the edit changed, 1 - mean(restored loss) / mean(edited loss)."""
        keep = ~self.excluded
        return {k: 1 - v[..., keep].mean(-1) / self.edited_loss[keep].mean()
                for k, v in self.losses.items()}  # fmt: skip

    @property
    def prompt_krs(self) -> dict[str, Tensor]:
        """Eq. 3 on each prompt alone, [window, layer, prompt]; NaN for excluded prompts."""
        denom = torch.where(self.excluded, torch.nan, self.edited_loss)
        return {k: 1 - v / denom for k, v in self.losses.items()}

    @property
    def prompt_mean(self) -> dict[str, Tensor]:
        """The per-prompt KRS averaged over the prompts the edit changed, [window, layer]: each
        prompt weighs the same however little the edit changed it (not the paper's KRS)."""
        return {k: v.nanmean(-1) for k, v in self.prompt_krs.items()}

    def to_dataframe(self, per_prompt: bool = False) -> pd.DataFrame:
        """Long format: setting, window, layer (the centre), first and last layer restored, krs
        (eq. 3 on losses averaged over prompts: the headline), krs_prompt_mean (the mean of the
        per-prompt KRS), n_prompts (those scored). With `per_prompt`, one row per prompt with
        its prompt_krs, restored and edited loss (and subject, relation, object)."""
        frames = []
        n = len(self.edited_loss)
        krs, per, prompt_mean = self.krs, self.prompt_krs, self.prompt_mean
        for setting, losses in self.losses.items():
            for wi, size in enumerate(self.windows):
                for layer in range(self.n_layers):
                    span = window_layers(layer, size, self.n_layers)
                    row = {"setting": setting, "window": size, "layer": layer,
                           "first_layer": span.start, "last_layer": span.stop - 1}  # fmt: skip
                    if per_prompt:
                        frame = pd.DataFrame({**row, "prompt": np.arange(n),
                                              "prompt_krs": per[setting][wi, layer].numpy(),
                                              "restored_loss": losses[wi, layer].numpy(),
                                              "edited_loss": self.edited_loss.numpy()})  # fmt: skip
                        if self.tuples is not None:
                            for i, col in enumerate(("subject", "relation", "object")):
                                frame.insert(6 + i, col, self.tuples[:, i])
                    else:
                        at = (wi, layer)
                        frame = pd.DataFrame([{**row, "krs": float(krs[setting][at]),
                                               "krs_prompt_mean": float(prompt_mean[setting][at]),
                                               "n_prompts": n - self.n_excluded}])  # fmt: skip
                    frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def plot(self, title: str | None = None):
        """KRS (eq. 3, losses averaged over prompts) against the window's centre layer, one
        line per setting and one panel per window size (Dissecting Figure 1)."""
        import plotly.express as px

        df = self.to_dataframe()
        df["window"] = [f"window {w}" for w in df["window"]]
        what = (f"Knowledge Recovery Score (eq. 3 on losses averaged over "
                f"{len(self.edited_loss) - self.n_excluded} prompts), "
                f"{self.config.n_tokens} tokens")  # fmt: skip
        fig = px.line(df, x="layer", y="krs", color="setting", facet_col="window", markers=True,
                      hover_data=["first_layer", "last_layer", "krs_prompt_mean"],
                      title=title or what)  # fmt: skip
        fig.update_xaxes(dtick=1)
        fig.add_hline(y=0, line_dash="dot", line_color="grey")
        fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write `restore.json` (config, axes) and `losses.safetensors` into directory `path`."""
        tensors = {f"losses/{k}": v for k, v in self.losses.items()}
        tensors.update(edited_loss=self.edited_loss, prompts=self.prompts,
                       continuation=self.continuation)  # fmt: skip
        if self.tuples is not None:
            tensors["tuples"] = torch.as_tensor(np.ascontiguousarray(self.tuples))
        meta = {"format": RESTORE_FORMAT, "config": self.config.to_dict(),
                "settings": list(self.settings)}  # fmt: skip
        return write_tensor_dir(path, ("restore.json", meta), ("losses.safetensors", tensors),
                                overwrite=overwrite)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> KRSResult:
        """Read a result written by `save`."""
        meta, t = read_tensor_dir(path, "restore.json", "losses.safetensors",
                                  what="restoration result", format=RESTORE_FORMAT)  # fmt: skip
        return cls(
            losses={k: t[f"losses/{k}"] for k in meta["settings"]},
            edited_loss=t["edited_loss"], prompts=t["prompts"], continuation=t["continuation"],
            tuples=t["tuples"].numpy() if "tuples" in t else None,
            config=RestoreConfig.from_dict(meta["config"]),
        )  # fmt: skip

    def __repr__(self) -> str:
        best = {k: round(float(np.nanmax(v.numpy())), 3) for k, v in self.krs.items()}
        return (f"KRSResult({len(self.edited_loss)} prompts ({self.n_excluded} unchanged), "
                f"windows {list(self.windows)}, best KRS {best})")  # fmt: skip


# ---------------------------------------------------------------------------------- restore
def restore(
    vanilla: HookedTransformer,
    edited: HookedTransformer,
    prompts: EditTask | Int[np.ndarray, "n 3"] | Int[Tensor, "n pos"],
    *,
    settings: tuple[str, ...] | str = SETTINGS,
    windows: tuple[int, ...] | int = (1, 3),
    n_tokens: int = 2,
    n_prompts: int | None = 100,
    seed: int = 0,
    batch_size: int = 256,
    template: str = "paper",
    world: World | None = None,
) -> KRSResult:
    """Knowledge Recovery Scores of restoring `vanilla` into `edited`, window by window.

    `prompts`: an `EditTask` (its edited tuples), tuples [n, 3] of the world (rendered in
    `template`), or prompt tokens [n, pos] (each starting with `<|endoftext|>`); more than
    `n_prompts` are sampled with `seed`. Each of `settings` (see `PARTS`) is restored over a
    window of every size in `windows` centred on every layer. Both models are
    HookedTransformers of one shape on one device (`load_model`, or `edit(..., hooked=True)
    .hooked`); `world` overrides the vanilla model's attached world. Returns a `KRSResult`.
    """
    config = RestoreConfig(settings, windows, n_tokens, n_prompts, seed, batch_size, template)
    _check_models(vanilla, edited)
    tuples, tokens = _prompt_tokens(vanilla, prompts, config, world)
    n_layers = vanilla.cfg.n_layers
    losses = {s: torch.zeros(len(config.windows), n_layers, len(tokens)) for s in config.settings}
    edited_loss = torch.zeros(len(tokens))
    sequences = []
    read = slice(tokens.shape[1] - 1, None)  # the positions that predict the continuation
    for rows in torch.arange(len(tokens)).split(config.batch_size):
        x = _continue(vanilla, tokens[rows], config.n_tokens)
        sequences.append(x)
        x = x[:, :-1]  # the last continuation token is predicted, never fed
        vanilla_run = capture(vanilla, x, ["mlp_post", "attn_out"])
        edited_run = capture(edited, x, "resid_pre")
        target = vanilla_run.logits[:, read]
        edited_loss[rows] = _mse(edited_run.logits[:, read], target)
        for setting in config.settings:
            for wi, size in enumerate(config.windows):
                for centre in range(n_layers):
                    layers = window_layers(centre, size, n_layers)
                    logits = _restored(edited, vanilla, vanilla_run, edited_run, x, setting, layers)
                    losses[setting][wi, centre, rows] = _mse(logits[:, read], target)
    if bool((edited_loss == 0).all()):
        raise InvalidArgument(
            f"the edited model's logits equal the vanilla model's on all {len(tokens)} prompts: "
            "there is nothing to recover. Restore into the model after the edit, on prompts the "
            "edit changed (e.g. the EditTask)"
        )
    x = torch.cat(sequences)
    return KRSResult(losses, edited_loss, x[:, : tokens.shape[1]].cpu(),
                     x[:, tokens.shape[1] :].cpu(), tuples, config)  # fmt: skip


def _restored(edited, vanilla, vanilla_run, edited_run, x, setting: str, layers: range) -> Tensor:
    """Logits of `edited` on `x` with `setting` restored from the vanilla run in `layers`; the
    run resumes at the window's first layer (the blocks before it are the edited run's)."""
    parts = setting.split("+")
    everywhere = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    kinds = [k for part, k in (("coefficients", "mlp_post"), ("attention", "attn_out"))
             if part in parts]  # fmt: skip
    patches = [
        Patch(Site(k, L), vanilla_run[Site(k, L)], everywhere) for k in kinds for L in layers
    ]
    values = [f"blocks.{L}.mlp.{w}" for L in layers for w in ("W_out", "b_out")]
    resume = dict(start_layer=layers.start, resid=edited_run[Site("resid_pre", layers.start)])
    if "values" not in parts:
        return patch(edited, x, patches, **resume)
    with swap_params(edited, vanilla, values):
        return patch(edited, x, patches, **resume)


def _continue(
    vanilla: HookedTransformer, prompts: Int[Tensor, "batch pos"], n_tokens: int
) -> Int[Tensor, "batch seq"]:
    """Prompts followed by the vanilla model's `n_tokens` greedy tokens."""
    x = prompts
    for _ in range(n_tokens):
        next_token = patch(vanilla, x, (), last_only=True)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, next_token], 1)
    return x


def _mse(logits: Tensor, target: Tensor) -> Float[Tensor, " batch"]:
    """Mean squared error between logit vectors per prompt, over positions and vocabulary."""
    return (logits.double() - target.double()).pow(2).mean((1, 2)).float().cpu()


def _check_models(vanilla, edited) -> None:
    keys = ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")
    shapes = [{k: getattr(m.cfg, k) for k in keys} for m in (vanilla, edited)]
    if shapes[0] != shapes[1]:
        raise InvalidArgument(
            f"the models have different shapes ({shapes[0]} vanilla, {shapes[1]} edited): "
            "restore between a model and an edited copy of itself"
        )
    worlds = [getattr(m, "world", None) for m in (vanilla, edited)]
    if None not in worlds and worlds[0] != worlds[1]:
        raise InvalidArgument(
            "the edited model was trained on another world than the vanilla model: "
            "restore between a model and an edited copy of itself"
        )
    devices = [next(m.parameters()).device for m in (vanilla, edited)]
    if devices[0] != devices[1]:
        raise InvalidArgument(
            f"the vanilla model is on {devices[0]}, the edited one on {devices[1]}: "
            "move both to one device (model.to(device))"
        )
    theirs = dict(edited.named_parameters())
    if all(torch.equal(p, theirs[n]) for n, p in vanilla.named_parameters()):
        raise InvalidArgument(
            "the edited model has the vanilla model's parameters: there is nothing to recover. "
            "Pass the model after the edit (e.g. edit(..., hooked=True).hooked)"
        )


def _prompt_tokens(vanilla, prompts, config: RestoreConfig, world):
    """The (seeded sample of) prompts as tokens [n, pos], with their tuples when given some."""
    device = next(vanilla.parameters()).device
    if isinstance(prompts, Tensor):
        tokens = prompts.to(device=device, dtype=torch.long)
        if tokens.ndim != 2 or not len(tokens):
            raise InvalidArgument(
                f"prompt tokens must be a non-empty [n, pos] tensor, got {tuple(tokens.shape)}"
            )
        if int(tokens.min()) < 0 or int(tokens.max()) >= vanilla.cfg.d_vocab:
            raise InvalidArgument(
                f"prompt tokens must be ids in 0..{vanilla.cfg.d_vocab - 1} of the model's world"
            )
        keep = _sample(len(tokens), config)
        return None, tokens[torch.as_tensor(keep, device=device)]
    world, tokenizer = _world_of(vanilla, world)
    if isinstance(prompts, EditTask):
        if prompts.world != world:
            raise InvalidArgument(
                "the edit task was drawn from another world than the model's: draw it from "
                "model.world"
            )
        prompts = prompts.facts
    facts = check_tuples(world, prompts)
    facts = facts[_sample(len(facts), config)]
    inputs = build_inputs(world, tokenizer, facts, template=config.template, device=device)
    return facts, inputs.tokens


def _sample(n: int, config: RestoreConfig) -> np.ndarray:
    if config.n_prompts is None or n <= config.n_prompts:
        return np.arange(n)
    return np.sort(np.random.default_rng(config.seed).choice(n, config.n_prompts, replace=False))
