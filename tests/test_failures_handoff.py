"""Issue 15's handoff-file probes: a damaged or foreign file is one clean error naming it, at every
reader and entry point; intact files round-trip bit for bit, get the run's file mode, and a killed
write leaves nothing behind for long (gkd.handoff, gkd.atomic)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from gkd.cli import main
from gkd.errors import HandoffError
from gkd.handoff import load_handoff, read_metadata, save_handoff
from gkd.models import build_segmentor, build_student, save_segmentor
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]
SPEC = {"name": "toy", "kind": "vit"}


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` and where its data starts, read by hand (the format's spec)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def _flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes inside the data of the file's largest tensor."""
    header, start = _header(path)
    entry = max((v for k, v in header.items() if k != "__metadata__"),
                key=lambda v: v["data_offsets"][1] - v["data_offsets"][0])
    begin, end = entry["data_offsets"]
    assert end - begin >= 2 * count
    raw = bytearray(path.read_bytes())
    at = start + begin + (end - begin) // 2
    raw[at:at + count] = bytes(b ^ 0xFF for b in raw[at:at + count])
    path.write_bytes(bytes(raw))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the probe table -----------------------------------------------------------------------------
# Each probe turns `path` (an intact handoff file) into the damaged thing and returns what the user
# then points gkd at; the expected outcome is the exception type and a fragment after the file's name.

def _flipped(p: Path) -> Path:
    _flip_tensor_bytes(p)
    return p


def _header_edited(p: Path) -> Path:  # one metadata value changed in place, same length: still valid JSON
    raw = p.read_bytes()
    assert raw.count(b'\\"toy\\"') == 1
    p.write_bytes(raw.replace(b'\\"toy\\"', b'\\"tox\\"'))
    return p


def _truncated(p: Path) -> Path:
    p.write_bytes(p.read_bytes()[: p.stat().st_size - 100])
    return p


def _cut_in_header(p: Path) -> Path:
    p.write_bytes(p.read_bytes()[:40])
    return p


def _trailing(p: Path) -> Path:
    p.write_bytes(p.read_bytes() + b"\0" * 16)
    return p


def _random(p: Path) -> Path:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _torch_save(p: Path) -> Path:
    torch.save(_linear().state_dict(), p)
    return p


def _legacy_pickle(p: Path) -> Path:
    torch.save(_linear().state_dict(), p, _use_new_zipfile_serialization=False)
    return p


def _empty(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _directory(p: Path) -> Path:
    d = p.parent / "run"
    d.mkdir()
    return d


def _missing(p: Path) -> Path:
    return p.parent / "nothing.safetensors"


def _plain(p: Path) -> Path:
    save_file({"w": torch.zeros(3)}, str(p))
    return p


PROBES: list[tuple[str, Callable[[Path], Path], type, str]] = [
    ("flipped tensor bytes", _flipped, HandoffError, ": its contents changed after it was written (sha256 "),
    ("edited header", _header_edited, HandoffError, ": its contents changed after it was written (sha256 "),
    ("truncated", _truncated, HandoffError, " is truncated: its header describes "),
    ("cut inside the header", _cut_in_header, HandoffError, " is truncated: it ends inside its "),
    ("bytes appended", _trailing, HandoffError, " has 16 bytes after its tensor data; the file is damaged"),
    ("random bytes", _random, HandoffError,
     " is not a safetensors handoff file (its first 8 bytes are no header length); re-copy it"),
    ("torch.save", _torch_save, HandoffError,
     " is not a safetensors handoff file: it is a zip archive, as torch.save writes (.pt/.pth)"),
    ("legacy pickle", _legacy_pickle, HandoffError,
     " is not a safetensors handoff file: it is a pickle (an older torch.save file?)"),
    ("empty", _empty, HandoffError, " is empty (0 bytes): the write or copy of it did not finish"),
    ("directory", _directory, HandoffError, " is a directory, not a handoff file"),
    ("missing", _missing, FileNotFoundError, ""),
    ("plain safetensors", _plain, HandoffError, " has no GKD metadata: a plain safetensors file"),
]
IDS = [p[0] for p in PROBES]


@pytest.mark.parametrize("reader", ["read_metadata", "load_handoff"])
@pytest.mark.parametrize("name, damage, error, fragment", PROBES, ids=IDS)
def test_probe_is_one_clean_error_naming_the_file(tmp_path, name, damage, error, fragment, reader):
    path = save_handoff(tmp_path / "encoder.safetensors", _linear(), SPEC, stage=1)
    bad = damage(path)
    with pytest.raises(Exception) as info:
        read_metadata(bad) if reader == "read_metadata" else load_handoff(bad, _linear(), SPEC)
    assert type(info.value) is error  # never safetensors' own SafetensorError
    expected = f"handoff file not found: {bad}" if error is FileNotFoundError else f"{bad}{fragment}"
    assert str(info.value).startswith(expected), str(info.value)


@pytest.mark.parametrize("name, damage, error, fragment", PROBES, ids=IDS)
def test_probe_at_gkd_inspect_is_one_line_and_exit_2(tmp_path, name, damage, error, fragment, capsys, monkeypatch):
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    bad = damage(save_handoff(tmp_path / "encoder.safetensors", _linear(), SPEC, stage=1))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gkd: error:")]
    assert "Traceback" not in err and len(lines) == 1
    expected = f"handoff file not found: {bad}" if error is FileNotFoundError else f"{bad}{fragment}"
    assert lines[0].startswith(f"gkd: error: {expected}")


def test_directory_holding_a_handoff_file_is_named(tmp_path):
    save_handoff(tmp_path / "s3" / "segmentor.safetensors", _linear(), SPEC, stage=3)
    with pytest.raises(HandoffError, match=r"s3 is a directory, not a handoff file; did you mean .*"
                                           r"s3/segmentor\.safetensors\?"):
        read_metadata(tmp_path / "s3")


# --- the flipped-bytes probe at every consumer --------------------------------------------------

def _flipped_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    _flip_tensor_bytes(dst)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Intact handoff files: a stage-1 encoder (56 px, patch 14), a stage-2 one (64 px) and a stage-3
    segmentor over the shapes classes."""
    out = tmp_path_factory.mktemp("handoffs")
    tiny = dict(depth=1, embed_dim=32, num_heads=2)
    s1 = build_student("vit_tiny_patch16_224", img_size=56, patch_size=14, **tiny)
    s2 = build_student("vit_tiny_patch16_224", img_size=64, **tiny)
    seg = build_segmentor(build_student("vit_tiny_patch16_224", img_size=64, **tiny), "mlp", num_classes=3,
                          mean=(0.5,) * 3, std=(0.25,) * 3, class_names=["background", "box", "disc"], channels=16)
    return {
        "stage1": save_handoff(out / "s1" / "encoder.safetensors", s1, s1.spec, stage=1,
                               extra={"input_norm": {"mean": [0.5] * 3, "std": [0.25] * 3}}),
        "stage2": save_handoff(out / "s2" / "encoder.safetensors", s2, s2.spec, stage=2,
                               extra={"input_norm": {"mean": [0.5] * 3, "std": [0.25] * 3}}),
        "segmentor": save_segmentor(out / "s3" / "segmentor.safetensors", seg.eval(),
                                    config={"data": {"manifest": "camvid", "crop_size": 64}}),
    }


def _entry_points(files: dict[str, Path], tmp: Path, data: tuple[Path, Path, Path]) -> dict[str, tuple[str, list]]:
    """consumer -> (which file it reads, the `gkd` command line reading the flipped copy at {bad})."""
    root, manifest, suite = data
    images = tmp / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "a.png")
    rest = [o for o in TINY if not o.startswith("student.")]
    s3 = [f"data.manifest={manifest}", f"data.root={root}", "data.num_workers=0", f"out_dir={tmp / 'run'}",
          "optim.iters=1"]  # should the file ever be accepted, the run is short
    return {
        "stage2 init=": ("stage1", ["stage2", *rest, "stage=2", "data.img_size=64", "teacher.patch_size=16",
                                    f"data.train_shards={tmp}/x.tar", "init={bad}", f"out_dir={tmp / 'run'}"]),
        "stage3 encoder=": ("stage2", ["stage3", "encoder={bad}", *s3]),
        "stage3 teacher=": ("segmentor", ["stage3", f"encoder={files['stage2']}", "method.name=kd", "teacher={bad}",
                                          *s3]),
        "eval": ("segmentor", ["eval", "{bad}", "--suite", str(suite), "--out", str(tmp / "eval"),
                               "--root", f"shapes={root}"]),
        "predict": ("segmentor", ["predict", "{bad}", str(images), "--out", str(tmp / "pred"), "--workers", "0"]),
        "export": ("segmentor", ["export", "{bad}", "--out", str(tmp / "m.onnx"), "--no-verify"]),
        "inspect": ("segmentor", ["inspect", "{bad}"]),
    }


CONSUMERS = ["stage2 init=", "stage3 encoder=", "stage3 teacher=", "eval", "predict", "export", "inspect"]


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_flipped_bytes_are_refused_at_every_consumer(consumer, files, tmp_path, folder_dataset, capsys, monkeypatch):
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    kind, argv = _entry_points(files, tmp_path, folder_dataset)[consumer]
    bad = _flipped_copy(files[kind], tmp_path / "copied" / files[kind].name)
    assert main([a.replace("{bad}", str(bad)) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gkd: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"gkd: error: {bad}: its contents changed after it was written (sha256 ")
    assert lines[0].endswith("the file is damaged; re-copy it, or re-run the stage that wrote it")
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.onnx").exists()


# --- intact files ---------------------------------------------------------------------------------

def test_round_trip_is_bit_identical_and_the_digest_is_the_documented_one(tmp_path):
    module = nn.Module()
    module.w = nn.Parameter(torch.randn(5, 3))
    module.register_buffer("bf16", torch.randn(7).to(torch.bfloat16))
    module.register_buffer("ids", torch.arange(6, dtype=torch.int64).reshape(2, 3))
    module.register_buffer("mask", torch.tensor([True, False, True]))
    module.register_buffer("count", torch.tensor(3))  # 0-dim, as BatchNorm's num_batches_tracked
    module.register_buffer("none", torch.zeros(0, 4))
    path = save_handoff(tmp_path / "e.safetensors", module, SPEC, stage=1)
    want = module.state_dict()
    got = load_file(str(path))  # safetensors' own reader reads our writer's file
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    other = nn.Module()
    other.w = nn.Parameter(torch.zeros(5, 3))
    for name, buf in want.items():
        if name != "w":
            other.register_buffer(name, torch.zeros_like(buf))
    load_handoff(path, other, SPEC)
    for k, v in want.items():
        assert torch.equal(other.state_dict()[k], v), k
    # the digest, recomputed from the file's bytes by the rule in gkd.handoff's docstring
    header, start = _header(path)
    recorded = header["__metadata__"].pop("gkd_content_sha256")
    canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert recorded == hashlib.sha256(canon + path.read_bytes()[start:]).hexdigest()
    assert start % 8 == 0  # the data section starts aligned, as safetensors writes it


def test_handoff_file_mode_is_the_runs(tmp_path):
    path = save_handoff(tmp_path / "e.safetensors", _linear(), SPEC, stage=1)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    other = tmp_path / "plain.txt"  # what every other file of the run gets
    other.write_text("x")
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777


def test_file_without_digest_loads_with_one_warning(tmp_path, caplog):
    """A handoff file written before the digest existed: same header otherwise, safetensors' writer."""
    module = _linear()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path),
              metadata={"format": "pt", "gkd_stage": "1", "gkd_spec": json.dumps(SPEC), "gkd_config": "{}",
                        "gkd_version": "0.1", "gkd_parent_sha256": ""})
    other = _linear(1)
    with caplog.at_level(logging.WARNING, logger="gkd.handoff"):
        assert read_metadata(path)["gkd_spec"] == SPEC
        load_handoff(path, other, SPEC)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gkd.handoff"]
    assert warnings == [f"{path} has no content digest (written before gkd recorded one): its tensors cannot be "
                        "verified; re-run the stage that wrote it for a file that can"]
    for k, v in module.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


# --- temporary files ------------------------------------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
from gkd.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 100000)  # a half-written handoff file
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temp_of_a_killed_write_is_removed_by_the_next_write(tmp_path, caplog):
    target = tmp_path / "encoder.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], cwd=REPO)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = tmp_path / f".encoder.safetensors.{proc.pid}.tmp"
    assert [p.name for p in tmp_path.iterdir()] == [left.name] and left.stat().st_size == 100000
    with caplog.at_level(logging.WARNING, logger="gkd.atomic"):
        save_handoff(target, _linear(), SPEC, stage=1)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]
    assert [r.getMessage() for r in caplog.records if r.name == "gkd.atomic"] == [
        f"removed {left} (100000 bytes), left by an earlier write of encoder.safetensors that did not finish "
        f"(process {proc.pid} is gone)"]


def test_temp_of_a_live_writer_is_kept(tmp_path):
    target = tmp_path / "encoder.safetensors"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".encoder.safetensors.{live.pid}.tmp"
        busy.write_bytes(b"being written")
        save_handoff(target, _linear(), SPEC, stage=1)
        assert busy.read_bytes() == b"being written"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, target.name])
    finally:
        live.kill()
        live.wait()


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = save_handoff(tmp_path / "encoder.safetensors", _linear(0), SPEC, stage=1)
    before = target.read_bytes()
    real = Path.write_bytes

    def disk_full(self, data):  # half the file reaches the disk, then it is full
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_handoff(target, _linear(1), SPEC, stage=1)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]
