"""`gkd.load`: predict / embed agree with independent computations on the gkd modules themselves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gkd
from gkd.api import LoadedEncoder, LoadedSegmentor
from gkd.eval.inference import slide_inference
from gkd.handoff import save_handoff
from gkd.models import build_segmentor, build_student, load_encoder_for_segmentor, load_segmentor, save_segmentor

TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2)
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.25, 0.3)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The input normalisation written out by hand: (x - mean) / std per channel."""
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _encoder_file(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    student = build_student("deit_small_patch16_224", img_size=64, patch_size=16, **TINY_VIT)
    with torch.no_grad():
        student.mask_token.normal_()
    return save_handoff(folder / "encoder.safetensors", student, student.spec, stage=2, config={"stage": 2},
                        extra={"input_norm": {"mean": list(MEAN), "std": list(STD)}})


def _segmentor_file(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    student = build_student("deit_small_patch16_224", img_size=64, patch_size=16, **TINY_VIT)
    seg = build_segmentor(student, "mlp", num_classes=3, mean=MEAN, std=STD, channels=16)
    with torch.no_grad():  # away from the init: BN statistics and weights perturbed
        for name, buf in seg.decoder.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buf.add_(torch.rand_like(buf) * 0.5)
        for p in seg.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_segmentor(folder / "segmentor.safetensors", seg.eval(), config={"data": {"crop_size": 64}})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("api")
    return _encoder_file(folder), _segmentor_file(folder)


def test_load_dispatches_on_the_header(files) -> None:
    enc, seg = (gkd.load(p) for p in files)
    assert isinstance(enc, LoadedEncoder) and enc.kind == "encoder" and not enc.module.training
    assert isinstance(seg, LoadedSegmentor) and seg.num_classes == 3 and not seg.module.training
    assert enc.input_norm == {"mean": list(MEAN), "std": list(STD)} == seg.input_norm
    assert seg.crop == 64 and enc.device == torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="gkd file not found"):
        gkd.load(files[0].parent / "missing.safetensors")


def test_import_gkd_does_not_import_torch() -> None:
    code = "import sys, gkd; assert callable(gkd.__getattr__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_embed_tokens_equal_student_forward(files) -> None:
    enc = gkd.load(files[0])
    student, _ = load_encoder_for_segmentor(files[0])  # an independent load of the same file
    student.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = student(_norm(x))
    tok = enc.embed(x)
    assert tok.patch.shape == (2, 16, 32) and tok.cls.shape == (2, 32) and tok.grid == (4, 4)
    torch.testing.assert_close(tok.patch, ref.patch, rtol=0, atol=0)
    torch.testing.assert_close(tok.cls, ref.cls, rtol=0, atol=0)
    # another input size is resized to the student's 64x64 (bilinear) before the forward
    y = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(2))
    small = torch.nn.functional.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(y).patch, student(_norm(small)).patch, rtol=0, atol=0)
    with pytest.raises(ValueError, match="student's input size"):
        enc.embed(x, size=(32, 32))


@pytest.mark.parametrize("hw", [(64, 96), (40, 72)])  # 40x72: padded to 48x80 as the segmentor does
def test_embed_maps_equal_segmentor_features(files, hw) -> None:
    enc = gkd.load(files[0])
    student, _ = load_encoder_for_segmentor(files[0])
    seg = build_segmentor(student, "mlp", num_classes=2, mean=MEAN, std=STD, channels=8).eval()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(3))
    ph, pw = (-hw[0]) % 16, (-hw[1]) % 16
    with torch.no_grad():
        ref = seg.extract_features(torch.nn.functional.pad(_norm(x), (0, pw, 0, ph)))
    maps = enc.embed(x, output="maps")
    H, W = hw[0] + ph, hw[1] + pw
    assert [tuple(m.shape) for m in maps] == [(2, 32, H // s, W // s) for s in (4, 8, 16, 32)]
    for got, want in zip(maps, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_predict_whole_and_slide(files) -> None:
    api = gkd.load(files[1])
    seg, _ = load_segmentor(files[1])
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # whole: the decoder on the features of the hand-normalised input, argmax
        ref_whole = seg.decoder.predict(seg.extract_features(_norm(x)), (64, 96)).argmax(1)
        ref_slide = slide_inference(seg, x, 3, crop=64, stride=42).argmax(1)  # training crop, 2/3 stride
    whole = api.predict(x, mode="whole")
    assert whole.dtype == torch.int64 and whole.shape == (2, 64, 96)
    assert torch.equal(whole, ref_whole)
    slide = api.predict(x)
    assert torch.equal(slide, ref_slide)
    assert not torch.equal(slide, whole)  # the two modes really differ here (overlapping windows)
    with torch.no_grad():
        assert torch.equal(api.predict(x, crop=48, stride=16), slide_inference(seg, x, 3, crop=48, stride=16).argmax(1))


def test_predict_accepts_pil_numpy_paths_and_mixed_sizes(files, tmp_path) -> None:
    api = gkd.load(files[1])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    as_tensor = torch.from_numpy(a).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    ref = api.predict(as_tensor, mode="whole")
    for given in ([a], [Image.fromarray(a)], [tmp_path / "a.png"], str(tmp_path / "a.png"), a):
        assert torch.equal(api.predict(given, mode="whole"), ref)
    both = api.predict([tmp_path / "a.png", b, Image.fromarray(a)], mode="whole")
    assert isinstance(both, list) and [tuple(m.shape) for m in both] == [(64, 80), (48, 64), (64, 80)]
    b_tensor = torch.from_numpy(b).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    assert torch.equal(both[0], ref[0]) and torch.equal(both[2], ref[0])
    assert torch.equal(both[1], api.predict(b_tensor, mode="whole")[0])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        api.predict([a.astype(np.float32)])


def test_segmentor_embed_uses_its_own_levels(files) -> None:
    api = gkd.load(files[1])
    seg, _ = load_segmentor(files[1])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = seg.extract_features(_norm(x))
        tok = seg.encoder(_norm(x))
    for got, want in zip(api.embed(x, output="maps"), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(api.embed(x).patch, tok.patch, rtol=0, atol=0)


# -- gkd embed ----------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _image_folder(folder: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir()
    sizes = {"a.png": (64, 80), "b.png": (64, 80), "c.png": (48, 56)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # ignored by suffix inside a folder
    return [folder / n for n in sizes]


def _as_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float().unsqueeze(0) / 255.0


def test_cli_embed_tokens_and_maps(files, tmp_path, capsys) -> None:
    import json

    from gkd.cli import main

    paths = _image_folder(tmp_path / "imgs")
    enc = gkd.load(files[0])

    out = tmp_path / "tok.safetensors"
    assert main(["embed", str(files[0]), str(tmp_path / "imgs"), "--out", str(out)]) == 0
    tensors, meta = _read(out)
    assert json.loads(meta["gkd_images"]) == [str(p) for p in paths] and meta["gkd_stacked"] == "true"
    assert meta["gkd_output"] == "tokens" and json.loads(meta["gkd_input_norm"])["std"] == list(STD)
    assert set(tensors) == {"patch", "cls"} and tensors["patch"].shape == (3, 16, 32)  # resized to 64x64
    for i, p in enumerate(paths):
        ref = enc.embed(_as_tensor(p))
        torch.testing.assert_close(tensors["patch"][i], ref.patch[0], rtol=0, atol=0)
        torch.testing.assert_close(tensors["cls"][i], ref.cls[0], rtol=0, atol=0)

    out = tmp_path / "maps.safetensors"  # mixed sizes: one set of maps per image
    assert main(["embed", str(files[0]), *map(str, paths), "--out", str(out), "--output", "maps"]) == 0
    tensors, meta = _read(out)
    assert meta["gkd_stacked"] == "false" and len(tensors) == 12
    for i, p in enumerate(paths):
        for name, want in zip(("feat4", "feat8", "feat16", "feat32"), enc.embed(_as_tensor(p), output="maps")):
            torch.testing.assert_close(tensors[f"{name}.{i}"], want[0], rtol=0, atol=0)

    out = tmp_path / "maps64.safetensors"  # --size: all resized to 64x96, stacked again
    assert main(["embed", str(files[0]), *map(str, paths), "--out", str(out), "--output", "maps",
                 "--size", "64", "96"]) == 0
    tensors, meta = _read(out)
    assert meta["gkd_stacked"] == "true" and json.loads(meta["gkd_size"]) == [64, 96]
    assert [tuple(tensors[n].shape) for n in ("feat4", "feat8", "feat16", "feat32")] == [
        (3, 32, 16, 24), (3, 32, 8, 12), (3, 32, 4, 6), (3, 32, 2, 3)]
    resized = torch.nn.functional.interpolate(_as_tensor(paths[2]), size=(64, 96), mode="bilinear",
                                              align_corners=False)
    torch.testing.assert_close(tensors["feat16"][2], enc.embed(resized, output="maps")[2][0], rtol=0, atol=0)
    assert "wrote maps of 3 image(s)" in capsys.readouterr().out

    assert main(["embed", str(files[0]), str(paths[0]), "--out", str(tmp_path / "x.safetensors"),
                 "--size", "32", "32"]) == 2  # tokens at another size than the student's: a user error
    assert not (tmp_path / "x.safetensors").exists()
