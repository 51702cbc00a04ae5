"""Knowledge edits and unlearning with exact ground truth, as a family of registered methods.

- `tasks`: the paper's four edit tasks (what must change, what must not), `EditTask`;
- `datasets`: what the fine-tuning methods train on (2:1:4 overrides, forget mixes);
- `selection`: where an edit may change the model (blocks x components);
- `objectives`: the losses of the fine-tuning methods (CE, GA, GradDiff, NPO, SimNPO, DPO,
  RMU, the localized loss), registered by name;
- `registry` and `methods/`: the methods behind one protocol (finetune, lora, rome, ...);
- `covariance`, `values`: what the locate-then-edit methods share (key statistics, v*);
- `evaluation`, `report`: the `EditReport` of an edited model; `search`: `select_lr` and the `training_scores` it ranks by;
- `run`: `edit()`, the single entry point.
"""

from behemoth_interp.edit import methods  # noqa: F401  (registers every method)
from behemoth_interp.edit.covariance import key_covariance
from behemoth_interp.edit.datasets import (
    PARTS,
    EditDataConfig,
    EditDataset,
    edit_dataset,
    general_data,
)
from behemoth_interp.edit.evaluation import changed_parameters, evaluate_edit, oracle_distance
from behemoth_interp.edit.methods.alphaedit import AlphaEditConfig
from behemoth_interp.edit.methods.finetune import FinetuneConfig
from behemoth_interp.edit.methods.lora import LoraConfig
from behemoth_interp.edit.methods.memit import MemitConfig
from behemoth_interp.edit.methods.rome import ROME_POSITIONS, RomeConfig, RomeUpdate, apply_rome
from behemoth_interp.edit.objectives import (
    DPO,
    NPO,
    OBJECTIVES,
    RMU,
    CrossEntropy,
    GradientAscent,
    GradientDifference,
    Localized,
    Objective,
    SimNPO,
    get_objective,
)
from behemoth_interp.edit.registry import METHODS, MODES, Method, Where, get_method, register
from behemoth_interp.edit.report import (
    EDIT_REPORT,
    EDIT_TASK,
    RATE_METRICS,
    EditReport,
    EditResult,
)
from behemoth_interp.edit.run import edit
from behemoth_interp.edit.search import LrSearch, select_lr, training_scores
from behemoth_interp.edit.selection import COMPONENT_CHOICES, lora_modules, trainable_parameters
from behemoth_interp.edit.tasks import TASKS, EditTask

__all__ = [
    "AlphaEditConfig", "COMPONENT_CHOICES", "DPO", "EDIT_REPORT", "EDIT_TASK", "METHODS",
    "MODES", "NPO", "OBJECTIVES", "PARTS", "RATE_METRICS", "RMU", "ROME_POSITIONS", "TASKS",
    "CrossEntropy", "EditDataConfig", "EditDataset", "EditReport", "EditResult", "EditTask",
    "FinetuneConfig", "GradientAscent", "GradientDifference", "Localized", "LoraConfig",
    "LrSearch", "MemitConfig", "Method", "Objective", "RomeConfig", "RomeUpdate", "SimNPO",
    "Where", "apply_rome", "changed_parameters", "edit", "oracle_distance", "edit_dataset",
    "evaluate_edit", "general_data", "get_method", "get_objective", "key_covariance",
    "lora_modules", "register", "select_lr", "training_scores", "trainable_parameters",
]  # fmt: skip
