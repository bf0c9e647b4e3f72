"""gkd import-official: an official-layout GKD checkpoint (the authors' MetaArch state dict) becomes an
encoder file that loads strictly and holds exactly the student's tensors; wrong layouts are refused."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from gkd.cli import main
from gkd.errors import GKDError
from gkd.handoff import load_tensors, read_metadata
from gkd.models import build_student
from gkd.models.segmentor import load_encoder_for_segmentor
from gkd.models.weights import CheckpointError
from gkd.tools.official import import_official

TINY = dict(depth=2, embed_dim=32, num_heads=2)


def _student(img_size: int = 64):
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=img_size, **TINY)
    with torch.no_grad():
        student.mask_token.normal_()  # not the zero init: the import must carry the trained value
    return student


def _official(tmp_path: Path, student, extra: dict | None = None, name: str = "checkpoint_300.pth") -> Path:
    """The authors' layout: {'model': MetaArch.state_dict(), ..., 'args': Namespace}."""
    model = {"student.backbone." + k: v.clone() for k, v in student.encoder.state_dict().items()}
    model["student.backbone.mask_token"] = student.mask_token.detach().clone()
    model["teacher.backbone.cls_token"] = torch.randn(1, 1, 48)
    model["teacher.backbone.blocks.0.norm1.weight"] = torch.randn(48)
    for head in ("patch_head", "fea_head", "token_head"):
        model[f"{head}.proj_q.1.weight"] = torch.randn(48, 32)
        model[f"{head}.proj_v.0.bias"] = torch.randn(32)
    model.update(extra or {})
    path = tmp_path / name
    torch.save({"model": model, "epoch": 299, "args": argparse.Namespace(input_size=64, patch_size=16)}, path)
    return path


def test_converts_and_loads_strictly(tmp_path):
    student = _student()
    src = _official(tmp_path, student)
    out = import_official(src, "vit_tiny_patch16_224", tmp_path / "encoder.safetensors", **TINY)
    loaded, norm = load_encoder_for_segmentor(out)  # rebuilds from the spec, strict
    assert norm == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert loaded.spec == student.spec and loaded.img_size == (64, 64) and loaded.patch_size == 16
    want = student.state_dict()
    got = load_tensors(out)
    assert set(got) == set(want)  # no teacher / head keys came along
    for k, v in want.items():
        assert torch.equal(got[k], v), k
        assert torch.equal(loaded.state_dict()[k], v), k
    meta = read_metadata(out)
    assert meta["gkd_config"]["import_official"]["dropped"] == 8  # 2 teacher + 3 heads x 2
    assert meta["gkd_config"]["import_official"]["native"] == {"img_size": 64, "patch_size": 16}


def test_cli(tmp_path, capsys):
    src = _official(tmp_path, _student())
    out = tmp_path / "enc.safetensors"
    rc = main(["import-official", str(src), str(out), "--student", "vit_tiny_patch16_224", "--model-kwarg", "depth=2",
               "--model-kwarg", "embed_dim=32", "--model-kwarg", "num_heads=2", "--mean", "0.5", "0.5", "0.5",
               "--std", "0.25", "0.25", "0.25"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    assert read_metadata(out)["gkd_input_norm"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    loaded, _ = load_encoder_for_segmentor(out)
    assert torch.equal(loaded.state_dict()["mask_token"], _student().mask_token.detach())


def test_other_geometry_resamples(tmp_path):
    """A stage-1 file (patch 14 here: 56 px, 4x4 grid) imported at another geometry: kernel and table resampled."""
    torch.manual_seed(0)
    stage1 = build_student("vit_tiny_patch16_224", img_size=56, patch_size=14, **TINY)
    src = _official(tmp_path, stage1)
    out = import_official(src, "vit_tiny_patch16_224", tmp_path / "e.safetensors", img_size=64, patch_size=16, **TINY)
    loaded, _ = load_encoder_for_segmentor(out)
    assert loaded.patch_size == 16 and loaded.grid == (4, 4)
    sd = load_tensors(out)
    assert tuple(sd["encoder.patch_embed.proj.weight"].shape[-2:]) == (16, 16)
    assert torch.equal(sd["encoder.blocks.1.mlp.fc2.weight"], stage1.state_dict()["encoder.blocks.1.mlp.fc2.weight"])


def test_wrong_architecture_lists_keys(tmp_path):
    src = _official(tmp_path, _student())
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.2\."):
        import_official(src, "vit_tiny_patch16_224", tmp_path / "e.safetensors", depth=3, embed_dim=32, num_heads=2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        import_official(src, "vit_tiny_patch16_224", tmp_path / "e.safetensors", depth=2, embed_dim=64, num_heads=2)
    assert not (tmp_path / "e.safetensors").exists()


def test_unexpected_student_key_is_refused(tmp_path):
    src = _official(tmp_path, _student(), extra={"student.backbone.extra_token": torch.zeros(1, 32)})
    with pytest.raises(CheckpointError, match="unexpected keys.*extra_token"):
        import_official(src, "vit_tiny_patch16_224", tmp_path / "e.safetensors", **TINY)
    src = _official(tmp_path, _student(), extra={"student.dino_head.weight": torch.zeros(2)}, name="b.pth")
    with pytest.raises(CheckpointError, match=r"unknown student keys.*student\.dino_head\.weight"):
        import_official(src, "vit_tiny_patch16_224", tmp_path / "e.safetensors", **TINY)


def test_wrong_layout_is_clear(tmp_path):
    student = _student()
    plain = tmp_path / "plain.pth"
    torch.save({"model": student.encoder.state_dict()}, plain)  # a timm state dict, no MetaArch
    with pytest.raises(CheckpointError, match="not an official GKD stage-1/2 checkpoint.*student-encoder"):
        import_official(plain, "vit_tiny_patch16_224", tmp_path / "e.safetensors", **TINY)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        import_official(junk, "vit_tiny_patch16_224", tmp_path / "e.safetensors", **TINY)
    assert issubclass(CheckpointError, GKDError)  # so the CLI prints one `gkd: error:` line
    with pytest.raises(FileNotFoundError):
        import_official(tmp_path / "absent.pth", "vit_tiny_patch16_224", tmp_path / "e.safetensors", **TINY)
