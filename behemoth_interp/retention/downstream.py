"""Downstream tasks inside the synthetic world: what an edited model is fine-tuned on next.

The retention paper (Wen & Zhang, section 3 and appendix C.2) fine-tunes an edited model on
four kinds of data that say nothing about the edit: general text, new facts, a classification
task and instructions. In a closed vocabulary every sentence is made of the world's tokens, so
the analogues are built from the world itself, and exclusion is exact instead of filtered:

- the *downstream subjects* are the world's subjects minus the edited ones and those of the
  facts the retention is measured on (`keep_out`: the matched intrinsic facts), a seeded
  fraction of them;
- the *downstream relations* are the base relations minus the edited ones (and their correlated
  partners), so no relation-object pair of the edit can occur;
- every object a downstream sentence names is an *allowed object*: it shares no token with an
  edited tuple's old or new object or a kept-out fact's object (`disjoint="tokens"`;
  `"objects"` only excludes those objects themselves, for edits of many tuples, whose objects
  cover every object token of a small world).

The four tasks follow the paper's: `general` restates facts the model knows (their true
objects, where allowed) in every non-choice template with the loss on every token, for a fixed
number of steps (the paper's general text, which mostly agrees with what the model knows);
`new_facts` gives facts new objects the model does not predict (paper template, object loss,
until 70% of them are learned, the paper's structured facts); `classification` labels every
downstream subject with one of two objects under one relation (a binary task, until 95%);
`instruction` asks known facts in the relation-first formats (answer loss, until 70% in that
format, the paper's instruction tuning). The rendered corpus is checked to contain no excluded
subject, relation or object token sequence before it is written.

The vocabulary is closed and the shipped models were trained on every subject, so "new" here
means new objects for known subjects (`new_facts`, `classification`): that fine-tune contradicts
what the model knows of those subjects, which the paper's downstream data mostly does not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from behemoth_interp._io import JsonConfig
from behemoth_interp.corpus import Corpus, CorpusConfig, write_world
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument, check_int, check_range
from behemoth_interp.grammar import AUGMENT_PARAPHRASES, PARAPHRASES
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.train import TrainConfig
from behemoth_interp.world import World

Disjoint = Literal["tokens", "objects"]
FINE_TUNE = TrainConfig(lr=2e-4, steps=2000, epochs=None, eval_every=20, save_optimizer=False)
"""The downstream fine-tune's defaults: lr 2e-4, a tenth of the shipped recipe's peak (the
paper fine-tunes at a fraction of pre-training's), at most 2000 steps, evaluated every 20."""


@dataclass(frozen=True)
class DownstreamTask:
    """One kind of downstream data: its templates, what carries the loss, which `objects` its
    facts state ('true': the world's; 'new': others, drawn; 'labels': one of two per subject),
    when to stop (the paper's thresholds: 70% on new facts and instructions, 95% on
    classification, measured exactly on the task's own facts in `eval_template`; None: the
    fine-tune's `steps`, as a general-text run that restates known facts has no accuracy to
    reach)."""

    name: str
    description: str
    templates: tuple[str, ...]
    loss_on: Literal["all", "object"]
    objects: Literal["true", "new", "labels"]
    stop_accuracy: float | None
    eval_template: str = "paper"


DOWNSTREAM_TASKS: dict[str, DownstreamTask] = {
    t.name: t
    for t in (
        DownstreamTask(
            "general",
            "next-token prediction on known facts in every non-choice "
            "template, loss on every token, for the fine-tune's steps (the paper's "
            "general text)",
            ("paper", *PARAPHRASES, *AUGMENT_PARAPHRASES),
            "all",
            "true",
            None,
        ),  # fmt: skip
        DownstreamTask(
            "new_facts",
            "object prediction for facts the model does not know (new "
            "objects), paper template, until 70% (the paper's structured facts)",
            ("paper",),
            "object",
            "new",
            0.7,
        ),  # fmt: skip
        DownstreamTask(
            "classification",
            "a binary relation: every downstream subject labelled "
            "with one of two objects, until 95% (the paper's sentiment classification)",
            ("paper",),
            "object",
            "labels",
            0.95,
        ),  # fmt: skip
        DownstreamTask(
            "instruction",
            "known facts asked in the relation-first formats, answer "
            "loss, until 70% in that format (the paper's instruction tuning)",
            ("relation_first", "relation_long"),
            "object",
            "true",
            0.7,
            eval_template="relation_first",
        ),  # fmt: skip
    )
}
"""The four analogues of the retention paper's downstream tasks, by name."""


@dataclass(frozen=True)
class DownstreamConfig(JsonConfig):
    """Which downstream task, on how many of the eligible subjects (`subjects`, a fraction),
    stated `copies` times in blocks of `block_len` tokens, how strictly it avoids the edit's
    objects (`disjoint`), drawn with `seed`."""

    task: str = "general"
    subjects: float = 1.0
    copies: int = 4
    block_len: int = 80
    disjoint: Disjoint = "tokens"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in DOWNSTREAM_TASKS:
            raise InvalidArgument(
                f"unknown downstream task {self.task!r}: choose one of {sorted(DOWNSTREAM_TASKS)}"
            )
        check_range("subjects", self.subjects, 0, 1, low_open=True)
        check_int("copies", self.copies, 1)
        check_int("block_len", self.block_len, 16)
        if self.disjoint not in ("tokens", "objects"):
            raise InvalidArgument(f"disjoint must be 'tokens' or 'objects', got {self.disjoint!r}")

    @property
    def spec(self) -> DownstreamTask:
        return DOWNSTREAM_TASKS[self.task]


@dataclass(frozen=True)
class Downstream:
    """A downstream task built for one edit: `world` (the edit's world, `original`, with the
    downstream facts' new objects), `facts` [n, 3] (what its corpus states), and what it keeps
    out."""

    config: DownstreamConfig
    world: World
    original: World
    facts: np.ndarray
    excluded_subjects: np.ndarray
    excluded_relations: np.ndarray
    excluded_objects: np.ndarray
    """Objects the corpus never names: with `disjoint="tokens"`, every object sharing a token
    with the edit's or the kept-out facts' objects."""

    @property
    def corpus_config(self) -> CorpusConfig:
        spec = self.config.spec
        return CorpusConfig(grammar_mix=tuple((t, 1.0) for t in spec.templates),
                            copies=self.config.copies, block_len=self.config.block_len,
                            seed=self.config.seed)  # fmt: skip

    def train_config(self, base: TrainConfig | None = None, **fields) -> TrainConfig:
        """`base` (default: `FINE_TUNE`) with this task's loss, stopping accuracy and evaluation
        template; `fields` override any of them."""
        base = base or FINE_TUNE
        spec = self.config.spec
        return replace(base, **{"loss_on": spec.loss_on, "stop_accuracy": spec.stop_accuracy,
                                "eval_template": spec.eval_template, **fields})  # fmt: skip

    def corpus(self) -> Corpus:
        """The rendered corpus, checked to contain nothing this task keeps out."""
        tokenizer = WorldTokenizer(self.world.config)
        corpus = Corpus.build(self.world, tokenizer, self.corpus_config, self.facts)
        self.check(corpus.tokens)
        return corpus

    def write(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the world and its corpus into `out` (what `train(out, ..., init_from=)` reads),
        atomically, after checking the corpus."""
        write_world(self.world, self.corpus(), out, overwrite=overwrite)
        return Path(out)

    def check(self, tokens: np.ndarray) -> None:
        """Raise if token blocks `tokens` [b, pos] contain an excluded subject, relation or
        object (as its token sequence); a failure is a bug in the builder, never the user's."""
        tok = WorldTokenizer(self.world.config)
        for space, ids in (("subject", self.excluded_subjects),
                           ("relation", self.excluded_relations),
                           ("object", self.excluded_objects)):  # fmt: skip
            found = contains(np.asarray(tokens), tok.entity_tokens(space, ids))
            if found.any():
                raise AssertionError(
                    f"the downstream corpus states excluded {space} {int(ids[found][0])}"
                )

    def to_dataframe(self) -> pd.DataFrame:
        """The downstream facts: subject, relation, object (new) and original (the world's)."""
        f = self.facts
        return pd.DataFrame({"subject": f[:, 0], "relation": f[:, 1], "object": f[:, 2],
                             "original": self.original.objects_of(f[:, 0], f[:, 1])})  # fmt: skip


def contains(tokens: np.ndarray, sequences: np.ndarray) -> np.ndarray:
    """Boolean [m]: whether each token sequence `sequences` [m, k] occurs contiguously
    anywhere in `tokens` [b, pos]."""
    k = sequences.shape[1]
    if tokens.shape[-1] < k or not len(sequences):
        return np.zeros(len(sequences), dtype=bool)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, k, axis=-1).reshape(-1, k)
    base = int(max(tokens.max(), sequences.max())) + 1
    code = lambda x: np.asarray(x, np.int64) @ (base ** np.arange(k, dtype=np.int64))  # noqa: E731
    return np.isin(code(sequences), code(windows))


def downstream(
    task: EditTask, config: DownstreamConfig = DownstreamConfig(), *,
    keep_out: np.ndarray | None = None,
) -> Downstream:  # fmt: skip
    """Build `config.task` for the edit `task`: facts of other subjects (not edited, not in
    `keep_out` [m, 3], the tuples retention is measured on besides the edit) and other relations,
    each with a new allowed object (see the module docstring). Raises `InvalidArgument` naming
    the fix when nothing is left to state."""
    world, rng = task.world, np.random.default_rng(config.seed)
    keep_out = (
        np.zeros((0, 3), np.int64) if keep_out is None else np.asarray(keep_out).reshape(-1, 3)
    )
    if len(keep_out) and keep_out[:, 1].max() >= world.config.n_relations:
        raise InvalidArgument("keep_out holds base tuples (the intrinsic facts): relations "
                              f"0..{world.config.n_relations - 1}")  # fmt: skip
    subjects = np.unique(np.concatenate([task.facts[:, 0], keep_out[:, 0]]))
    relations = set(np.concatenate([task.facts[:, 1], keep_out[:, 1]]).tolist())
    c = world.config
    if c.distribution == "correlated" and relations & set(c.correlated):
        relations |= set(c.correlated)
    excluded_relations = np.array(sorted(relations), dtype=np.int64)
    touched = np.unique(np.concatenate([task.facts[:, 2], task.targets, keep_out[:, 2]]))
    tok = WorldTokenizer(c)
    objects = np.arange(c.n_objects)
    if config.disjoint == "tokens":
        used = tok.entity_tokens("object", touched)
        allowed = ~np.isin(tok.entity_tokens("object", objects), used).any(1)
    else:
        allowed = ~np.isin(objects, touched)
    eligible = np.setdiff1d(np.arange(c.n_subjects), subjects)
    n = round(config.subjects * len(eligible))
    chosen = np.sort(rng.choice(eligible, size=n, replace=False)) if n else eligible[:0]
    rels = [r for r in range(c.n_relations) if r not in relations]
    pools = {r: np.intersect1d(world.candidate_objects(r), objects[allowed]) for r in rels}
    rels = [r for r in rels if len(pools[r]) >= 2]
    if not len(chosen) or not rels:
        what = "subject" if not len(chosen) else "relation with two allowed objects"
        raise InvalidArgument(
            f"the downstream task has no {what} left after leaving out the edit's "
            f"({len(subjects)} subjects, relations {sorted(relations)}, {int((~allowed).sum())} "
            f"objects): edit fewer tuples, raise subjects=, or use disjoint='objects'"
        )
    objects_of = config.spec.objects
    if objects_of == "labels":
        r = rels[0]
        labels = rng.permutation(pools[r])[:2]
        new = labels[rng.permutation(np.arange(len(chosen)) % 2)]
        facts = np.stack([chosen, np.full_like(chosen, r), new], axis=1)
    else:
        s, r = (a.ravel() for a in np.meshgrid(chosen, rels, indexing="ij"))
        true = world.objects_of(s, r)
        if objects_of == "new":
            facts = np.stack([s, r, _other_object(rng, true, r, pools)], axis=1)
        else:  # the known facts whose objects are allowed
            facts = np.stack([s, r, true], axis=1)[allowed[true]]  # a true object is a candidate
            if not len(facts):
                raise InvalidArgument("no downstream subject's fact has an allowed object: raise "
                                      "subjects= or use disjoint='objects'")  # fmt: skip
    stated = np.stack([facts[:, 0], facts[:, 1], world.objects_of(facts[:, 0], facts[:, 1])], 1)
    return Downstream(config, world.with_objects(stated, facts[:, 2]), world,
                      facts.astype(np.int64), subjects, excluded_relations, objects[~allowed])  # fmt: skip


def _other_object(rng, true: np.ndarray, relation: np.ndarray, pools: dict[int, np.ndarray]):
    """Per fact, an object drawn uniformly from its relation's pool without its own object."""
    new = np.empty(len(true), dtype=np.int64)
    for r, pool in pools.items():
        rows = np.flatnonzero(relation == r)
        own = np.searchsorted(pool, true[rows])
        has_own = (own < len(pool)) & (pool[np.minimum(own, len(pool) - 1)] == true[rows])
        pick = (rng.random(len(rows)) * (len(pool) - has_own)).astype(np.int64)
        new[rows] = pool[pick + (has_own & (pick >= own))]
    return new
