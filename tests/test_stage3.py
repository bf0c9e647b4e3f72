"""Stage 3 in process: Mask2Former on the frozen encoder, resume, refusals; `gkd eval` on real CamVid."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gkd.config import SegmentConfig, load_config
from gkd.engine import read_metadata
from gkd.handoff import save_handoff
from gkd.engine.segment import check_resize, label_subset, poly_lr, train_segmentor
from gkd.models import build_segmentor, build_student, save_segmentor
from helpers import reset_accelerate

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
M2F = ["decoder.name=mask2former", "decoder.kwargs.num_queries=6", "decoder.kwargs.num_layers=1",
       "decoder.kwargs.pixel_decoder_layers=1", "decoder.kwargs.hidden_dim=32", "decoder.kwargs.num_heads=2",
       "decoder.kwargs.dim_feedforward=64", "decoder.kwargs.pixel_decoder_ffn_dim=64", "decoder.kwargs.num_points=256"]


def _encoder(tmp_path: Path, name: str = "vit_tiny_patch16_224") -> Path:
    torch.manual_seed(0)
    student = build_student(name, img_size=64, depth=2, embed_dim=32, num_heads=2)
    return save_handoff(tmp_path / "encoder.safetensors", student, student.spec, stage=2,
                        extra={"input_norm": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})


def _cfg(tmp_path, encoder, manifest, root, *extra) -> SegmentConfig:
    return load_config(SegmentConfig, [], [
        f"encoder={encoder}", f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64",
        "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=2", "data.num_workers=0", "optim.iters=6",
        "optim.lr=1e-3", "engine.log_every=1", "engine.save_every=3", f"out_dir={tmp_path / 's3'}", *extra])


def test_mask2former_stage3_resumes_and_keeps_encoder(tmp_path, folder_dataset, monkeypatch):
    root, manifest, _ = folder_dataset
    encoder = _encoder(tmp_path)
    import gkd.engine.segment as seg

    real = seg.poly_lr

    def dying(step, *a):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(step, *a)

    monkeypatch.setattr(seg, "poly_lr", dying)
    with pytest.raises(KeyboardInterrupt):
        train_segmentor(_cfg(tmp_path, encoder, manifest, root, *M2F))
    reset_accelerate()
    monkeypatch.setattr(seg, "poly_lr", real)
    path = train_segmentor(_cfg(tmp_path, encoder, manifest, root, *M2F))

    records = [json.loads(x) for x in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # killed during step 5: resumed from the step-3 checkpoint (its step-4 row cut)
    assert all({"loss_cls", "loss_mask", "loss_dice"} <= set(r) for r in records if "loss" in r)
    meta = read_metadata(path)
    assert meta["gkd_spec"]["decoder"]["name"] == "mask2former" and meta["gkd_spec"]["num_classes"] == 3
    enc, seg_w = load_file(str(encoder)), load_file(str(path))
    for k, v in enc.items():
        torch.testing.assert_close(seg_w[f"encoder.{k}"], v, rtol=0, atol=0, msg=k)


def test_encoder_fine_tuning_recipe(tmp_path, folder_dataset):
    """The authors' EVA-02 stage 3 (configs/stage3/recipes/eva02_finetune.yaml): the encoder trains at a scaled lr
    with stochastic depth. At lr scale 0 the encoder must not move while the decoder does."""
    from gkd.models.segmentor import load_encoder_for_segmentor

    root, manifest, _ = folder_dataset
    encoder = _encoder(tmp_path)
    enc, _ = load_encoder_for_segmentor(encoder, drop_path_rate=0.15)
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in enc.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.15])  # linear over the 2 blocks, as timm lays it out

    fine = ["train_encoder=true", "encoder_drop_path=0.15", "decoder.name=mlp", "decoder.kwargs.channels=16",
            "optim.iters=2", "engine.save_every=100"]
    path = train_segmentor(_cfg(tmp_path, encoder, manifest, root, *fine, "optim.encoder_lr_scale=0"))
    before, after = load_file(str(encoder)), load_file(str(path))
    for k, v in before.items():
        torch.testing.assert_close(after[f"encoder.{k}"], v, rtol=0, atol=0, msg=k)
    assert read_metadata(path)["gkd_protocol"]["encoder_recipe"] == {"trained": True, "lr_scale": 0.0, "drop_path": 0.15}
    reset_accelerate()
    path = train_segmentor(_cfg(tmp_path / "b", encoder, manifest, root, *fine, "optim.encoder_lr_scale=0.1"))
    after = load_file(str(path))
    assert any(not torch.equal(after[f"encoder.{k}"], v) for k, v in before.items())
    with pytest.raises(ValueError, match="train_encoder=true"):
        train_segmentor(_cfg(tmp_path / "c", encoder, manifest, root, "optim.encoder_lr_scale=0.1"))


def test_stage3_refuses_non_encoder_files(tmp_path, folder_dataset):
    root, manifest, _ = folder_dataset
    encoder = _encoder(tmp_path)
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=32, num_heads=2)
    segmentor = build_segmentor(student, decoder="mlp", num_classes=3, channels=16)
    seg_file = save_segmentor(tmp_path / "segmentor.safetensors", segmentor, parent=encoder)
    with pytest.raises(ValueError, match="segmentor"):
        train_segmentor(_cfg(tmp_path, seg_file, manifest, root, "decoder.name=mlp"))


def test_keep_ratio_options_need_short_edges_off():
    """data.scale beside the authors' short-edge list would do nothing: refused, naming the fix."""
    base = ["encoder=e.safetensors", "data.manifest=camvid"]
    check_resize(load_config(SegmentConfig, [], base).data)  # the defaults
    check_resize(load_config(SegmentConfig, [], base + ["data.short_edges=null", "data.scale=[64,32]"]).data)
    with pytest.raises(ValueError, match="data.short_edges=null"):
        check_resize(load_config(SegmentConfig, [], base + ["data.scale=[64,32]"]).data)


def test_poly_schedule_and_label_subset():
    assert poly_lr(0, 0.0, 1e-4, 0.9, 0.0, 0) == pytest.approx(1e-4)
    assert poly_lr(50, 0.5, 1e-4, 0.9, 0.0, 0) == pytest.approx(1e-4 * 0.5 ** 0.9)
    assert poly_lr(100, 1.0, 1e-4, 0.9, 1e-6, 0) == pytest.approx(1e-6)
    assert poly_lr(4, 0.04, 1e-4, 0.9, 0.0, 10) == pytest.approx(1e-4 * 5 / 10)  # warmup
    a, b = label_subset(160, 1 / 16, seed=3), label_subset(160, 1 / 16, seed=3)
    assert a == b and len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert label_subset(160, 1 / 16, seed=4) != a
    with pytest.raises(ValueError, match="fraction"):
        label_subset(10, 0.0, 0)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_gkd_eval_on_real_camvid_writes_report(tmp_path):
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=64, depth=1, embed_dim=32, num_heads=2)
    segmentor = build_segmentor(student, decoder="mlp", num_classes=11, channels=16)
    path = save_segmentor(tmp_path / "m" / "segmentor.safetensors", segmentor)
    from gkd.cli import main

    rc = main(["eval", str(path), "--suite", "camvid", "--out", str(tmp_path / "eval"), "--root",
               f"camvid={CAMVID}", "--limit", "2", "--workers", "0", "--save-predictions"])
    assert rc == 0
    for name in ("results.md", "results.csv", "metrics.json"):
        assert (tmp_path / "eval" / name).is_file()
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"][0]["datasets"]
    assert set(results) == {"Seen (0016E5)", "Unseen (Seq05VD)"}
    assert all(r["num_images"] == 2 for r in results.values())
    assert len(list((tmp_path / "eval" / "predictions").rglob("*_overlay.png"))) == 4
