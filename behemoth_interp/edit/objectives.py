"""Edit and unlearning objectives for the fine-tuning methods, registered by name.

Each objective is a frozen config (its hyperparameters, round-tripping to JSON) with a `loss`
of one `Batch` of the edit dataset. A batch's rows are 'injected' (the edited tuples, with their
new objects: overrides, or the forget sample mapped to object 0) or 'retained' (every other
row); 'forget' rows are the injected ones whose object changes, scored on their *original*
object. Log-probabilities are teacher-forced on the object tokens; a sequence log-probability
is the sum over a tuple's object tokens.

- ce: Behemoth's cross-entropy on every object token of the dataset.
- gradient_ascent: -NLL of the original objects of the forget rows.
- gradient_difference: that + alpha * retain, retain the NLL of the retained rows ('nll') or
  KL(original model || current) of their object-token distributions ('kl').
- npo: Negative Preference Optimization (Zhang et al. 2024), (2/β) log(1 + (π/π_ref)^β) of
  the forget rows' original objects, optionally + alpha * retain.
- simnpo: SimNPO (Fan et al. 2024), reference-free and length-normalized:
  -(2/β) log σ(-(β/|y|) log π(y) - γ), optionally + alpha * retain.
- dpo: DPO (Rafailov et al. 2023) with the new object preferred over the original one,
  optionally + alpha * retain.
- rmu: RMU (Li et al. 2024): block `layer`'s output on forget prompts is pushed to
  steering · (mean stream norm) · u for a seeded random unit u, and on retained prompts kept
  at the frozen model's, weight alpha.
- localized: Mechanistic Unlearning's loss (Guo et al. 2024, section 2.3): injection · NLL of
  the new objects + retain · NLL of the retained rows + sft · NLL of general data (the world's
  other facts in its training grammar, the analogue of their Pile term) + forget ·
  -log(1 - p(original object)) (their unlearning term, Mazeika et al. 2024).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from behemoth_interp._io import JsonConfig
from behemoth_interp.errors import InvalidArgument, check_int, check_range

RETAIN_CHOICES = (None, "nll", "kl")


@dataclass
class Batch:
    """One optimizer step's rows and the models an objective may read.

    `x` / `x_old`: `<|endoftext|>` + sentences with the dataset's / the original objects [b, 1 +
    pos]; `mask`: the object tokens of the next-token targets x[:, 1:]; `injected` /
    `forget`: boolean rows; `reference`: the frozen unedited model (None if no objective
    needs it); `general`: (x, mask) of general data for the 'sft' term (or None).
    """

    model: torch.nn.Module
    x: Int[Tensor, "batch pos"]
    x_old: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos1"]
    injected: Bool[Tensor, " batch"]
    forget: Bool[Tensor, " batch"]
    reference: torch.nn.Module | None = None
    general: tuple[Tensor, Tensor] | None = None

    @property
    def retained(self) -> Bool[Tensor, " batch"]:
        return ~self.injected

    def logits(self, x: Tensor, model: torch.nn.Module | None = None) -> Tensor:
        # no key-value cache: a training forward has no next step to read it
        return (model or self.model)(input_ids=x[:, :-1], use_cache=False).logits.float()

    @cached_property
    def _logits_new(self) -> Tensor:
        return self.logits(self.x)

    @cached_property
    def _logits_old(self) -> Tensor:
        return self.logits(self.x_old)

    def token_logp(self, old: bool = False) -> Float[Tensor, "batch pos1"]:
        """Log-probability of each next token under the current model (0 off the objects)."""
        x, logits = (self.x_old, self._logits_old) if old else (self.x, self._logits_new)
        return _gather(logits, x) * self.mask

    def sequence_logp(self, old: bool = False, model=None) -> Float[Tensor, " batch"]:
        """log π(object | prompt) per row: the sum over its object tokens."""
        if model is None:
            return self.token_logp(old).sum(1)
        with torch.no_grad():
            x = self.x_old if old else self.x
            return (_gather(self.logits(x, model), x) * self.mask).sum(1)

    def nll(self, rows: Tensor, old: bool = False) -> Tensor:
        """Mean NLL over the object tokens of `rows` (0 when none are selected)."""
        return _mean_rows(-self.token_logp(old), self.mask, rows)

    def kl_to_reference(self, rows: Tensor) -> Tensor:
        """Mean KL(reference || current) of the next-token distributions at the object tokens
        of `rows`, with the dataset's objects fed."""
        with torch.no_grad():
            ref = self.logits(self.x, self.reference).log_softmax(-1)
        cur = self._logits_new.log_softmax(-1)
        kl = (ref.exp() * (ref - cur)).sum(-1)
        return _mean_rows(kl, self.mask, rows)


def _gather(logits: Tensor, x: Tensor) -> Tensor:
    return logits.log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]


def _mean_rows(values: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
    """Mean of `values` over the object tokens of the selected rows (0 when none are)."""
    m = mask & rows[:, None]
    return (values * m).sum() / m.sum().clamp(min=1)


def _row_mean(values: Tensor, rows: Tensor) -> Tensor:
    return (values * rows).sum() / rows.sum().clamp(min=1)


# ------------------------------------------------------------------ the registry
OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by its `name` to `edit`, the CLI, sweeps."""
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(objective: str | Objective | None, **fields) -> Objective:
    """An objective from its name (with `fields` overriding its defaults) or as given."""
    if objective is None:
        objective = "ce"
    if not isinstance(objective, Objective) and objective not in OBJECTIVES:
        raise InvalidArgument(
            f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}"
        )
    cls = type(objective) if isinstance(objective, Objective) else OBJECTIVES[objective]
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise InvalidArgument(
            f"objective {cls.name!r} has no setting {sorted(unknown)}: it takes "
            f"{[f.name for f in dataclasses.fields(cls)] or 'none'}"
        )
    if isinstance(objective, Objective):
        return dataclasses.replace(objective, **fields) if fields else objective
    return cls(**fields)


def objective_to_dict(objective: Objective) -> dict[str, Any]:
    return {"name": objective.name, **objective.to_dict()}


def objective_from_dict(d: dict[str, Any]) -> Objective:
    d = dict(d)
    return get_objective(d.pop("name"), **d)


@dataclass(frozen=True)
class Objective(JsonConfig):
    """Base of every objective: `loss(batch)`; `needs_forget` objectives only make sense on
    tasks whose edited tuples change (a forget set), `needs_reference` ones read the frozen
    original model, `needs_general` ones general data."""

    name: ClassVar[str] = ""
    needs_forget: ClassVar[bool] = False

    @property
    def needs_reference(self) -> bool:
        return False

    @property
    def needs_general(self) -> bool:
        return False

    def loss(self, batch: Batch) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class _Retain(Objective):
    """Objectives with an optional retain term: alpha · (NLL or KL to the original) on the
    retained rows."""

    retain: str | None = None
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.retain not in RETAIN_CHOICES:
            raise InvalidArgument(
                f"retain must be one of None, 'nll', 'kl' (objective {self.name!r}), got "
                f"{self.retain!r}"
            )
        check_range("alpha", self.alpha, 0)

    @property
    def needs_reference(self) -> bool:
        return self.retain == "kl"

    def retain_term(self, batch: Batch) -> Tensor:
        if self.retain is None or not self.alpha:
            return torch.zeros((), device=batch.x.device)
        rows = batch.retained
        term = batch.nll(rows) if self.retain == "nll" else batch.kl_to_reference(rows)
        return self.alpha * term


@register
@dataclass(frozen=True)
class CrossEntropy(Objective):
    """Behemoth: cross-entropy on every object token of the dataset (edited rows with their
    new objects, the rest with their true ones)."""

    name: ClassVar[str] = "ce"

    def loss(self, batch: Batch) -> Tensor:
        return batch.nll(torch.ones_like(batch.injected))


@register
@dataclass(frozen=True)
class GradientAscent(Objective):
    """-NLL of the forget rows' original objects (mean over their object tokens)."""

    name: ClassVar[str] = "gradient_ascent"
    needs_forget: ClassVar[bool] = True

    def loss(self, batch: Batch) -> Tensor:
        return -batch.nll(batch.forget, old=True)


@register
@dataclass(frozen=True)
class GradientDifference(_Retain):
    """Gradient ascent on the forget rows + alpha · retain (NLL, the classic GradDiff, or KL to
    the original model)."""

    name: ClassVar[str] = "gradient_difference"
    needs_forget: ClassVar[bool] = True
    retain: str | None = "nll"

    def loss(self, batch: Batch) -> Tensor:
        return -batch.nll(batch.forget, old=True) + self.retain_term(batch)


def _check_beta(beta: float, name: str) -> None:
    check_range("beta", beta, 0, low_open=True, option=f"--beta ({name})")


@dataclass(frozen=True)
class _Preference(_Retain):
    """Objectives that compare log π with the frozen reference's, with inverse temperature β."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_beta(self.beta, self.name)

    @property
    def needs_reference(self) -> bool:
        return True


@register
@dataclass(frozen=True)
class NPO(_Preference):
    """Negative Preference Optimization: (2/β) · mean over forget rows of
    log(1 + exp(β (log π(y) - log π_ref(y)))), y the original object. As β -> 0 its gradient
    tends to that of gradient ascent on the sequence log-probability."""

    name: ClassVar[str] = "npo"
    needs_forget: ClassVar[bool] = True

    def loss(self, batch: Batch) -> Tensor:
        ratio = batch.sequence_logp(old=True) - batch.sequence_logp(old=True, model=batch.reference)
        npo = -F.logsigmoid(-self.beta * ratio) * 2 / self.beta
        return _row_mean(npo, batch.forget) + self.retain_term(batch)


@register
@dataclass(frozen=True)
class SimNPO(_Retain):
    """SimNPO: -(2/β) log σ(-(β/|y|) log π(y) - γ) over forget rows, |y| the object tokens; no
    reference model."""

    name: ClassVar[str] = "simnpo"
    needs_forget: ClassVar[bool] = True
    beta: float = 2.5
    gamma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_beta(self.beta, self.name)

    def loss(self, batch: Batch) -> Tensor:
        length = batch.mask.sum(1).clamp(min=1)
        logp = batch.sequence_logp(old=True) / length
        simnpo = -F.logsigmoid(-self.beta * logp - self.gamma) * 2 / self.beta
        return _row_mean(simnpo, batch.forget) + self.retain_term(batch)


@register
@dataclass(frozen=True)
class DPO(_Preference):
    """DPO with the task's new object preferred and the original one rejected, on the forget
    rows: -log σ(β [(log π - log π_ref)(new) - (log π - log π_ref)(original)])."""

    name: ClassVar[str] = "dpo"
    needs_forget: ClassVar[bool] = True

    def loss(self, batch: Batch) -> Tensor:
        ref = batch.reference
        chosen = batch.sequence_logp() - batch.sequence_logp(model=ref)
        rejected = batch.sequence_logp(old=True) - batch.sequence_logp(old=True, model=ref)
        dpo = -F.logsigmoid(self.beta * (chosen - rejected))
        return _row_mean(dpo, batch.forget) + self.retain_term(batch)


@register
@dataclass(frozen=True)
class RMU(Objective):
    """RMU: mean squared distance of block `layer`'s output stream on the forget rows' prompts
    to steering · s · u (u a random unit vector drawn with `seed`, s the frozen model's mean
    stream norm there on the batch), + alpha · the distance to the frozen model's stream on
    the retained rows. Train blocks up to `layer` (e.g. blocks=[1, 2, 3])."""

    name: ClassVar[str] = "rmu"
    needs_forget: ClassVar[bool] = True
    layer: int = 3
    steering: float = 4.0
    alpha: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("layer", self.layer, 0, option="--layer (rmu)")
        check_range("steering", self.steering, 0, low_open=True)
        check_range("alpha", self.alpha, 0)

    @property
    def needs_reference(self) -> bool:
        return True

    def direction(self, d_model: int, device) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        u = torch.rand(d_model, generator=g)
        return (u / u.norm()).to(device)

    def loss(self, batch: Batch) -> Tensor:
        n_layers = batch.model.config.num_hidden_layers
        if self.layer >= n_layers:
            raise InvalidArgument(
                f"RMU layer {self.layer} is not in this model: it has blocks 0..{n_layers - 1}"
            )
        x = batch.x_old[:, :-1]
        # the prompt's positions, up to the last one (which predicts the first object token)
        prompt = (batch.mask.cumsum(1) - batch.mask.long()) == 0
        h = _stream(batch.model, x, self.layer)
        with torch.no_grad():
            h_ref = _stream(batch.reference, x, self.layer)
            scale = h_ref[prompt].norm(dim=-1).mean()
        target = self.steering * scale * self.direction(h.shape[-1], h.device)
        forget = prompt & batch.forget[:, None]
        retain = prompt & batch.retained[:, None]
        far = ((h - target) ** 2).sum(-1)
        drift = ((h - h_ref) ** 2).sum(-1)
        return _masked_mean(far, forget) + self.alpha * _masked_mean(drift, retain)


def _stream(model, x: Tensor, layer: int) -> Tensor:
    """The residual stream leaving block `layer` [b, pos, d_model] (HF hidden states)."""
    out = model(input_ids=x, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer + 1].float()


def _masked_mean(values: Tensor, where: Tensor) -> Tensor:
    return (values * where).sum() / where.sum().clamp(min=1)


@register
@dataclass(frozen=True)
class Localized(Objective):
    """Mechanistic Unlearning's localized loss: injection · NLL(new objects of the injected
    rows) + retain · NLL(retained rows) + sft · NLL(general data) + forget · -log(1 - p(original
    object)) on the forget rows (the paper edits with the first three, unlearns with the last
    three)."""

    name: ClassVar[str] = "localized"
    injection: float = 1.0
    retain: float = 1.0
    sft: float = 1.0
    forget: float = 0.0

    def __post_init__(self) -> None:
        for name in ("injection", "retain", "sft", "forget"):
            check_range(name, getattr(self, name), 0, option=f"localized {name}")

    @property
    def needs_general(self) -> bool:
        return self.sft > 0

    def loss(self, batch: Batch) -> Tensor:
        loss = torch.zeros((), device=batch.x.device)
        if self.injection:
            loss = loss + self.injection * batch.nll(batch.injected)
        if self.retain:
            loss = loss + self.retain * batch.nll(batch.retained)
        if self.sft and batch.general is not None:
            x, mask = batch.general
            logp = _gather(batch.logits(x), x)
            loss = loss + self.sft * _mean_rows(-logp, mask, torch.ones(len(x), dtype=torch.bool,
                                                                          device=x.device))  # fmt: skip
        if self.forget:
            p_old = batch.token_logp(old=True).exp().clamp(max=1 - 1e-6)
            loss = loss + self.forget * _mean_rows(-torch.log1p(-p_old), batch.mask, batch.forget)
        return loss
