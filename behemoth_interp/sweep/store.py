"""The content-addressed store of a sweep: one JSON record per run, keyed by the run's hash.

    STORE/store.json            {"format": "behemoth-sweep-store/1", "specs": [sha, ...]}
    STORE/specs/<sha>.json      every spec that ran into the store
    STORE/runs/<ab>/<key>.json  one record per run (its EditReport, training-time scores,
                                move-rank summary, error, and `timings`)

Records are written atomically when a run ends and never rewritten (a failed run only by
`retry_failed`), so a store killed at any moment holds only whole records, a rerun adds what
is missing, and the same run is never stored twice. Everything in a record but its `timings`
is a function of its key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from behemoth_interp._io import read_json, write_json
from behemoth_interp.errors import CorruptFile, MissingInput, OutputExists
from behemoth_interp.sweep.spec import SweepSpec
from behemoth_interp.sweep.worker import RECORD_FORMAT

STORE_FORMAT = "behemoth-sweep-store/1"
STORE_META = "store.json"


class Store:
    """A sweep store at `path` (see the module docstring); `Store.open` creates or checks it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> Store:
        """The store at `path`, created if absent (with `create`). A non-empty directory that is
        not a sweep store is refused: it is never written into."""
        path = Path(path)
        meta = path / STORE_META
        if path.exists() and not path.is_dir():
            raise OutputExists(f"--out {path} is a file: give a directory for the sweep store")
        if path.is_dir() and any(path.iterdir()) and not meta.is_file():
            raise OutputExists(
                f"--out {path} is a non-empty directory that is not a sweep store: choose "
                "another path (a sweep resumes only into its own store)"
            )
        if not meta.is_file():
            if not create:
                raise MissingInput(
                    f"{path} is not a sweep store: run `behemoth-interp sweep` first"
                )
            write_json(meta, {"format": STORE_FORMAT, "specs": []})
        read_json(meta, what="sweep store record", format=STORE_FORMAT)
        return cls(path)

    # ------------------------------------------------------------------ records
    def record_path(self, key: str) -> Path:
        return self.path / "runs" / key[:2] / f"{key}.json"

    def keys(self) -> list[str]:
        """Keys of every stored record, sorted."""
        return sorted(p.stem for p in self._files())

    def status(self) -> dict[str, str]:
        """key -> 'ok' or 'failed' for every stored record."""
        return {r["key"]: r["status"] for r in self.records()}

    def records(self) -> Iterator[dict[str, Any]]:
        for p in self._files():
            yield self._read(p)

    def read(self, key: str) -> dict[str, Any]:
        return self._read(self.record_path(key))

    def write(self, record: dict[str, Any]) -> Path:
        """Write one run's record atomically under its key."""
        path = self.record_path(record["key"])
        write_json(path, record)
        return path

    def _files(self) -> list[Path]:
        return sorted(
            p for p in (self.path / "runs").glob("*/*.json") if not p.name.startswith(".")
        )

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CorruptFile(
                f"{path} is not a readable run record ({err}): delete it and rerun the sweep, "
                "which runs it again"
            ) from None
        if record.get("format") != RECORD_FORMAT or record.get("key") != path.stem:
            raise CorruptFile(f"{path} is not a run record of this store: remove it")
        return record

    def clear_leftovers(self) -> None:
        """Remove the temporary and lock files that writers killed mid-write left in runs/;
        only under the store's `output_lock` (the sweep's), so no live writer owns them."""
        for p in (self.path / "runs").glob("*/.*"):
            if p.name.endswith((".tmp", ".lock")):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ specs
    def add_spec(self, spec: SweepSpec) -> None:
        """Record that `spec` ran into this store (the last one gives the default selection)."""
        meta = read_json(self.path / STORE_META, what="sweep store record", format=STORE_FORMAT)
        sha = spec.sha256
        path = self.path / "specs" / f"{sha}.json"
        if not path.is_file():
            write_json(path, spec.to_dict())
        if meta["specs"][-1:] != [sha]:
            meta["specs"] = [s for s in meta["specs"] if s != sha] + [sha]
            write_json(self.path / STORE_META, meta)

    def specs(self) -> list[SweepSpec]:
        """The specs that ran into this store, the most recent last."""
        meta = read_json(self.path / STORE_META, what="sweep store record", format=STORE_FORMAT)
        return [SweepSpec.from_dict(read_json(self.path / "specs" / f"{s}.json", what="sweep spec"))
                for s in meta["specs"]]  # fmt: skip
