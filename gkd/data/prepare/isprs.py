"""`gkd data prepare potsdam_rgb|potsdam_irrg|vaihingen_irrg`: orthophotos → tiles + id labels.

Each preparer finds the raw files under `src`, cuts every labelled area (one orthophoto and its
label tif) into tile×tile windows and writes::

    OUT/img_dir/{train,val}/<area>_<x0>_<y0>_<x1>_<y1>.png   RGB PNG: the orthophoto's 3 bands as
                                                             stored (R-G-B, or IR-R-G for IRRG)
    OUT/ann_dir/{train,val}/<area>_<x0>_<y0>_<x1>_<y1>.png   L PNG, uint8 train ids 0-5, 255 ignore

which the shipped manifests `potsdam_rgb`, `potsdam_irrg` and `vaihingen_irrg` read.

Raw layouts accepted (file names are matched exactly, case-insensitively, `.tif` or `.tiff`; files
are looked for in `src` and in folders down to two levels below it, so each archive's folder may
sit directly in `src` or be nested one level, e.g. `src/2_Ortho_RGB/2_Ortho_RGB/`; `__MACOSX` and
dot folders are not searched):

* Potsdam (areas `<i>_<j>`, e.g. `2_10`): orthophotos `2_Ortho_RGB/top_potsdam_<i>_<j>_RGB.tif`
  or `3_Ortho_IRRG/top_potsdam_<i>_<j>_IRRG.tif`; labels
  `5_Labels_all/top_potsdam_<i>_<j>_label.tif` (full) and
  `5_Labels_all_noBoundary/top_potsdam_<i>_<j>_label_noBoundary.tif` (eroded). The older
  `5_Labels_for_participants[_no_Boundary]` folders hold files of the same names (training areas
  only) and work too. The folder names are not checked, only the file names; `.tfw` world files
  and other files are ignored.
* Vaihingen (areas `area<k>`): orthophotos (IR-R-G) `top/top_mosaic_09cm_area<k>.tif` (the folder
  must be named `top`); full labels: files of the SAME name in any other folder
  (`gts_for_participants/` of ISPRS_semantic_labeling_Vaihingen.zip, the extracted
  ..._ground_truth_COMPLETE archive, or `src` itself); eroded labels
  `top_mosaic_09cm_area<k>_noBoundary.tif` (the ..._ground_truth_eroded_COMPLETE archive).
* When one area's file of one kind is found in several folders (e.g. Vaihingen's
  gts_for_participants, 16 areas, and ground_truth_COMPLETE, 33 areas), the folder holding more
  files of that kind wins; the choice is written in the report's notes. A tie is an error.

Labels: `labels="auto"` (default) uses the eroded ("noBoundary") labels when any are present — the
usual protocol (mmsegmentation's converters use them); their black boundary pixels become 255 —
and the full labels otherwise; `"eroded"` / `"full"` force one kind. The choice is in the report.

Facts used (read, not copied):
* Split lists: mmsegmentation tools/dataset_converters/potsdam.py (24 train / 14 val areas) and
  vaihingen.py (16 / 17 areas). Areas found on disk in neither list, listed areas missing on disk,
  and labels without an orthophoto are recorded as skipped in the report.
* Colour legend (ISPRS 2D semantic labelling): white impervious surfaces, blue building, cyan low
  vegetation, green tree, yellow car, red clutter/background; black = eroded boundary (ignored).
  mmseg maps colours exactly (any other colour silently becomes its ignored index 0). Here a colour
  outside the legend also becomes 255 (`unknown_colours="ignore"`, default), but its pixel count
  and the colours are written to the report for that label file; `unknown_colours="skip"` leaves
  such areas out instead. Whether real label tifs contain such colours is not verified here (one
  public audit script looks for (252, 255, 0) in Potsdam labels).
* Windows: mmseg's converters place windows at multiples of the CLIP size and shift the ones
  crossing the right/bottom border back to end at it; their `--stride_size` (256) only sets how
  many windows are generated, and the extra ones coincide with the shifted border window (same
  file name). So their output is non-overlapping 512×512 tiles plus shifted border tiles: 12×12 =
  144 tiles per 6000×6000 Potsdam area, 24×144 = 3456 train and 14×144 = 2016 val tiles, the
  counts in mmseg's dataset_prepare docs (its Vaihingen counts, 344 / 398, are not re-derived
  here: the area sizes are not known here). Here windows start at multiples of `stride` (plus the
  shifted border window); `stride=None` (default) means `stride=tile`, which gives exactly mmseg's
  tiles. A smaller stride gives overlapping tiles (more training data; overlapping val tiles count
  the shared pixels twice in mIoU). Tile names follow mmseg: `<area>_<x0>_<y0>_<x1>_<y1>`.
* Image sizes: Potsdam orthophotos and labels are 6000×6000, 8-bit, 3 bands (public dataset
  descriptions); 36 Mpx is below PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`,
  about 89.5 Mpx), so the limit is left as it is (it is process-wide state); a file over twice
  the limit raises DecompressionBombError and its area is skipped with the reason. Vaihingen
  areas are smaller (about 2000×2500, not verified per area). An image/label size mismatch skips
  the area with both sizes in the reason (no such Potsdam/Vaihingen pair is known; one public
  issue reports a 5999×6000 Potsdam nDSM, which is not used here).
* Area 7_10 of Potsdam is in mmseg's train list and kept here; some works (GeoSeg/UNetFormer)
  leave it out for "error annotations" (what the error is was not verified).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from gkd.data.prepare.base import IGNORE, READ_ERRORS, PrepareError, PrepareReport, prepare_out_dir, register

log = logging.getLogger(__name__)

SPLITS = ("train", "val")

# ISPRS legend, train-id order (the manifests' `classes`): (colour, name)
LEGEND: tuple[tuple[tuple[int, int, int], str], ...] = (
    ((255, 255, 255), "impervious surfaces"),
    ((0, 0, 255), "building"),
    ((0, 255, 255), "low vegetation"),
    ((0, 255, 0), "tree"),
    ((255, 255, 0), "car"),
    ((255, 0, 0), "clutter"),
)
BOUNDARY = (0, 0, 0)  # black: boundary pixels of the eroded labels -> IGNORE

# Split lists of mmsegmentation's tools/dataset_converters/potsdam.py and vaihingen.py.
POTSDAM_TRAIN = ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10",
                 "5_11", "5_12", "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11",
                 "7_12", "7_7", "7_8", "7_9")
POTSDAM_VAL = ("5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14",
               "5_13", "4_13", "3_14", "7_13")
VAIHINGEN_TRAIN = ("area1", "area11", "area13", "area15", "area17", "area21", "area23", "area26",
                   "area28", "area3", "area30", "area32", "area34", "area37", "area5", "area7")
VAIHINGEN_VAL = ("area6", "area24", "area35", "area16", "area14", "area22", "area10", "area4",
                 "area2", "area20", "area8", "area31", "area33", "area27", "area38", "area12",
                 "area29")

_SKIP_DIRS = ("__MACOSX",)
_SEARCH_DEPTH = 2  # folders below src that are searched (src/a/b/)
_MAX_LISTED_COLOURS = 10


# ============================================================================ raw layout

@dataclass(frozen=True)
class FileKind:
    """One kind of raw file: a name pattern (group 1 = the area id) and an optional folder test."""

    what: str                      # for messages, e.g. "RGB orthophotos (2_Ortho_RGB/...)"
    expected: str                  # the file name of one area, e.g. "top_potsdam_{area}_RGB.tif"
    pattern: re.Pattern[str]
    folder_ok: Callable[[Path], bool] = lambda folder: True

    @property
    def shown(self) -> str:
        """`expected` for messages: `top_potsdam_<area>_RGB.tif`."""
        return self.expected.replace("{area}", "<area>")

    def area(self, path: Path) -> str | None:
        m = self.pattern.fullmatch(path.name)
        return m.group(1) if m and self.folder_ok(path.parent) else None


def _kind(what: str, expected: str, folder_ok: Callable[[Path], bool] | None = None) -> FileKind:
    """A FileKind from its expected name: `{area}` becomes the area group, `.tif` also `.tiff`."""
    stem = expected.removesuffix(".tif").split("/")[-1]
    area = r"(\d+_\d+)" if "potsdam" in stem else r"(area\d+)"
    regex = re.escape(stem).replace(re.escape("{area}"), area) + r"\.tiff?"
    pat = re.compile(regex, re.IGNORECASE)
    return FileKind(what, expected, pat) if folder_ok is None else \
        FileKind(what, expected, pat, folder_ok)


def _is_top(folder: Path) -> bool:
    return folder.name.lower() == "top"


POTSDAM_RGB = _kind("Potsdam RGB orthophotos (2_Ortho_RGB)", "top_potsdam_{area}_RGB.tif")
POTSDAM_IRRG = _kind("Potsdam IRRG orthophotos (3_Ortho_IRRG)", "top_potsdam_{area}_IRRG.tif")
POTSDAM_FULL = _kind("Potsdam full labels (5_Labels_all)", "top_potsdam_{area}_label.tif")
POTSDAM_ERODED = _kind("Potsdam eroded labels (5_Labels_all_noBoundary)",
                       "top_potsdam_{area}_label_noBoundary.tif")
VAIHINGEN_TOP = _kind("Vaihingen IRRG orthophotos (top/)", "top/top_mosaic_09cm_{area}.tif",
                      _is_top)
VAIHINGEN_FULL = _kind("Vaihingen full labels (gts_for_participants/ or ..._ground_truth_COMPLETE)",
                       "top_mosaic_09cm_{area}.tif", lambda folder: not _is_top(folder))
VAIHINGEN_ERODED = _kind("Vaihingen eroded labels (..._ground_truth_eroded_COMPLETE)",
                         "top_mosaic_09cm_{area}_noBoundary.tif")
# Only for describing what was found when a layout is not recognised.
_OTHER_KINDS = (_kind("Potsdam RGBIR orthophotos (4_Ortho_RGBIR)", "top_potsdam_{area}_RGBIR.tif"),)


@dataclass(frozen=True)
class IsprsSpec:
    """What one preparer reads: its orthophoto kind, label kinds and split lists."""

    dataset: str
    image: FileKind
    full: FileKind
    eroded: FileKind
    train: tuple[str, ...]
    val: tuple[str, ...]

    def split_of(self, area: str) -> str | None:
        return "train" if area in self.train else "val" if area in self.val else None


SPECS = {
    "potsdam_rgb": IsprsSpec("potsdam_rgb", POTSDAM_RGB, POTSDAM_FULL, POTSDAM_ERODED,
                             POTSDAM_TRAIN, POTSDAM_VAL),
    "potsdam_irrg": IsprsSpec("potsdam_irrg", POTSDAM_IRRG, POTSDAM_FULL, POTSDAM_ERODED,
                              POTSDAM_TRAIN, POTSDAM_VAL),
    "vaihingen_irrg": IsprsSpec("vaihingen_irrg", VAIHINGEN_TOP, VAIHINGEN_FULL, VAIHINGEN_ERODED,
                                VAIHINGEN_TRAIN, VAIHINGEN_VAL),
}
_ALL_KINDS = (POTSDAM_RGB, POTSDAM_IRRG, POTSDAM_FULL, POTSDAM_ERODED, VAIHINGEN_TOP,
              VAIHINGEN_FULL, VAIHINGEN_ERODED, *_OTHER_KINDS)


def scan_files(src: Path, depth: int = _SEARCH_DEPTH) -> list[Path]:
    """Every file in `src` and its folders down to `depth` levels below it (sorted)."""
    out: list[Path] = []
    for root, dirs, files in os.walk(src):
        level = len(Path(root).relative_to(src).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS
                         and level < depth)
        out.extend(Path(root) / f for f in files)
    return sorted(out)


def find_kind(kind: FileKind, files: list[Path], notes: list[str]) -> dict[str, Path]:
    """area -> file of `kind`. An area found in several folders is taken from the folder holding
    the most files of this kind (noted); a tie raises PrepareError naming the files."""
    by_folder: dict[Path, dict[str, Path]] = {}
    for f in files:
        area = kind.area(f)
        if area is not None:
            by_folder.setdefault(f.parent, {})[area] = f
    if len(by_folder) > 1:
        notes.append(f"{kind.what}: found in several folders: " + ", ".join(
            f"{d} ({len(v)})" for d, v in sorted(by_folder.items())))
    chosen: dict[str, Path] = {}
    for folder, found in sorted(by_folder.items(), key=lambda kv: -len(kv[1])):
        for area, f in found.items():
            if area in chosen:
                if len(by_folder[chosen[area].parent]) == len(found):
                    raise PrepareError(f"{kind.what}: area {area} is found twice in folders of "
                                       f"equal size: {chosen[area]} and {f}; remove one copy")
                continue
            chosen[area] = f
    return chosen


def describe_found(src: Path, files: list[Path]) -> str:
    """What `src` holds, for a PrepareError: counts of each known ISPRS file kind, archives and
    the first entries of `src`."""
    parts = []
    for kind in _ALL_KINDS:
        hits = [f for f in files if kind.area(f) is not None]
        if hits:
            folders = sorted({str(f.parent.relative_to(src)) or "." for f in hits})
            parts.append(f"{len(hits)} {kind.what} in {', '.join(folders[:3])}")
    archives = [f.name for f in files if f.suffix.lower() in (".zip", ".rar", ".7z", ".tar")]
    if archives:
        parts.append(f"{len(archives)} archive(s) not extracted: {', '.join(archives[:5])}")
    entries = sorted(p.name for p in src.iterdir())
    listing = ", ".join(entries[:15])
    if len(entries) > 15:
        listing += f", ... ({len(entries)} entries)"
    return (("found " + "; ".join(parts)) if parts else "found no ISPRS files") + \
        f"; {src} holds: {listing or 'nothing'}"


# ============================================================================ tiling and labels

def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: 0, stride, 2·stride, ... while the window fits, plus one
    window shifted back to end at the border when the last one stops short of it.
    Requires `length >= tile`."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_windows(width: int, height: int, tile: int, stride: int
                 ) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of every window, row by row: every pixel covered, every window full size."""
    return [(x0, y0, x0 + tile, y0 + tile) for y0 in tile_starts(height, tile, stride)
            for x0 in tile_starts(width, tile, stride)]


# The legend's colours use only 0 and 255 per channel: a pixel whose channels are all 0/255 has a
# 3-bit code (r, g, b) -> 4r + 2g + b, mapped by this table; -1 = outside the legend (magenta).
_CODE_TO_ID = np.full(8, -1, dtype=np.int16)
for _tid, ((_r, _g, _b), _) in enumerate(LEGEND):
    _CODE_TO_ID[4 * (_r // 255) + 2 * (_g // 255) + (_b // 255)] = _tid
_CODE_TO_ID[0] = IGNORE  # black boundary


def colours_to_ids(rgb: np.ndarray) -> tuple[np.ndarray, dict[tuple[int, int, int], int]]:
    """Colour label uint8 [H, W, 3] -> (train ids uint8 [H, W] with IGNORE for black and for
    colours outside the legend, {outside colour: pixel count})."""
    pure = np.all((rgb == 0) | (rgb == 255), axis=2)
    code = (rgb[..., 0] >> 7).astype(np.uint8) * 4 + (rgb[..., 1] >> 7) * 2 + (rgb[..., 2] >> 7)
    mapped = _CODE_TO_ID[code]
    outside = ~pure | (mapped < 0)
    ids = np.where(outside, IGNORE, mapped).astype(np.uint8)
    unknown: dict[tuple[int, int, int], int] = {}
    if outside.any():
        packed = rgb[outside].astype(np.int32)
        values, counts = np.unique((packed[:, 0] << 16) | (packed[:, 1] << 8) | packed[:, 2],
                                   return_counts=True)
        unknown = {((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255): int(c)
                   for v, c in zip(values, counts)}
    return ids, unknown


class AreaSkip(Exception):
    """This area cannot be used; the message is the reason recorded in the report."""


def _open(path: Path, what: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except READ_ERRORS as exc:
        raise AreaSkip(f"cannot read {what}: {type(exc).__name__}: {exc}") from exc


def read_orthophoto(path: Path) -> np.ndarray:
    """Orthophoto -> uint8 [H, W, 3], bands as stored. Raises AreaSkip for other formats."""
    with _open(path, "orthophoto") as im:
        if im.mode != "RGB":
            raise AreaSkip(f"orthophoto mode is {im.mode}, expected 8-bit 3-band (RGB)")
        return np.asarray(im)


def read_colour_label(path: Path, report: PrepareReport) -> np.ndarray:
    """Colour label tif -> uint8 [H, W, 3]. RGBA: the alpha band is dropped (recorded);
    P: palette colours; other modes (e.g. already-converted index labels) raise AreaSkip."""
    with _open(path, "label") as im:
        if im.mode == "RGB":
            return np.asarray(im)
        if im.mode == "P":
            return np.asarray(im.convert("RGB"))
        if im.mode == "RGBA":
            arr = np.asarray(im)
            opaque = int((arr[..., 3] == 255).sum())
            report.alter(path, f"label has a 4th (alpha) band, dropped ({opaque} of "
                               f"{arr[..., 3].size} pixels opaque)")
            return np.ascontiguousarray(arr[..., :3])
        raise AreaSkip(f"label mode is {im.mode}, expected an RGB colour label (ISPRS legend); "
                       "single-channel files are already converted labels, not the raw ones")


def _format_colours(unknown: dict[tuple[int, int, int], int]) -> str:
    top = sorted(unknown.items(), key=lambda kv: -kv[1])[:_MAX_LISTED_COLOURS]
    more = len(unknown) - len(top)
    return ", ".join(f"({r},{g},{b}): {n}" for (r, g, b), n in top) + \
        (f", ... {more} more colours" if more > 0 else "")


# ============================================================================ the preparer

@dataclass
class _Plan:
    """Which files one run uses: split -> [(area, orthophoto, label)]; label kind."""

    areas: dict[str, list[tuple[str, Path, Path]]]
    label_kind: str  # "eroded" | "full"


def _choose_labels(spec: IsprsSpec, files: list[Path], labels: str, notes: list[str],
                   src: Path) -> tuple[str, dict[str, Path]]:
    """("eroded" | "full", area -> label file): `auto` takes the eroded labels when any exist."""
    for kind in (("eroded", "full") if labels == "auto" else (labels,)):
        found = find_kind(spec.eroded if kind == "eroded" else spec.full, files, notes)
        if found:
            return kind, found
    wanted = {"eroded": [spec.eroded], "full": [spec.full]}.get(labels, [spec.eroded, spec.full])
    raise PrepareError(f"{spec.dataset}: no labels under {src} (labels={labels!r}): no "
                       + " and no ".join(f"{k.what}: {k.shown}" for k in wanted) + "; "
                       + describe_found(src, files))


def plan_areas(spec: IsprsSpec, src: Path, labels: str, report: PrepareReport) -> _Plan:
    """Find the files, pair orthophotos with labels, assign splits; record every area left out."""
    files = scan_files(src)
    images = find_kind(spec.image, files, report.notes)
    if not images:
        raise PrepareError(f"{spec.dataset}: no {spec.image.what}: {spec.image.shown} under {src} "
                           f"(searched {_SEARCH_DEPTH} folder levels deep); "
                           + describe_found(src, files))
    kind, label_files = _choose_labels(spec, files, labels, report.notes, src)
    areas: dict[str, list[tuple[str, Path, Path]]] = {s: [] for s in SPLITS}
    for area in sorted(set(images) | set(label_files), key=_area_key):
        split = spec.split_of(area)
        image, label = images.get(area), label_files.get(area)
        if image is None:
            report.skip(label, f"area {area}: {kind} label without an orthophoto"
                               + ("" if split else " (and in neither split list)"))
        elif split is None:
            report.skip(image, f"area {area} is in neither the train nor the val list "
                               "(mmseg's split)")
        elif label is None:
            report.skip(image, f"area {area} ({split}): no {kind} label found")
        else:
            areas[split].append((area, image, label))
    for split, listed in (("train", spec.train), ("val", spec.val)):
        for area in sorted(set(listed) - set(images) - set(label_files), key=_area_key):
            report.skip(spec.image.expected.format(area=area),
                        f"area {area} is listed in the {split} split but missing: no orthophoto "
                        f"and no {kind} label under {src}")
    return _Plan(areas, kind)


def _area_key(area: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", area))


def _prepare_out(src: Path, out: Path, overwrite: bool, report: PrepareReport) -> None:
    """`prepare_out_dir`'s checks (out outside src; files of an earlier run are an error unless
    `overwrite`, which removes them), then the four output folders."""
    prepare_out_dir(src, out, ("img_dir", "ann_dir"), overwrite, report)
    for top in ("img_dir", "ann_dir"):
        for split in SPLITS:
            (out / top / split).mkdir(parents=True, exist_ok=True)


def cut_area(area: str, image_path: Path, label_path: Path, out_split: tuple[Path, Path],
             tile: int, stride: int, unknown_colours: str, report: PrepareReport) -> int:
    """Read one area, check it, write its tiles to (img folder, ann folder). Returns the tile count.
    Raises AreaSkip (nothing written) when the area cannot be used."""
    image = read_orthophoto(image_path)
    rgb = read_colour_label(label_path, report)
    if image.shape[:2] != rgb.shape[:2]:
        raise AreaSkip(f"size mismatch: orthophoto {image.shape[1]}x{image.shape[0]}, label "
                       f"{label_path.name} {rgb.shape[1]}x{rgb.shape[0]} (width x height)")
    height, width = image.shape[:2]
    if height < tile or width < tile:
        raise AreaSkip(f"{width}x{height} is smaller than one {tile}x{tile} tile")
    ids, unknown = colours_to_ids(rgb)
    if unknown:
        n = sum(unknown.values())
        if unknown_colours == "skip":
            raise AreaSkip(f"{n} label pixels of {len(unknown)} colour(s) outside the ISPRS "
                           f"legend in {label_path.name}: {_format_colours(unknown)}")
        report.alter(label_path, f"{n} pixels of {len(unknown)} colour(s) outside the ISPRS "
                                 f"legend set to {IGNORE}: {_format_colours(unknown)}")
    img_dir, ann_dir = out_split
    windows = tile_windows(width, height, tile, stride)
    for x0, y0, x1, y1 in windows:
        name = f"{area}_{x0}_{y0}_{x1}_{y1}.png"
        Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]), mode="RGB").save(img_dir / name)
        Image.fromarray(np.ascontiguousarray(ids[y0:y1, x0:x1]), mode="L").save(ann_dir / name)
    return len(windows)


def _check_options(tile: int, stride: int | None, labels: str, unknown_colours: str) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    stride = tile if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= tile:
        raise ValueError(f"stride must be an integer in [1, tile={tile}] (a larger stride leaves "
                         f"pixels uncovered), got {stride!r}")
    if labels not in ("auto", "eroded", "full"):
        raise ValueError(f"labels must be 'auto', 'eroded' or 'full', got {labels!r}")
    if unknown_colours not in ("ignore", "skip"):
        raise ValueError(f"unknown_colours must be 'ignore' or 'skip', got {unknown_colours!r}")
    return stride


def prepare_isprs(spec: IsprsSpec, src: Path, out: Path, *, tile: int = 512,
                  stride: int | None = None, labels: str = "auto",
                  unknown_colours: str = "ignore", overwrite: bool = False) -> PrepareReport:
    """Tile every labelled area of `spec`'s dataset under `src` into `out` (see the module doc).

    tile, stride: window size and step in pixels (stride None = tile: mmseg's tiles).
    labels: "auto" | "eroded" | "full". unknown_colours: "ignore" (-> 255, reported) | "skip".
    overwrite: remove tiles left in `out` by an earlier run instead of stopping.
    """
    stride = _check_options(tile, stride, labels, unknown_colours)
    src, out = Path(src), Path(out)
    report = PrepareReport(dataset=spec.dataset, src=str(src), out=str(out), manifest=spec.dataset)
    plan = plan_areas(spec, src, labels, report)
    report.version = f"{plan.label_kind} labels" + (" (noBoundary)" if plan.label_kind == "eroded"
                                                    else "")
    report.options = {"tile": tile, "stride": stride, "labels": plan.label_kind,
                      "labels_requested": labels, "unknown_colours": unknown_colours,
                      "overwrite": overwrite}
    _prepare_out(src, out, overwrite, report)
    planned_skips = len(report.skipped)
    for split in SPLITS:
        dirs = (out / "img_dir" / split, out / "ann_dir" / split)
        tiles = areas = 0
        for area, image, label in plan.areas[split]:
            try:
                n = cut_area(area, image, label, dirs, tile, stride, unknown_colours, report)
            except AreaSkip as exc:
                report.skip(image, f"area {area} ({split}): {exc}")
                continue
            log.info("%s %s: %d tiles", spec.dataset, area, n)
            tiles, areas = tiles + n, areas + 1
        report.splits[split] = {"images": tiles, "labels": tiles, "areas": areas}
    if not any(c["images"] for c in report.splits.values()):
        why = report.skipped[planned_skips:] or report.skipped  # the areas' own reasons first
        raise PrepareError(f"{spec.dataset}: no area could be tiled; " + "; ".join(
            f"{s['file']}: {s['reason']}" for s in why[:10]))
    report.notes.append(f"{plan.label_kind} labels: black boundary pixels and colours outside the "
                        f"ISPRS legend are {IGNORE} in ann_dir")
    return report


def _make_preparer(spec: IsprsSpec) -> Callable[..., PrepareReport]:
    def preparer(src: Path, out: Path, *, tile: int = 512, stride: int | None = None,
                 labels: str = "auto", unknown_colours: str = "ignore",
                 overwrite: bool = False) -> PrepareReport:
        return prepare_isprs(spec, src, out, tile=tile, stride=stride, labels=labels,
                             unknown_colours=unknown_colours, overwrite=overwrite)
    preparer.__name__ = f"prepare_{spec.dataset}"
    preparer.__doc__ = f"`gkd data prepare {spec.dataset}`: see `prepare_isprs`."
    return preparer


for _name, _spec in SPECS.items():
    register(_name)(_make_preparer(_spec))
