"""`run_eval`: score checkpoints on an evaluation suite and write the report (and test-server exports).

Suites and targets are defined in `gkd.eval.targets`; the batched prediction loop is
`gkd.eval.predict_loop.predict_dataset`, shared with the submission export (`gkd.eval.submission`).
`run_eval` checks every dataset root, and every checkpoint's protocol record against the targets
(`gkd.eval.protocol`), before it loads a model, so a missing dataset or a leaking target costs nothing.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from gkd.atomic import check_writable
from gkd.data import build_dataset, load_manifest, resolve_root
from gkd.handoff import read_metadata
from gkd.models.segmentor import load_segmentor
from gkd.tracking import check_trackers, log_files, log_images, start_trackers

from .metrics import SegMetric
from .predict_loop import predict_dataset, process_state
from .visualize import models_panel, prediction_panel, to_uint8_image
from .targets import PreparedTarget, Suite, load_suite, resolve_resize, slugify

__all__ = ["RESULTS_FORMAT", "dataset_entry", "default_model_name", "evaluate_target", "model_entry",
           "prepare_targets", "run_eval"]

log = logging.getLogger(__name__)

RESULTS_FORMAT = "gkd-eval/1"


# --- Evaluation --------------------------------------------------------------------------------

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
        resize = resolve_resize(t.resize, manifest)
        dataset = build_dataset(manifest, t.split, root=resolved[t.manifest], transform=None)
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
             export_split: str | None = None, trackers: Sequence[str] = (), panels: int = 0) -> dict[str, Any]:
    """Evaluate one checkpoint (or several: one report row each) on every target of `suite`.

    Before any model is loaded, every checkpoint's protocol record is checked against the targets
    (`gkd.eval.protocol.check_targets`: no target may be a split the run trained or selected on).
    Writes `metrics.json`, `results.md`, `results.csv` into `out_dir` (main process only) and,
    with `save_predictions`, palette masks and overlays under `out_dir/predictions/<target>/`
    (each process writes its own images). `groups` maps a group name to the model names of its
    runs (seeds): the report adds mean ± std per target and for the average. `export_split`
    (e.g. "test"): also write that split of every target dataset with a benchmark server
    (Cityscapes, ACDC) in the server's format under `out_dir/submission/`.
    `trackers` (tensorboard, wandb, mlflow; `gkd.tracking`): log each model's per-target scores
    (`eval/<model>/<target>/mIoU`, …), an image | ground truth | prediction panel per target, and
    (MLflow) the report files, to one tracker run writing under `out_dir`.
    `panels` N > 0: the main process writes `out_dir/panels/<target slug>.png`, an image | ground truth |
    prediction-per-model grid of the first N images it scores of each target.
    Under `accelerate launch`, process r scores images r, r+W, r+2W, … of each dataset and the
    confusion matrices are summed across processes.
    Returns the results dict written to metrics.json (NaN where a metric is undefined).
    """
    from .protocol import check_targets
    from .report import seed_groups, write_report
    from .submission import export_submission

    if isinstance(panels, bool) or not isinstance(panels, int) or panels < 0:
        raise ValueError(f"run_eval: panels must be a whole number >= 0, not {panels!r}")
    check_writable(out_dir, "the report folder")  # before the evaluation, not after it
    trackers = check_trackers(trackers, "trackers")
    suite = load_suite(suite)
    if trackers and accelerator is not None:
        raise ValueError("run_eval: pass trackers or an accelerator, not both (give the accelerator log_with)")
    state = accelerator if accelerator is not None else process_state(trackers, str(out_dir))
    prepared = prepare_targets(suite, roots)  # fails here, before any model is loaded

    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    absent = [str(c) for c in checkpoints if not Path(c).exists()]  # a folder is named by read_metadata
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
    if trackers:
        out_dir.mkdir(parents=True, exist_ok=True)
        start_trackers(state, "gkd-eval", {"suite": suite.name, "checkpoints": json.dumps([str(c) for c in checkpoints])},
                       out_dir)
    models = []
    own_panels = panels if state.is_main_process else 0  # only the main process writes panel files
    panel_rows = max(own_panels, _TRACKER_PANEL_ROWS if trackers else 0)
    grids: dict[str, dict[str, list]] = {}  # target slug → rows (image, label) and predictions per model
    for ckpt, name, protocol in zip(checkpoints, names, protocols):
        model, metadata = load_segmentor(ckpt)
        _check_classes(model, prepared, ckpt)
        model = model.to(state.device).eval()
        datasets = {}
        for pt in prepared:
            pred_dir = out_dir / "predictions" / pt.target.slug if save_predictions else None
            if save_predictions and len(checkpoints) > 1:
                pred_dir = out_dir / "predictions" / _slug(name) / pt.target.slug
            panel = [] if panel_rows else None
            metric, count = evaluate_target(model, pt, suite, state, batch_size=batch_size, num_workers=num_workers,
                                            limit=limit, pred_dir=pred_dir, panel=panel, panel_rows=panel_rows)
            datasets[pt.target.name] = dataset_entry(metric.compute(), pt, count)
            if state.is_main_process:
                log.info("%s on %s: mIoU %.2f", name, pt.target.name, datasets[pt.target.name]["mIoU"])
            if panel and own_panels:  # image and label from the first model, a prediction from each
                grid = grids.setdefault(pt.target.slug, {
                    "rows": [(image, label) for image, label, _ in panel[:own_panels]], "predictions": []})
                grid["predictions"].append([pred for _, _, pred in panel[:own_panels]])
            if panel and trackers:
                log_images(state, {f"eval/{_slug(name)}/{pt.target.slug}/panel": prediction_panel(
                    panel[:_TRACKER_PANEL_ROWS], getattr(pt.manifest, "palette", None), len(pt.classes),
                    pt.target.name)}, step=0)
        exports = []
        for pt in submissions:
            sub_dir = out_dir / "submission" / (_slug(name) if len(checkpoints) > 1 else "")
            exports.append(export_submission(
                model, pt.manifest, export_split, pt.root, sub_dir, mode=suite.mode, resize=pt.resize, crop=suite.crop,
                stride=suite.stride, state=state, batch_size=batch_size, num_workers=num_workers, limit=limit).to_dict())
        models.append(model_entry(name, ckpt, metadata, datasets, protocol))
        if trackers:
            state.log(tracker_scalars(name, models[-1]), step=0)
        if exports:
            models[-1]["submissions"] = exports
        del model

    if grids:
        _write_panels(grids, prepared, names, out_dir / "panels")
    results = {"format": RESULTS_FORMAT, "suite": suite.to_dict(), "models": models}
    if groups:
        results["groups"] = seed_groups(models, groups)
    if state.is_main_process:
        written = write_report(results, out_dir)
    if trackers:
        if state.is_main_process:
            log_files(state, list(written.values()))
        state.end_training()
    state.wait_for_everyone()
    return results


_TRACKER_PANEL_ROWS = 4  # rows of the panel a tracker gets per model and target


def _write_panels(grids: Mapping[str, Mapping[str, list]], prepared: list[PreparedTarget], names: Sequence[str],
                  folder: Path) -> list[Path]:
    """One `<target slug>.png` per target: image | ground truth | one prediction column per model."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for pt in prepared:
        grid = grids.get(pt.target.slug)
        if not grid or not grid["rows"]:
            continue
        image = models_panel(grid["rows"], grid["predictions"], getattr(pt.manifest, "palette", None),
                             len(pt.classes), [pt.target.name, "ground truth", *names])
        path = folder / f"{pt.target.slug}.png"
        Image.fromarray(image).save(path)
        written.append(path)
    log.info("wrote %d panel(s) under %s", len(written), folder)
    return written


def tracker_scalars(name: str, entry: Mapping[str, Any]) -> dict[str, float]:
    """One report row → tracker scalars `eval/<name>/<target slug>/<metric>` and
    `eval/<name>/average/<metric>` (mIoU, mAcc, aAcc); undefined (NaN) values are left out."""
    parts = [(slugify(target, "target"), numbers) for target, numbers in entry["datasets"].items()]
    parts.append(("average", entry["average"]))
    return {f"eval/{_slug(name)}/{part}/{key}": float(numbers[key]) for part, numbers in parts
            for key in ("mIoU", "mAcc", "aAcc") if math.isfinite(numbers[key])}


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


def _slug(text: str) -> str:
    return slugify(text, "model")


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


def evaluate_target(model: Any, pt: PreparedTarget, suite: Suite, state: Any, *, batch_size: int = 1,
                    num_workers: int = 2, limit: int | None = None,
                    pred_dir: Path | None = None, panel: list | None = None,
                    panel_rows: int = 4) -> tuple[SegMetric, int]:
    """Score this process's share of one dataset; returns (metric reduced over processes, #images).

    panel: a list that receives (image [H,W,3] uint8, label [H,W], prediction [H,W]) for the first
    `panel_rows` images this process scores (`gkd.eval.visualize.prediction_panel` and
    `models_panel` draw them)."""
    total = len(pt.dataset) if limit is None else min(limit, len(pt.dataset))
    indices = list(range(state.process_index, total, state.num_processes))
    metric = SegMetric(len(pt.classes), ignore_index=int(getattr(pt.manifest, "ignore_index", 255)))
    palette = getattr(pt.manifest, "palette", None)
    for run, scores in predict_dataset(model, pt.dataset, indices, state, mode=suite.mode, resize=pt.resize,
                                       crop=suite.crop, stride=suite.stride, num_classes=len(pt.classes),
                                       batch_size=batch_size, num_workers=num_workers, desc=pt.target.name,
                                       keep=_label_fits):
        labels = torch.stack([torch.as_tensor(s["label"]) for s in run])
        pred = scores.argmax(dim=1)
        metric.update(pred.cpu(), labels)
        if panel is not None:
            for s, p, y in list(zip(run, pred.cpu(), labels))[:max(0, panel_rows - len(panel))]:
                panel.append((to_uint8_image(s["image"]), y.numpy(), p.numpy()))
        if pred_dir is not None:
            from .visualize import save_prediction

            for s, p in zip(run, pred.cpu()):
                save_prediction(pred_dir, Path(str(s["path"])).stem, s["image"], p, palette)
    metric.reduce(state)
    return metric, total


def _label_fits(sample: dict) -> bool:
    """A labelled sample is scored; an image whose label differs in size is an error."""
    image, label = sample["image"], sample["label"]
    if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
        raise ValueError(f"{sample.get('path')}: image size {tuple(image.shape[-2:])} != label size "
                         f"{tuple(label.shape[-2:])}")
    return True


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
