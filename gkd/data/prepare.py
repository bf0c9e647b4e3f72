"""`gkd data prepare <dataset>`: raw downloads → folders that a shipped manifest reads, plus a JSON report.

Each preparer takes the raw dataset folder `src` (as the official archives extract) and an output
folder `out`, writes a manifest-compatible layout into `out` (or, for datasets whose raw layout is
already what the manifest reads, only checks it), and returns a `PrepareReport`: counts per split,
every skipped or altered file with the reason, the manifest to read `out` with, and notes.
`prepare_dataset` dispatches by name and writes the report to `out/prepare_report.json`.

A raw folder whose dataset version cannot be recognised is a `PrepareError` that says what was found.

Preparers here (the ISPRS ones are in `gkd.data.prepare_isprs`):

* ``mapillary`` (``version`` required, ``half_res``, ``copy``, ``overwrite``): Mapillary Vistas
  v1.2 or v2.0 class indices → the 19 Cityscapes train ids, by class NAME (`MAPILLARY_CLASSES`)::

      OUT/images/{train,val}/<key>.jpg   link to the raw image (copy with copy=True; with
                                         half_res a half-size JPEG, quality 95)
      OUT/labels/{train,val}/<key>.png   single-channel uint8 train ids, 255 = ignore

* ``gta5`` (``on_mismatch`` skip|resize, ``copy``, ``overwrite``): palette labels read as indices::

      OUT/images/<split>/<id>.png        link to the raw frame (copy with copy=True)
      OUT/labels/<split>/<id>.png        single-channel uint8 Cityscapes label ids (as raw)

  split = train/val/test from ``split.mat`` when present, else everything in ``train``.
* ``cityscapes``, ``acdc``, ``bdd100k``: layout checks. Nothing is written but the report; the raw
  folder is read as it is (``data.root=SRC``). Problems (unpaired files, values outside the map,
  size mismatches) are listed in ``report.problems`` (the CLI then exits 1).

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
* GTA5 ("Playing for Data"): ``images/<5-digit>.png`` and ``labels/<5-digit>.png``, labels are
  P-mode PNGs whose indices are Cityscapes label ids; ``split.mat`` holds ``trainIds``, ``valIds``,
  ``testIds`` as column vectors of 1-based frame numbers (a public GTA5 loader reads
  ``split[mode + "Ids"][:, 0]`` and opens ``'%05d.png' % id``; the same loader leaves out frames
  15188, 17705 and 20801-20860 for image/label size mismatches — not verified here, every
  mismatch is found by comparing sizes).
* BDD100K: the 10k semantic segmentation release is ``images/10k/{train,val,test}`` and
  ``labels/sem_seg/masks/{train,val}``; the older release is ``seg/images/{train,val,test}`` and
  ``seg/labels/{train,val}/<name>_train_id.png`` (mmsegmentation's old BDD100KDataset and other
  loaders use that suffix).
* ACDC: ``rgb_anon/<condition>/{train,val,test}/<sequence>/..._rgb_anon.png`` and
  ``gt/<condition>/{train,val}/...`` (test labels are not public).
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch-free import of this module for the CLI
    from gkd.data.segmentation import SplitCheck

log = logging.getLogger(__name__)

REPORT_NAME = "prepare_report.json"
IGNORE = 255
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class PrepareError(ValueError):
    """The raw folder is not what the preparer expects (unknown version, missing parts); says what it found."""


@dataclass
class PrepareReport:
    """What a preparer did. `splits`: split → {"images": n, "labels": n, ...}; `skipped` / `altered`:
    one {"file", "reason"} per file left out or changed (e.g. a label resized to its image);
    `problems`: what a layout check found wrong ({"split", "file", "reason"}); `root`: the folder to
    read with the manifest (`out` for preparers that write a layout, `src` for layout checks)."""

    dataset: str
    src: str
    out: str
    manifest: str  # the shipped manifest that reads `root` (data.manifest=<this> data.root=<root>)
    version: str | None = None
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    altered: list[dict[str, str]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    root: str = ""

    def __post_init__(self) -> None:
        self.root = self.root or self.out

    def skip(self, file: str | Path, reason: str) -> None:
        self.skipped.append({"file": str(file), "reason": reason})
        log.warning("skipped %s: %s", file, reason)

    def alter(self, file: str | Path, reason: str) -> None:
        self.altered.append({"file": str(file), "reason": reason})
        log.info("altered %s: %s", file, reason)

    def problem(self, split: str, file: str | Path, reason: str) -> None:
        self.problems.append({"split": split, "file": str(file), "reason": reason})
        log.warning("%s: %s: %s", split, file, reason)

    @property
    def ok(self) -> bool:
        """False when a layout check found problems (skips of a preparer do not count)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def summary(self) -> str:
        counts = ", ".join(f"{s} {c.get('images', 0)}" for s, c in self.splits.items())
        problems = f", {len(self.problems)} problem(s)" if self.problems else ""
        return (f"{self.dataset}{f' {self.version}' if self.version else ''}: {counts or 'nothing'}; "
                f"{len(self.skipped)} skipped, {len(self.altered)} altered{problems} → {self.out} "
                f"(read with data.manifest={self.manifest} data.root={self.root})")


Preparer = Callable[..., PrepareReport]  # (src: Path, out: Path, **options) -> PrepareReport
PREPARERS: dict[str, Preparer] = {}


def register(name: str) -> Callable[[Preparer], Preparer]:
    def deco(fn: Preparer) -> Preparer:
        PREPARERS[name] = fn
        return fn
    return deco


def prepare_dataset(name: str, src: str | Path, out: str | Path, **options: Any) -> PrepareReport:
    """Run the preparer `name` on `src` into `out`; writes `out/prepare_report.json`.

    An option the preparer does not take is a PrepareError naming the options it does take.
    """
    _load_preparers()
    if name not in PREPARERS:
        raise PrepareError(f"no preparer for {name!r}; known: {', '.join(sorted(PREPARERS))}")
    src, out = Path(src), Path(out)
    _check_options(name, PREPARERS[name], options)
    if not src.is_dir():
        raise FileNotFoundError(f"{name}: raw dataset folder not found: {src}")
    report = PREPARERS[name](src, out, **options)
    report.write(out / REPORT_NAME)
    return report


def preparer_options(fn: Preparer) -> list[str]:
    """The options (keyword arguments after src, out) a preparer takes."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_options(name: str, fn: Preparer, options: dict[str, Any]) -> None:
    takes = preparer_options(fn)
    unknown = [k for k in options if k not in takes]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        accepted = ", ".join("--" + k.replace("_", "-") for k in takes) or "no options"
        raise PrepareError(f"{name}: {flags} does not apply to this dataset (it takes: {accepted})")


def _load_preparers() -> None:
    """Import the modules whose preparers register themselves."""
    importlib.import_module("gkd.data.prepare_isprs")


# ============================================================================ shared helpers

class _Skip(Exception):
    """One sample cannot be used; `file` and `reason` go to the report."""

    def __init__(self, file: str | Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = str(file), reason


def prepare_out_dir(src: Path, out: Path, tops: Sequence[str], overwrite: bool,
                    report: PrepareReport) -> None:
    """Check `out` for a preparer that writes files: it must lie outside `src` (the raw download
    is never written to), and `out/<top>` must hold no files of an earlier run unless
    `overwrite` (then they are removed, noted)."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise PrepareError(f"--out {out} is inside --src {src}; write the prepared copy outside "
                           "the raw download")
    old = [p for top in tops if (out / top).is_dir()
           for p in (out / top).rglob("*") if p.is_file() or p.is_symlink()]
    if old and not overwrite:
        raise PrepareError(f"{out} already holds {len(old)} prepared file(s) (e.g. {old[0]}); "
                           "pass --overwrite to replace them, or choose another --out")
    for p in old:
        p.unlink()
    if old:
        report.notes.append(f"removed {len(old)} files of an earlier run under {out}")


def place_image(src: Path, dst: Path, copy: bool) -> None:
    """Put the raw image `src` at `dst`: an absolute symbolic link, or a copy with `copy`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
        return
    try:
        os.symlink(src.resolve(), dst)
    except OSError as exc:
        raise PrepareError(f"cannot create the link {dst} -> {src}: {exc}; pass --copy to copy "
                           "the images instead") from exc


def write_label_png(path: Path, ids: np.ndarray) -> None:
    """Write [H, W] integer values in 0..255 as a single-channel 8-bit ('L') PNG."""
    if ids.ndim != 2 or ids.size == 0 or ids.min() < 0 or ids.max() > 255:
        raise ValueError(f"{path}: a label must be [H, W] values in 0..255, got shape {ids.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8)).save(path)


def read_index_label(path: Path) -> np.ndarray:
    """Class indices uint8 [H, W] of a P-mode (palette) or L-mode label PNG.

    A P-mode file is read as its palette INDICES (np.asarray of the P image), never its colours.
    Any other mode (RGB, RGBA, 16-bit) raises `_Skip`: an RGB label holds colours, not indices.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                what = "colours, not class indices" if im.mode in ("RGB", "RGBA") else "not 8-bit indices"
                raise _Skip(path, f"label image mode is {im.mode} ({what}); expected a palette (P) "
                                  "or single-channel (L) PNG")
            return np.asarray(im).copy()
    except _READ_ERRORS as exc:
        raise _Skip(path, f"unreadable label: {type(exc).__name__}: {exc}") from exc


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header (`segmentation.image_size`); `_Skip` when unreadable."""
    from gkd.data.segmentation import BadSampleError, image_size

    try:
        return image_size(path)
    except BadSampleError as exc:
        raise _Skip(path, f"unreadable image: {exc.problems[0].detail}") from exc


def walk(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """key (path below `folder` without suffix, '/'-separated) → file; the manifests' pairing rule."""
    from gkd.data.segmentation import _walk_keys

    return _walk_keys(folder, suffixes, ())


def _size_text(wh: tuple[int, int]) -> str:
    return f"{wh[0]}x{wh[1]}"


def _listing(folder: Path, limit: int = 15) -> str:
    """The first entries of a folder, for messages."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _unpaired_labels(labels: dict[str, Path], keys: Iterable[str], report: PrepareReport) -> None:
    for key in sorted(set(labels) - set(keys)):
        report.skip(labels[key], "label without an image")


# ============================================================================ Mapillary Vistas

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")  # train-id order
_TRAIN_ID = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}

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
    v: tuple((name, IGNORE if cls is None else _TRAIN_ID[cls]) for name, cls in table)
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
            f"folders: {', '.join(folders) or 'none'}; {src} holds: {_listing(src)}")


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
        raise _Skip(label, f"label is {_size_text((raw.shape[1], raw.shape[0]))} but image "
                           f"{image} is {_size_text(wh)}")
    mapped = lut[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0]).tolist()
        raise _Skip(label, f"label indices {bad[:10]} are outside the {len(config.names)} labels "
                           f"of {config.file}")
    ids = mapped.astype(np.uint8)
    if half_res:
        size = _half_size(wh)
        try:
            with Image.open(image) as im:
                # PIL's bilinear resize widens its filter when shrinking: antialiased.
                small = im.convert("RGB").resize(size, Image.BILINEAR)
        except _READ_ERRORS as exc:
            raise _Skip(image, f"unreadable image: {type(exc).__name__}: {exc}") from exc
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
            except _Skip as s:
                report.skip(s.file, s.reason)
        _unpaired_labels(labels, images, report)
        report.splits[split] = {"images": done, "labels": done}
    report.notes.append(f"labels: {config.file} class indices mapped by name to the 19 Cityscapes "
                        f"train ids (gkd.data.prepare.MAPILLARY_CLASSES['{version}']), "
                        f"{IGNORE} = ignored")
    return report


# ============================================================================ GTA5

GTA5_SPLIT_KEYS = {"train": "trainIds", "val": "valIds", "test": "testIds"}
ON_MISMATCH = ("skip", "resize")


def _gta5_folders(src: Path) -> tuple[Path, Path]:
    images, labels = src / "images", src / "labels"
    if not images.is_dir() or not labels.is_dir():
        nested = [p.name for p in src.iterdir() if p.is_dir() and (p / "images").is_dir()]
        hint = f" (images/ is one level down in {', '.join(nested)}: use that as --src)" if nested else ""
        raise PrepareError(f"gta5: expected images/<5-digit>.png and labels/<5-digit>.png in {src}"
                           f"{hint}; found: {_listing(src)}")
    if (images / "train").is_dir() or (labels / "train").is_dir():
        raise PrepareError(f"gta5: {src} already has images/train (a prepared layout); --src must "
                           "be the raw download (flat images/ and labels/)")
    return images, labels


def read_gta5_split(path: Path) -> dict[str, list[int]]:
    """split.mat → {"train": [frame numbers], "val": [...], "test": [...]}; PrepareError naming the
    file when it is unreadable, lacks a key or holds non-integer ids."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for a bad file
        raise PrepareError(f"gta5: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in GTA5_SPLIT_KEYS.values() if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise PrepareError(f"gta5: {path} lacks {', '.join(missing)} (found keys: "
                           f"{', '.join(found) or 'none'}); expected trainIds, valIds, testIds")
    out: dict[str, list[int]] = {}
    for split, key in GTA5_SPLIT_KEYS.items():
        ids = np.asarray(mat[key]).ravel()
        if ids.size and (not np.issubdtype(ids.dtype, np.number) or np.any(ids != np.round(ids))):
            raise PrepareError(f"gta5: {path}: {key} must hold integer frame numbers")
        out[split] = [int(i) for i in ids]
    seen: dict[int, str] = {}
    for split, ids in out.items():
        for i in ids:
            if i in seen and seen[i] != split:
                raise PrepareError(f"gta5: {path}: frame {i} is in both {seen[i]} and {split}")
            seen[i] = split
    return out


def _gta5_frame(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    return int(name) if name.isdigit() else None


def gta5_assign_splits(src: Path, images: dict[str, Path], report: PrepareReport) -> dict[str, str]:
    """image key → split: from split.mat when present (keys it does not list are skipped,
    frames it lists without an image are noted), else everything → train (noted)."""
    keys = list(images)
    path = src / "split.mat"
    if not path.is_file():
        report.options["split_source"] = None
        report.notes.append("no split.mat: every frame is in train (the usual DG protocol trains "
                            "on all 24,966 frames)")
        return {k: "train" for k in keys}
    splits = read_gta5_split(path)
    report.options["split_source"] = "split.mat"
    of_frame = {i: s for s, ids in splits.items() for i in ids}
    assigned: dict[str, str] = {}
    for key in keys:
        split = of_frame.get(_gta5_frame(key))
        if split is None:
            report.skip(images[key], "not listed in split.mat (trainIds/valIds/testIds)")
        else:
            assigned[key] = split
    present = {_gta5_frame(k) for k in keys}
    absent = sorted(i for i in of_frame if i not in present)
    if absent:
        report.notes.append(f"{len(absent)} frame(s) listed in split.mat have no image, e.g. "
                            + ", ".join(f"{i:05d}" for i in absent[:20]))
    return assigned


class _Gta5Writer:
    """Checks and writes one GTA5 pair (the per-run settings in one place)."""

    def __init__(self, out: Path, on_mismatch: str, copy: bool, report: PrepareReport) -> None:
        from gkd.data.manifest import load_manifest
        from gkd.data.segmentation import LabelDecoder

        self.out, self.on_mismatch, self.copy, self.report = out, on_mismatch, copy, report
        self.decoder = LabelDecoder(load_manifest("gta5"))  # the ids the shipped manifest maps

    def __call__(self, key: str, split: str, image: Path, label: Path) -> None:
        wh = header_size(image)
        raw = read_index_label(label)
        _, outside = self.decoder.map(raw.astype(np.int64))
        if outside:
            raise _Skip(label, f"label ids {outside[:10]} are not Cityscapes label ids 0-33")
        lbl_wh = (raw.shape[1], raw.shape[0])
        if lbl_wh != wh:
            text = f"label is {_size_text(lbl_wh)} but image {image.name} is {_size_text(wh)}"
            if self.on_mismatch == "skip":
                raise _Skip(label, f"size mismatch: {text} (--on-mismatch resize keeps it)")
            raw = np.asarray(Image.fromarray(raw).resize(wh, Image.NEAREST))
            self.report.alter(label, f"size mismatch: {text}; label resized to the image "
                                     "(nearest neighbour)")
        place_image(image, self.out / "images" / split / f"{key}.png", self.copy)
        write_label_png(self.out / "labels" / split / f"{key}.png", raw)


@register("gta5")
def prepare_gta5(src: Path, out: Path, *, on_mismatch: str = "skip", copy: bool = False,
                 overwrite: bool = False) -> PrepareReport:
    """GTA5 → `out/images/<split>/<id>.png` (links, or copies with `copy`) and
    `out/labels/<split>/<id>.png` (single-channel Cityscapes label ids, read from the palette
    PNGs as indices). `on_mismatch`: "skip" leaves out pairs whose sizes differ, "resize"
    resizes such a label to its image (nearest neighbour). Every mismatch is reported."""
    if on_mismatch not in ON_MISMATCH:
        raise PrepareError(f"gta5: --on-mismatch must be one of {', '.join(ON_MISMATCH)}, "
                           f"got {on_mismatch!r}")
    src, out = Path(src), Path(out)
    image_dir, label_dir = _gta5_folders(src)
    report = PrepareReport("gta5", str(src), str(out), "gta5",
                           options={"on_mismatch": on_mismatch, "copy": bool(copy),
                                    "overwrite": bool(overwrite)})
    images, labels = walk(image_dir, (".png",)), walk(label_dir, (".png",))
    if not images:
        raise PrepareError(f"gta5: no .png images in {image_dir}; found: {_listing(image_dir)}")
    assigned = gta5_assign_splits(src, images, report)
    prepare_out_dir(src, out, ("images", "labels"), overwrite, report)
    used = sorted(set(assigned.values()) | {"train"}, key=list(GTA5_SPLIT_KEYS).index)
    for split in used:  # train always exists, so the manifest never falls back to the flat folder
        for top in ("images", "labels"):
            (out / top / split).mkdir(parents=True, exist_ok=True)
    counts = {s: 0 for s in used}
    write = _Gta5Writer(out, on_mismatch, copy, report)
    for key, split in assigned.items():
        if key not in labels:
            report.skip(images[key], f"no label file {label_dir / (key + '.png')}")
            continue
        try:
            write(key, split, images[key], labels[key])
            counts[split] += 1
        except _Skip as s:
            report.skip(s.file, s.reason)
    _unpaired_labels(labels, images, report)
    report.splits = {s: {"images": n, "labels": n} for s, n in counts.items()}
    report.notes.append("labels/<split>/*.png hold Cityscapes label ids (as the raw palette "
                        "indices); the gta5 manifest maps them to train ids")
    return report


# ============================================================================ layout checks

def _split_problems(report: PrepareReport, split: str, sc: "SplitCheck") -> None:
    """Copy one `SplitCheck`'s findings into `report.problems`."""
    for d in sc.missing_dirs:
        report.problem(split, d.partition(": ")[2], f"folder not found ({d.partition(': ')[0]})")
    for entry in sc.unpaired_images:
        image, _, expected = entry.partition(" (expected ")
        report.problem(split, image, f"image without a label (expected {expected.rstrip(')')})")
    for label in sc.unpaired_labels:
        report.problem(split, label, "label without an image")
    per_file: dict[str, list[int]] = {}
    for value, files in sc.outside_map.items():
        for f in files:
            per_file.setdefault(f, []).append(value)
    for f, values in sorted(per_file.items()):
        report.problem(split, f, f"label values outside the manifest's map: {sorted(values)[:10]}")
    for entry in sc.size_mismatches + sc.unreadable:
        file, _, detail = entry.partition(": ")
        report.problem(split, file, detail)
    if sc.num_paired == 0 and not sc.missing_dirs:
        report.problem(split, "", "no image/label pairs")


def check_layout(report: PrepareReport, src: Path, splits: Sequence[str]) -> None:
    """Check the labelled `splits` of `report.manifest` on the raw folder with
    `gkd.data.segmentation.check_dataset`; counts into `report.splits`, findings into
    `report.problems`."""
    from gkd.data.segmentation import check_dataset

    checked = check_dataset(report.manifest, root=src, splits=list(splits))
    for split, sc in checked.splits.items():
        report.splits[split] = {"images": sc.num_images, "labels": sc.num_labels,
                                "paired": sc.num_paired}
        _split_problems(report, split, sc)


def _count_files(folder: Path, suffix: str) -> int:
    return len(walk(folder, (suffix,))) if folder.is_dir() else 0


def _layout_report(name: str, src: Path, out: Path) -> PrepareReport:
    report = PrepareReport(name, str(src), str(out), name, root=str(src))
    report.notes.append(f"layout check: nothing copied; read the raw folder as it is with "
                        f"data.manifest={name} data.root={src}")
    return report


@register("cityscapes")
def check_cityscapes(src: Path, out: Path) -> PrepareReport:
    """Cityscapes layout check: train/val of leftImg8bit + gtFine; test images counted."""
    src = Path(src)
    if not (src / "leftImg8bit").is_dir() or not (src / "gtFine").is_dir():
        raise PrepareError(f"cityscapes: expected leftImg8bit/{{train,val}}/<city>/... and "
                           f"gtFine/{{train,val}}/<city>/..._gtFine_labelIds.png in {src} "
                           f"(leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip); found: "
                           f"{_listing(src)}")
    report = _layout_report("cityscapes", src, Path(out))
    check_layout(report, src, ("train", "val"))
    test = _count_files(src / "leftImg8bit" / "test", "_leftImg8bit.png")
    report.splits["test"] = {"images": test, "labels": 0}
    report.notes.append("test: images only (its gtFine labels are not public), not checked")
    return report


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@register("acdc")
def check_acdc(src: Path, out: Path) -> PrepareReport:
    """ACDC layout check: per condition, train and val (images + gt_labelIds) are checked and the
    test images (rgb_anon/<condition>/test, no labels) counted. A missing condition is a problem
    (the C→ACDC suite evaluates all four)."""
    src = Path(src)
    rgb, gt = src / "rgb_anon", src / "gt"
    present = [c for c in ACDC_CONDITIONS if (rgb / c).is_dir()]
    if not gt.is_dir() or not present:
        raise PrepareError(f"acdc: expected rgb_anon/<condition>/{{train,val,test}}/... and "
                           f"gt/<condition>/{{train,val}}/... (condition in "
                           f"{', '.join(ACDC_CONDITIONS)}) in {src}; found: {_listing(src)}"
                           + (f"; rgb_anon holds: {_listing(rgb)}" if rgb.is_dir() else ""))
    report = _layout_report("acdc", src, Path(out))
    for cond in ACDC_CONDITIONS:
        if cond not in present:
            report.problem(cond, f"rgb_anon/{cond}", "condition folder not found")
    check_layout(report, src, [f"{s}_{c}" for c in present for s in ("train", "val")])
    for cond in present:
        n = _count_files(rgb / cond / "test", "_rgb_anon.png")
        report.splits[f"test_{cond}"] = {"images": n, "labels": 0}
    report.notes.append("test_<condition>: images only (labels are not public), not checked; "
                        "the *_ref folders are not read")
    return report


_BDD_10K = ("images/10k/train", "images/10k/val", "labels/sem_seg/masks/train",
            "labels/sem_seg/masks/val")


def _bdd_unrecognised(src: Path) -> PrepareError:
    """What was found instead of the 10k sem_seg layout."""
    expected = ("expected the BDD100K 10k semantic segmentation layout: images/10k/{train,val} "
                "(.jpg) and labels/sem_seg/masks/{train,val} (.png train ids)")
    old = [d for d in ("seg/images", "seg/labels", "seg/color_labels") if (src / d).is_dir()]
    if old:
        return PrepareError(f"bdd100k: {src} holds {', '.join(old)} (<name>_train_id.png "
                            f"labels): the older BDD100K segmentation release, which the bdd100k "
                            f"manifest does not read; {expected}")
    present = [d for d in _BDD_10K if (src / d).is_dir()]
    missing = [d for d in _BDD_10K if d not in present]
    nested = [p.name for p in src.iterdir() if p.is_dir() and (p / "images" / "10k").is_dir()]
    hint = f"; images/10k is one level down in {', '.join(nested)}: use that as --src" if nested else ""
    return PrepareError(f"bdd100k: {expected}; missing {', '.join(missing)}"
                        f"{' (present: ' + ', '.join(present) + ')' if present else ''}{hint}; "
                        f"{src} holds: {_listing(src)}")


@register("bdd100k")
def check_bdd100k(src: Path, out: Path) -> PrepareReport:
    """BDD100K layout check: the 10k sem_seg release's train/val checked, test images counted;
    the older `seg/` release or anything else is a PrepareError saying what was found."""
    src = Path(src)
    if not all((src / d).is_dir() for d in _BDD_10K):
        raise _bdd_unrecognised(src)
    report = _layout_report("bdd100k", src, Path(out))
    report.version = "10k sem_seg"
    check_layout(report, src, ("train", "val"))
    report.splits["test"] = {"images": _count_files(src / "images" / "10k" / "test", ".jpg"),
                             "labels": 0}
    report.notes.append("test: images only (no masks), not checked")
    return report
