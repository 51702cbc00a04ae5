"""What an edit produced: its `EditReport` (every rate over exact ground truth, and the
settings that made it) and the `EditResult` that holds the edited model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import read_json, write_dir, write_json
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, MissingInput
from behemoth_interp.evaluate import FactScores
from behemoth_interp.model import load_hf, write_checkpoint

EDIT_REPORT = "edit_report.json"
EDIT_TASK = "edit_task.json"


@dataclass
class EditResult:
    """An applied edit: the edited HF `model`, its HookedTransformer twin (when asked), the
    `report`, the `task`, and `scores`, the model's per-tuple ranks the report was computed
    from (a `FactScores`: read more tuples from it, each run once)."""

    model: GPTNeoXForCausalLM
    report: EditReport
    hooked: Any = None
    task: EditTask | None = None
    scores: FactScores | None = None

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the edited model as a checkpoint directory (`load_model` and `load_hf` read it,
        so every analysis runs on it) with `edit_report.json` and `edit_task.json`; atomic."""
        if self.task is None:
            raise InvalidArgument(
                "this result has no task: build it with edit(), which records one"
            )

        def fill(tmp: Path) -> None:
            write_checkpoint(tmp, self.model, self.task.world)
            self.report.save(tmp / EDIT_REPORT)
            write_json(tmp / EDIT_TASK, _jsonable({"format": "behemoth-edit-task/1",
                                                   **self.task.to_dict()}))  # fmt: skip

        return write_dir(Path(out), fill, overwrite=overwrite)


def load_edited(path: str | Path) -> tuple[GPTNeoXForCausalLM, EditTask]:
    """The edited HF model in a directory written by `EditResult.save` (or `behemoth-interp
    edit --out`) and the task it records."""
    path = Path(path)
    if not (path / EDIT_TASK).is_file():
        raise MissingInput(
            f"{path} has no {EDIT_TASK}: give an edited checkpoint (EditResult.save, or "
            "`behemoth-interp edit ... --out DIR`), which records its task"
        )
    model, world, _ = load_hf(path)
    return model, EditTask.from_dict(read_json(path / EDIT_TASK, what="edit task"), world)


RATE_METRICS = ("success_top1", "success_top2", "success_top1_all", "forget_rate",
                "remaining_before", "remaining", "dependent_kept", "dependent_followed",
                "dependent_followed_all", "oracle_agreement", "oracle_kl")  # fmt: skip


@dataclass
class EditReport:
    """How an edit went (Behemoth sections 4.7-4.10), every rate over exact ground truth.

    Rates over edited tuples count only the tuples the edit changes (forgetting leaves the
    tuples already at object 0 as they are: counting them would credit the edit with them);
    the `_all` variants count every tuple of the task.
    success_top1/2: changed tuples whose new object is top-1 / within top-2; forget_rate:
    changed tuples whose old object is no longer top-1; remaining (remaining_before): top-1
    accuracy on every tuple the edit must not change, after (before) the edit;
    dependent_kept / dependent_followed: dependents (correlated partner, nested implied tuple)
    whose implied object changes, still predicting their old object / the object implied by
    the edit (None without such dependents); template_success: success_top1 in each paraphrase
    and the 'mcq' format (its choices always list the original and the new object);
    template_before: the unedited model's accuracy on the same tuples with their original
    objects in the same formats (was the format learned at all?); oracle_agreement,
    oracle_kl: the distance to the edit's exact oracle (`oracle_distance`, when one was given);
    changed: parameter name -> number of elements changed.
    """

    task: str
    method: str
    success_top1: float = float("nan")
    success_top2: float = float("nan")
    success_top1_all: float = float("nan")
    forget_rate: float = float("nan")
    remaining: float = float("nan")
    remaining_before: float | None = None
    dependent_kept: float | None = None
    dependent_followed: float | None = None
    dependent_followed_all: float | None = None
    template_success: dict[str, float] = field(default_factory=dict)
    template_before: dict[str, float] = field(default_factory=dict)
    oracle_agreement: float | None = None
    oracle_kl: float | None = None
    changed: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def params_changed(self) -> int:
        return sum(self.changed.values())

    def metrics(self) -> dict[str, float]:
        """Every scalar of the report (rates, per-template success, parameters changed)."""
        out = {m: getattr(self, m) for m in RATE_METRICS if getattr(self, m) is not None}
        out.update({f"success/{t}": v for t, v in self.template_success.items()})
        out.update({f"before/{t}": v for t, v in self.template_before.items()})
        out["params_changed"] = self.params_changed
        out["tensors_changed"] = len(self.changed)
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per metric: task, method, metric, value."""
        m = self.metrics()
        return pd.DataFrame({"task": self.task, "method": self.method,
                             "metric": list(m), "value": list(m.values())})  # fmt: skip

    def plot(self):
        """Bars of the rates (success, forgetting, remaining and dependent accuracy)."""
        import plotly.express as px

        df = self.to_dataframe()
        df = df[~df.metric.isin(["params_changed", "tensors_changed"])]
        return px.bar(df, x="metric", y="value", range_y=[0, 1],
                      title=f"Edit '{self.task}' by {self.method}: "
                            f"{self.params_changed:,} parameters changed")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"format": "behemoth-edit-report/1", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditReport:
        d = {k: v for k, v in d.items() if k != "format"}
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, _jsonable(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EditReport:
        d = read_json(
            path, what="edit report written by EditReport.save", format="behemoth-edit-report/1"
        )
        return cls.from_dict(d)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
