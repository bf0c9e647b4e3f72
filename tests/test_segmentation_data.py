"""Segmentation datasets: roots, bad input (error / skip / validate), `check_dataset`, items,
stage-2 image sharding, and the real CamVid copy in ../shared/data."""
from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gkd.data import (BadSampleError, build_dataset, check_dataset, manifest_image_files,
                      resolve_root, write_shards)
from gkd.data.seg_transforms import build_seg_eval_transform

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def write_rgb(path: Path, h: int, w: int, value=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None
           else np.full((h, w, 3), value, np.uint8))
    Image.fromarray(arr).save(path)
    return arr


def write_l(path: Path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


def cityscapes_tree(root: Path, split: str, city: str, stem: str, label: np.ndarray,
                    image_hw: tuple[int, int] | None = None) -> tuple[Path, Path]:
    img = root / "leftImg8bit" / split / city / f"{city}_{stem}_leftImg8bit.png"
    lbl = root / "gtFine" / split / city / f"{city}_{stem}_gtFine_labelIds.png"
    write_rgb(img, *(image_hw or label.shape))
    write_l(lbl, label)
    return img, lbl


GOOD = np.array([[7, 7, 26], [0, 8, 26]])  # road road car / unlabeled sidewalk car
GOOD_TRAIN = np.array([[0, 0, 13], [255, 1, 13]])


@pytest.fixture
def broken(tmp_path) -> Path:
    """A Cityscapes-layout dataset with one of each problem in `train` and a clean `val`."""
    cityscapes_tree(tmp_path, "train", "aachen", "000000_000001", GOOD)            # good
    cityscapes_tree(tmp_path, "train", "aachen", "000000_000002", np.array([[7, 40], [26, 34]]))  # outside
    cityscapes_tree(tmp_path, "train", "aachen", "000000_000003", GOOD, image_hw=(4, 6))  # size mismatch
    cityscapes_tree(tmp_path, "train", "bochum", "000000_000004", GOOD)            # good
    img, lbl = cityscapes_tree(tmp_path, "train", "bochum", "000000_000005", GOOD)
    lbl.unlink()                                                                   # missing label
    lonely = tmp_path / "gtFine" / "train" / "bochum" / "bochum_000000_000006_gtFine_labelIds.png"
    write_l(lonely, GOOD)                                                          # label, no image
    bad = tmp_path / "gtFine" / "train" / "bochum" / "bochum_000000_000007_gtFine_labelIds.png"
    write_rgb(tmp_path / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000007_leftImg8bit.png", 2, 3)
    bad.write_bytes(b"not a png")                                                  # unreadable
    cityscapes_tree(tmp_path, "val", "lindau", "000000_000019", GOOD)
    return tmp_path


# ----------------------------------------------------------------------------- roots

def test_resolve_root(tmp_path, monkeypatch):
    (tmp_path / "cityscapes").mkdir()
    assert resolve_root("cityscapes", tmp_path / "cityscapes") == tmp_path / "cityscapes"
    monkeypatch.setenv("GKD_DATA_ROOT", str(tmp_path))
    assert resolve_root("cityscapes") == tmp_path / "cityscapes"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gta5")):
        resolve_root("gta5")  # $GKD_DATA_ROOT/gta5 does not exist
    with pytest.raises(FileNotFoundError, match="/nowhere/at/all"):
        build_dataset("cityscapes", "val", root="/nowhere/at/all")
    monkeypatch.delenv("GKD_DATA_ROOT")
    with pytest.raises(FileNotFoundError, match="GKD_DATA_ROOT"):
        resolve_root("cityscapes")


def test_unknown_split_and_missing_folder(tmp_path):
    cityscapes_tree(tmp_path, "val", "lindau", "000000_000019", GOOD)
    with pytest.raises(KeyError, match="train, val, test"):
        build_dataset("cityscapes", "trainextra", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        build_dataset("cityscapes", "train", root=tmp_path)


# ----------------------------------------------------------------------------- items

def test_item_contract(tmp_path):
    img = tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png"
    arr = write_rgb(img, 2, 3)
    write_l(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", GOOD)
    ds = build_dataset("cityscapes", "val", root=tmp_path)
    item = ds[0]
    assert set(item) == {"image", "label", "path"} and item["path"] == str(img)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 2, 3)
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy() * 255, arr, atol=1e-3)  # RGB, [0,1]
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), GOOD_TRAIN)
    assert ds.num_classes == 19 and len(ds.palette) == 19 and ds.manifest.name == "cityscapes"
    assert ds.skipped == [] and ds.ignore_index == 255
    assert ds.image_path(0) == img and ds.label_path(0).name == "lindau_000000_000019_gtFine_labelIds.png"
    # a transform gets (image, label) tensors; the eval transform leaves the label alone
    ds2 = build_dataset("cityscapes", "val", root=tmp_path, transform=build_seg_eval_transform((6, 4)))
    assert ds2[0]["image"].shape == (3, 4, 6) and ds2[0]["label"].shape == (2, 3)
    # picklable for DataLoader workers; batches collate
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[0]["label"], item["label"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))
    assert batch["image"].shape == (1, 3, 2, 3) and batch["path"] == [str(img)]


# ----------------------------------------------------------------------------- bad input

def test_check_dataset_finds_every_problem(broken):
    report = check_dataset("cityscapes", root=broken)
    assert not report.ok
    tr, va = report.splits["train"], report.splits["val"]
    assert va.ok and va.num_paired == 1
    assert (tr.num_images, tr.num_labels, tr.num_paired) == (6, 6, 5)
    assert tr.unpaired_images == ["leftImg8bit/train/bochum/bochum_000000_000005_leftImg8bit.png "
                                  "(expected gtFine/train/bochum/bochum_000000_000005_gtFine_labelIds.png)"]
    assert tr.unpaired_labels == ["gtFine/train/bochum/bochum_000000_000006_gtFine_labelIds.png"]
    f2 = "gtFine/train/aachen/aachen_000000_000002_gtFine_labelIds.png"
    assert tr.outside_map == {34: [f2], 40: [f2]}
    assert len(tr.size_mismatches) == 1 and "aachen_000000_000003" in tr.size_mismatches[0]
    assert "6x4" in tr.size_mismatches[0] and "3x2" in tr.size_mismatches[0]
    assert len(tr.unreadable) == 1 and "bochum_000000_000007" in tr.unreadable[0]
    text = report.format()
    for needle in ("split train: 6 images, 6 labels, 5 paired", "images without a label (1)",
                   "labels without an image (1)", "34: 1 file(s)", "40: 1 file(s)",
                   "size mismatches (1)", "unreadable files (1)", "RESULT: NOT OK"):
        assert needle in text, needle
    only_val = check_dataset("cityscapes", root=broken, splits=["val"])
    assert only_val.ok and list(only_val.splits) == ["val"] and "RESULT: OK" in only_val.format()


def test_on_bad_error(broken):
    with pytest.raises(BadSampleError, match="bochum_000000_000005_leftImg8bit.png"):
        build_dataset("cityscapes", "train", root=broken)  # image without label, at construction
    (broken / "leftImg8bit/train/bochum/bochum_000000_000005_leftImg8bit.png").unlink()
    ds = build_dataset("cityscapes", "train", root=broken)
    names = [Path(i).name for i, _ in ds.samples]
    with pytest.raises(BadSampleError, match=r"aachen_000000_000002_gtFine_labelIds.png.*34, 40"):
        ds[names.index("aachen_000000_000002_leftImg8bit.png")]
    with pytest.raises(BadSampleError, match=r"aachen_000000_000003_gtFine_labelIds.png.*3x2.*6x4"):
        ds[names.index("aachen_000000_000003_leftImg8bit.png")]
    with pytest.raises(BadSampleError, match="bochum_000000_000007"):
        ds[names.index("bochum_000000_000007_leftImg8bit.png")]
    with pytest.raises(BadSampleError, match="3 bad sample"):
        ds.validate()


def test_on_bad_skip_lazily(broken, caplog):
    ds = build_dataset("cityscapes", "train", root=broken, on_bad="skip")
    assert len(ds) == 5 and [p.kind for p in ds.skipped] == ["missing_label"]
    assert "bochum_000000_000005" in caplog.text
    names = [Path(i).name for i, _ in ds.samples]
    bad = names.index("aachen_000000_000002_leftImg8bit.png")
    item = ds[bad]  # replaced by the next good sample (000003 is bad too: size mismatch)
    assert Path(item["path"]).name == "bochum_000000_000004_leftImg8bit.png"
    assert [p.kind for p in ds.skipped] == ["missing_label", "outside_map", "size_mismatch"]
    seen = [Path(ds[i]["path"]).name for i in range(len(ds))]
    assert len(seen) == 5 and set(seen) == {"aachen_000000_000001_leftImg8bit.png",
                                           "bochum_000000_000004_leftImg8bit.png"}
    assert ds.num_skipped == 4  # + the unreadable label, each counted once
    assert "aachen_000000_000002_gtFine_labelIds.png" in caplog.text


def test_on_bad_skip_validate_upfront(broken):
    ds = build_dataset("cityscapes", "train", root=broken, on_bad="skip")
    problems = ds.validate(num_workers=2)
    assert sorted(p.kind for p in problems) == ["outside_map", "size_mismatch", "unreadable"]
    assert len(ds) == 2 and ds.num_skipped == 4
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), GOOD_TRAIN)
    assert ds.num_skipped == 4  # nothing left to skip lazily
    with pytest.raises(ValueError, match="on_bad"):
        build_dataset("cityscapes", "val", root=broken, on_bad="ignore")


def test_unlisted_values_are_an_explicit_choice(tmp_path):
    """`unlisted: error` reports a value in neither map nor ignore list; `ignore` maps it to 255."""
    write_rgb(tmp_path / "images" / "train" / "a.png", 1, 3)
    write_l(tmp_path / "labels" / "train" / "a.png", [[0, 1, 7]])
    spec = {"name": "t", "type": "folder", "splits": ["train"], "classes": ["x", "y"]}
    for unlisted, expect in (("error", None), ("ignore", [[0, 1, 255]])):
        path = tmp_path / f"{unlisted}.yaml"
        path.write_text(yaml.safe_dump({**spec, "unlisted": unlisted}))
        ds = build_dataset(path, "train", root=tmp_path)
        if expect is None:
            with pytest.raises(BadSampleError, match="outside the map.*: 7"):
                ds[0]
            assert check_dataset(path, root=tmp_path).splits["train"].outside_map == {
                7: ["labels/train/a.png"]}
        else:
            assert ds[0]["label"].tolist() == expect


# ----------------------------------------------------------------------------- stage-2 images

def test_manifest_image_files_to_shards(tmp_path):
    for city, n in (("aachen", 2), ("bremen", 1)):
        for i in range(n):
            cityscapes_tree(tmp_path, "train", city, f"00000{i}_000019", GOOD, image_hw=(8, 8))
    files = manifest_image_files("cityscapes", "train", root=tmp_path)
    assert [f.name for f in files] == ["aachen_000000_000019_leftImg8bit.png",
                                       "aachen_000001_000019_leftImg8bit.png",
                                       "bremen_000000_000019_leftImg8bit.png"]
    index = write_shards(tmp_path, tmp_path / "wds", shard_size=2, files=files)
    assert index.num_samples == 3 and index.layout == "files" and index.counts == [2, 1]
    members = []
    for shard in index.shard_paths:
        with tarfile.open(shard) as tar:
            members += tar.getnames()
            cls = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")]
            assert set(cls) == {b"-1"}  # unlabelled
    keys = sorted(m.rsplit(".", 1)[0] for m in members if m.endswith(".jpg"))
    assert keys == ["leftImg8bit_train_aachen_aachen_000000_000019_leftImg8bit",
                    "leftImg8bit_train_aachen_aachen_000001_000019_leftImg8bit",
                    "leftImg8bit_train_bremen_bremen_000000_000019_leftImg8bit"]
    assert json.loads((tmp_path / "wds" / "train-index.json").read_text())["num_samples"] == 3
    with pytest.raises(ValueError, match="empty"):
        write_shards(tmp_path, tmp_path / "wds2", files=[])


# ----------------------------------------------------------------------------- real CamVid

@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_real_camvid(monkeypatch):
    monkeypatch.setenv("GKD_DATA_ROOT", str(CAMVID.parent))
    sizes = {"train": 305, "val": 101, "test": 171, "train_0006R0": 101, "train_0016E5": 204,
             "seq05vd": 171}
    for split, n in sizes.items():
        ds = build_dataset("camvid", split)
        assert len(ds) == n, split
    ds = build_dataset("camvid", "test")
    allowed = set(range(11)) | {255}
    for i in (0, 85, 170):
        item = ds[i]
        assert item["image"].shape == (3, 360, 480) and item["label"].shape == (360, 480)
        assert set(item["label"].unique().tolist()) <= allowed
        assert Path(item["path"]).name.startswith("Seq05VD_")
    raw = np.array(Image.open(CAMVID / "labels" / "test" / Path(ds.samples[0][1]).name))
    np.testing.assert_array_equal(ds[0]["label"].numpy(), np.where(raw == 11, 255, raw))
    assert check_dataset("camvid", splits="val").ok
