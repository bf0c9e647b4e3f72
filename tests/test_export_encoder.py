"""`gkd export ENC --format onnx`: the encoder's four decoder-input maps; onnxruntime == PyTorch."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import gkd
from gkd.cli import main
from gkd.handoff import save_handoff
from gkd.models import build_segmentor, build_student, load_encoder_for_segmentor
from gkd.tools.export import EncoderExportResult, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2)
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.25, 0.3)
NAMES = ["feat4", "feat8", "feat16", "feat32"]
ATOL = 1e-4


def _encoder_file(folder: Path, name: str = "deit_small_patch16_224", **kw) -> Path:
    torch.manual_seed(0)
    student = build_student(name, img_size=64, patch_size=16, **{**TINY_VIT, **kw})
    return save_handoff(folder / f"{name}.safetensors", student, student.spec, stage=2, config={"stage": 2},
                        extra={"input_norm": {"mean": list(MEAN), "std": list(STD)}})


def _reference(enc_path: Path, x: torch.Tensor) -> list[np.ndarray]:
    """The segmentor-path features, computed without gkd.api: a real stage-3 segmentor's extractor."""
    student, _ = load_encoder_for_segmentor(enc_path)
    seg = build_segmentor(student, "mlp", num_classes=2, mean=MEAN, std=STD, channels=8).eval()
    ph, pw = (-x.shape[-2]) % 16, (-x.shape[-1]) % 16
    norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return [m.numpy() for m in seg.extract_features(torch.nn.functional.pad(norm, (0, pw, 0, ph)))]


# 64x64: the training grid (4x4); 40x72: padded to 48x80, a 3x5 grid; 32x48: a smaller grid (2x3,
# where the antialiasing of the table's resampling acts); 96x160: a larger one (6x10)
SIZES = [(64, 64), (40, 72), (32, 48), (96, 160)]


def _check(sess, enc: Path, hw: tuple[int, int], batch: int) -> None:
    x = torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(batch + hw[0]))
    for got, want in zip(sess.run(NAMES, {"images": x.numpy()}), _reference(enc, x)):
        assert got.shape == want.shape and float(np.abs(got - want).max()) < ATOL


def test_encoder_onnx_dynamic_size_matches_pytorch(tmp_path) -> None:
    enc = _encoder_file(tmp_path)
    result = export_onnx(enc, tmp_path / "enc.onnx")  # routed to the encoder export; size: the encoder's
    assert isinstance(result, EncoderExportResult) and result.dynamic_size and result.opset == 18
    assert result.verified and result.max_diff < ATOL and result.verified_sizes == [(64, 64), (80, 96)]
    assert result.shapes == {n: (32, 64 // s, 64 // s) for n, s in zip(NAMES, (4, 8, 16, 32))}
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == NAMES
    for hw in SIZES:  # one graph, four sizes, two batch sizes, an independent reference
        for batch in (1, 3):
            _check(sess, enc, hw, batch)
    model = onnx.load(str(result.path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["gkd_input_norm"])["mean"] == list(MEAN) and json.loads(props["gkd_layers"]) == [0, 1, 1, 2]
    assert props["gkd_dynamic_size"] == "true" and props["gkd_stage"] == "2"
    x = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(9))  # gkd.api's maps: the same numbers
    for got, want in zip(gkd.load(enc).embed(x, output="maps"), sess.run(NAMES, {"images": x.numpy()})):
        assert float(np.abs(got.numpy() - want).max()) < ATOL


def test_encoder_onnx_fixed_size(tmp_path) -> None:
    enc = _encoder_file(tmp_path)
    result = export_onnx(enc, tmp_path / "fixed.onnx", height=40, width=72, opset=17)  # opset 17: no aa Resize
    assert not result.dynamic_size and "opset 17" in result.note and result.max_diff < ATOL
    model = onnx.load(str(result.path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 40, 72]
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        _check(sess, enc, (40, 72), batch)


def test_encoder_export_cli_default_size(tmp_path) -> None:
    enc = _encoder_file(tmp_path)
    out = tmp_path / "cli.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        rc = main(["export", str(enc), "--format", "onnx", "--out", str(out)])
    assert rc == 0, stderr.getvalue()
    text = stdout.getvalue()
    assert "feat4 [B,32,16,16]" in text and "feat32 [B,32,2,2]" in text and "batch 3" in text
    assert "height and width dynamic" in text and "at 64x64 and 80x96" in text


def test_rope_student_fixed_at_its_size_and_refuses_others(tmp_path) -> None:
    enc = _encoder_file(tmp_path, "eva02_tiny_patch14_224", embed_dim=32, depth=2, num_heads=2)
    result = export_onnx(enc, tmp_path / "eva64.onnx")
    assert not result.dynamic_size and "RoPE" in result.note and result.max_diff < ATOL
    with pytest.raises(RuntimeError, match="RoPE .* training size"):
        export_onnx(enc, tmp_path / "eva.onnx", height=48, width=80)
    assert not (tmp_path / "eva.onnx").exists()


def test_cnn_encoder_onnx_dynamic_size(tmp_path) -> None:
    torch.manual_seed(0)
    student = build_student("resnet18", img_size=64)
    enc = save_handoff(tmp_path / "cnn.safetensors", student, student.spec, stage=2, config={"stage": 2},
                       extra={"input_norm": {"mean": list(MEAN), "std": list(STD)}})
    result = export_onnx(enc, tmp_path / "cnn.onnx")
    assert result.dynamic_size and result.verified and result.max_diff < ATOL
    assert result.shapes == {n: (c, 64 // s, 64 // s) for n, c, s in zip(NAMES, (64, 128, 256, 512), (4, 8, 16, 32))}
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    student, _ = load_encoder_for_segmentor(enc)
    seg = build_segmentor(student, "mlp", num_classes=2, mean=MEAN, std=STD, channels=8).eval()
    for hw in ((64, 64), (40, 72)):  # 40x72: padded to 64x96 (multiples of 32)
        x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(hw[1]))
        ph, pw = (-hw[0]) % 32, (-hw[1]) % 32
        norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            ref = seg.extract_features(torch.nn.functional.pad(norm, (0, pw, 0, ph)))
        for got, want in zip(sess.run(NAMES, {"images": x.numpy()}), ref):
            assert got.shape == tuple(want.shape) and float(np.abs(got - want.numpy()).max()) < ATOL
