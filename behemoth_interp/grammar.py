"""Artificial grammars: templates that turn tuples into token sequences with exact spans.

The paper's template (Behemoth section 4.3) is `SS <s> FT1 FT2 RR <r> FT3 OO <o> . <|endoftext|>`.
Paraphrases use other fillers and orders; the multiple-choice format lists candidate objects
before the answer. Rendering is vectorized per template and returns every sentence's spans
(subject, relation, object) and prompt length, so no downstream code guesses positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from behemoth_interp.errors import InvalidArgument, is_int
from behemoth_interp.tokenizer import WorldTokenizer
from behemoth_interp.world import N_FILLERS, World

ROLES = ("pad", "grammar", "subject", "relation", "object", "choice")
"""Role codes of rendered tokens: `roles == ROLES.index("object")` marks the answer tokens."""
PAD_ROLE, GRAMMAR, SUBJECT, RELATION, OBJECT, CHOICE = range(len(ROLES))


@dataclass(frozen=True)
class Template:
    """A sentence pattern: markers SS RR OO . EOT, fillers F<i>, slots <s> <r> <o> <choices>."""

    name: str
    pattern: str
    description: str = ""

    def __post_init__(self) -> None:
        parts = self.pattern.split()
        for slot in ("<s>", "<r>", "<o>"):
            if parts.count(slot) != 1:
                raise InvalidArgument(f"template {self.name!r} must contain {slot} exactly once")
        if parts.index("<o>") < max(parts.index("<s>"), parts.index("<r>")):
            raise InvalidArgument(
                f"template {self.name!r}: the object must come after subject and relation"
            )
        for p in parts:
            known = p in ("SS", "RR", "OO", ".", "EOT", "<s>", "<r>", "<o>", "<choices>")
            if not known and not (p[0] == "F" and p[1:].isdigit() and int(p[1:]) < N_FILLERS - 1):
                raise InvalidArgument(f"template {self.name!r} has unknown part {p!r}")

    @property
    def parts(self) -> list[str]:
        return self.pattern.split()

    @property
    def is_choice(self) -> bool:
        return "<choices>" in self.parts


CHOICE_FILLER = N_FILLERS - 1
"""The filler that precedes every candidate object in the multiple-choice format."""

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("paper", "SS <s> F0 F1 RR <r> F2 OO <o> . EOT", "the paper's template"),
        Template("relation_first", "RR <r> F3 SS <s> F4 OO <o> . EOT", "relation before subject"),
        Template("compact", "SS <s> RR <r> F5 F6 OO <o> . EOT", "fillers moved after the relation"),
        Template("fronted", "F7 F8 SS <s> F9 RR <r> OO <o> . EOT", "fillers in front"),
        Template(
            "mcq",
            "F10 SS <s> RR <r> F11 <choices> F12 OO <o> . EOT",
            "multiple choice: candidate objects listed, then the answer",
        ),
        Template("bare", "SS <s> RR <r> OO <o> . EOT", "markers only, no fillers"),
        Template("wrapped", "F13 SS <s> RR <r> F14 OO <o> . EOT", "one filler before, one inside"),
        Template("spaced", "SS <s> F15 RR <r> F16 OO <o> . EOT", "a filler after each slot"),
        Template("relation_fronted", "F17 RR <r> SS <s> OO <o> . EOT", "filler, relation, subject"),
        Template("long", "F18 SS <s> F19 F20 RR <r> F21 OO <o> . EOT", "four fillers"),
        Template(
            "relation_long",
            "RR <r> F22 F13 SS <s> F14 F15 OO <o> . EOT",
            "relation first, two fillers after each slot",
        ),  # fmt: skip
        Template("subject_late", "F16 F17 RR <r> F18 SS <s> F19 OO <o> . EOT", "subject last"),
        Template("tailed", "SS <s> RR <r> F20 OO <o> F21 . EOT", "a filler after the object"),
        Template("echoed", "SS <s> F22 RR <r> F0 OO <o> . EOT", "reuses a paper filler"),
        Template(
            "interleaved", "F3 SS <s> F5 RR <r> F7 OO <o> . EOT", "fillers of other paraphrases"
        ),
    )
}
PARAPHRASES = ("relation_first", "compact", "fronted")
"""The paraphrases edit reports evaluate on."""
AUGMENT_PARAPHRASES = (
    "bare", "wrapped", "spaced", "relation_fronted", "long",
    "relation_long", "subject_late", "tailed", "echoed", "interleaved",
)  # fmt: skip
"""Ten more paraphrases, disjoint from PARAPHRASES: data for paraphrase-augmented edits
(Retention paper, k = 5 and 10) that leaves the evaluation paraphrases unseen by the edit."""


def augment_templates(k: int) -> tuple[str, ...]:
    """The first `k` of `AUGMENT_PARAPHRASES`: the paraphrases a k-paraphrase-augmented edit
    states its facts in, besides its own templates (Retention paper, section 5.1)."""
    if not is_int(k) or not 0 <= k <= len(AUGMENT_PARAPHRASES):
        raise InvalidArgument(
            f"paraphrases must be an integer from 0 to {len(AUGMENT_PARAPHRASES)} (the grammar's "
            f"augmentation paraphrases), got {k!r}"
        )
    return AUGMENT_PARAPHRASES[: int(k)]


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise InvalidArgument(f"unknown template {name!r}: choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class Sentences:
    """Rendered sentences: tokens [n, pos] right-padded with <|pad|>, per-token roles, spans.

    `spans[name]` is an int array [n, 2] of (start, end) for 'subject', 'relation', 'object'
    (and 'choices' for the multiple-choice format); `prompt_len[i]` equals the object's start:
    the prompt is everything before the object.
    """

    tokens: np.ndarray
    roles: np.ndarray
    lengths: np.ndarray
    spans: dict[str, np.ndarray]
    facts: np.ndarray
    template: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def prompt_len(self) -> np.ndarray:
        return self.spans["object"][:, 0]

    @cached_property
    def uniform(self) -> bool:
        """True if every sentence has the same length and spans (one layout, batchable as is)."""
        return bool(
            (self.lengths == self.lengths[0]).all()
            and all((v == v[0]).all() for v in self.spans.values())
        )

    def prompts(self) -> np.ndarray:
        """Prompt tokens [n, prompt_len] (requires one layout; select rows first otherwise)."""
        if not self.uniform:
            raise InvalidArgument(
                "sentences have different layouts: render one template and kind at a time"
            )
        return self.tokens[:, : self.prompt_len[0]]

    def select(self, rows) -> Sentences:
        rows = np.asarray(rows)
        return Sentences(
            self.tokens[rows], self.roles[rows], self.lengths[rows],
            {k: v[rows] for k, v in self.spans.items()}, self.facts[rows], self.template[rows],
        )  # fmt: skip

    def text(self, tokenizer: WorldTokenizer, i: int) -> str:
        return tokenizer.decode(self.tokens[i, : self.lengths[i]])


def render(
    world: World,
    tokenizer: WorldTokenizer,
    facts: np.ndarray,
    template: str | np.ndarray = "paper",
    *,
    n_choices: int = 4,
    seed: int = 0,
    choices: np.ndarray | None = None,
) -> Sentences:
    """Render tuples [n, 3] as sentences in one template, or per row (array of template names).

    The true objects are taken from `facts`, so edited targets render as given. Candidate
    objects for the multiple-choice format are the true object plus `n_choices - 1` distinct
    others of the relation (all of them if it has fewer), in an order drawn with `seed`; or
    exactly `choices` [n, k] when given (each row distinct objects of its relation, holding
    the row's object: edit evaluations list the original and the new object).
    """
    facts = np.asarray(facts, dtype=np.int64).reshape(-1, 3)
    names = np.broadcast_to(np.asarray(template, dtype=object), (len(facts),))
    for name in set(names.tolist()):
        get_template(name)
    if n_choices < 2:
        raise InvalidArgument(f"n_choices must be at least 2, got {n_choices}")
    if choices is not None:
        choices = _check_choices(world, facts, choices)
    rng = np.random.default_rng(seed)
    groups = []
    for name in sorted(set(names.tolist())):
        t_rows = np.flatnonzero(names == name)
        # one group per relation, not per relation kind: candidate objects differ between
        # relations of one kind (binarized correlated relations take only objects 0 and 1)
        relations = facts[t_rows, 1]
        for relation in np.unique(relations):
            rows = t_rows[relations == relation]
            groups.append(
                (
                    rows,
                    _render_group(
                        world,
                        tokenizer,
                        facts[rows],
                        TEMPLATES[name],
                        n_choices,
                        rng,
                        None if choices is None else choices[rows],
                    ),
                )
            )
    n = len(facts)
    width = max(g[1][0].shape[1] for g in groups) if groups else 0
    tokens = np.full((n, width), tokenizer.pad_id, dtype=np.int32)
    roles = np.zeros((n, width), dtype=np.uint8)
    lengths = np.zeros(n, dtype=np.int32)
    span_names = {k for _, g in groups for k in g[2]}
    spans = {k: np.zeros((n, 2), dtype=np.int32) for k in sorted(span_names)}
    for rows, (tok, rol, sp) in groups:
        tokens[rows, : tok.shape[1]] = tok
        roles[rows, : tok.shape[1]] = rol
        lengths[rows] = tok.shape[1]
        for k, v in sp.items():
            spans[k][rows] = v
    return Sentences(
        tokens, roles, lengths, spans, facts.astype(np.int32), np.array(names, dtype=object)
    )


def _render_group(world, tokenizer, facts, template: Template, n_choices: int, rng, given=None):
    """One template, one relation: every row has the same layout, so build by columns."""
    n = len(facts)
    r0 = int(facts[0, 1]) if n else 0
    s_space, o_space = world.subject_space(r0), world.object_space(r0)
    world.objects_of(facts[:, 0], facts[:, 1])  # validates subjects and relations
    candidates = world.candidate_objects(r0)
    if n and (facts[:, 2].min() < 0 or facts[:, 2].max() >= len(candidates)):
        bad = facts[(facts[:, 2] < 0) | (facts[:, 2] >= len(candidates))][0]
        raise InvalidArgument(
            f"object {bad[2]} is not a possible object of relation {world.relation_name(int(bad[1]))}: "
            f"it takes objects 0..{len(candidates) - 1}"
        )
    columns: list[np.ndarray] = []
    roles: list[int] = []
    spans: dict[str, tuple[int, int]] = {}

    def add(block: np.ndarray, role: int | list[int], span: str | None = None) -> None:
        block = block.reshape(n, -1) if block.ndim == 2 else np.broadcast_to(block, (n, 1))
        start = sum(c.shape[1] for c in columns)
        columns.append(block)
        roles.extend([role] * block.shape[1] if isinstance(role, int) else role)
        if span:
            spans[span] = (start, start + block.shape[1])

    fixed = {"SS": tokenizer.ss_id, "RR": tokenizer.rr_id, "OO": tokenizer.oo_id,
             ".": tokenizer.period_id, "EOT": tokenizer.eot_id}  # fmt: skip
    for part in template.parts:
        if part in fixed:
            add(np.array(fixed[part]), GRAMMAR)
        elif part[0] == "F":
            add(np.array(tokenizer.fillers[int(part[1:])]), GRAMMAR)
        elif part == "<s>":
            add(tokenizer.entity_tokens(s_space, facts[:, 0]), SUBJECT, "subject")
        elif part == "<r>":
            add(tokenizer.entity_tokens("relation", facts[:, 1]), RELATION, "relation")
        elif part == "<o>":
            add(tokenizer.entity_tokens(o_space, facts[:, 2]), OBJECT, "object")
        else:  # <choices>
            choices = (_draw_choices(facts[:, 2], len(candidates), n_choices, rng)
                       if given is None else given)  # fmt: skip
            ent = tokenizer.entity_tokens(o_space, choices.ravel()).reshape(n, choices.shape[1], -1)
            filler = np.full((n, choices.shape[1], 1), tokenizer.fillers[CHOICE_FILLER])
            role = ([GRAMMAR] + [CHOICE] * ent.shape[2]) * choices.shape[1]
            add(np.concatenate([filler, ent], axis=2).reshape(n, -1), role, "choices")
    tokens = np.concatenate(columns, axis=1).astype(np.int32)
    role_row = np.array(roles, dtype=np.uint8)
    return (
        tokens,
        np.broadcast_to(role_row, tokens.shape),
        {k: np.broadcast_to(np.array(v, dtype=np.int32), (n, 2)) for k, v in spans.items()},
    )


def _check_choices(world: World, facts: np.ndarray, choices) -> np.ndarray:
    """Given candidate lists [n, k] as int64, or an error naming what is wrong with them."""
    choices = np.asarray(choices, dtype=np.int64)
    if choices.ndim != 2 or len(choices) != len(facts) or choices.shape[1] < 2:
        raise InvalidArgument(
            f"choices must be [n_tuples={len(facts)}, k >= 2] candidate objects, got shape "
            f"{choices.shape}"
        )
    if not (choices == facts[:, 2:3]).any(1).all():
        raise InvalidArgument("every row of choices must contain that tuple's object")
    s = np.sort(choices, axis=1)
    if (s[:, 1:] == s[:, :-1]).any():
        raise InvalidArgument("the candidate objects of a row must be distinct")
    for r in np.unique(facts[:, 1]):
        n = len(world.candidate_objects(int(r)))
        if choices[facts[:, 1] == r].min() < 0 or choices[facts[:, 1] == r].max() >= n:
            raise InvalidArgument(
                f"choices for relation {world.relation_name(int(r))} must be objects 0..{n - 1}"
            )
    return choices


def _draw_choices(true: np.ndarray, n_objects: int, n_choices: int, rng) -> np.ndarray:
    """Candidate lists [n, k]: the true object and k-1 distinct others, shuffled per row."""
    k = min(n_choices, n_objects)
    n = len(true)
    if _p_distinct(k - 1, n_objects - 1) < 0.05:
        # nearly every other object is a candidate: rejection would almost never stop, so take
        # the first k-1 of a random order of the offsets instead
        offsets = 1 + np.argsort(rng.random((n, n_objects - 1)), axis=1)[:, : k - 1]
        return _shuffled(true, offsets, n_objects, k, rng)
    # offsets in 1..n_objects-1 (mod n_objects they never hit the true object); redraw
    # the rows that drew an offset twice until every row is distinct
    offsets = rng.integers(1, n_objects, size=(n, k - 1))
    while True:
        s = np.sort(offsets, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not dup.any():
            break
        offsets[dup] = rng.integers(1, n_objects, size=(int(dup.sum()), k - 1))
    return _shuffled(true, offsets, n_objects, k, rng)


def _shuffled(true, offsets, n_objects: int, k: int, rng) -> np.ndarray:
    choices = np.concatenate([true[:, None], (true[:, None] + offsets) % n_objects], axis=1)
    order = np.argsort(rng.random((len(true), k)), axis=1)
    return np.take_along_axis(choices, order, axis=1)


def _p_distinct(k: int, m: int) -> float:
    """Probability that k draws from m values with replacement are all distinct."""
    return float(np.prod((m - np.arange(k)) / m)) if k <= m else 0.0


def edit_choices(
    world: World, facts: np.ndarray, targets: np.ndarray, n_choices: int = 4, seed: int = 0
) -> np.ndarray:
    """Candidate lists [n, k] for asking edited tuples in the multiple-choice format: the
    original object, the new one and k-2 distinct others of the relation, shuffled with `seed`,
    so the same question scores the model before (original) and after (new) the edit."""
    facts = np.asarray(facts, dtype=np.int64).reshape(-1, 3)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng([seed, 23])
    rows = []
    for (_, r, o), t in zip(facts, targets):
        n = len(world.candidate_objects(int(r)))
        k = min(n_choices, n)
        others = np.setdiff1d(np.arange(n), [o, t])
        pick = rng.choice(others, size=k - len({int(o), int(t)}), replace=False)
        rows.append(rng.permutation(np.concatenate([[o], [t] if t != o else [], pick])))
    width = max(map(len, rows)) if rows else 0
    if any(len(r) != width for r in rows):
        raise InvalidArgument(
            "these tuples' relations have different numbers of objects: ask them in groups"
        )
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, 2), dtype=np.int64)
