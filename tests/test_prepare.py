"""`gkd data prepare` on tiny files written in each dataset's real raw layout.

Expected train ids are built here from class NAMES (Mapillary) or the Cityscapes label-id table
(GTA5), not from the tables in gkd.data.prepare; the Mapillary configs list the label names of
the module's table (the name list itself is checked against mmsegmentation's in test_manifests).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from gkd.cli import main
from gkd.data import build_dataset
from gkd.data.prepare import MAPILLARY_CLASSES, PrepareError, prepare_dataset

IGN = 255
CS = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
      "motorcycle", "bicycle"]
# Cityscapes label ids of the 19 train ids, in train-id order (cityscapesScripts labels.py)
CS_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CS_COLOURS = {7: (128, 64, 128), 8: (244, 35, 232), 26: (0, 0, 142), 0: (0, 0, 0)}


# ----------------------------------------------------------------------------- expectations

def mapillary_expected(name: str) -> int:
    """Train id of a Mapillary label name: the 66 → 19 mapping, v2.0 parts as their v1.2 parent."""
    if name.startswith("Lane Marking"):  # every marking kind is road, except crosswalks
        return IGN if "Crosswalk" in name else CS.index("road")
    if name.startswith("Traffic Light"):
        return CS.index("traffic light")
    direct = {
        "road": {"Road", "Manhole"}, "sidewalk": {"Sidewalk", "Curb"},
        "building": {"Building", "Garage"}, "wall": {"Wall"}, "fence": {"Fence"},
        "pole": {"Pole", "Utility Pole"},
        "traffic sign": {"Traffic Sign (Front)", "Traffic Sign - Direction (Front)",
                         "Traffic Sign - Temporary (Front)", "Traffic Sign - Parking"},
        "vegetation": {"Vegetation"}, "terrain": {"Terrain"}, "sky": {"Sky"},
        "person": {"Person", "Person Group"}, "rider": {"Bicyclist", "Motorcyclist", "Other Rider"},
        "car": {"Car"}, "truck": {"Truck"}, "bus": {"Bus"}, "train": {"On Rails"},
        "motorcycle": {"Motorcycle"}, "bicycle": {"Bicycle"},
    }
    for cls, names in direct.items():
        if name in names:
            return CS.index(cls)
    return IGN


def cs_train_id(label_id: int) -> int:
    return CS_IDS.index(label_id) if label_id in CS_IDS else IGN


# ----------------------------------------------------------------------------- writers

def blocks(values, side: int) -> np.ndarray:
    """The values row by row on a side×side grid (rest = last value), each cell a 2×2 block
    (so nearest-neighbour halving is unambiguous). uint8 [2·side, 2·side]."""
    values = list(values)
    flat = values + [values[-1]] * (side * side - len(values))
    return np.kron(np.array(flat, dtype=np.uint8).reshape(side, side), np.ones((2, 2), np.uint8))


def write_image(path: Path, h: int, w: int, seed: int = 0, colour=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.full((h, w, 3), colour, np.uint8) if colour is not None
           else np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    Image.fromarray(arr).save(path)


def write_palette(path: Path, arr: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> None:
    """P-mode PNG: pixel values are indices; the palette's colours differ from the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    pal = np.random.default_rng(7).integers(0, 256, (256, 3))
    for i, c in colours.items():
        pal[i] = c
    im.putpalette(pal.astype(np.uint8).flatten().tolist())
    im.save(path)
    assert Image.open(path).mode == "P"


def write_config(path: Path, names: list[str], version: str | None = None) -> None:
    """A config in the archives' format; `name` is a stand-in slug (only `readable` is used)."""
    labels = [{"name": "cls--" + n.lower().replace(" ", "-"), "readable": n, "color": [i, i, i],
               "instances": False, "evaluate": True} for i, n in enumerate(names)]
    data = {"labels": labels, **({"version": version} if version else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", path
        return np.asarray(im)


def names(version: str) -> list[str]:
    return [n for n, _ in MAPILLARY_CLASSES[version]]


KEY_T, KEY_V = "--0KOQxA1VbhjoFhX53oJA", "_3Fq0ePLRLSWkzeQ3hYpjg"  # 22 url-safe characters


def mapillary_v12_archive(root: Path) -> np.ndarray:
    """The v1.2 archive: config.json, {training,validation}/{images,labels}. Returns the label."""
    write_config(root / "config.json", names("v1.2"))
    raw = blocks(range(66), 9)  # every index 0..65
    for split, key in (("training", KEY_T), ("validation", KEY_V)):
        write_image(root / split / "images" / f"{key}.jpg", *raw.shape)
        write_palette(root / split / "labels" / f"{key}.png", raw, {13: (128, 64, 128)})
    return raw


def mapillary_v20_archive(root: Path) -> dict[str, np.ndarray]:
    """The v2.0 archive: config_v1.2.json + config_v2.0.json, images shared, labels per version."""
    write_config(root / "config_v1.2.json", names("v1.2"))
    write_config(root / "config_v2.0.json", names("v2.0"), version="2.0")
    raws = {"v1.2": blocks(range(66), 12), "v2.0": blocks(range(124), 12)}
    for split, key in (("training", KEY_T), ("validation", KEY_V)):
        write_image(root / split / "images" / f"{key}.jpg", 24, 24)
        for v, raw in raws.items():
            write_palette(root / split / v / "labels" / f"{key}.png", raw, {21: (128, 64, 128)})
    return raws


def expected_ids(raw: np.ndarray, version: str) -> np.ndarray:
    return np.vectorize(lambda i: mapillary_expected(names(version)[i]))(raw)


# ----------------------------------------------------------------------------- Mapillary

def test_mapillary_v12_archive(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    raw = mapillary_v12_archive(src)
    # bad input: an image without a label, indices beyond the 66 labels, a size mismatch, RGB
    write_image(src / "training" / "images" / "nolabel.jpg", 4, 4)
    for key, arr in (("outside", np.full((4, 4), 70)), ("small", np.zeros((2, 2)))):
        write_image(src / "training" / "images" / f"{key}.jpg", 4, 4)
        write_palette(src / "training" / "labels" / f"{key}.png", arr, {})
    write_image(src / "training" / "images" / "rgb.jpg", 4, 4)
    write_image(src / "training" / "labels" / "rgb.png", 4, 4)  # an RGB image: colours

    report = prepare_dataset("mapillary", src, out, version="v1.2")
    assert report.version == "v1.2" and report.options["config"] == "config.json"
    assert report.options["half_res"] is False
    assert report.splits == {"train": {"images": 1, "labels": 1}, "val": {"images": 1, "labels": 1}}
    reasons = {Path(s["file"]).stem: s["reason"] for s in report.skipped}
    assert set(reasons) == {"nolabel", "outside", "small", "rgb"}
    assert "no label file" in reasons["nolabel"] and "[70]" in reasons["outside"]
    assert "2x2" in reasons["small"] and "mode is RGB" in reasons["rgb"]
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["version"] == "v1.2" and len(saved["skipped"]) == 4

    expected = expected_ids(raw, "v1.2")
    assert set(np.unique(expected)) == set(range(19)) | {IGN}  # every class reached
    for split, key in (("train", KEY_T), ("val", KEY_V)):
        np.testing.assert_array_equal(read(out / "labels" / split / f"{key}.png"), expected)
        link = out / "images" / split / f"{key}.jpg"
        assert link.is_symlink()
        assert Path(os.readlink(link)) == (src / ("training" if split == "train" else "validation")
                                           / "images" / f"{key}.jpg").resolve()
    ds = build_dataset("mapillary", "val", root=out)  # the shipped manifest reads the output
    assert len(ds) == 1
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)


@pytest.mark.parametrize("version", ["v2.0", "v1.2"])
def test_mapillary_v20_archive(tmp_path, version):
    src, out = tmp_path / "raw", tmp_path / "out"
    raws = mapillary_v20_archive(src)
    report = prepare_dataset("mapillary", src, out, version=version, copy=True)
    assert report.options["config"] == f"config_{version}.json"
    assert report.splits["train"] == {"images": 1, "labels": 1} and not report.skipped
    expected = expected_ids(raws[version], version)  # the labels of the stated version are read
    if version == "v2.0":
        assert set(np.unique(expected)) == set(range(19)) | {IGN}
    np.testing.assert_array_equal(read(out / "labels" / "train" / f"{KEY_T}.png"), expected)
    image = out / "images" / "val" / f"{KEY_V}.jpg"
    assert not image.is_symlink() and image.read_bytes() == (
        src / "validation" / "images" / f"{KEY_V}.jpg").read_bytes()
    assert len(build_dataset("mapillary", "train", root=out)) == 1


def test_mapillary_half_res(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    raw = mapillary_v12_archive(src)  # 18x18, labels in 2x2 blocks
    write_image(src / "validation" / "images" / f"{KEY_V}.jpg", 18, 18, colour=(200, 40, 90))
    report = prepare_dataset("mapillary", src, out, version="1.2", half_res=True)
    assert report.options["half_res"] is True
    image = out / "images" / "val" / f"{KEY_V}.jpg"
    assert not image.is_symlink()
    with Image.open(image) as im:
        assert im.format == "JPEG" and im.size == (9, 9)
        assert np.abs(np.asarray(im).astype(int) - (200, 40, 90)).max() <= 4
    label = read(out / "labels" / "val" / f"{KEY_V}.png")
    assert label.shape == (9, 9)  # nearest: one value per 2x2 block
    np.testing.assert_array_equal(label, expected_ids(raw[::2, ::2], "v1.2"))


def test_mapillary_version_errors(tmp_path):
    src = tmp_path / "raw"
    mapillary_v12_archive(src)
    with pytest.raises(PrepareError, match=r"v1\.2, v2\.0"):
        prepare_dataset("mapillary", src, tmp_path / "o1")
    with pytest.raises(PrepareError) as e:  # stated version not on disk: says what is
        prepare_dataset("mapillary", src, tmp_path / "o2", version="v2.0")
    assert "config.json (66 labels → v1.2)" in str(e.value) and "training/labels" in str(e.value)
    # a config of neither version
    write_config(src / "config.json", ["Road", "Sky", "Car"])
    with pytest.raises(PrepareError, match="cannot be recognised") as e:
        prepare_dataset("mapillary", src, tmp_path / "o3", version="v1.2")
    assert "3 labels" in str(e.value)
    # the right count but a name the table does not know
    write_config(src / "config.json", names("v1.2")[:-1] + ["Hoverboard"])
    with pytest.raises(PrepareError, match="'Hoverboard'"):
        prepare_dataset("mapillary", src, tmp_path / "o4", version="v1.2")
    assert not (tmp_path / "o4").exists()


def test_out_folder_rules(tmp_path):
    src = tmp_path / "raw"
    mapillary_v12_archive(src)
    with pytest.raises(PrepareError, match="inside --src"):
        prepare_dataset("mapillary", src, src / "prepared", version="v1.2")
    prepare_dataset("mapillary", src, tmp_path / "out", version="v1.2")
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare_dataset("mapillary", src, tmp_path / "out", version="v1.2")
    report = prepare_dataset("mapillary", src, tmp_path / "out", version="v1.2", overwrite=True)
    assert report.splits["val"]["images"] == 1
    assert any(n.startswith("removed 4 files") for n in report.notes)
    with pytest.raises(PrepareError, match="--on-mismatch does not apply"):
        prepare_dataset("mapillary", src, tmp_path / "o", version="v1.2", on_mismatch="skip")


# ----------------------------------------------------------------------------- GTA5

def gta5_raw(root: Path) -> np.ndarray:
    """Frames 1-5 in the raw layout; 3 is size-mismatched, 4 has an RGB label. Returns the
    palette indices of the good labels (every Cityscapes label id 0-33)."""
    raw = blocks(range(34), 6)  # 12x12
    for i in (1, 2, 5):
        write_image(root / "images" / f"{i:05d}.png", 12, 12, seed=i)
        write_palette(root / "labels" / f"{i:05d}.png", raw, CS_COLOURS)
    write_image(root / "images" / "00003.png", 12, 12, seed=3)
    write_palette(root / "labels" / "00003.png", blocks([7, 26, 8, 0], 2), CS_COLOURS)  # 4x4
    write_image(root / "images" / "00004.png", 12, 12, seed=4)
    write_image(root / "labels" / "00004.png", 12, 12, colour=(128, 64, 128))
    return raw


def test_gta5_palette_indices_and_mismatch(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    raw = gta5_raw(src)
    report = prepare_dataset("gta5", src, out)
    assert report.options["split_source"] is None and report.splits == {"train": {"images": 3, "labels": 3}}
    reasons = {Path(s["file"]).stem: s["reason"] for s in report.skipped}
    assert set(reasons) == {"00003", "00004"}
    assert "size mismatch" in reasons["00003"] and "4x4" in reasons["00003"]
    assert "mode is RGB" in reasons["00004"] and "colours" in reasons["00004"]
    label = out / "labels" / "train" / "00001.png"
    np.testing.assert_array_equal(read(label), raw)  # the indices, not the palette colours
    ds = build_dataset("gta5", "train", root=out)
    assert len(ds) == 3 and all(image.parent == out / "images" / "train" for image, _ in ds.samples)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), np.vectorize(cs_train_id)(raw))
    # the raw layout still reads: train = every frame of the flat folders
    assert len(build_dataset("gta5", "train", root=src, on_bad="skip")) == 5

    resized = prepare_dataset("gta5", src, tmp_path / "out2", on_mismatch="resize")
    assert [Path(a["file"]).stem for a in resized.altered] == ["00003"]
    assert resized.splits["train"]["images"] == 4
    # nearest: each of the 4x4 label's 2x2 blocks becomes a 6x6 block of the 12x12 image
    expected = np.kron(np.array([[7, 26], [8, 0]], np.uint8), np.ones((6, 6), np.uint8))
    np.testing.assert_array_equal(read(tmp_path / "out2" / "labels" / "train" / "00003.png"), expected)


def test_gta5_split_mat(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    gta5_raw(src)
    write_image(src / "images" / "00006.png", 12, 12)  # in no split
    write_palette(src / "labels" / "00006.png", blocks([7], 6), {})
    # column vectors of 1-based frame numbers, as in the official file; frame 9 has no image
    savemat(src / "split.mat", {"trainIds": np.array([[1], [3], [4]]), "valIds": np.array([[2]]),
                                "testIds": np.array([[5], [9]])})
    report = prepare_dataset("gta5", src, out)
    assert report.options["split_source"] == "split.mat"
    assert report.splits == {"train": {"images": 1, "labels": 1}, "val": {"images": 1, "labels": 1},
                             "test": {"images": 1, "labels": 1}}
    assert {Path(s["file"]).stem for s in report.skipped} == {"00003", "00004", "00006"}
    assert any("00009" in n for n in report.notes)
    # each split reads only its folder: the prepared train is not mixed with val/test
    for split, frame in (("train", "00001"), ("val", "00002"), ("test", "00005")):
        ds = build_dataset("gta5", split, root=out)
        assert [p.name for p, _ in ds.samples] == [f"{frame}.png"]
    savemat(src / "split.mat", {"trainIds": np.array([[1]])})
    with pytest.raises(PrepareError, match="valIds, testIds"):
        prepare_dataset("gta5", src, tmp_path / "o2")


def test_gta5_unrecognised_layout(tmp_path):
    (tmp_path / "raw" / "gta5" / "images").mkdir(parents=True)
    with pytest.raises(PrepareError, match="use that as --src"):
        prepare_dataset("gta5", tmp_path / "raw", tmp_path / "out")


# ----------------------------------------------------------------------------- layout checks

def acdc_raw(root: Path) -> None:
    raw = blocks([7, 26, 0, 21], 2)
    for k, cond in enumerate(["fog", "night", "rain", "snow"]):
        for split, n in (("train", 2), ("val", 1)):
            for i in range(n):
                stem = f"GOPR0{400 + k}_frame_{i:06d}"
                write_image(root / "rgb_anon" / cond / split / f"GOPR0{400 + k}" / f"{stem}_rgb_anon.png", 4, 4)
                lab = root / "gt" / cond / split / f"GOPR0{400 + k}" / f"{stem}_gt_labelIds.png"
                lab.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(raw).save(lab)
        write_image(root / "rgb_anon" / cond / "test" / f"GP{k}" / f"GP{k}_frame_000001_rgb_anon.png", 4, 4)


def test_acdc_layout_check(tmp_path):
    src, out = tmp_path / "acdc", tmp_path / "out"
    acdc_raw(src)
    report = prepare_dataset("acdc", src, out)
    assert report.ok and report.root == str(src)
    assert report.splits["train_night"] == {"images": 2, "labels": 2, "paired": 2}
    assert report.splits["val_snow"] == {"images": 1, "labels": 1, "paired": 1}
    assert report.splits["test_rain"] == {"images": 1, "labels": 0}
    assert not (out / "images").exists() and (out / "prepare_report.json").is_file()
    # a val image without its label and a label value outside the Cityscapes ids are problems
    write_image(src / "rgb_anon" / "fog" / "val" / "GOPR0400" / "GOPR0400_frame_000009_rgb_anon.png", 4, 4)
    Image.fromarray(np.full((4, 4), 40, np.uint8)).save(
        src / "gt" / "night" / "train" / "GOPR0401" / "GOPR0401_frame_000000_gt_labelIds.png")
    report = prepare_dataset("acdc", src, out)
    assert not report.ok
    problems = {(p["split"], Path(p["file"]).name.split("_gt")[0].split("_rgb")[0]): p["reason"]
                for p in report.problems}
    assert "image without a label" in problems[("val_fog", "GOPR0400_frame_000009")]
    assert "[40]" in problems[("train_night", "GOPR0401_frame_000000")]


def test_bdd100k_layout_check(tmp_path):
    src = tmp_path / "bdd100k"
    for split in ("train", "val"):
        for name in ("0a0a0b1a-7c39d841", "7d2f7975-e0c1c5a7"):
            write_image(src / "images" / "10k" / split / f"{name}.jpg", 4, 4)
            lab = src / "labels" / "sem_seg" / "masks" / split / f"{name}.png"
            lab.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array([[0, 18], [255, 13]], np.uint8).repeat(2, 0).repeat(2, 1)).save(lab)
    write_image(src / "images" / "10k" / "test" / "ac517380-00000000.jpg", 4, 4)
    report = prepare_dataset("bdd100k", src, tmp_path / "out")
    assert report.ok and report.splits["val"]["paired"] == 2 and report.splits["test"]["images"] == 1

    old = tmp_path / "old"
    (old / "seg" / "images" / "train").mkdir(parents=True)
    (old / "seg" / "labels" / "train").mkdir(parents=True)
    with pytest.raises(PrepareError, match="older BDD100K") as e:
        prepare_dataset("bdd100k", old, tmp_path / "o2")
    assert "seg/images" in str(e.value) and "images/10k" in str(e.value)
    with pytest.raises(PrepareError, match="use that as --src"):
        prepare_dataset("bdd100k", tmp_path, tmp_path / "o3")  # one level too high


# ----------------------------------------------------------------------------- CLI

def test_cli_prepare(tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "out"
    gta5_raw(src)
    assert main(["data", "prepare", "gta5", "--src", str(src), "--out", str(out),
                 "--on-mismatch", "resize"]) == 0
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["options"]["on_mismatch"] == "resize" and len(saved["skipped"]) == 1
    assert "1 skipped, 1 altered" in capsys.readouterr().out
    # an option of another dataset is a clear error (exit 2), not a TypeError
    assert main(["data", "prepare", "gta5", "--src", str(src), "--out", str(tmp_path / "o"),
                 "--half-res"]) == 2
    assert "--half-res does not apply" in capsys.readouterr().err
    acdc = tmp_path / "acdc"
    acdc_raw(acdc)
    (acdc / "gt" / "rain" / "val" / "GOPR0402" / "GOPR0402_frame_000000_gt_labelIds.png").unlink()
    assert main(["data", "prepare", "acdc", "--src", str(acdc), "--out", str(tmp_path / "a")]) == 1
    assert "image without a label" in capsys.readouterr().out


def test_cityscapes_layout_check(tmp_path):
    src = tmp_path / "cityscapes"
    for split, city in (("train", "aachen"), ("val", "frankfurt"), ("test", "berlin")):
        stem = f"{city}_000000_000019"
        write_image(src / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 4, 4)
        if split != "test":
            lab = src / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            lab.parent.mkdir(parents=True)
            Image.fromarray(blocks([7, 26, 0, 33], 2)).save(lab)
    report = prepare_dataset("cityscapes", src, tmp_path / "out")
    assert report.ok and report.splits == {
        "train": {"images": 1, "labels": 1, "paired": 1}, "val": {"images": 1, "labels": 1, "paired": 1},
        "test": {"images": 1, "labels": 0}}
    with pytest.raises(PrepareError, match="gtFine"):
        prepare_dataset("cityscapes", src / "leftImg8bit", tmp_path / "out")
