"""gkd.atomic: a failed write leaves the old file and no temporary; a finished one replaces it."""
from __future__ import annotations

import pytest

from gkd.atomic import atomic_path, write_text_atomic


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
