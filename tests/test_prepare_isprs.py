"""`gkd data prepare` for ISPRS Potsdam / Vaihingen on tiny raw layouts written as real .tif files.

Expected values are computed here independently of gkd.data.prepare.isprs: the ISPRS legend as a
colour -> id dict, the mmseg split lists typed again, and the windows as "every multiple of the
stride below the side, clamped to side - tile" (the same set as "shift the border window back").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkd.data import build_dataset
from gkd.data.prepare import REPORT_NAME, PrepareError, prepare_dataset

IGN = 255
# ISPRS 2D semantic labelling legend -> train id (classes in the manifests' order); black = boundary
LEGEND = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4,
          (255, 0, 0): 5}
BLACK = (0, 0, 0)
FOREIGN = [(10, 20, 30), (252, 255, 0)]  # not in the legend (the second: a near-yellow)
W, H, TILE, STRIDE = 40, 30, 16, 8        # 40x30 areas, 16-px tiles at stride 8: border shifts in y

# mmseg's potsdam.py / vaihingen.py split lists (only the areas used here)
POTSDAM_TRAIN_N, POTSDAM_VAL_N = 24, 14
VAIHINGEN_TRAIN_N, VAIHINGEN_VAL_N = 16, 17


# ----------------------------------------------------------------------------- raw files

def write_tif(path: Path, arr: np.ndarray, mode: str = "RGB", **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode=mode).save(path, format="TIFF", **save)


def orthophoto(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def colour_label(seed: int, black: bool, foreign: int = 0, h: int = H, w: int = W
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """A colour label with every legend colour (+ black, + `foreign` pixels of foreign colours)
    -> (rgb [h, w, 3], expected ids [h, w], number of foreign pixels)."""
    colours = list(LEGEND) + ([BLACK] if black else [])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(colours), (h, w))
    pick.flat[: len(colours)] = np.arange(len(colours))  # every colour present
    rgb = np.array(colours, dtype=np.uint8)[pick]
    for k in range(foreign):
        rgb[h - 1, k] = FOREIGN[k % len(FOREIGN)]
    table = {**LEGEND, BLACK: IGN, **{c: IGN for c in FOREIGN}}
    ids = np.array([[table[tuple(int(v) for v in rgb[y, x])] for x in range(w)] for y in range(h)])
    return rgb, ids, foreign


def windows(w: int, h: int, tile: int, stride: int) -> set[tuple[int, int, int, int]]:
    xs = sorted({min(x, w - tile) for x in range(0, w, stride)})
    ys = sorted({min(y, h - tile) for y in range(0, h, stride)})
    return {(x, y, x + tile, y + tile) for x in xs for y in ys}


def make_potsdam(src: Path) -> dict:
    """Potsdam's archive folders: 2_10, 6_7 train; 2_13 val; 9_9 in neither list; 6_7's labels are
    1 px narrower. IRRG nested one level (3_Ortho_IRRG/3_Ortho_IRRG/) and LZW-compressed."""
    truth: dict = {"rgb": {}, "irrg": {}, "eroded": {}, "full": {}}
    for k, area in enumerate(["2_10", "2_13", "6_7", "9_9"]):
        truth["rgb"][area] = orthophoto(10 + k)
        truth["irrg"][area] = orthophoto(20 + k)
        write_tif(src / "2_Ortho_RGB" / f"top_potsdam_{area}_RGB.tif", truth["rgb"][area])
        world = src / "2_Ortho_RGB" / f"top_potsdam_{area}_RGB.tfw"  # georeference: not an image
        world.write_text("0.05\n0\n0\n-0.05\n0\n0\n")
        write_tif(src / "3_Ortho_IRRG" / "3_Ortho_IRRG" / f"top_potsdam_{area}_IRRG.tif",
                  truth["irrg"][area], compression="tiff_lzw")
        lw = W - 1 if area == "6_7" else W
        rgb, ids, nf = colour_label(30 + k, black=True, foreign=3 if area == "2_10" else 0, w=lw)
        write_tif(src / "5_Labels_all_noBoundary" / f"top_potsdam_{area}_label_noBoundary.tif", rgb)
        truth["eroded"][area] = (ids, nf)
        rgb, ids, nf = colour_label(40 + k, black=False, w=lw)
        write_tif(src / "5_Labels_all" / f"top_potsdam_{area}_label.tif", rgb)
        truth["full"][area] = (ids, nf)
    return truth


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def check_tiles(out: Path, split: str, area: str, image: np.ndarray, ids: np.ndarray) -> None:
    """Tile names are the expected windows; each tile is the crop of the source at its window."""
    names = {p.name for p in (out / "img_dir" / split).glob(f"{area}_*.png")}
    wins = windows(image.shape[1], image.shape[0], TILE, STRIDE)
    assert names == {f"{area}_{x0}_{y0}_{x1}_{y1}.png" for x0, y0, x1, y1 in wins}
    for x0, y0, x1, y1 in wins:
        name = f"{area}_{x0}_{y0}_{x1}_{y1}.png"
        np.testing.assert_array_equal(read_png(out / "img_dir" / split / name), image[y0:y1, x0:x1])
        lab = read_png(out / "ann_dir" / split / name)
        assert lab.ndim == 2 and lab.dtype == np.uint8
        np.testing.assert_array_equal(lab, ids[y0:y1, x0:x1])


def reasons(report: dict, text: str) -> list[dict]:
    return [s for s in report["skipped"] if text in s["reason"]]


# ----------------------------------------------------------------------------- tests

def test_windows_cover_every_pixel_with_full_tiles():
    from gkd.data.prepare.isprs import tile_windows
    assert set(tile_windows(W, H, TILE, STRIDE)) == windows(W, H, TILE, STRIDE)
    assert sorted({y0 for _, y0, _, _ in tile_windows(W, H, TILE, STRIDE)}) == [0, 8, 14]
    # stride = tile: mmseg's tiles of a 6000x6000 Potsdam area, 12 x 12 = 144
    assert len(tile_windows(6000, 6000, 512, 512)) == 144
    assert (5488, 5488, 6000, 6000) in tile_windows(6000, 6000, 512, 512)


def test_potsdam_rgb_eroded(tmp_path):
    src, out = tmp_path / "potsdam", tmp_path / "out"
    truth = make_potsdam(src)
    report = prepare_dataset("potsdam_rgb", src, out, tile=TILE, stride=STRIDE)
    saved = json.loads((out / REPORT_NAME).read_text())
    n = len(windows(W, H, TILE, STRIDE))  # per area: x 0, 8, 16, 24; y 0, 8, 14 (shifted)
    assert n == 4 * 3
    assert saved["splits"] == {"train": {"images": n, "labels": n, "areas": 1},
                               "val": {"images": n, "labels": n, "areas": 1}}
    assert saved["manifest"] == "potsdam_rgb" and saved["options"]["labels"] == "eroded"
    assert saved == report.to_dict()
    check_tiles(out, "train", "2_10", truth["rgb"]["2_10"], truth["eroded"]["2_10"][0])
    check_tiles(out, "val", "2_13", truth["rgb"]["2_13"], truth["eroded"]["2_13"][0])
    # the size-mismatched area and the one in neither list are reported, nothing of them written
    (mismatch,) = reasons(saved, "size mismatch")
    assert all(t in mismatch["reason"] for t in ("6_7", "40x30", "39x30"))
    (neither,) = reasons(saved, "in neither the train")
    assert neither["file"].endswith("top_potsdam_9_9_RGB.tif")
    assert not list((out / "img_dir").rglob("6_7_*")) and not list((out / "img_dir").rglob("9_9_*"))
    # every other listed area is missing on disk: reported one by one
    missing = reasons(saved, "is listed in the")
    assert len(missing) == (POTSDAM_TRAIN_N - 2) + (POTSDAM_VAL_N - 1)
    assert len(saved["skipped"]) == len(missing) + 2
    # the foreign colours of 2_10's label: set to 255, their pixel count reported
    (alt,) = saved["altered"]
    assert alt["file"].endswith("top_potsdam_2_10_label_noBoundary.tif")
    assert alt["reason"].startswith(f"{truth['eroded']['2_10'][1]} pixels of 2 colour(s)")
    assert "(252,255,0)" in alt["reason"]


def test_potsdam_full_labels_and_irrg(tmp_path):
    src = tmp_path / "potsdam"
    truth = make_potsdam(src)
    out = tmp_path / "full"
    report = prepare_dataset("potsdam_rgb", src, out, tile=TILE, stride=STRIDE, labels="full")
    assert report.options["labels"] == "full" and report.altered == []
    check_tiles(out, "val", "2_13", truth["rgb"]["2_13"], truth["full"]["2_13"][0])
    out = tmp_path / "irrg"
    prepare_dataset("potsdam_irrg", src, out, tile=TILE, stride=STRIDE)
    check_tiles(out, "train", "2_10", truth["irrg"]["2_10"], truth["eroded"]["2_10"][0])
    ds = build_dataset("potsdam_irrg", "train", root=out)
    assert len(ds) == len(windows(W, H, TILE, STRIDE))
    item = ds[0]
    x0, y0, x1, y1 = map(int, Path(item["path"]).stem.split("_")[2:])
    np.testing.assert_array_equal(item["label"].numpy(), truth["eroded"]["2_10"][0][y0:y1, x0:x1])
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy() * 255,
                               truth["irrg"]["2_10"][y0:y1, x0:x1], atol=1e-3)


def test_default_stride_is_the_tile(tmp_path):
    src = tmp_path / "potsdam"
    make_potsdam(src)
    report = prepare_dataset("potsdam_rgb", src, tmp_path / "out", tile=TILE)
    assert report.options["stride"] == TILE
    names = {p.name for p in (tmp_path / "out" / "img_dir" / "train").iterdir()}
    assert names == {f"2_10_{x}_{y}_{x + TILE}_{y + TILE}.png"
                     for x in (0, 16, 24) for y in (0, 14)}


def make_vaihingen(src: Path) -> dict:
    """Vaihingen archives extracted into folders named after them: top/ and gts_for_participants/
    (area1 only) inside ISPRS_semantic_labeling_Vaihingen/, the COMPLETE and eroded COMPLETE
    ground truth (area1, area2; eroded also area9, which has no orthophoto)."""
    base = src / "ISPRS_semantic_labeling_Vaihingen"
    truth: dict = {"top": {}, "full": {}, "eroded": {}}
    for k, area in enumerate(["area1", "area2"]):
        truth["top"][area] = orthophoto(50 + k)
        write_tif(base / "top" / f"top_mosaic_09cm_{area}.tif", truth["top"][area])
        rgb, ids, _ = colour_label(60 + k, black=False)
        write_tif(src / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE"
                  / f"top_mosaic_09cm_{area}.tif", rgb)
        truth["full"][area] = ids
    for k, area in enumerate(["area1", "area2", "area9"]):
        rgb, ids, _ = colour_label(70 + k, black=True)
        write_tif(src / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
                  / f"top_mosaic_09cm_{area}_noBoundary.tif", rgb)
        truth["eroded"][area] = ids
    rgb, _, _ = colour_label(99, black=False)  # differs from COMPLETE: shows which one is used
    write_tif(base / "gts_for_participants" / "top_mosaic_09cm_area1.tif", rgb)
    return truth


def test_vaihingen_eroded_and_full(tmp_path):
    src = tmp_path / "vaihingen"
    truth = make_vaihingen(src)
    out = tmp_path / "out"
    report = prepare_dataset("vaihingen_irrg", src, out, tile=TILE, stride=STRIDE)
    assert report.options["labels"] == "eroded"
    check_tiles(out, "train", "area1", truth["top"]["area1"], truth["eroded"]["area1"])
    check_tiles(out, "val", "area2", truth["top"]["area2"], truth["eroded"]["area2"])
    (no_image,) = reasons(report.to_dict(), "without an orthophoto")
    assert no_image["file"].endswith("top_mosaic_09cm_area9_noBoundary.tif")
    missing = reasons(report.to_dict(), "is listed in the")
    assert len(missing) == VAIHINGEN_TRAIN_N + VAIHINGEN_VAL_N - 2
    assert len(build_dataset("vaihingen_irrg", "val", root=out)) == len(windows(W, H, TILE, STRIDE))

    out = tmp_path / "full"
    report = prepare_dataset("vaihingen_irrg", src, out, tile=TILE, stride=STRIDE, labels="full")
    check_tiles(out, "train", "area1", truth["top"]["area1"], truth["full"]["area1"])  # COMPLETE
    assert any("several folders" in n and "gts_for_participants" in n for n in report.notes)


def test_unrecognised_layouts_say_what_was_found(tmp_path):
    src = tmp_path / "potsdam"
    make_potsdam(src)
    for p in (src / "3_Ortho_IRRG").rglob("*.tif"):
        p.unlink()
    with pytest.raises(PrepareError, match=r"no Potsdam IRRG orthophotos.*found 4 Potsdam RGB "
                                           r"orthophotos \(2_Ortho_RGB\) in 2_Ortho_RGB"):
        prepare_dataset("potsdam_irrg", src, tmp_path / "out")
    with pytest.raises(PrepareError, match=r"no Vaihingen IRRG orthophotos.*Potsdam RGB"):
        prepare_dataset("vaihingen_irrg", src, tmp_path / "out")
    zips = tmp_path / "zips"
    zips.mkdir()
    (zips / "2_Ortho_RGB.zip").write_bytes(b"PK")
    with pytest.raises(PrepareError, match=r"found 1 archive\(s\) not extracted: 2_Ortho_RGB\.zip"):
        prepare_dataset("potsdam_rgb", zips, tmp_path / "out")
    # two equally large copies of one archive folder: ambiguous
    copy = src / "copy" / "2_Ortho_RGB"
    copy.mkdir(parents=True)
    for p in (src / "2_Ortho_RGB").glob("*.tif"):
        copy.joinpath(p.name).write_bytes(p.read_bytes())
    with pytest.raises(PrepareError, match=r"area 2_10 is found twice"):
        prepare_dataset("potsdam_rgb", src, tmp_path / "out")
    for p in copy.glob("*.tif"):
        p.unlink()
    for p in src.glob("5_Labels_all*/*"):
        p.unlink()
    with pytest.raises(PrepareError, match=r"no labels.*noBoundary"):
        prepare_dataset("potsdam_rgb", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the layout is recognised

    only_bad = tmp_path / "only_bad"  # the one area with an orthophoto has a smaller label
    make_potsdam(only_bad)
    for area in ("2_10", "2_13", "9_9"):
        (only_bad / "2_Ortho_RGB" / f"top_potsdam_{area}_RGB.tif").unlink()
    with pytest.raises(PrepareError, match=r"no area could be tiled; \S*top_potsdam_6_7_RGB\.tif: "
                                           r"area 6_7 \(train\): size mismatch"):
        prepare_dataset("potsdam_rgb", only_bad, tmp_path / "out2")


def test_label_formats_unknown_colour_skip_and_overwrite(tmp_path):
    src = tmp_path / "potsdam"
    truth = make_potsdam(src)
    # 2_13's eroded label with an alpha band (dropped, recorded); 6_7's as single-channel indices
    eroded_2_13 = src / "5_Labels_all_noBoundary/top_potsdam_2_13_label_noBoundary.tif"
    rgb = read_png(eroded_2_13)
    write_tif(eroded_2_13,
              np.dstack([rgb, np.full((H, W), 255, np.uint8)]), mode="RGBA")
    write_tif(src / "5_Labels_all_noBoundary/top_potsdam_6_7_label_noBoundary.tif",
              np.zeros((H, W), np.uint8), mode="L")
    out = tmp_path / "out"
    report = prepare_dataset("potsdam_rgb", src, out, tile=TILE, stride=STRIDE,
                             unknown_colours="skip")
    d = report.to_dict()
    (foreign,) = reasons(d, "outside the ISPRS legend")  # 2_10 left out instead of altered
    assert "2_10" in foreign["reason"] and "(10,20,30)" in foreign["reason"]
    assert "mode is L" in reasons(d, "6_7")[0]["reason"]
    (alpha,) = d["altered"]
    assert "alpha" in alpha["reason"] and alpha["file"].endswith("2_13_label_noBoundary.tif")
    check_tiles(out, "val", "2_13", truth["rgb"]["2_13"], truth["eroded"]["2_13"][0])
    assert d["splits"]["train"] == {"images": 0, "labels": 0, "areas": 0}

    with pytest.raises(PrepareError, match=r"already holds 24 prepared file\(s\)"):
        prepare_dataset("potsdam_rgb", src, out, tile=TILE, stride=STRIDE)
    report = prepare_dataset("potsdam_rgb", src, out, tile=TILE, overwrite=True)
    assert report.splits["val"]["images"] == len(list((out / "img_dir" / "val").iterdir())) == 6
    with pytest.raises(PrepareError, match="inside --src"):  # the raw download is never written to
        prepare_dataset("potsdam_rgb", src, src / "prepared", tile=TILE)
    with pytest.raises(ValueError, match="stride"):
        prepare_dataset("potsdam_rgb", src, out, tile=TILE, stride=TILE + 1)
