"""gkd.atomic: a failed write leaves the old file and no temporary; a finished one replaces it, with the
run's file mode; temporaries that killed writers left are removed by the next write of the target."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gkd.atomic import atomic_path, default_file_mode, write_text_atomic


def test_write_replaces_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    assert write_text_atomic(path, "new ü") == path
    assert path.read_text(encoding="utf-8") == "new ü"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half"):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".")  # hidden from globs over the folder
            tmp.write_bytes(b"half")
            raise RuntimeError("half written")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_finished_write_gets_the_umask_mode_whatever_the_writer_made(tmp_path, mask):
    old = os.umask(mask)
    try:
        text = write_text_atomic(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that makes its file private, as safetensors' does
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
        assert default_file_mode() == 0o666 & ~mask
    finally:
        os.umask(old)
    assert text.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_stale_temps_of_this_target_from_dead_processes_are_removed(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    names = {
        f".a.json.{dead.pid}.tmp": False,  # this target, process gone: removed
        f".a.json.{live}.tmp": True,  # a live writer's
        f".b.json.{dead.pid}.tmp": True,  # another target's
        ".a.json.x.tmp": True,  # no pid: not ours
        f"a.json.{dead.pid}.tmp": True,  # not hidden: not ours
    }
    for name in names:
        (tmp_path / name).write_bytes(b"12345")
    with caplog.at_level(logging.WARNING, logger="gkd.atomic"):
        write_text_atomic(tmp_path / "a.json", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", *(n for n, kept in names.items() if kept)])
    assert [r.getMessage() for r in caplog.records] == [
        f"removed {tmp_path / f'.a.json.{dead.pid}.tmp'} (5 bytes), left by an earlier write of a.json that did not "
        f"finish (process {dead.pid} is gone)"]
