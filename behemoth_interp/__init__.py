"""behemoth-interp: synthetic fact worlds, models trained on them, and exact interpretability.

    import behemoth_interp as bi
    world = bi.World.generate(bi.WorldConfig("nested", n_subjects=1000))
"""

from behemoth_interp.corpus import Corpus, CorpusConfig, build_world, load_world
from behemoth_interp.grammar import PARAPHRASES, ROLES, TEMPLATES, Sentences, Template, render
from behemoth_interp.tokenizer import OutOfVocabularyError, WorldTokenizer
from behemoth_interp.world import Fact, World, WorldConfig

__all__ = [
    "PARAPHRASES",
    "ROLES",
    "TEMPLATES",
    "Corpus",
    "CorpusConfig",
    "Fact",
    "OutOfVocabularyError",
    "Sentences",
    "Template",
    "World",
    "WorldConfig",
    "WorldTokenizer",
    "build_world",
    "load_world",
    "render",
]
