"""Domain-generalization evaluation suites (YAML) and `run_eval`, which scores checkpoints on them.

A suite file (shipped ones live in `configs/suites/`; any path works the same way):

    name: gta2cbm                 # optional; default: the file name
    description: GTA5 → Cityscapes, BDD100K, Mapillary
    source: gta5                  # the training domain, for the report
    mode: slide                   # slide | whole
    crop: 512                     # int or [h, w]   (slide only)
    stride: 341                   # int or [h, w]   (slide only)
    targets:
      - name: Cityscapes          # display name: a column of the report; unique
        manifest: cityscapes      # gkd.data manifest name or path
        split: val
        resize: [1024, 512]       # optional keep-ratio resize; absent: the manifest's test_resize;
                                  # null: score at the original size

`run_eval` checks every dataset root, and every checkpoint's protocol record against the targets
(`gkd.eval.protocol`), before it loads a model, so a missing dataset or a leaking target costs nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from gkd.handoff import read_metadata

from .inference import pair, predict
from .metrics import SegMetric

log = logging.getLogger(__name__)

FROM_MANIFEST = "manifest"  # Target.resize sentinel: use the manifest's test_resize
MODES = ("slide", "whole")
_SUITE_KEYS = {"name", "description", "source", "mode", "crop", "stride", "targets"}
_TARGET_KEYS = {"name", "manifest", "split", "resize"}
RESULTS_FORMAT = "gkd-eval/1"


class SuiteError(ValueError):
    """A suite file that does not validate; the message names the file and the field."""


# --- Loader hooks. Imported lazily (the data and model packages are heavy, and tests replace these). ---

def load_manifest(name_or_path: str) -> Any:
    from gkd.data import load_manifest as _load_manifest

    return _load_manifest(name_or_path)


def resolve_root(manifest: Any, root: str | Path | None = None) -> Path:
    from gkd.data import resolve_root as _resolve_root

    return _resolve_root(manifest, root)


def build_dataset(manifest: Any, split: str, root: str | Path | None = None) -> Any:
    from gkd.data import build_dataset as _build_dataset

    return _build_dataset(manifest, split, root=root, transform=None)


def load_segmentor(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    from gkd.models.segmentor import load_segmentor as _load_segmentor

    return _load_segmentor(path)


# --- Suite definition --------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One evaluation dataset. `resize`: (a, b) edge limits, None (original size) or FROM_MANIFEST."""

    name: str
    manifest: str
    split: str
    resize: Any = FROM_MANIFEST

    @property
    def slug(self) -> str:
        """File-system-safe form of the name (prediction folders)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "target"


@dataclass(frozen=True)
class Suite:
    name: str
    targets: tuple[Target, ...]
    source: str | None = None
    mode: str = "slide"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    description: str = ""
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "source": self.source, "mode": self.mode,
            "crop": list(self.crop), "stride": list(self.stride), "path": self.path,
            "targets": [{"name": t.name, "manifest": t.manifest, "split": t.split,
                         "resize": _resize_json(t.resize)} for t in self.targets],
        }


def _resize_json(resize: Any) -> Any:
    return list(resize) if isinstance(resize, tuple) else resize


def load_suite(name_or_path: str | Path | Suite) -> Suite:
    """A shipped suite by name (`gta2cbm`) or a YAML file path → validated `Suite`."""
    if isinstance(name_or_path, Suite):
        return name_or_path
    from gkd.resources import find_resource

    path = find_resource("suite", name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from e
    return parse_suite(raw, source=str(path), default_name=path.stem)


def parse_suite(raw: Any, source: str = "<suite>", default_name: str = "suite") -> Suite:
    """Validate a suite mapping (as read from YAML); errors name `source` and the field."""
    def fail(field_name: str, msg: str) -> SuiteError:
        return SuiteError(f"{source}: {field_name}: {msg}")

    if not isinstance(raw, Mapping):
        raise SuiteError(f"{source}: a suite must be a mapping with a 'targets' list, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key; allowed: {', '.join(sorted(_SUITE_KEYS))}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise fail("name", f"expected a non-empty string, got {name!r}")
    mode = raw.get("mode", "slide")
    if mode not in MODES:
        raise fail("mode", f"expected one of {MODES}, got {mode!r}")
    try:
        crop = pair(raw.get("crop", 512), "crop")
    except (ValueError, TypeError) as e:
        raise fail("crop", str(e)) from e
    try:
        stride = pair(raw.get("stride", 341), "stride")
    except (ValueError, TypeError) as e:
        raise fail("stride", str(e)) from e
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise fail("stride", f"{list(stride)} exceeds crop {list(crop)}: windows would leave gaps")
    source_name = raw.get("source")
    if source_name is not None and not isinstance(source_name, str):
        raise fail("source", f"expected a string, got {source_name!r}")
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise fail("description", f"expected a string, got {description!r}")
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, list) or not targets_raw:
        raise fail("targets", "expected a non-empty list of {name, manifest, split[, resize]}")
    targets = tuple(_parse_target(t, f"targets[{i}]", fail) for i, t in enumerate(targets_raw))
    seen: dict[str, int] = {}
    for i, t in enumerate(targets):
        if t.name in seen:
            raise fail(f"targets[{i}].name", f"{t.name!r} is already used by targets[{seen[t.name]}]; names must be unique")
        seen[t.name] = i
    return Suite(name=name, targets=targets, source=source_name, mode=mode, crop=crop, stride=stride,
                 description=description, path=None if source.startswith("<") else source)


def _parse_target(raw: Any, where: str, fail) -> Target:
    if not isinstance(raw, Mapping):
        raise fail(where, f"expected a mapping with manifest and split, got {raw!r}")
    unknown = sorted(set(raw) - _TARGET_KEYS)
    if unknown:
        raise fail(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(_TARGET_KEYS))}")
    values = {}
    for key in ("manifest", "split"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise fail(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
        values[key] = value
    name = raw.get("name", values["manifest"])
    if not isinstance(name, (str, int)) or str(name) == "":
        raise fail(f"{where}.name", f"expected a non-empty string, got {name!r}")
    resize: Any = FROM_MANIFEST
    if "resize" in raw:
        resize = raw["resize"]
        if resize is not None and resize != FROM_MANIFEST:
            try:
                resize = pair(resize, "resize")
            except (ValueError, TypeError) as e:
                raise fail(f"{where}.resize", f"{e} (or null for the original size)") from e
    return Target(name=str(name), manifest=values["manifest"], split=values["split"], resize=resize)


# --- Evaluation --------------------------------------------------------------------------------

@dataclass
class PreparedTarget:
    """A target with its manifest, checked root, dataset and effective resize."""

    target: Target
    manifest: Any
    root: Path
    dataset: Any
    resize: tuple[int, int] | None
    classes: list[str] = field(default_factory=list)


def _manifest_resize(manifest: Any) -> tuple[int, int] | None:
    value = getattr(manifest, "test_resize", None)
    if value is None:
        return None
    return pair(value if isinstance(value, int) else tuple(value), "test_resize")


def prepare_targets(suite: Suite, roots: Mapping[str, str | Path] | None = None) -> list[PreparedTarget]:
    """Load manifests, check every root and build the datasets — no model involved.

    `roots` maps a manifest name (as in the suite or the manifest's `.name`) to its dataset root.
    All missing roots are reported together in one FileNotFoundError that names each path.
    """
    roots = {str(k): v for k, v in (roots or {}).items()}
    manifests = {t.manifest: load_manifest(t.manifest) for t in suite.targets}
    known = set(manifests) | {str(getattr(m, "name", k)) for k, m in manifests.items()}
    stray = sorted(set(roots) - known)
    if stray:
        raise ValueError(f"--root given for {', '.join(stray)}, which suite {suite.name!r} does not use; "
                         f"its datasets: {', '.join(sorted(known))}")
    resolved: dict[str, Path] = {}
    missing: list[str] = []
    for key, manifest in manifests.items():
        override = roots.get(key, roots.get(str(getattr(manifest, "name", key))))
        try:  # resolve_root checks the folder exists and names it when it does not
            resolved[key] = Path(resolve_root(manifest, override))
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing:
        raise FileNotFoundError(f"suite {suite.name!r}: " + "; ".join(missing))
    prepared = []
    for t in suite.targets:
        manifest = manifests[t.manifest]
        resize = _manifest_resize(manifest) if t.resize == FROM_MANIFEST else t.resize
        dataset = build_dataset(manifest, t.split, root=resolved[t.manifest])
        prepared.append(PreparedTarget(t, manifest, resolved[t.manifest], dataset, resize,
                                       classes=[str(c) for c in manifest.classes]))
    return prepared


def default_model_name(checkpoint: str | Path) -> str:
    """`runs/s3/segmentor.safetensors` → 's3' (the generic file name says nothing); else the stem."""
    path = Path(checkpoint)
    if path.stem in ("segmentor", "model") and path.parent.name:
        return path.parent.name
    return path.stem


def run_eval(checkpoint: str | Path | Sequence[str | Path], suite: str | Path | Suite, out_dir: str | Path, *,
             roots: Mapping[str, str] | None = None, save_predictions: bool = False, batch_size: int = 1,
             num_workers: int = 2, limit: int | None = None, accelerator: Any = None,
             model_name: str | Sequence[str] | None = None, groups: Mapping[str, Sequence[str]] | None = None,
             export_split: str | None = None) -> dict[str, Any]:
    """Evaluate one checkpoint (or several: one report row each) on every target of `suite`.

    Before any model is loaded, every checkpoint's protocol record is checked against the targets
    (`gkd.eval.protocol.check_targets`: no target may be a split the run trained or selected on).
    Writes `metrics.json`, `results.md`, `results.csv` into `out_dir` (main process only) and,
    with `save_predictions`, palette masks and overlays under `out_dir/predictions/<target>/`
    (each process writes its own images). `groups` maps a group name to the model names of its
    runs (seeds): the report adds mean ± std per target and for the average. `export_split`
    (e.g. "test"): also write that split of every target dataset with a benchmark server
    (Cityscapes, ACDC) in the server's format under `out_dir/submission/`.
    Under `accelerate launch`, process r scores images r, r+W, r+2W, … of each dataset and the
    confusion matrices are summed across processes.
    Returns the results dict written to metrics.json (NaN where a metric is undefined).
    """
    from .protocol import check_targets
    from .report import seed_groups, write_report
    from .submission import export_submission

    suite = load_suite(suite)
    state = accelerator if accelerator is not None else _process_state()
    prepared = prepare_targets(suite, roots)  # fails here, before any model is loaded

    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    absent = [str(c) for c in checkpoints if not Path(c).is_file()]
    if absent:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(absent)}")
    if model_name is None:
        names = [default_model_name(c) for c in checkpoints]
    else:
        names = [model_name] if isinstance(model_name, str) else list(model_name)
    if len(names) != len(checkpoints):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(names)} model names")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique (they label the report rows): {names}; pass model_name")
    for group, members in (groups or {}).items():
        unknown = sorted(set(members) - set(names))
        if unknown or not members:
            raise ValueError(f"group {group!r} names runs that are not evaluated: {unknown or members}")
    listed: dict = {}  # split file listings, shared by the checkpoints
    protocols = [check_targets(c, read_metadata(c), prepared, listed) for c in checkpoints]  # before any model loads
    submissions = _submission_targets(prepared, export_split) if export_split else []

    out_dir = Path(out_dir)
    models = []
    for ckpt, name, protocol in zip(checkpoints, names, protocols):
        model, metadata = load_segmentor(ckpt)
        _check_classes(model, prepared, ckpt)
        model = model.to(state.device).eval()
        datasets = {}
        for pt in prepared:
            pred_dir = out_dir / "predictions" / pt.target.slug if save_predictions else None
            if save_predictions and len(checkpoints) > 1:
                pred_dir = out_dir / "predictions" / _slug(name) / pt.target.slug
            metric, count = evaluate_target(model, pt, suite, state, batch_size=batch_size,
                                            num_workers=num_workers, limit=limit, pred_dir=pred_dir)
            datasets[pt.target.name] = dataset_entry(metric.compute(), pt, count)
            if state.is_main_process:
                log.info("%s on %s: mIoU %.2f", name, pt.target.name, datasets[pt.target.name]["mIoU"])
        exports = []
        for pt in submissions:
            sub_dir = out_dir / "submission" / (_slug(name) if len(checkpoints) > 1 else "")
            exports.append(export_submission(
                model, pt.manifest, export_split, pt.root, sub_dir, mode=suite.mode, resize=pt.resize, crop=suite.crop,
                stride=suite.stride, state=state, batch_size=batch_size, num_workers=num_workers, limit=limit).to_dict())
        models.append(model_entry(name, ckpt, metadata, datasets, protocol))
        if exports:
            models[-1]["submissions"] = exports
        del model

    results = {"format": RESULTS_FORMAT, "suite": suite.to_dict(), "models": models}
    if groups:
        results["groups"] = seed_groups(models, groups)
    if state.is_main_process:
        write_report(results, out_dir)
    state.wait_for_everyone()
    return results


def _submission_targets(prepared: list[PreparedTarget], split: str) -> list[PreparedTarget]:
    """One target per dataset that has a benchmark server (the first target of that manifest)."""
    from .submission import SERVER_FORMATS

    chosen: dict[str, PreparedTarget] = {}
    for pt in prepared:
        if pt.manifest.name in SERVER_FORMATS:
            chosen.setdefault(pt.manifest.name, pt)
    if not chosen:
        raise ValueError(f"--export-submission: no target of this suite has a benchmark server format "
                         f"(supported: {', '.join(SERVER_FORMATS)})")
    for pt in chosen.values():
        if split not in pt.manifest.splits:
            raise ValueError(f"--export-submission: {pt.manifest.name} has no split {split!r}; "
                             f"splits: {', '.join(pt.manifest.splits)}")
    return list(chosen.values())


def _process_state() -> Any:
    """accelerate's PartialState: rank, world size, device; `wait_for_everyone`.

    A multi-process launch on a machine without CUDA must ask for CPU explicitly, or accelerate
    falls back to independent single processes that would each score everything.
    """
    import os

    from accelerate import PartialState

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or (multi and not torch.cuda.is_available()))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _check_classes(model: Any, prepared: list[PreparedTarget], checkpoint: Any) -> None:
    """A class-count mismatch is an error; differing class names only a warning (spellings vary)."""
    k = getattr(model, "num_classes", None)
    names = getattr(model, "class_names", None)
    for pt in prepared:
        if k is not None and int(k) != len(pt.classes):
            raise ValueError(f"{checkpoint} predicts {k} classes but {pt.target.name} "
                             f"({pt.target.manifest}) has {len(pt.classes)}")
        if names and [str(n).lower() for n in names] != [c.lower() for c in pt.classes]:
            log.warning("%s: class names %s differ from %s's %s; check the class order",
                        checkpoint, list(names), pt.target.manifest, pt.classes)


def _collate_list(batch: list[dict]) -> list[dict]:
    """Keep samples apart: images of one dataset may differ in size."""
    return batch


def evaluate_target(model: Any, pt: PreparedTarget, suite: Suite, state: Any, *, batch_size: int = 1,
                    num_workers: int = 2, limit: int | None = None,
                    pred_dir: Path | None = None) -> tuple[SegMetric, int]:
    """Score this process's share of one dataset; returns (metric reduced over processes, #images)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    total = len(pt.dataset) if limit is None else min(limit, len(pt.dataset))
    indices = list(range(state.process_index, total, state.num_processes))
    metric = SegMetric(len(pt.classes), ignore_index=int(getattr(pt.manifest, "ignore_index", 255)))
    palette = getattr(pt.manifest, "palette", None)
    autocast = getattr(state, "autocast", None) or contextlib.nullcontext
    if indices:
        loader = DataLoader(Subset(pt.dataset, indices), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=_collate_list)
        bar = tqdm(total=len(indices), desc=pt.target.name, unit="img", disable=not state.is_main_process)
        for batch in loader:
            for group in _same_size_groups(batch):
                images = torch.stack([s["image"] for s in group]).to(state.device)
                labels = torch.stack([torch.as_tensor(s["label"]) for s in group])
                with autocast():  # the accelerator's mixed precision, if it has one
                    scores = predict(model, images.float(), mode=suite.mode, resize=pt.resize, crop=suite.crop,
                                     stride=suite.stride, num_classes=len(pt.classes))
                pred = scores.argmax(dim=1)
                metric.update(pred.cpu(), labels)
                if pred_dir is not None:
                    from .visualize import save_prediction

                    for s, p in zip(group, pred.cpu()):
                        save_prediction(pred_dir, Path(str(s["path"])).stem, s["image"], p, palette)
            bar.update(len(batch))
        bar.close()
    metric.reduce(state)
    return metric, total


def same_size_runs(samples: list[dict]) -> list[list[dict]]:
    """Runs of consecutive samples whose images have the same size (so they stack into one batch)."""
    runs: list[list[dict]] = []
    for sample in samples:
        if runs and runs[-1][0]["image"].shape == sample["image"].shape:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs


def _same_size_groups(batch: list[dict]) -> list[list[dict]]:
    """`same_size_runs` of labelled samples; an image whose label differs in size is an error."""
    for sample in batch:
        image, label = sample["image"], sample["label"]
        if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
            raise ValueError(f"{sample.get('path')}: image size {tuple(image.shape[-2:])} != label size "
                             f"{tuple(label.shape[-2:])}")
    return same_size_runs(batch)


def dataset_entry(computed: Mapping[str, Any], pt: PreparedTarget, num_images: int) -> dict[str, Any]:
    """One target's metrics.json entry: summary numbers and per-class values keyed by class name."""
    return {
        "manifest": pt.target.manifest, "dataset": str(getattr(pt.manifest, "name", pt.target.manifest)),
        "split": pt.target.split, "root": str(pt.root),
        "resize": list(pt.resize) if pt.resize else None, "num_images": num_images,
        "aAcc": computed["aAcc"], "mIoU": computed["mIoU"], "mAcc": computed["mAcc"],
        "IoU": dict(zip(pt.classes, computed["IoU"])), "Acc": dict(zip(pt.classes, computed["Acc"])),
    }


def model_entry(name: str, checkpoint: Any, metadata: Mapping[str, Any] | None,
                datasets: Mapping[str, Mapping[str, Any]], protocol: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One report row: the model, its per-target metrics and the mean over targets ("Avg"), the
    protocol it was trained under (source, selection) and its seed."""
    metadata = dict(metadata or {})
    return {
        "name": name, "checkpoint": str(checkpoint),
        "spec": _jsonable(metadata.get("gkd_spec")),
        "seed": (_jsonable(metadata.get("gkd_config")) or {}).get("seed"),
        "protocol": _jsonable(dict(protocol or {})),
        "datasets": dict(datasets),
        "average": {key: _mean([d[key] for d in datasets.values()]) for key in ("mIoU", "mAcc", "aAcc")},
    }


def _mean(values: Sequence[float]) -> float:
    """Plain mean over targets: NaN if any target is NaN (an undefined target poisons the average)."""
    return sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return json.loads(json.dumps(value, default=str))
