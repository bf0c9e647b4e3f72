"""Test-server submission exports for Cityscapes and ACDC (`gkd eval --export-submission`).

`export_submission` predicts every image of a test split with the evaluation suite's inference
(`gkd.eval.inference.predict`: keep-ratio resize, whole or sliding window, scores resized back to the
input size), writes one single-channel 8-bit PNG per image in the id space and with the file names the
server expects, and packs them into the zip(s) to upload. `SERVER_FORMATS` holds what each server
wants; a manifest without an entry is refused.

Disk layout (``out_dir`` given by the caller)::

    out_dir/cityscapes/<city>/<city>_<seq>_<frame>_leftImg8bit.png    label ids
    out_dir/cityscapes.zip              members <city>/<file>
    out_dir/acdc/<condition>/<seq>_frame_<n>_rgb_anon.png             train ids
    out_dir/acdc_<condition>.zip        members labelTrainIds/<file>   (one per condition)
    out_dir/acdc.zip                    members labelTrainIds/<file>   (all conditions; split `test`)
    out_dir/<name>_submission.json      counts, zips, skipped images, unexpected sizes

Facts relied on, and where they come from
-----------------------------------------
Cityscapes, pixel-level semantic labelling (mcordts/cityscapesScripts @0bcc4a7: README "The result
format is described at the top of our evaluation scripts"; evaluation/evalPixelLevelSemanticLabeling.py):
- pixels hold the label *ids* of helpers/labels.py, "not the train ID" (header comment); ids that
  are ignored in evaluation need never be predicted.
- the prediction for ground truth ``<city>_<seq>_<frame>_gtFine_labelIds.png`` is found by walking the
  results folder recursively (os.walk) for file names matching ``<city>_<seq>_<frame>*.png``; more than
  one match is an error ("Found multiple predictions"), none too (`getPrediction`).
- prediction and ground truth must have equal width and height, and one channel (`evaluatePair`);
  the test images are 2048×1024, so predictions are written at the input image's own size.
- not verified (the submission page needs a login): the zip itself. We zip the results folder with
  one folder per city; the evaluator's recursive glob makes folders irrelevant. A third-party report
  (hellochick/semantic-segmentation-tensorflow issue 9) quotes the server's rejection of a zip
  missing some test images, so an incomplete export is flagged (`complete`, a warning).

ACDC, semantic segmentation (acdc.vision.ee.ethz.ch/submit; no public devkit found):
- labels in Cityscapes *train ids* (road = 0) and result size equal to the input, 1920×1080: the
  submit page's requirements as quoted by the hf618/DTBS README ("Labels must be encoded in trainIDs
  format, e.g., road should correspond to ID 0"; "Image dimensions of result files must be equal to
  input RGB image dimensions, i.e., 1920 x 1080"). Consistent with published server submissions:
  lhoyer/HRDA README (`--format-only imgfile_prefix=labelTrainIds to_label_id=False`) and
  brdav/refign `predict_step` (argmax train ids, uint8 PNG at (1080, 1920)).
- file names: the input image's name, ``<seq>_frame_<n>_rgb_anon.png`` (what HRDA's mmseg
  `results2img` and Refign write), all in one folder named ``labelTrainIds`` that is zipped
  (lhoyer/HRDA and BIT-DA/VBLC READMEs). The server lets the user pick the evaluated subset per submission
  (fog/night/rain/snow/all adverse: maintainer answer in brdav/cma issue 4), hence one zip per
  condition besides the all-conditions one.
- NOT verified: whether the server also finds files in sub-folders of ``labelTrainIds`` (one
  third-party script says it searches recursively). We take the conservative reading: flat
  ``labelTrainIds/`` in every zip (the layout of the accepted HRDA/Refign submissions), with a clear
  error if two test images share a file name. Also not verified: that a per-condition task accepts
  a zip holding only that condition (the per-condition zips assume it), and whether the uncertainty
  track's ``confidence``/``labelTrainIds_invalid`` folders (required by the related Dark Zurich
  server) are needed for the standard task; none of the cited ACDC submissions include them.

Unlabelled predictions: argmax over the manifest's classes always yields a class, so every pixel
gets a valid id; a prediction outside 0..K-1 is an error. The lookup tables map non-class values to
Cityscapes id 0 ('unlabeled', ignored in evaluation) for label ids and 255 for train ids; both are
only reachable through that error path.

Under `accelerate launch` (a `state` with process_index, num_processes, is_main_process,
wait_for_everyone and device), process r predicts images r, r+W, r+2W, …; after
`wait_for_everyone` the main process merges the per-process reports and writes the zips.
Unreadable images are skipped: logged, counted and listed in the result and the JSON report.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gkd.atomic import atomic_path
from gkd.data.manifest import Manifest, load_manifest
from gkd.data.layout import BadSampleError, manifest_image_files, resolve_root
from gkd.data.segmentation import read_image

from .predict_loop import predict_dataset, process_state
from .targets import FROM_MANIFEST, resolve_resize

log = logging.getLogger(__name__)

LABEL_IDS, TRAIN_IDS = "label_ids", "train_ids"
UNLABELLED_LABEL_ID = 0   # Cityscapes 'unlabeled' (ignoreInEval); fill of the label-id table
UNLABELLED_TRAIN_ID = 255  # the ignore train id; fill of the train-id table
REPORT_FORMAT = "gkd-submission/1"


@dataclass(frozen=True)
class ServerFormat:
    """What one benchmark server expects (see the module docstring for the sources).

    name_pattern: regex that a test image's file name must match in full; group ``key`` is the part
    the server matches predictions by, group ``group`` (if any) the output folder.
    group_after: else the folder is the path component right after this folder name (ACDC's condition).
    image_size: (width, height) of the server's test images; predictions always take the input's size.
    zip_folder: top-level folder inside the zip ('' for none); zip_flat: members drop the group folder;
    zip_per_group: also one zip per group (ACDC: per condition).
    """

    name: str
    server: str
    id_space: str
    image_size: tuple[int, int]
    name_pattern: str
    group_after: str | None = None
    groups: tuple[str, ...] = ()
    zip_folder: str = ""
    zip_flat: bool = False
    zip_per_group: bool = False


SERVER_FORMATS: dict[str, ServerFormat] = {
    "cityscapes": ServerFormat(
        name="cityscapes", server="https://www.cityscapes-dataset.com/submit", id_space=LABEL_IDS,
        image_size=(2048, 1024),
        name_pattern=r"(?P<key>(?P<group>[A-Za-z]+)_\d{6}_\d{6})_leftImg8bit\.png"),
    "acdc": ServerFormat(
        name="acdc", server="https://acdc.vision.ee.ethz.ch/submit", id_space=TRAIN_IDS,
        image_size=(1920, 1080),
        name_pattern=r"(?P<key>[A-Za-z0-9]+_frame_\d+)_rgb_anon\.png",
        group_after="rgb_anon", groups=("fog", "night", "rain", "snow"),
        zip_folder="labelTrainIds", zip_flat=True, zip_per_group=True),
}


def submission_format(manifest: str | os.PathLike | Manifest) -> ServerFormat | None:
    """The server format for a manifest (by its `name`), or None when no server is known."""
    return SERVER_FORMATS.get(load_manifest(manifest).name)


def _require_format(m: Manifest) -> ServerFormat:
    fmt = SERVER_FORMATS.get(m.name)
    if fmt is None:
        raise ValueError(f"dataset {m.name!r} ({m.source()}) has no known test-server format; "
                         f"submission exports support: {', '.join(sorted(SERVER_FORMATS))}")
    return fmt


# ============================================================================ id tables

def train_to_label_ids(manifest: str | os.PathLike | Manifest, fill: int = UNLABELLED_LABEL_ID) -> np.ndarray:
    """Lookup table [256] uint8: train id → raw label id, the inverse of the manifest's label_map.

    Raises ValueError (naming the manifest) when the map is not one-to-one, when a class has no raw
    id, or when a raw id does not fit 8 bits. Entries that are no train id hold `fill`.
    """
    m = load_manifest(manifest)
    k = len(m.classes)
    inverse: dict[int, int] = {}
    for raw, train_id in sorted(m.label_map.items()):
        if train_id in inverse:
            raise ValueError(f"{m.source()}: label_map is not one-to-one: train id {train_id} comes from raw "
                             f"values {inverse[train_id]} and {raw}; a submission needs one label id per class")
        if not 0 <= raw <= 255:
            raise ValueError(f"{m.source()}: raw label value {raw} does not fit an 8-bit PNG")
        inverse[train_id] = raw
    missing = [t for t in range(k) if t not in inverse]
    if missing:
        raise ValueError(f"{m.source()}: train ids {missing} have no raw label id in label_map")
    lut = np.full(256, fill, dtype=np.uint8)
    for train_id, raw in inverse.items():
        lut[train_id] = raw
    return lut


def submission_lut(manifest: str | os.PathLike | Manifest) -> np.ndarray:
    """Lookup table [256] uint8: train id → the value the manifest's server wants in the PNG."""
    m = load_manifest(manifest)
    fmt = _require_format(m)
    if fmt.id_space == LABEL_IDS:
        return train_to_label_ids(m)
    lut = np.full(256, UNLABELLED_TRAIN_ID, dtype=np.uint8)
    lut[: len(m.classes)] = np.arange(len(m.classes), dtype=np.uint8)
    return lut


def encode_prediction(pred: np.ndarray, lut: np.ndarray, num_classes: int, path: str = "") -> np.ndarray:
    """Train ids [H,W] → server ids [H,W] uint8; a value outside 0..num_classes-1 is an error."""
    low, high = int(pred.min(initial=0)), int(pred.max(initial=0))
    if low < 0 or high >= num_classes:
        raise ValueError(f"{path}: prediction holds train id {low if low < 0 else high}, outside 0..{num_classes - 1}")
    return lut[pred.astype(np.int64)]


# ============================================================================ file plan

@dataclass(frozen=True)
class Entry:
    """One test image and where its prediction goes. rel: path under the format folder (group/file)."""

    image: Path
    group: str
    key: str
    rel: str
    arcname: str


def plan_entries(files: Sequence[Path], root: Path, fmt: ServerFormat) -> list[Entry]:
    """Check every file name against the server's pattern and place its prediction.

    Raises ValueError naming the file for a name the server would not match, a folder outside the
    format's groups, or two images the server could not tell apart (same key or same zip member).
    """
    pattern = re.compile(fmt.name_pattern)
    entries: list[Entry] = []
    by_key: dict[str, Path] = {}
    by_arc: dict[str, Path] = {}
    for path in files:
        match = pattern.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: file name does not match the {fmt.name} server's pattern "
                             f"{fmt.name_pattern!r}; its prediction could not be matched")
        group = _group_of(path, root, fmt, match)
        key = match.group("key")
        rel = f"{group}/{path.name}"
        arcname = "/".join(p for p in (fmt.zip_folder, path.name if fmt.zip_flat else rel) if p)
        for seen, value, what in ((by_key, key, "server key"), (by_arc, arcname, "zip member")):
            if value in seen:
                raise ValueError(f"{seen[value]} and {path} have the same {what} {value!r}; "
                                 f"the {fmt.name} server could not tell their predictions apart")
            seen[value] = path
        entries.append(Entry(path, group, key, rel, arcname))
    return entries


def _group_of(path: Path, root: Path, fmt: ServerFormat, match: re.Match) -> str:
    if fmt.group_after is None:
        return match.group("group")
    parts = path.relative_to(root).parts
    if fmt.group_after not in parts[:-1] or parts.index(fmt.group_after) + 1 >= len(parts) - 1:
        raise ValueError(f"{path}: expected a '{fmt.group_after}/<{'|'.join(fmt.groups)}>/' folder in its path")
    group = parts[parts.index(fmt.group_after) + 1]
    if fmt.groups and group not in fmt.groups:
        raise ValueError(f"{path}: folder {group!r} after {fmt.group_after!r} is none of {', '.join(fmt.groups)}")
    return group


# ============================================================================ result

@dataclass
class SubmissionResult:
    """What an export wrote. On the main process: every process's files; elsewhere its own share.

    counts: PNGs per group folder; zips: 'all' (every group) and, for per-group servers, each group;
    skipped: [{'path', 'reason'}]; unexpected_sizes: [{'path', 'size': [w, h]}] (inputs whose size
    differs from the server's test images: their predictions keep the input size).
    """

    manifest: str
    split: str
    folder: Path
    num_images: int
    counts: dict[str, int] = field(default_factory=dict)
    zips: dict[str, Path] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unexpected_sizes: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    report: Path | None = None

    @property
    def zip_path(self) -> Path | None:
        """The zip covering every exported group (the one to upload for the whole split)."""
        if "all" in self.zips:
            return self.zips["all"]
        return next(iter(self.zips.values()), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(folder=str(self.folder), report=str(self.report) if self.report else None,
                   zips={k: str(v) for k, v in self.zips.items()}, format=REPORT_FORMAT)
        return out


@dataclass
class _SingleProcess:
    """The process state of a plain (non-launched) run."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass


def _default_state(model: Any) -> Any:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched: share the work, as run_eval does
        return process_state()
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    return _SingleProcess(params[0].device if params else torch.device("cpu"))


# ============================================================================ prediction

class _ImageFiles(Dataset):
    """Decoded test images: {'index', 'path', 'image' [3,H,W] in [0,1]} or {'index', 'path', 'error'}."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"index": i, "path": self.paths[i], "image": read_image(Path(self.paths[i]))}
        except BadSampleError as e:  # reported by the caller, in the main loop (workers' logs may be lost)
            return {"index": i, "path": self.paths[i], "error": str(e)}


def _save_png(ids: np.ndarray, path: Path) -> None:
    """Single-channel 8-bit PNG, written to a temporary name first so no half file is ever zipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    assert image.mode == "L", image.mode
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


@dataclass
class _Share:
    """What one process did: entry indices written, skipped images, inputs of unexpected size."""

    written: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unexpected_sizes: list[dict[str, Any]] = field(default_factory=list)


def _predict_share(model: Any, entries: list[Entry], indices: list[int], folder: Path, lut: np.ndarray,
                   num_classes: int, fmt: ServerFormat, state: Any, *, mode: str, resize: Any, crop: Any,
                   stride: Any, batch_size: int, num_workers: int) -> _Share:
    """Predict this process's images and write their PNGs."""
    share = _Share()

    def readable(s: dict) -> bool:
        if "error" in s:
            log.warning("skipped unreadable test image %s: %s", s["path"], s["error"])
            share.skipped.append({"path": s["path"], "reason": s["error"]})
        return "error" not in s

    images = _ImageFiles([e.image for e in entries])  # sample "index": the entry's index
    for run, scores in predict_dataset(model, images, indices, state, mode=mode, resize=resize, crop=crop,
                                       stride=stride, num_classes=num_classes, batch_size=batch_size,
                                       num_workers=num_workers, desc=f"{fmt.name} submission", keep=readable):
        if scores.shape[1] != num_classes:
            raise ValueError(f"model returned {scores.shape[1]} score channels; {fmt.name} has {num_classes} classes")
        for s, pred in zip(run, scores.argmax(dim=1).cpu().numpy()):
            _save_png(encode_prediction(pred, lut, num_classes, s["path"]), folder / entries[s["index"]].rel)
            share.written.append(s["index"])
            height, width = pred.shape
            if (width, height) != fmt.image_size:
                share.unexpected_sizes.append({"path": s["path"], "size": [width, height]})
    if share.unexpected_sizes:
        log.warning("%d test images are not %d×%d like the %s server's; their predictions keep the input size "
                    "(first: %s)", len(share.unexpected_sizes), *fmt.image_size, fmt.name,
                    share.unexpected_sizes[0]["path"])
    return share


# ============================================================================ export

def export_submission(model: Any, manifest: str | os.PathLike | Manifest, split: str,
                      root: str | os.PathLike | None, out_dir: str | os.PathLike, *, mode: str = "slide",
                      resize: Any = FROM_MANIFEST, crop: int | Sequence[int] = 512,
                      stride: int | Sequence[int] = 341, state: Any = None, batch_size: int = 1,
                      num_workers: int = 2, limit: int | None = None) -> SubmissionResult:
    """Predict every image of `split` and write the server's PNGs and zip(s) under `out_dir`.

    model: images [B,3,H,W] in [0,1] → scores [B,K,h,w], already on `state.device` in eval mode.
    resize: keep-ratio test resize; FROM_MANIFEST (default) uses the manifest's `test_resize`, None
    keeps the original size. mode/crop/stride as in the evaluation suite. limit: the first `limit`
    images only (the export is then incomplete). Raises ValueError for a manifest without a server
    format and for file names the server could not match, before any prediction.
    """
    m = load_manifest(manifest)
    fmt = _require_format(m)
    num_classes = len(m.classes)
    k = getattr(model, "num_classes", None)
    if k is not None and int(k) != num_classes:
        raise ValueError(f"the model predicts {k} classes but {m.name} has {num_classes}")
    lut = submission_lut(m)
    root_path = resolve_root(m, root)
    entries = plan_entries(manifest_image_files(m, split, root_path), root_path, fmt)
    total = len(entries) if limit is None else min(limit, len(entries))
    state = state if state is not None else _default_state(model)
    resize = resolve_resize(resize, m)
    out = Path(out_dir)
    folder = out / fmt.name

    indices = list(range(state.process_index, total, state.num_processes))
    share = _predict_share(model, entries, indices, folder, lut, num_classes, fmt, state, mode=mode,
                           resize=resize, crop=crop, stride=stride, batch_size=batch_size,
                           num_workers=num_workers)
    rank_file = out / f".{fmt.name}_submission.rank{state.process_index}.json"
    if state.num_processes > 1:
        out.mkdir(parents=True, exist_ok=True)
        rank_file.write_text(json.dumps(asdict(share)))
    state.wait_for_everyone()
    if not state.is_main_process:
        return _result(m.name, split, folder, entries, share, total, zips={}, complete=False)

    if state.num_processes > 1:
        share = _merge_shares(out, fmt.name, state.num_processes)
    _check_written(entries, share, folder)
    complete = total == len(entries) and not share.skipped
    if not complete:
        log.warning("%s %s: %d of %d test images exported (%d skipped%s); the server rejects a submission "
                    "without every test image of the evaluated subset", m.name, split, len(share.written),
                    len(entries), len(share.skipped), f", limit {limit}" if total < len(entries) else "")
    zips = write_zips([entries[i] for i in sorted(share.written)], folder, out, fmt)
    result = _result(m.name, split, folder, entries, share, total, zips=zips, complete=complete)
    out.mkdir(parents=True, exist_ok=True)  # also when nothing was written (limit 0, all skipped)
    result.report = out / f"{fmt.name}_submission.json"
    result.report.write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _result(name: str, split: str, folder: Path, entries: list[Entry], share: _Share, total: int, *,
            zips: dict[str, Path], complete: bool) -> SubmissionResult:
    counts: dict[str, int] = {}
    for i in sorted(share.written):
        counts[entries[i].group] = counts.get(entries[i].group, 0) + 1
    return SubmissionResult(manifest=name, split=split, folder=folder, num_images=total, counts=counts,
                            zips=zips, skipped=share.skipped, unexpected_sizes=share.unexpected_sizes,
                            complete=complete)


def _merge_shares(out: Path, name: str, world: int) -> _Share:
    """Read (and remove) every process's report; a missing one is an error naming the file."""
    merged = _Share()
    for r in range(world):
        path = out / f".{name}_submission.rank{r}.json"
        if not path.is_file():
            raise RuntimeError(f"process {r} left no report at {path}; did it fail?")
        part = json.loads(path.read_text())
        merged.written += part["written"]
        merged.skipped += part["skipped"]
        merged.unexpected_sizes += part["unexpected_sizes"]
        path.unlink()
    return merged


def _check_written(entries: list[Entry], share: _Share, folder: Path) -> None:
    missing = [str(folder / entries[i].rel) for i in share.written if not (folder / entries[i].rel).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} predictions reported written are missing, e.g. {missing[0]}")


def write_zips(entries: Sequence[Entry], folder: Path, out: Path, fmt: ServerFormat) -> dict[str, Path]:
    """Zip the written predictions: 'all' → <out>/<name>.zip and, per group if the server takes
    subsets, <out>/<name>_<group>.zip. A split with one group gets that group's zip only."""
    groups = sorted({e.group for e in entries})
    zips: dict[str, Path] = {}
    if not entries:
        log.warning("%s: no predictions written; no zip", fmt.name)
        return zips
    if not fmt.zip_per_group or len(groups) > 1:
        zips["all"] = _zip(entries, folder, out / f"{fmt.name}.zip")
    if fmt.zip_per_group:
        for g in groups:
            zips[g] = _zip([e for e in entries if e.group == g], folder, out / f"{fmt.name}_{g}.zip")
    return zips


def _zip(entries: Sequence[Entry], folder: Path, path: Path) -> Path:
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for e in sorted(entries, key=lambda e: e.arcname):
            zf.write(folder / e.rel, arcname=e.arcname)
    return path
