"""Atomic file and directory writes: a reader never sees a half-written artifact."""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from behemoth_interp.errors import (
    CorruptFile,
    InvalidArgument,
    MissingInput,
    OutputBusy,
    OutputExists,
)

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
"""Every file and directory the project writes gets these modes (the umask's defaults)."""


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON to `path` atomically."""
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` via a temp file in the same folder and `os.replace`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


REPORT_MARK = "<!-- written by behemoth-interp -->"
"""The first line of every HTML page the project writes: what --force may replace."""


def write_page(path: str | os.PathLike, html: str) -> None:
    """An HTML page, marked as ours (`REPORT_MARK`), written atomically."""
    write_bytes(path, (REPORT_MARK + "\n" + html).encode())


def is_report(path: Path) -> bool:
    """Whether the file at `path` is an HTML page this program wrote (which --force replaces)."""
    with open(path, "rb") as f:
        return f.read(len(REPORT_MARK)) == REPORT_MARK.encode()


# ------------------------------------------------------------------ one writer per output
_HELD: dict[Path, int] = {}


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive right to write `path` (a `.name.lock` file beside it, `flock`ed).

    A second process that asks for the same output gets `OutputBusy` at once, naming the
    holder's pid; the lock dies with its process, so a killed writer never blocks the next.
    Re-entrant within a process (a command that holds it may call writers that take it too).
    """
    path = Path(os.path.abspath(path))
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    _check_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_text(lock).strip() or "unknown"
            raise OutputBusy(
                f"{path} is being written by another process (pid {holder}): wait for it to "
                "finish, or write somewhere else"
            ) from None
        # the previous holder unlinks the file when done: make sure ours is still the one there
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[path] = 1
    try:
        yield path
    finally:
        del _HELD[path]
        lock.unlink(missing_ok=True)
        os.close(fd)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _clear_leftovers(path: Path) -> None:
    """Remove what killed writers of `path` left beside it (`.name.*.tmp`, `.name.old`); only
    called under `output_lock(path)`, so no live writer owns them. A writer killed between
    moving the old directory aside and the new one in left only `.name.old`: it is moved back."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if stale.name.endswith(".tmp") or stale.name == f".{path.name}.old":
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    with output_lock(path):
        _clear_leftovers(path)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def is_artifact(path: Path) -> bool:
    """Whether directory `path` was written by behemoth-interp: a world, corpus, checkpoint or
    saved result (a top-level JSON file whose "format" is one of the project's)."""
    for file in path.glob("*.json"):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("format", "")).startswith("behemoth-"):
            return True
    return False


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    directory: bool = True,
    replaceable: Callable[[Path], bool] = is_artifact,
    what: str = "output",
) -> Path:
    """Check, before long work, that its result can be written at `path`; returns it as a Path.

    Refused: a non-empty directory (or a file, for `directory=False`) unless `overwrite`, and
    even then unless `replaceable(path)` (it must be one of the project's own artifacts, never a
    user's folder); a file where a directory goes or the reverse; a path whose nearest existing
    parent is not a writable directory. `what` names the option in messages (e.g. '--out').
    """
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise OutputExists(f"{what} {path} is a file: give a directory path")
        if not directory and path.is_dir():
            raise OutputExists(f"{what} {path} is a directory: give a file path")
        occupied = any(path.iterdir()) if directory else True
        if occupied and not overwrite:
            raise OutputExists(
                f"{what} {path} exists{' and is not empty' if directory else ''}: choose "
                "another path, or pass --force (overwrite=True) to replace it"
            )
        if occupied and directory and not replaceable(path):
            raise OutputExists(
                f"{what} {path} holds files that behemoth-interp did not write, so it is never "
                "replaced, even with --force: choose another path or empty it yourself"
            )
    _check_parent(path, what)
    return path


def _check_parent(path: Path, what: str = "output") -> None:
    """The nearest existing parent of `path` must be a writable directory."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExists(f"{what} {path}: {parent} is a file, so nothing can be written below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExists(f"{what} {path}: {parent} is not writable: choose another path")


def write_dir(
    path: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool] = is_artifact,
) -> Path:
    """Build a directory with `fill(tmp_dir)`, then move it into place at `path` in one step.

    With `overwrite=False` an existing non-empty `path` is an error; with `True` it is
    replaced only after the new directory is complete, and only if `replaceable(path)` (see
    `check_output`). Holds `output_lock(path)` throughout and clears what killed writers left.
    """
    path = Path(path)
    with output_lock(path):
        _clear_leftovers(path)
        check_output(path, overwrite=overwrite, replaceable=replaceable)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            fill(tmp)
            _set_modes(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _set_modes(root: Path) -> None:
    """Give `root` and everything under it the project's modes, whichever library wrote it."""
    os.chmod(root, DIR_MODE)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), DIR_MODE)
        for f in files:
            os.chmod(os.path.join(base, f), FILE_MODE)


def read_json(path: str | os.PathLike, *, what: str, format: str | None = None) -> Any:
    """Read JSON, raising an error that names what the file was expected to be.

    With `format`, the file's "format" field must equal it (files of another kind or version
    are refused by name rather than misread).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} is missing: expected the {what} here")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFile(f"{path} is not valid JSON ({err}): expected the {what} here") from None
    if format is not None and (not isinstance(data, dict) or data.get("format") != format):
        found = data.get("format") if isinstance(data, dict) else None
        raise InvalidArgument(
            f"{path} is not a {what}: its format is {found!r}, expected {format!r}"
        )
    return data


def write_tensor_dir(
    path: str | os.PathLike,
    meta: tuple[str, Any],
    tensors: tuple[str, Mapping[str, Any]],
    *,
    overwrite: bool,
) -> Path:
    """Write a result directory atomically: `meta` = (file name, JSON data) and `tensors` =
    (file name, name -> tensor, stored as safetensors on the CPU)."""
    from safetensors.torch import save_file

    (meta_name, data), (tensors_name, arrays) = meta, tensors
    cpu = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}

    def fill(tmp: Path) -> None:
        save_file(cpu, str(tmp / tensors_name))
        write_json(tmp / meta_name, data)

    return write_dir(path, fill, overwrite=overwrite)


def read_tensor_dir(
    path: str | os.PathLike, meta_name: str, tensors_name: str, *, what: str, format: str
) -> tuple[Any, dict[str, Any]]:
    """Read a directory written by `write_tensor_dir`: (its JSON data, its tensors by name).
    The JSON's "format" must equal `format`; `what` names the result in errors."""
    from safetensors.torch import load_file

    path = Path(path)
    data = read_json(path / meta_name, what=f"{what} ({meta_name})", format=format)
    return data, load_file(str(path / tensors_name))


class JsonConfig:
    """`to_dict` / `from_dict` for frozen dataclass configs: tuples (nested ones too) become
    JSON lists and come back as tuples, and unknown fields are refused by name."""

    def to_dict(self) -> dict[str, Any]:
        return {k: _lists(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise InvalidArgument(
                f"unknown {cls.__name__} fields {sorted(unknown)}: was it written by another "
                "version? Drop them or upgrade"
            )
        return cls(**{k: _tuples(v) for k, v in d.items()})


def _lists(x: Any) -> Any:
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
