"""`gkd predict`: masks = argmax of the segmentor's scores, overlays = the documented blend, bad input."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.cli import main
from gkd.data import load_manifest
from gkd.handoff import save_handoff
from gkd.models import build_segmentor, build_student, save_segmentor
from gkd.tools import collect_images, predict_paths

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.25, 0.3)
SIZES = {"a": (64, 80), "b": (48, 72), "c": (64, 80)}  # name -> (height, width): two sizes


def _student(seed: int = 0):
    torch.manual_seed(seed)
    return build_student("deit_small_patch16_224", img_size=64, patch_size=16, **TINY_VIT)


@pytest.fixture(scope="module")
def segmentor_file(tmp_path_factory) -> Path:
    """A tiny ViT + MLP segmentor over CamVid's 11 classes, trained (config) on camvid at 64-px crops."""
    classes = list(load_manifest("camvid").classes)
    seg = build_segmentor(_student(), "mlp", num_classes=len(classes), mean=MEAN, std=STD, class_names=classes,
                          channels=16, dropout=0.0)
    with torch.no_grad():  # sharper, more varied class maps than the default init gives
        seg.decoder.head.classifier.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("seg") / "segmentor.safetensors"
    return save_segmentor(path, seg.eval(), config={"data": {"manifest": "camvid", "crop_size": 64}})


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        small = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"this is not an image")  # unreadable from its header on
    buf = io.BytesIO()  # a JPEG whose header is fine but whose pixel data is cut off
    Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    return folder


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _check_outputs(out: Path, folder: Path, seg_path: Path, reference) -> None:
    from gkd.models import load_segmentor

    seg, _ = load_segmentor(seg_path)
    palette = np.asarray(load_manifest("camvid").palette, dtype=np.uint8)
    for name, (h, w) in SIZES.items():
        mask_img = Image.open(out / f"{name}_mask.png")
        assert mask_img.mode == "P" and mask_img.size == (w, h)
        got_palette = np.asarray(mask_img.getpalette()[: 3 * len(palette)], dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(got_palette, palette)  # colours from the training manifest
        mask = np.asarray(mask_img)

        rgb = _read_rgb(folder / f"{name}.png")
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)[None]
        with torch.no_grad():
            scores = reference(seg, image)[0]
        top2 = scores.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 1e-4).numpy()  # leave out float near-ties (batched vs single)
        assert decided.mean() > 0.99
        np.testing.assert_array_equal(mask[decided], scores.argmax(0).numpy()[decided])
        assert len(np.unique(mask)) >= 2  # a real class map, not one colour

        blend = np.clip(np.round(0.5 * rgb.astype(np.float32) + 0.5 * palette[mask].astype(np.float32)), 0, 255)
        np.testing.assert_array_equal(_read_rgb(out / f"{name}_overlay.png"), blend.astype(np.uint8))


def test_predict_folder_whole_mode(segmentor_file, image_folder, tmp_path, caplog) -> None:
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        summary = predict_paths(segmentor_file, image_folder, out, mode="whole", batch_size=2, progress=False)
    assert sorted(p.name for p, _, _ in summary.written) == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p, _ in summary.skipped) == ["broken.png", "truncated.jpg"]
    assert summary.num_images == 5 and summary.palette_source == "manifest camvid"
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text  # each skip names its file
    text = summary.format()
    assert "3 of 5" in text and "skipped 2" in text and "broken.png" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_{k}.png" for n in SIZES for k in ("mask", "overlay"))
    # whole mode, no resize: the scores are the segmentor's own forward at the image size
    _check_outputs(out, image_folder, segmentor_file, lambda seg, x: seg(x))


def test_predict_slide_mode_cli(segmentor_file, image_folder, tmp_path) -> None:
    from gkd.eval.inference import slide_inference

    out = tmp_path / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        rc = main(["predict", str(segmentor_file), str(image_folder), "--out", str(out), "--crop", "48",
                   "--stride", "32", "--batch-size", "3", "--workers", "0"])
    assert rc == 0, stderr.getvalue()
    assert "3 of 5" in stdout.getvalue() and "broken.png" in stdout.getvalue()
    # 48-px windows every 32 px over 64×80 / 48×72 images, overlaps averaged
    _check_outputs(out, image_folder, segmentor_file,
                   lambda seg, x: slide_inference(seg, x, seg.num_classes, crop=48, stride=32))


def test_predict_generated_palette_and_single_file(tmp_path, image_folder) -> None:
    seg = build_segmentor(_student(1), "mlp", num_classes=3, channels=16)
    path = save_segmentor(tmp_path / "segmentor.safetensors", seg.eval())  # no config: no manifest
    summary = predict_paths(path, image_folder / "b.png", tmp_path / "out", mode="whole", progress=False)
    assert summary.palette_source == "generated" and len(summary.written) == 1 and not summary.skipped
    with pytest.raises(ValueError, match="--palette-from nope"):
        predict_paths(path, image_folder / "b.png", tmp_path / "out2", palette_from="nope", progress=False)


def test_predict_refuses_encoder_file(tmp_path, image_folder) -> None:
    student = _student()
    enc = save_handoff(tmp_path / "encoder.safetensors", student, student.spec, stage=1, config={"stage": 1})
    with pytest.raises(ValueError, match="stage-1 encoder file.*expected a segmentor.safetensors written by stage 3"):
        predict_paths(enc, image_folder, tmp_path / "out", progress=False)
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        assert main(["predict", str(enc), str(image_folder), "--out", str(tmp_path / "out")]) == 2
    assert "expected a segmentor.safetensors" in stderr.getvalue()
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="segmentor file not found"):
        predict_paths(tmp_path / "missing.safetensors", image_folder, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict_paths(enc, tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_collect_images(tmp_path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for rel in ("d/x.png", "d/x.jpg", "d/sub/y.png", "d/.hidden.png", "d/readme.md"):
        (tmp_path / rel).write_bytes(b"")
    found = collect_images([tmp_path / "d", tmp_path / "d" / "x.png"])
    assert [(p.name, s) for p, s in found] == [("x.jpg", "x"), ("x.png", "x-1")]  # file given twice kept once
    found = collect_images(tmp_path / "d", recursive=True)
    assert [s for _, s in found] == ["sub/y", "x", "x-1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        collect_images(tmp_path / "empty")
