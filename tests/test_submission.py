"""Test-server exports (gkd.eval.submission) against the servers' documented formats.

Tiny test images are written in each dataset's real raw layout (Cityscapes `leftImg8bit/test/<city>/`,
ACDC `rgb_anon/<condition>/test/<sequence>/`). The model is a stub whose predicted train id is known
per pixel: train id c wherever the red channel is 10·c, so every written value can be checked against
a train id → label id table typed here from cityscapesScripts helpers/labels.py. The Cityscapes check
re-does the evaluator's search (evalPixelLevelSemanticLabeling.getPrediction: os.walk the results,
fnmatch `<city>_<seq>_<frame>*.png`, exactly one match) on the unpacked zip.
"""
from __future__ import annotations

import fnmatch
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gkd.eval.submission import (SERVER_FORMATS, export_submission, submission_format, submission_lut,
                                 train_to_label_ids)

# cityscapesScripts helpers/labels.py: label id of train ids 0..18 (road 7, ..., car 26, ..., bicycle 33)
CS_LABEL_ID_OF_TRAIN_ID = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
K = 19
ROAD, CAR = 0, 13
CONDITIONS = ("fog", "night", "rain", "snow")


class ColourCoded(nn.Module):
    """Scores −(25.5·R − k)²: argmax k is the train id c written as red value 10·c."""

    num_classes = K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(K, dtype=x.dtype).view(1, K, 1, 1)
        return -(x[:, :1] * 25.5 - k) ** 2


@dataclass
class FakeState:
    """accelerate's PartialState surface used by the export; `waits` counts the barriers."""

    process_index: int = 0
    num_processes: int = 1
    device: torch.device = torch.device("cpu")
    waits: int = 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        self.waits += 1


def write_coded(path: Path, train_ids: np.ndarray) -> None:
    """RGB image [H,W,3] whose red channel encodes the train ids (green/blue are noise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(int(train_ids.sum())).integers(0, 256, train_ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = train_ids * 10
    Image.fromarray(rgb).save(path)


def train_map(seed: int, h: int, w: int) -> np.ndarray:
    """Random train ids [H,W] with a road stripe on top and a car block at the bottom left."""
    ids = np.random.default_rng(seed).integers(0, K, (h, w))
    ids[:2] = ROAD
    ids[-3:, :4] = CAR
    return ids


def read_png(path: Path | bytes) -> Image.Image:
    im = Image.open(path)
    im.load()
    return im


# ----------------------------------------------------------------------------- dataset trees

CS_TEST = {  # city -> [(seq, frame, (h, w))]; sizes vary and are not the server's 2048×1024
    "berlin": [("000000", "000019", (12, 20)), ("000001", "000019", (12, 20))],
    "bonn": [("000002", "000019", (9, 17))],
    "munich": [("000003", "000019", (16, 30))],
}


@pytest.fixture
def cityscapes(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """leftImg8bit/test/<city>/<city>_<seq>_<frame>_leftImg8bit.png, plus a val image that must be ignored."""
    root = tmp_path / "cityscapes"
    maps = {}
    for i, (city, frames) in enumerate(sorted(CS_TEST.items())):
        for j, (seq, frame, (h, w)) in enumerate(frames):
            name = f"{city}_{seq}_{frame}_leftImg8bit.png"
            maps[name] = train_map(10 * i + j, h, w)
            write_coded(root / "leftImg8bit" / "test" / city / name, maps[name])
    write_coded(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", train_map(99, 8, 8))
    return root, maps


ACDC_TEST = {"fog": "GOPR0475", "night": "GOPR0351", "rain": "GOPR0400", "snow": "GOPR0122"}


@pytest.fixture
def acdc(tmp_path) -> tuple[Path, dict[str, tuple[str, np.ndarray]]]:
    """rgb_anon/<cond>/test/<seq>/<seq>_frame_<n>_rgb_anon.png (two per condition) and a test_ref decoy."""
    root = tmp_path / "acdc"
    maps = {}
    for i, (cond, seq) in enumerate(sorted(ACDC_TEST.items())):
        for j, frame in enumerate(("000100", "000247")):
            name = f"{seq}_frame_{frame}_rgb_anon.png"
            maps[name] = (cond, train_map(20 + 2 * i + j, 9, 16))
            write_coded(root / "rgb_anon" / cond / "test" / seq / name, maps[name][1])
        # reference images of the same scenes: no part of the test split
        write_coded(root / "rgb_anon" / cond / "test_ref" / seq / f"{seq}_frame_000100_rgb_ref_anon.png",
                    train_map(0, 9, 16))
    return root, maps


def export(manifest: str, root: Path, out: Path, **kw):
    kw = {"mode": "slide", "resize": None, "crop": 8, "stride": 5, "num_workers": 0, **kw}
    return export_submission(ColourCoded(), manifest, "test", root, out, **kw)


def unpack(zip_path: Path, dest: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        zf.extractall(dest)
        return sorted(zf.namelist())


def cityscapes_matches(results: Path, image_name: str) -> list[str]:
    """The evaluator's search: <city>_<seq>_<frame>*.png anywhere under the results folder."""
    city, seq, frame = image_name.split("_")[:3]
    pattern = f"{city}_{seq}_{frame}*.png"
    return [os.path.join(d, f) for d, _, files in os.walk(results) for f in fnmatch.filter(files, pattern)]


# ----------------------------------------------------------------------------- tables

def test_server_formats_and_id_tables():
    assert set(SERVER_FORMATS) == {"cityscapes", "acdc"}
    assert submission_format("cityscapes").id_space == "label_ids"
    assert submission_format("acdc").id_space == "train_ids"
    assert submission_format("cityscapes").image_size == (2048, 1024)
    assert submission_format("acdc").image_size == (1920, 1080)
    assert submission_format("gta5") is None and submission_format("camvid") is None
    lut = train_to_label_ids("cityscapes")
    assert lut.shape == (256,) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[:K], CS_LABEL_ID_OF_TRAIN_ID)
    assert (lut[K:] == 0).all()  # 'unlabeled', never produced: predictions outside 0..18 are refused
    np.testing.assert_array_equal(submission_lut("cityscapes")[:K], CS_LABEL_ID_OF_TRAIN_ID)
    np.testing.assert_array_equal(submission_lut("acdc")[:K], np.arange(K))


def test_label_map_that_is_not_one_to_one_is_refused(tmp_path):
    manifest = tmp_path / "merged.yaml"
    manifest.write_text("name: merged\ntype: folder\ndefault_root: merged\nsplits: [test]\n"
                        "classes: [a, b]\nlabel_map: {1: 0, 2: 0, 3: 1}\n")
    with pytest.raises(ValueError, match=r"merged\.yaml.*not one-to-one.*train id 0"):
        train_to_label_ids(manifest)


def test_manifest_without_a_server_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'gta5'.*cityscapes, acdc|'gta5'.*acdc, cityscapes"):
        export_submission(ColourCoded(), "gta5", "val", tmp_path, tmp_path / "out", num_workers=0)


# ----------------------------------------------------------------------------- Cityscapes

def test_cityscapes_export_matches_the_evaluator(cityscapes, tmp_path):
    root, maps = cityscapes
    state = FakeState()
    result = export("cityscapes", root, tmp_path / "out", state=state, batch_size=3)  # mixed sizes in a batch

    assert result.complete and not result.skipped and result.num_images == 4
    assert result.counts == {"berlin": 2, "bonn": 1, "munich": 1}
    assert result.zip_path == tmp_path / "out" / "cityscapes.zip" and set(result.zips) == {"all"}
    members = unpack(result.zip_path, tmp_path / "unzipped")
    assert members == sorted(f"{n.split('_')[0]}/{n}" for n in maps)  # lindau (val) is not there
    # every test image is found exactly once by the evaluator's glob, in the zip and on disk
    for name in maps:
        for results in (tmp_path / "unzipped", tmp_path / "out" / "cityscapes"):
            assert len(cityscapes_matches(results, name)) == 1, (name, results)
    for name, train_ids in maps.items():
        pred = read_png(tmp_path / "unzipped" / name.split("_")[0] / name)
        assert pred.mode == "L" and pred.size == (train_ids.shape[1], train_ids.shape[0])
        values = np.asarray(pred)
        assert values.dtype == np.uint8
        np.testing.assert_array_equal(values, CS_LABEL_ID_OF_TRAIN_ID[train_ids])
        assert (values[:2] == 7).all() and (values[-3:, :4] == 26).all()  # road, car as label ids
        assert values.max() <= 33 and not np.isin(values, [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]).any()
    # the tiny inputs are not the server's 2048×1024: listed, predictions keep the input size
    assert sorted(Path(u["path"]).name for u in result.unexpected_sizes) == sorted(maps)
    report = json.loads((tmp_path / "out" / "cityscapes_submission.json").read_text())
    assert report["counts"] == result.counts and report["zips"]["all"] == str(result.zip_path)
    assert state.waits == 1


def test_full_size_cityscapes_image_with_the_manifest_resize(tmp_path):
    """A real-size 2048×1024 test image, scored at the manifest's 1024×512 and written back at 2048×1024."""
    root = tmp_path / "cityscapes"
    name = "mainz_000000_000123_leftImg8bit.png"
    write_coded(root / "leftImg8bit" / "test" / "mainz" / name, np.full((1024, 2048), CAR))
    result = export_submission(ColourCoded(), "cityscapes", "test", root, tmp_path / "out", mode="whole",
                               num_workers=0, state=FakeState())
    pred = read_png(tmp_path / "out" / "cityscapes" / "mainz" / name)
    assert pred.size == (2048, 1024) and pred.mode == "L"
    assert (np.asarray(pred) == 26).all()
    assert result.unexpected_sizes == [] and result.complete


def test_unreadable_image_is_counted_listed_and_left_out(cityscapes, tmp_path):
    root, maps = cityscapes
    broken = root / "leftImg8bit" / "test" / "bonn" / "bonn_000009_000019_leftImg8bit.png"
    broken.write_bytes(b"not a png at all")
    result = export("cityscapes", root, tmp_path / "out", state=FakeState())
    assert [s["path"] for s in result.skipped] == [str(broken)]
    assert "cannot read image" in result.skipped[0]["reason"]
    assert result.num_images == 5 and not result.complete
    assert result.counts == {"berlin": 2, "bonn": 1, "munich": 1}
    assert "bonn/bonn_000009_000019_leftImg8bit.png" not in unpack(result.zip_path, tmp_path / "z")
    report = json.loads((tmp_path / "out" / "cityscapes_submission.json").read_text())
    assert report["skipped"] == result.skipped and report["complete"] is False


def test_file_names_the_server_cannot_match_are_errors(cityscapes, tmp_path):
    root, _ = cityscapes
    odd = root / "leftImg8bit" / "test" / "bonn" / "bonn_12_000019_leftImg8bit.png"
    write_coded(odd, train_map(0, 4, 4))
    with pytest.raises(ValueError, match="bonn_12_000019_leftImg8bit.png.*pattern"):
        export("cityscapes", root, tmp_path / "out", state=FakeState())
    assert not (tmp_path / "out").exists()  # refused before any prediction


def test_two_processes_share_the_images_and_the_main_one_zips(cityscapes, tmp_path):
    root, maps = cityscapes
    broken = root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000020_leftImg8bit.png"  # index 1
    broken.write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    rank1 = export("cityscapes", root, out, state=FakeState(1, 2))  # runs first; its barrier is a no-op here
    assert rank1.zips == {} and [Path(s["path"]).name for s in rank1.skipped] == [broken.name]
    assert rank1.counts == {"bonn": 1}  # sorted images 1 (the broken berlin one) and 3 (bonn) of 0..4
    main = export("cityscapes", root, out, state=FakeState(0, 2))
    assert main.counts == {"berlin": 2, "bonn": 1, "munich": 1}
    assert [Path(s["path"]).name for s in main.skipped] == [broken.name] and not main.complete
    assert len(unpack(main.zip_path, tmp_path / "z")) == 4
    assert not list(out.glob(".*rank*.json"))  # per-process reports merged and removed


# ----------------------------------------------------------------------------- ACDC

def test_acdc_export_one_folder_and_zip_per_condition(acdc, tmp_path):
    root, maps = acdc
    result = export("acdc", root, tmp_path / "out", state=FakeState())

    assert result.complete and result.counts == {c: 2 for c in CONDITIONS}
    assert set(result.zips) == {"all", *CONDITIONS}
    assert result.zip_path == tmp_path / "out" / "acdc.zip"
    assert unpack(result.zips["all"], tmp_path / "all") == sorted(f"labelTrainIds/{n}" for n in maps)
    for cond in CONDITIONS:
        assert result.zips[cond] == tmp_path / "out" / f"acdc_{cond}.zip"
        assert unpack(result.zips[cond], tmp_path / cond) == sorted(
            f"labelTrainIds/{n}" for n, (c, _) in maps.items() if c == cond)
    for name, (cond, train_ids) in maps.items():
        on_disk = tmp_path / "out" / "acdc" / cond / name
        assert on_disk.is_file()
        pred = read_png(tmp_path / "all" / "labelTrainIds" / name)
        assert pred.mode == "L" and pred.size == (16, 9)
        values = np.asarray(pred)
        np.testing.assert_array_equal(values, train_ids)  # train ids, not label ids: road 0, car 13
        assert (values[:2] == ROAD).all() and (values[-3:, :4] == CAR).all()
        assert (np.asarray(read_png(on_disk)) == values).all()
    assert not any("rgb_ref_anon" in n for n in unpack(result.zips["all"], tmp_path / "again"))


def test_acdc_single_condition_split_and_resize(acdc, tmp_path):
    """A one-condition split gets that condition's zip only; a keep-ratio resize keeps the output size."""
    root, maps = acdc
    name = "GOPR0351_frame_000500_rgb_anon.png"
    write_coded(root / "rgb_anon" / "night" / "test" / "GOPR0351" / name, np.full((18, 32), CAR))
    result = export_submission(ColourCoded(), "acdc", "test_night", root, tmp_path / "out", mode="slide",
                               resize=(16, 9), crop=8, stride=5, num_workers=0, state=FakeState())
    assert set(result.zips) == {"night"} and result.counts == {"night": 3}
    assert result.zip_path == tmp_path / "out" / "acdc_night.zip"
    assert not (tmp_path / "out" / "acdc.zip").exists()
    pred = read_png(tmp_path / "out" / "acdc" / "night" / name)
    assert pred.size == (32, 18) and (np.asarray(pred) == CAR).all()


def test_acdc_same_file_name_in_two_conditions_is_an_error(acdc, tmp_path):
    root, _ = acdc
    clash = "GOPR0475_frame_000100_rgb_anon.png"  # already under fog; the flat zip could not hold both
    write_coded(root / "rgb_anon" / "snow" / "test" / "GOPR0475" / clash, train_map(1, 9, 16))
    with pytest.raises(ValueError, match="same"):
        export("acdc", root, tmp_path / "out", state=FakeState())


def test_gkd_eval_export_submission_end_to_end(tmp_path):
    """`gkd eval --export-submission` on a real (tiny) segmentor file: labelled val scored, the test split
    exported with the predictions `predict` gives, in label ids, and named in results.md."""
    from gkd.cli import main as gkd_main
    from gkd.eval.inference import predict
    from gkd.models import build_segmentor, build_student, load_segmentor, save_segmentor
    from helpers import reset_accelerate

    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(0)
    for split, city in (("val", "lindau"), ("test", "berlin")):
        for i in range(2):
            stem = f"{city}_{i:06d}_000019"
            write_coded(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", train_map(i, 24, 40))
            gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.choice(CS_LABEL_ID_OF_TRAIN_ID, (24, 40)).astype(np.uint8)).save(gt)
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2)
    seg = build_segmentor(student, decoder="mlp", num_classes=K, channels=8, mean=[0.5] * 3, std=[0.25] * 3)
    ckpt = save_segmentor(tmp_path / "s3" / "segmentor.safetensors", seg.eval())
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: cs\nsource: synthetic\nmode: slide\ncrop: 32\nstride: 21\ntargets:\n"
                     "  - {name: Cityscapes, manifest: cityscapes, split: val, resize: null}\n")
    out = tmp_path / "eval"
    assert gkd_main(["eval", str(ckpt), "--suite", str(suite), "--out", str(out), "--root", f"cityscapes={root}",
                     "--workers", "0", "--export-submission"]) == 0
    reset_accelerate()
    model, _ = load_segmentor(ckpt)
    names = unpack(out / "submission" / "cityscapes.zip", tmp_path / "unzipped")
    assert names == ["berlin/berlin_000000_000019_leftImg8bit.png", "berlin/berlin_000001_000019_leftImg8bit.png"]
    for name in names:
        image = np.asarray(Image.open(root / "leftImg8bit" / "test" / name).convert("RGB"))
        x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)[None]
        with torch.no_grad():
            train_ids = predict(model, x, mode="slide", resize=None, crop=(32, 32), stride=(21, 21),
                                num_classes=K).argmax(1)[0].numpy()
        written = read_png(tmp_path / "unzipped" / name)
        assert written.mode == "L" and written.size == (40, 24)
        np.testing.assert_array_equal(np.asarray(written), CS_LABEL_ID_OF_TRAIN_ID[train_ids])
    metrics = json.loads((out / "metrics.json").read_text())
    (export_record,) = metrics["models"][0]["submissions"]
    assert export_record["complete"] and export_record["split"] == "test"
    assert "Test-server exports" in (out / "results.md").read_text()
