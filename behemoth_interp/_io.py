"""Atomic file and directory writes: a reader never sees a half-written artifact."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON to `path` atomically."""
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` via a temp file in the same folder and `os.replace`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """`path` as a Path; an error if it is a non-empty directory and `overwrite` is False
    (call before long work whose result goes there)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty: pass overwrite=True or --force")
    return path


def write_dir(path: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Build a directory with `fill(tmp_dir)`, then move it into place at `path` in one step.

    With `overwrite=False` an existing non-empty `path` is an error; with `True` it is
    replaced only after the new directory is complete.
    """
    path = check_writable(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_json(path: str | os.PathLike, *, what: str, format: str | None = None) -> Any:
    """Read JSON, raising an error that names what the file was expected to be.

    With `format`, the file's "format" field must equal it (files of another kind or version
    are refused by name rather than misread).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected the {what} here")
    data = json.loads(path.read_text())
    if format is not None and (not isinstance(data, dict) or data.get("format") != format):
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a {what}: its format is {found!r}, expected {format!r}")
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
            raise ValueError(
                f"unknown {cls.__name__} fields {sorted(unknown)}: was it written by another "
                "version? Drop them or upgrade"
            )
        return cls(**{k: _tuples(v) for k, v in d.items()})


def _lists(x: Any) -> Any:
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
