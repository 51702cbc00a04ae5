"""The shared writer: outputs checked before work, one writer per output, leftovers cleared,
one set of file modes, and never a user's folder replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from behemoth_interp._io import (
    DIR_MODE,
    FILE_MODE,
    check_output,
    is_artifact,
    output_lock,
    write_dir,
    write_json,
)
from behemoth_interp.errors import OutputBusy, OutputExists


def _fill(tmp: Path) -> None:
    write_json(tmp / "result.json", {"format": "behemoth-test/1"})
    (tmp / "sub").mkdir()
    (tmp / "sub" / "data.bin").write_bytes(b"x")


def test_check_output_refuses_what_it_must(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExists, match="exists and is not empty"):
        check_output(user, overwrite=False, what="--out")
    with pytest.raises(OutputExists, match="did not write, so it is never replaced"):
        check_output(user, overwrite=True, what="--out")
    with pytest.raises(OutputExists, match="is a file: give a directory"):
        check_output(user / "notes.txt", overwrite=True)
    with pytest.raises(OutputExists, match="is a directory: give a file"):
        check_output(user, overwrite=True, directory=False)
    with pytest.raises(OutputExists, match="notes.txt is a file, so nothing can be written"):
        check_output(user / "notes.txt" / "deeper" / "out", overwrite=False)
    assert (user / "notes.txt").read_text() == "keep me"
    # parents that do not exist yet are fine: they are created
    assert check_output(tmp_path / "a" / "b", overwrite=False) == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False)


def test_check_output_refuses_an_unwritable_parent(tmp_path, monkeypatch):
    # root may write anywhere, so the permission answer is simulated
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(OutputExists, match="is not writable"):
        check_output(tmp_path / "out", overwrite=False, what="--out")


def test_write_dir_replaces_only_its_own_artifacts(tmp_path):
    out = write_dir(tmp_path / "r", _fill, overwrite=False)
    assert is_artifact(out)
    with pytest.raises(OutputExists):
        write_dir(out, _fill, overwrite=False)
    (out / "extra").write_text("old run")
    write_dir(out, _fill, overwrite=True)
    assert not (out / "extra").exists() and (out / "result.json").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExists, match="never replaced"):
        write_dir(user, _fill, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_written_files_share_one_mode(tmp_path):
    out = write_dir(tmp_path / "r", _fill, overwrite=False)
    assert os.stat(out).st_mode & 0o777 == DIR_MODE
    for path in out.rglob("*"):
        want = DIR_MODE if path.is_dir() else FILE_MODE
        assert os.stat(path).st_mode & 0o777 == want, path


def test_leftovers_of_killed_writers_are_cleared(tmp_path):
    out = write_dir(tmp_path / "r", _fill, overwrite=False)
    stale_dir = tmp_path / ".r.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "half.bin").write_bytes(b"half")
    stale_file = tmp_path / ".r.def456.tmp"
    stale_file.write_bytes(b"")
    write_dir(out, _fill, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    # killed between moving the old result aside and the new one in: the old one comes back
    os.replace(out, tmp_path / ".r.old")
    (tmp_path / ".r.ghi.tmp").mkdir()
    write_dir(tmp_path / "other", _fill, overwrite=False)  # another output: left alone
    assert (tmp_path / ".r.old").is_dir()
    with pytest.raises(OutputExists):  # the restored result is there again, not replaced
        write_dir(out, _fill, overwrite=False)
    assert (out / "result.json").is_file() and not (tmp_path / ".r.old").exists()
    assert not (tmp_path / ".r.ghi.tmp").exists()


HOLD = """
import sys, time
from behemoth_interp._io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        with pytest.raises(
            OutputBusy, match=rf"being written by another process \(pid {proc.pid}\)"
        ):
            write_dir(out, _fill, overwrite=False)
        assert not out.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    write_dir(out, _fill, overwrite=False)  # the lock died with its process
    assert not (tmp_path / ".out.lock").exists()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out), output_lock(out):
        write_dir(out, _fill, overwrite=False)
    # released: another process may take it now
    proc = _holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    start = time.perf_counter()
    with output_lock(out):
        pass
    assert time.perf_counter() - start < 5
