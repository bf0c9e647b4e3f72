"""`gkd export --format onnx`: onnxruntime agrees with PyTorch at several batch sizes (dynamic batch)."""
from __future__ import annotations

import importlib.util
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd.cli import main
from gkd.models import build_segmentor, build_student, load_segmentor, save_segmentor
from gkd.tools import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
TINY_M2F = dict(
    num_queries=8, num_layers=1, pixel_decoder_layers=1, hidden_dim=32, num_heads=2,
    dim_feedforward=64, pixel_decoder_ffn_dim=64, num_points=64,
)
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.25, 0.3)
ATOL = 1e-4


def _segmentor_file(folder: Path, decoder: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    student = build_student("deit_small_patch16_224", img_size=64, patch_size=16, **TINY_VIT)
    kw = dict(channels=16) if decoder == "mlp" else TINY_M2F
    seg = build_segmentor(student, decoder, num_classes=3, mean=MEAN, std=STD, class_names=["sky", "road", "car"], **kw)
    with torch.no_grad():  # not a fresh init: BatchNorm statistics and weights away from their defaults
        for name, buf in seg.decoder.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buf.add_(torch.rand_like(buf) * 0.5)
        for p in seg.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_segmentor(folder / f"{decoder}.safetensors", seg.eval(),
                          config={"data": {"manifest": "camvid", "crop_size": 64}})


def _ort_vs_torch(onnx_path: Path, seg_path: Path, shape: tuple[int, ...]) -> float:
    seg, _ = load_segmentor(seg_path)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = seg(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


def test_export_mlp_dynamic_batch_and_metadata(tmp_path) -> None:
    seg_path = _segmentor_file(tmp_path, "mlp")
    result = export_onnx(seg_path, tmp_path / "mlp.onnx")  # size: the training crop in the config (64)
    assert (result.height, result.width, result.exporter, result.opset) == (64, 64, "torchscript", 17)
    assert result.verified and set(result.max_abs_diff) == {1, 3} and result.max_diff < ATOL
    for batch in (1, 3):  # an independent check: the file, a fresh load, new random inputs
        assert _ort_vs_torch(result.path, seg_path, (batch, 3, 64, 64)) < ATOL

    model = onnx.load(str(result.path))
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and out.name == "scores" and dims == ["batch", 3, 64, 64]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["gkd_class_names"]) == ["sky", "road", "car"] and props["gkd_num_classes"] == "3"
    assert json.loads(props["gkd_input_norm"])["mean"] == list(MEAN)
    assert "[0,1]" in props["gkd_input"] and "inside the graph" in props["gkd_input"]
    assert props["gkd_manifest"] == "camvid" and len(json.loads(props["gkd_palette"])) == 3
    assert json.loads(props["gkd_spec"])["decoder"]["name"] == "mlp" and props["gkd_stage"] == "3"


def test_export_mask2former_other_size_cli(tmp_path) -> None:
    """Mask2Former at 40×72: padded to 48×80 inside the graph, a 3×5 token grid (the position table
    resampled from the 4×4 training grid is a constant) and a 1×2 stride-32 level (one-step linspace)."""
    seg_path = _segmentor_file(tmp_path, "mask2former", seed=1)
    out = tmp_path / "m2f.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        rc = main(["export", str(seg_path), "--format", "onnx", "--out", str(out), "--height", "40", "--width", "72"])
    assert rc == 0, stderr.getvalue()
    assert "max abs difference" in stdout.getvalue() and "batch 3" in stdout.getvalue()
    for batch in (1, 3):
        assert _ort_vs_torch(out, seg_path, (batch, 3, 40, 72)) < ATOL


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript")
def test_export_dynamo(tmp_path) -> None:
    seg_path = _segmentor_file(tmp_path, "mlp")
    result = export_onnx(seg_path, tmp_path / "dyn.onnx", exporter="dynamo", height=48, width=64)
    assert result.opset == 18 and result.verified and result.max_diff < ATOL
    assert not list(tmp_path.glob("*.data"))  # weights inside the one file
