"""The project's error types: what a user can fix (the CLI prints one line) versus a bug.

Every error a user can cause by what they pass or point at derives from `BehemothError`; the
command line prints its message and exits 2, and any other exception is a bug and keeps its
traceback. Each type also derives from the built-in a caller would expect (`ValueError`,
`FileNotFoundError`, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations

import numpy as np


class BehemothError(Exception):
    """A mistake in what was asked for, or an input that cannot be used; the message says
    what to do."""


class InvalidArgument(BehemothError, ValueError):
    """An argument or config field outside its allowed range or set."""


class MissingInput(BehemothError, FileNotFoundError):
    """A file or directory that should be there is not."""


class OutputExists(BehemothError, FileExistsError):
    """An output path is occupied and replacing it was not asked for (or is not allowed)."""


class OutputBusy(BehemothError, BlockingIOError):
    """Another process is writing the same output right now."""


class CheckpointMismatch(BehemothError, ValueError):
    """Parts of a checkpoint, or a model and a world, do not belong together."""


class CorruptFile(BehemothError, ValueError):
    """A file exists but cannot be read as what it should be."""


class Diverged(BehemothError, FloatingPointError):
    """A model or an optimization produced NaN or infinite values: no result is reported."""


class WrongType(BehemothError, TypeError):
    """An argument of the wrong kind (e.g. a HookedTransformer where an HF model is needed)."""


def check_range(
    name: str, value, low=None, high=None, *, low_open: bool = False, option: str | None = None
) -> None:
    """Raise `InvalidArgument` naming `name` (and its command-line `option`, by default
    `--name-with-dashes`) and the allowed range unless `low <= value <= high` (`low < value`
    with `low_open`); a bound of None is no bound. Booleans and non-numbers are refused too."""
    option = option or "--" + name.replace("_", "-")
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"<= {high}"
    allowed = " and ".join(x for x in (lo, hi) if x)
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )
    if (
        not number
        or value != value  # NaN
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and value > high)
    ):
        raise InvalidArgument(f"{name} ({option}) must be {allowed}, got {value!r}")


def is_int(value) -> bool:
    """An integer (Python or numpy), not a boolean."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value, low=None, high=None, *, option: str | None = None) -> None:
    """`check_range` for counts: `value` must also be an integer (1.5 blocks is no block)."""
    if not is_int(value):
        where = option or "--" + name.replace("_", "-")
        raise InvalidArgument(f"{name} ({where}) must be an integer, got {value!r}")
    check_range(name, int(value), low, high, option=option)
