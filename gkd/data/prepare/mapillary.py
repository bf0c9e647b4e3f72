"""``mapillary`` (``version`` required, ``half_res``, ``copy``, ``overwrite``): Mapillary Vistas
v1.2 or v2.0 class indices → the 19 Cityscapes train ids, by class NAME (`MAPILLARY_CLASSES`)::

    OUT/images/{train,val}/<key>.jpg   link to the raw image (copy with copy=True; with
                                       half_res a half-size JPEG, quality 95)
    OUT/labels/{train,val}/<key>.png   single-channel uint8 train ids, 255 = ignore

Facts relied on (read in public code, not copied):

* Mapillary Vistas archives: v1.2 (research edition) holds ``config.json`` and
  ``{training,validation}/{images,labels,instances,panoptic}``; the v2.0 archive holds
  ``config_v1.2.json``, ``config_v2.0.json``, ``{training,validation}/images`` and
  ``{training,validation}/{v1.2,v2.0}/{labels,instances,panoptic,...}`` (mmsegmentation's
  projects/Mapillary_dataset docs; Mask2Former's register_mapillary_vistas.py; several dataset
  loaders). A config is ``{"labels": [{"name", "readable", "color", "instances", "evaluate"},
  ...], ...}`` whose list order is the label PNGs' palette index (mapillary/mapillary_vistas
  evaluation reads ``config['labels']``). v1.2 lists 66 labels, v2.0 124 (mmsegmentation
  mmseg/datasets/mapillary.py: MapillaryDataset_v1 / _v2). The v2.0 readable name
  "Lane Marking (only) - Test" (sic) is spelled as in those lists. NOT verified: whether a v1.2
  download's ``config.json`` carries a version field, and whether v1.1 and v1.2 configs differ
  (both list 66 labels; this module cannot tell them apart and calls both v1.2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gkd.data.prepare.base import (IGNORE, READ_ERRORS, PrepareError, PrepareReport, Skip, header_size,
                                   listing, place_image, prepare_out_dir, read_index_label, register,
                                   size_text, unpaired_labels, walk, write_label_png)
from gkd.data.prepare.cityscapes import TRAIN_ID

# Mapillary readable label name → Cityscapes class (None = ignored, 255), in config order.
# v1.2: the decisions of the earlier data_manifests/mapillary.yaml (the DG literature's 66 → 19
# mapping): road also takes "Lane Marking - General" and "Manhole", sidewalk takes "Curb", pole
# takes "Utility Pole", rider the three rider classes, traffic sign = "Traffic Sign (Front)";
# every class without a one-to-one Cityscapes counterpart is ignored (bike lane, service lane,
# parking, crosswalk, pedestrian area, guard rail, billboard, street light, sign backs, ...).
_V12 = (
    ("Bird", None), ("Ground Animal", None), ("Curb", "sidewalk"), ("Fence", "fence"),
    ("Guard Rail", None), ("Barrier", None), ("Wall", "wall"), ("Bike Lane", None),
    ("Crosswalk - Plain", None), ("Curb Cut", None), ("Parking", None), ("Pedestrian Area", None),
    ("Rail Track", None), ("Road", "road"), ("Service Lane", None), ("Sidewalk", "sidewalk"),
    ("Bridge", None), ("Building", "building"), ("Tunnel", None), ("Person", "person"),
    ("Bicyclist", "rider"), ("Motorcyclist", "rider"), ("Other Rider", "rider"),
    ("Lane Marking - Crosswalk", None), ("Lane Marking - General", "road"), ("Mountain", None),
    ("Sand", None), ("Sky", "sky"), ("Snow", None), ("Terrain", "terrain"),
    ("Vegetation", "vegetation"), ("Water", None), ("Banner", None), ("Bench", None),
    ("Bike Rack", None), ("Billboard", None), ("Catch Basin", None), ("CCTV Camera", None),
    ("Fire Hydrant", None), ("Junction Box", None), ("Mailbox", None), ("Manhole", "road"),
    ("Phone Booth", None), ("Pothole", None), ("Street Light", None), ("Pole", "pole"),
    ("Traffic Sign Frame", None), ("Utility Pole", "pole"), ("Traffic Light", "traffic light"),
    ("Traffic Sign (Back)", None), ("Traffic Sign (Front)", "traffic sign"), ("Trash Can", None),
    ("Bicycle", "bicycle"), ("Boat", None), ("Bus", "bus"), ("Car", "car"), ("Caravan", None),
    ("Motorcycle", "motorcycle"), ("On Rails", "train"), ("Other Vehicle", None),
    ("Trailer", None), ("Truck", "truck"), ("Wheeled Slow", None), ("Car Mount", None),
    ("Ego Vehicle", None), ("Unlabeled", None),
)
# v2.0 splits several v1.2 classes; each part keeps its v1.2 parent's decision:
#   * the lane-marking kinds (dashed, straight, zigzag, ambiguous, arrows, give way, hatched,
#     other, stop line, symbols, text; also the "(only)" markings) → road, as "Lane Marking -
#     General"; "Lane Marking - Crosswalk" and "Lane Marking (only) - Crosswalk" → ignored, as v1.2;
#   * the six traffic-light kinds → traffic light; traffic-sign fronts (front, direction front,
#     temporary front, parking) → traffic sign; backs and "Traffic Sign - Ambiguous" (front or
#     back unknown) → ignored, as "Traffic Sign (Back)";
#   * the barrier kinds (ambiguous, concrete block, road median, road side, lane separator,
#     temporary) → ignored, as "Barrier"; the signage kinds → ignored, as "Billboard".
# Open choices (v2.0 classes with no v1.2 parent), documented here:
#   * "Garage" → building (a building structure); "Person Group" → person (Cityscapes draws
#     person groups with the person label); "Pole Group" → ignored (Cityscapes' polegroup has
#     train id 255); "Vehicle Group" → ignored (it may mix cars, trucks and buses);
#   * "Driveway", "Parking Aisle", "Road Shoulder", "Traffic Island" → ignored, like the v1.2
#     flat classes without a one-to-one counterpart (parking, service lane, pedestrian area),
#     although Cityscapes' sidewalk definition includes traffic islands;
#   * "Parking Meter", "Traffic Cone", "Water Valve", "Dynamic", "Ground", "Static" → ignored.
_LANE = "road"
_V20 = (
    ("Bird", None), ("Ground Animal", None), ("Ambiguous Barrier", None), ("Concrete Block", None),
    ("Curb", "sidewalk"), ("Fence", "fence"), ("Guard Rail", None), ("Barrier", None),
    ("Road Median", None), ("Road Side", None), ("Lane Separator", None),
    ("Temporary Barrier", None), ("Wall", "wall"), ("Bike Lane", None),
    ("Crosswalk - Plain", None), ("Curb Cut", None), ("Driveway", None), ("Parking", None),
    ("Parking Aisle", None), ("Pedestrian Area", None), ("Rail Track", None), ("Road", "road"),
    ("Road Shoulder", None), ("Service Lane", None), ("Sidewalk", "sidewalk"),
    ("Traffic Island", None), ("Bridge", None), ("Building", "building"), ("Garage", "building"),
    ("Tunnel", None), ("Person", "person"), ("Person Group", "person"), ("Bicyclist", "rider"),
    ("Motorcyclist", "rider"), ("Other Rider", "rider"),
    ("Lane Marking - Dashed Line", _LANE), ("Lane Marking - Straight Line", _LANE),
    ("Lane Marking - Zigzag Line", _LANE), ("Lane Marking - Ambiguous", _LANE),
    ("Lane Marking - Arrow (Left)", _LANE), ("Lane Marking - Arrow (Other)", _LANE),
    ("Lane Marking - Arrow (Right)", _LANE),
    ("Lane Marking - Arrow (Split Left or Straight)", _LANE),
    ("Lane Marking - Arrow (Split Right or Straight)", _LANE),
    ("Lane Marking - Arrow (Straight)", _LANE), ("Lane Marking - Crosswalk", None),
    ("Lane Marking - Give Way (Row)", _LANE), ("Lane Marking - Give Way (Single)", _LANE),
    ("Lane Marking - Hatched (Chevron)", _LANE), ("Lane Marking - Hatched (Diagonal)", _LANE),
    ("Lane Marking - Other", _LANE), ("Lane Marking - Stop Line", _LANE),
    ("Lane Marking - Symbol (Bicycle)", _LANE), ("Lane Marking - Symbol (Other)", _LANE),
    ("Lane Marking - Text", _LANE), ("Lane Marking (only) - Dashed Line", _LANE),
    ("Lane Marking (only) - Crosswalk", None), ("Lane Marking (only) - Other", _LANE),
    ("Lane Marking (only) - Test", _LANE), ("Mountain", None), ("Sand", None), ("Sky", "sky"),
    ("Snow", None), ("Terrain", "terrain"), ("Vegetation", "vegetation"), ("Water", None),
    ("Banner", None), ("Bench", None), ("Bike Rack", None), ("Catch Basin", None),
    ("CCTV Camera", None), ("Fire Hydrant", None), ("Junction Box", None), ("Mailbox", None),
    ("Manhole", "road"), ("Parking Meter", None), ("Phone Booth", None), ("Pothole", None),
    ("Signage - Advertisement", None), ("Signage - Ambiguous", None), ("Signage - Back", None),
    ("Signage - Information", None), ("Signage - Other", None), ("Signage - Store", None),
    ("Street Light", None), ("Pole", "pole"), ("Pole Group", None), ("Traffic Sign Frame", None),
    ("Utility Pole", "pole"), ("Traffic Cone", None),
    ("Traffic Light - General (Single)", "traffic light"),
    ("Traffic Light - Pedestrians", "traffic light"),
    ("Traffic Light - General (Upright)", "traffic light"),
    ("Traffic Light - General (Horizontal)", "traffic light"),
    ("Traffic Light - Cyclists", "traffic light"), ("Traffic Light - Other", "traffic light"),
    ("Traffic Sign - Ambiguous", None), ("Traffic Sign (Back)", None),
    ("Traffic Sign - Direction (Back)", None), ("Traffic Sign - Direction (Front)", "traffic sign"),
    ("Traffic Sign (Front)", "traffic sign"), ("Traffic Sign - Parking", "traffic sign"),
    ("Traffic Sign - Temporary (Back)", None), ("Traffic Sign - Temporary (Front)", "traffic sign"),
    ("Trash Can", None), ("Bicycle", "bicycle"), ("Boat", None), ("Bus", "bus"), ("Car", "car"),
    ("Caravan", None), ("Motorcycle", "motorcycle"), ("On Rails", "train"),
    ("Other Vehicle", None), ("Trailer", None), ("Truck", "truck"), ("Vehicle Group", None),
    ("Wheeled Slow", None), ("Water Valve", None), ("Car Mount", None), ("Dynamic", None),
    ("Ego Vehicle", None), ("Ground", None), ("Static", None), ("Unlabeled", None),
)
# version → ((readable name, train id or 255), ...) in config order (66 and 124 entries)
MAPILLARY_CLASSES: dict[str, tuple[tuple[str, int], ...]] = {
    v: tuple((name, IGNORE if cls is None else TRAIN_ID[cls]) for name, cls in table)
    for v, table in (("v1.2", _V12), ("v2.0", _V20))
}
MAPILLARY_VERSIONS = ("v1.2", "v2.0")
_MAPILLARY_CONFIGS = {"v1.2": ("config_v1.2.json", "config.json"), "v2.0": ("config_v2.0.json", "config.json")}
_MAPILLARY_SPLITS = (("training", "train"), ("validation", "val"))
_MAPILLARY_LABEL_DIRS = {"v1.2": ("v1.2/labels", "labels"), "v2.0": ("v2.0/labels",)}
# JPEG quality of half-resolution images: the raw images are JPEGs already, so a second encoding
# must add little error; at 95 it is far below what the test-time resize (1024x512) removes,
# while the files stay JPEG (the manifest reads .jpg, keys unchanged).
HALF_RES_JPEG_QUALITY = 95


@dataclass
class _MapillaryConfig:
    """One config file found on disk: its readable label names (index order) and the version
    recognised from their number (None when neither 66 nor 124)."""

    file: str
    names: list[str]
    version: str | None
    declared: str | None  # the file's own "version" field, if any

    def describe(self) -> str:
        v = f"→ {self.version}" if self.version else "→ not a known version"
        d = f", \"version\": {self.declared!r}" if self.declared is not None else ""
        return f"{self.file} ({len(self.names)} labels {v}{d})"


def _read_mapillary_config(path: Path) -> _MapillaryConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        labels = data["labels"]
        names = [str(lab["readable"]) for lab in labels]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrepareError(f"mapillary: cannot read the label list of {path} (expected "
                           f"{{\"labels\": [{{\"readable\": ...}}, ...]}}): {type(exc).__name__}: "
                           f"{exc}") from exc
    by_count = {len(MAPILLARY_CLASSES[v]): v for v in MAPILLARY_VERSIONS}
    declared = data.get("version") if isinstance(data, dict) else None
    return _MapillaryConfig(path.name, names, by_count.get(len(names)),
                            None if declared is None else str(declared))


def _mapillary_found(src: Path, configs: list[_MapillaryConfig]) -> str:
    """What the raw folder holds, for a PrepareError."""
    folders = [f"{split}/{d}" for split, _ in _MAPILLARY_SPLITS
               for d in ("images", "labels", "v1.2/labels", "v2.0/labels") if (src / split / d).is_dir()]
    return (f"config files: {', '.join(c.describe() for c in configs) or 'none'}; "
            f"folders: {', '.join(folders) or 'none'}; {src} holds: {listing(src)}")


def _normalise_version(version: str | None) -> str:
    v = None if version is None else ("v" + str(version).lstrip("vV"))
    if v not in MAPILLARY_VERSIONS:
        raise PrepareError("mapillary: --version is required and must be one of "
                           f"{', '.join(MAPILLARY_VERSIONS)} (got {version!r}); v1.2 has 66 "
                           "classes, v2.0 124 — the G→M benchmark uses v1.2")
    return v


def find_mapillary_config(src: Path, version: str) -> _MapillaryConfig:
    """The config file of `version` under `src`; PrepareError listing what was found otherwise
    (config files with their label counts, label folders)."""
    names = ("config.json", "config_v1.2.json", "config_v2.0.json")
    configs = [_read_mapillary_config(src / n) for n in names if (src / n).is_file()]
    for wanted in _MAPILLARY_CONFIGS[version]:
        for c in configs:
            if c.file == wanted and c.version == version:
                return c
    if not configs:
        raise PrepareError(f"mapillary: no config.json / config_v1.2.json / config_v2.0.json in "
                           f"{src}: is it the folder the archive extracted to? Found: "
                           + _mapillary_found(src, configs))
    recognised = sorted({c.version for c in configs if c.version})
    what = (f"found version(s) {', '.join(recognised)}" if recognised
            else "the version cannot be recognised (v1.2 configs list 66 labels, v2.0 124)")
    raise PrepareError(f"mapillary: --version {version} is not in {src}: {what}. Found: "
                       + _mapillary_found(src, configs))


def mapillary_lut(config: _MapillaryConfig, version: str) -> np.ndarray:
    """Raw index → train id, int16 [256]; -1 for indices beyond the config's labels.
    Every name of the config must be in `MAPILLARY_CLASSES[version]` (PrepareError otherwise)."""
    table = dict(MAPILLARY_CLASSES[version])
    unknown = [n for n in config.names if n not in table]
    if unknown:
        raise PrepareError(f"mapillary: {config.file} names {len(unknown)} label(s) unknown to the "
                           f"{version} table (gkd.data.prepare.MAPILLARY_CLASSES): "
                           + ", ".join(repr(n) for n in unknown[:20]))
    lut = np.full(256, -1, dtype=np.int16)
    for index, name in enumerate(config.names[:256]):
        lut[index] = table[name]
    return lut


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _mapillary_split_dirs(src: Path, version: str, config: _MapillaryConfig,
                          report: PrepareReport) -> list[tuple[str, Path, Path]]:
    """(output split, image folder, label folder) of each split present."""
    found = []
    for raw, split in _MAPILLARY_SPLITS:
        images = src / raw / "images"
        if not images.is_dir():
            report.notes.append(f"{raw}/images not found: split {split} not prepared")
            continue
        labels = next((src / raw / d for d in _MAPILLARY_LABEL_DIRS[version]
                       if (src / raw / d).is_dir()), None)
        if labels is None:
            tried = " or ".join(f"{raw}/{d}" for d in _MAPILLARY_LABEL_DIRS[version])
            raise PrepareError(f"mapillary {version}: {raw}/images is there but no {tried}. Found: "
                               + _mapillary_found(src, [config]))
        report.notes.append(f"{split}: images {_rel(images, src)}, labels {_rel(labels, src)}")
        found.append((split, images, labels))
    if not found:
        raise PrepareError(f"mapillary: no training/images or validation/images in {src}. Found: "
                           + _mapillary_found(src, [config]))
    if (src / "testing").is_dir():
        report.notes.append("testing/ has no public labels: not prepared")
    return found


def _half_size(wh: tuple[int, int]) -> tuple[int, int]:
    return max(1, wh[0] // 2), max(1, wh[1] // 2)


def _mapillary_pair(image: Path, label: Path, dst_image: Path, dst_label: Path, lut: np.ndarray,
                    config: _MapillaryConfig, half_res: bool, copy: bool) -> None:
    """Check one pair and write its image (link, copy or half-size JPEG) and train-id label."""
    wh = header_size(image)
    raw = read_index_label(label)
    if (raw.shape[1], raw.shape[0]) != wh:
        raise Skip(label, f"label is {size_text((raw.shape[1], raw.shape[0]))} but image "
                          f"{image} is {size_text(wh)}")
    mapped = lut[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0]).tolist()
        raise Skip(label, f"label indices {bad[:10]} are outside the {len(config.names)} labels "
                          f"of {config.file}")
    ids = mapped.astype(np.uint8)
    if half_res:
        size = _half_size(wh)
        try:
            with Image.open(image) as im:
                # PIL's bilinear resize widens its filter when shrinking: antialiased.
                small = im.convert("RGB").resize(size, Image.BILINEAR)
        except READ_ERRORS as exc:
            raise Skip(image, f"unreadable image: {type(exc).__name__}: {exc}") from exc
        dst_image.parent.mkdir(parents=True, exist_ok=True)
        small.save(dst_image, quality=HALF_RES_JPEG_QUALITY)
        ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))  # ids: never blended
    else:
        place_image(image, dst_image, copy)
    write_label_png(dst_label, ids)


@register("mapillary")
def prepare_mapillary(src: Path, out: Path, *, version: str | None = None, half_res: bool = False,
                      copy: bool = False, overwrite: bool = False) -> PrepareReport:
    """Mapillary Vistas `version` (v1.2 | v2.0, required) → `out/images|labels/{train,val}` with the
    19 Cityscapes train ids (see the module docstring). `half_res`: half width and height
    (bilinear, antialiased image as JPEG quality 95; nearest labels), as the DG literature often
    evaluates Mapillary; `copy`: copy the images instead of linking them."""
    version = _normalise_version(version)
    src, out = Path(src), Path(out)
    config = find_mapillary_config(src, version)
    lut = mapillary_lut(config, version)
    report = PrepareReport("mapillary", str(src), str(out), "mapillary", version=version,
                           options={"config": config.file, "half_res": bool(half_res),
                                    "copy": bool(copy), "overwrite": bool(overwrite)})
    splits = _mapillary_split_dirs(src, version, config, report)
    prepare_out_dir(src, out, ("images", "labels"), overwrite, report)
    for split, image_dir, label_dir in splits:
        images, labels = walk(image_dir, (".jpg",)), walk(label_dir, (".png",))
        done = 0
        for key, image in images.items():
            if key not in labels:
                report.skip(image, f"no label file {label_dir / (key + '.png')}")
                continue
            try:
                _mapillary_pair(image, labels[key], out / "images" / split / f"{key}.jpg",
                                out / "labels" / split / f"{key}.png", lut, config,
                                half_res, copy)
                done += 1
            except Skip as s:
                report.skip(s.file, s.reason)
        unpaired_labels(labels, images, report)
        report.splits[split] = {"images": done, "labels": done}
    report.notes.append(f"labels: {config.file} class indices mapped by name to the 19 Cityscapes "
                        f"train ids (gkd.data.prepare.MAPILLARY_CLASSES['{version}']), "
                        f"{IGNORE} = ignored")
    return report
