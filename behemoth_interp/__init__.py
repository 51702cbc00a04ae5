"""behemoth-interp: synthetic fact worlds, models trained on them, and exact interpretability.

import behemoth_interp as bi
world = bi.World.generate(bi.WorldConfig("nested", n_subjects=1000))
"""

from behemoth_interp.corpus import Corpus, CorpusConfig, build_world, load_world
from behemoth_interp.edit import (
    EditDataConfig,
    EditDataset,
    EditReport,
    EditResult,
    EditTask,
    LrSearch,
    edit,
    edit_dataset,
    evaluate_edit,
    select_lr,
)
from behemoth_interp.evaluate import FactAccuracy, evaluate_facts
from behemoth_interp.grammar import PARAPHRASES, ROLES, TEMPLATES, Sentences, Template, render
from behemoth_interp.hooks import (
    SITE_KINDS,
    Capture,
    Inputs,
    Patch,
    Site,
    build_inputs,
    capture,
    patch,
    resolve_sites,
    swap_params,
)
from behemoth_interp.model import (
    PRESETS,
    ModelConfig,
    hooked_in_world,
    load_hf,
    load_model,
    to_hooked,
)
from behemoth_interp.probe import (
    LatentKnowledge,
    Localization,
    ProbeConfig,
    ProbeResult,
    flu_layers,
    latent_knowledge,
    probe,
)
from behemoth_interp.rank import MoveRank, move_rank
from behemoth_interp.restore import KRSResult, RestoreConfig, restore, window_layers
from behemoth_interp.rome import RomeConfig, RomeUpdate, apply_rome, key_covariance
from behemoth_interp.tokenizer import OutOfVocabularyError, WorldTokenizer
from behemoth_interp.trace import TraceConfig, TraceResult, find_partners, sample_tuples, trace
from behemoth_interp.train import TrainConfig, capacity_search, train
from behemoth_interp.world import Fact, World, WorldConfig

__all__ = [
    "EditDataConfig",
    "EditDataset",
    "EditReport",
    "EditResult",
    "EditTask",
    "MoveRank",
    "edit",
    "edit_dataset",
    "evaluate_edit",
    "LrSearch",
    "move_rank",
    "LatentKnowledge",
    "Localization",
    "ProbeConfig",
    "ProbeResult",
    "flu_layers",
    "latent_knowledge",
    "probe",
    "KRSResult",
    "RestoreConfig",
    "restore",
    "window_layers",
    "RomeConfig",
    "RomeUpdate",
    "apply_rome",
    "key_covariance",
    "select_lr",
    "PRESETS",
    "FactAccuracy",
    "ModelConfig",
    "TrainConfig",
    "capacity_search",
    "evaluate_facts",
    "load_hf",
    "load_model",
    "to_hooked",
    "hooked_in_world",
    "train",
    "PARAPHRASES",
    "ROLES",
    "SITE_KINDS",
    "TEMPLATES",
    "Capture",
    "Corpus",
    "CorpusConfig",
    "Fact",
    "Inputs",
    "OutOfVocabularyError",
    "Patch",
    "Sentences",
    "Site",
    "Template",
    "TraceConfig",
    "TraceResult",
    "World",
    "WorldConfig",
    "WorldTokenizer",
    "build_inputs",
    "build_world",
    "capture",
    "find_partners",
    "load_world",
    "patch",
    "render",
    "resolve_sites",
    "sample_tuples",
    "swap_params",
    "trace",
]
