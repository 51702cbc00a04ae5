"""`reproduce`: a paper's committed sweep specs at one scale, run into one directory, resumably,
and its figures written to one report page.

    OUT/reproduce.json    what this directory reproduces (paper, scale, the specs' hashes)
    OUT/<spec name>/      one sweep store per spec (each keeps its own selection rule)
    OUT/report.html       every store's figures

The specs are the repository's `experiments/sweeps/<figure>-<scale>.yaml`; their relative
model paths are read from the repository root, so the command runs from any directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from behemoth_interp._io import output_lock, read_json, write_json
from behemoth_interp.errors import InvalidArgument, MissingInput, OutputExists
from behemoth_interp.sweep.report import reproduce_page
from behemoth_interp.sweep.result import SweepResult
from behemoth_interp.sweep.runner import SweepSummary, run_sweep
from behemoth_interp.sweep.spec import SweepSpec

REPRODUCE_FORMAT = "behemoth-reproduce/1"
ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "experiments" / "sweeps"
PAPERS = {
    "behemoth": ("figure4-single", "figure4-forget", "figure7-lora", "figure8-correlated",
                 "dependents"),
    "retention": ("retention", "retention-remedies", "retention-remedies-classification"),
    "mechanistic-unlearning": ("mu-localizations",),
    "dissecting": ("dissecting-krs",),
}  # fmt: skip
"""Each paper's figures, by the stem of their spec files (`<stem>-<scale>.yaml`)."""
SCALES = ("quick", "paper")


@dataclass
class Reproduction:
    """What `reproduce` did: each spec's `SweepSummary`, the report page, the wall time."""

    paper: str
    scale: str
    out: Path
    summaries: dict[str, SweepSummary]
    report: Path

    def __str__(self) -> str:
        lines = [f"{self.paper} at {self.scale} scale into {self.out}:"]
        for name, s in self.summaries.items():
            lines.append(f"- {name}: " + str(s).replace("\n", "\n  "))
        wall = sum(s.wall_s for s in self.summaries.values())
        lines.append(f"report: {self.report} (sweeps {wall / 60:.1f} min)")
        return "\n".join(lines)


def paper_specs(paper: str, scale: str, specs: str | Path = SPECS) -> list[SweepSpec]:
    """The committed specs of `paper` at `scale`, validated, with model paths made absolute
    (relative ones are read from the specs' repository root)."""
    if paper not in PAPERS:
        raise InvalidArgument(f"unknown paper {paper!r}: choose one of {', '.join(PAPERS)}")
    if scale not in SCALES:
        raise InvalidArgument(f"--scale must be one of {SCALES}, got {scale!r}")
    specs = Path(specs)
    root = specs.resolve().parents[1]
    out = []
    for stem in PAPERS[paper]:
        path = specs / f"{stem}-{scale}.yaml"
        if not path.is_file():
            raise MissingInput(
                f"{path} is missing: reproduce reads the repository's experiments/sweeps "
                "(run it from a clone of behemoth-interp, or pass --specs DIR)"
            )
        spec = SweepSpec.load(path)
        models = tuple(m if Path(m).is_absolute() else str(root / m) for m in spec.models)
        out.append(dataclasses.replace(spec, models=models))
    return out


def reproduce(
    paper: str,
    out: str | Path,
    *,
    scale: str = "quick",
    executor: str = "ray",
    workers: int = 1,
    address: str | None = None,
    specs: str | Path = SPECS,
    progress: bool = True,
) -> Reproduction:
    """Run every spec of `paper` at `scale` into `out` (one store each; a rerun resumes: only
    the missing runs run) and write `out/report.html`. Every spec is read and validated
    before any run; `out` must be empty, absent or an earlier `reproduce` of the same paper
    and scale."""
    chosen = paper_specs(paper, scale, specs)
    out = Path(out)
    meta = {"format": REPRODUCE_FORMAT, "paper": paper, "scale": scale,
            "specs": {s.name: s.sha256 for s in chosen}}  # fmt: skip
    with output_lock(out):
        _check_out(out, paper, scale)
        write_json(out / "reproduce.json", meta)
        run = partial(run_sweep, executor=executor, workers=workers, address=address,
                      progress=progress)  # fmt: skip
        summaries = {s.name: run(s, out / s.name) for s in chosen}
        results = {name: SweepResult.load(out / name) for name in summaries}
        page = out / "report.html"
        title = f"{paper} at {scale} scale"
        # one shareable page per directory: plotly.js inline, no script file beside it
        reproduce_page(results, title).write(page, offline=True)
    return Reproduction(paper, scale, out, summaries, page)


def _check_out(out: Path, paper: str, scale: str) -> None:
    """`out` is new, empty, or a reproduction of this paper and scale (which resumes)."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"--out {out} is a file: give a directory")
    if not out.is_dir() or not any(p for p in out.iterdir() if not p.name.startswith(".")):
        return
    meta = out / "reproduce.json"
    if not meta.is_file():
        raise OutputExists(
            f"--out {out} is a non-empty directory that is not a reproduction: choose another"
        )
    found = read_json(meta, what="reproduction record", format=REPRODUCE_FORMAT)
    if (found["paper"], found["scale"]) != (paper, scale):
        raise OutputExists(
            f"--out {out} reproduces {found['paper']} at {found['scale']} scale: give another "
            "directory for this one"
        )
