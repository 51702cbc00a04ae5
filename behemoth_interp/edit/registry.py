"""Edit methods behind one small protocol, registered by name.

A method gets the HF model (a copy it may change), the task, where to edit (`Where`: blocks and
components, resolved and validated by the method) and its config (a frozen dataclass that
round-trips to JSON), and returns the edited model and its settings. `edit()`, the CLI and the
sweep runner enumerate, configure and validate methods through `METHODS` alone, so adding a
method is one new module in `edit/methods/` that calls `register`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import GPTNeoXForCausalLM

from behemoth_interp._io import JsonConfig
from behemoth_interp.edit.selection import selection
from behemoth_interp.edit.tasks import EditTask
from behemoth_interp.errors import InvalidArgument

MODES = ("batched", "sequential")
"""How a multi-tuple task is applied: all tuples in one edit, or one edit per tuple in order
(evaluated after each, as sequential-editing benchmarks do)."""


@dataclass(frozen=True)
class Where:
    """The blocks and components an edit may change."""

    blocks: tuple[int, ...]
    components: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "components": list(self.components)}


class Method:
    """One edit method: `name`, its `Config`, the `modes` it supports, and `apply`.

    `where(hf, blocks, components, config)` resolves the user's selection (None: the method's
    default) against the user's config (None if none was given) and may return an updated
    config (e.g. ROME's layer from `blocks`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[JsonConfig]]
    modes: ClassVar[tuple[str, ...]] = MODES
    where_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields that say where the method edits (checked against `blocks` in `where`)."""

    def where(self, hf: GPTNeoXForCausalLM, blocks, components, config) -> tuple[Where, Any]:
        chosen, comps = selection(hf, blocks, ("mlp", "attn") if components is None else components)
        return Where(tuple(chosen), comps), config

    def apply(
        self, hf: GPTNeoXForCausalLM, task: EditTask, where: Where, config, *, seed: int
    ) -> tuple[GPTNeoXForCausalLM, dict[str, Any]]:
        """Edit `hf` (the method's own copy: in place is fine) to carry out `task` in one go;
        returns the edited model and what the report's settings should record."""
        raise NotImplementedError

    def config_from(self, config, options: dict[str, Any]):
        """The method's config: `config` (or the defaults) with `options` overriding fields,
        unknown options named."""
        base = self.Config() if config is None else config
        if not isinstance(base, self.Config):
            raise InvalidArgument(
                f"method {self.name!r} takes a {self.Config.__name__}, got {type(base).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InvalidArgument(
                f"method {self.name!r} has no setting {unknown}: its {self.Config.__name__} "
                f"takes {sorted(fields)}"
            )
        return dataclasses.replace(base, **options) if options else base


METHODS: dict[str, Method] = {}


def register(method: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[method.name] = method()
    return method


def get_method(name: str) -> Method:
    from behemoth_interp.edit import methods  # noqa: F401  (the modules register themselves)

    if name not in METHODS:
        raise InvalidArgument(f"unknown edit method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
