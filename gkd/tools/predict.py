"""``gkd predict``: coloured masks and overlays from a stage-3 segmentor, for images or folders.

For every readable input image ``<stem>.<ext>`` the output folder receives

* ``<stem>_mask.png``: a palette ('P' mode) PNG whose pixel values are the predicted class ids
  (``argmax`` over the segmentor's scores at the image's original size) and whose palette colours them;
* ``<stem>_overlay.png``: RGB, ``round((1 - alpha) * image + alpha * colour)`` per pixel (``alpha`` 0.5),
  the blend of ``gkd.eval.visualize.overlay``.

Scoring is ``gkd.eval.inference.predict`` (the evaluation suite's): an optional keep-ratio resize
(``resize``), then sliding-window (``mode='slide'``, ``crop``/``stride``) or whole-image scoring, and
the scores bilinearly resized back to the original size. Images are batched by size: inputs are
grouped by their (width, height) read from the file header, and each group is cut into batches of
``batch_size`` (images of different sizes never share a batch; nothing is resized to stack them).

Palette: ``palette_from`` (a manifest name or YAML path) if given, else the manifest the segmentor
was trained on (``data.manifest`` of the stage-3 config in the file's metadata), else generated
colours (``gkd.eval.visualize.make_palette``: fixed pseudo-random, the same on every run).

Bad input: an unreadable image is skipped with a warning naming it, listed in the summary, and the
run carries on; an encoder file from stage 1 or 2 is refused (``load_segmentor``'s message says that
a stage-3 ``segmentor.safetensors`` was expected).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from gkd.atomic import check_writable
from gkd.eval.inference import DEFAULT_CROP, config_data, trained_crop_size

_log = logging.getLogger(__name__)

__all__ = ["PredictSummary", "predict_paths", "collect_images", "resolve_palette", "load_stage3", "trained_crop_size"]


# ------------------------------------------------------------------------------------------------
# inputs


def load_stage3(checkpoint: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``load_segmentor`` with a clear error for a missing file.

    Returns (segmentor in eval mode, metadata). A file that is no intact handoff file (damaged,
    truncated, a pickle, a folder...) is a ``HandoffError`` from ``gkd.handoff``'s readers, naming
    it; stage-1/2 encoder files are refused by ``load_segmentor`` itself ("... expected a
    segmentor.safetensors written by stage 3").
    """
    from gkd.models.segmentor import load_segmentor

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"segmentor file not found: {path} (expected a stage-3 segmentor.safetensors)")
    return load_segmentor(path)


def _is_image(path: Path) -> bool:
    from gkd.data.shards import IMAGE_SUFFIXES

    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def collect_images(inputs: str | Path | Iterable[str | Path], recursive: bool = False) -> list[tuple[Path, str]]:
    """Image files of ``inputs`` (files and/or folders) as (path, output stem), in the given order.

    A folder contributes its image files (by suffix, sorted; with ``recursive`` also those of its
    sub-folders, whose stems keep the relative folder, e.g. ``sub/name``). A file is taken as is,
    whatever its suffix. Repeated stems get ``-1``, ``-2``... appended; repeated files are kept once.
    Raises FileNotFoundError for a missing input and ValueError when no image is found.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in (p.rglob("*") if recursive else p.iterdir()) if _is_image(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            found += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in files]
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    out, seen_files, seen_stems = [], set(), set()
    for path, stem in found:
        key = path.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        unique, n = stem, 0
        while unique in seen_stems:
            n += 1
            unique = f"{stem}-{n}"
        seen_stems.add(unique)
        out.append((path, unique))
    if not out:
        raise ValueError(f"no images found in {', '.join(str(i) for i in inputs)}")
    return out


def resolve_palette(num_classes: int, metadata: Mapping[str, Any] | None = None,
                    palette_from: str | Path | None = None) -> tuple[list[list[int]], str]:
    """(one [r, g, b] per class, where the colours come from).

    ``palette_from`` (manifest name or YAML path) must load; the training manifest recorded in the
    metadata is used when it loads and falls back to generated colours (with a warning) otherwise.
    A manifest with another number of classes than the segmentor is used with a warning (colours
    are matched by class id; missing ones generated).
    """
    from gkd.data import load_manifest
    from gkd.eval.visualize import make_palette

    given, source = None, "generated"
    name = palette_from if palette_from is not None else config_data(metadata or {}).get("manifest")
    if name:
        try:
            manifest = load_manifest(str(name))
        except Exception as e:  # noqa: BLE001 - a missing/unknown manifest is reported, not fatal (if implicit)
            if palette_from is not None:
                raise ValueError(f"--palette-from {palette_from}: {e}") from e
            _log.warning("training manifest %r not found (%s); using generated colours", name, e)
        else:
            given, source = [list(c) for c in manifest.palette], f"manifest {name}"
            if len(manifest.classes) != num_classes:
                _log.warning("manifest %s has %d classes, the segmentor %d: colours are matched by class id",
                             name, len(manifest.classes), num_classes)
    return make_palette(num_classes, given).tolist(), source


# ------------------------------------------------------------------------------------------------
# reading, in DataLoader workers


class _BatchReader(Dataset):
    """Item i = batch i: ([(path, stem, image [3,H,W] float in [0,1])], [(path, error message)])."""

    def __init__(self, batches: Sequence[Sequence[tuple[Path, str]]]) -> None:
        self.batches = [list(b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[list[tuple[Path, str, torch.Tensor]], list[tuple[Path, str]]]:
        from gkd.data.layout import BadSampleError
        from gkd.data.segmentation import read_image

        items, errors = [], []
        for path, stem in self.batches[index]:
            try:
                items.append((path, stem, read_image(path)))
            except BadSampleError as e:
                errors.append((path, _reason(e)))
        return items, errors


def _reason(error: Exception) -> str:
    """Why an image could not be read, without repeating its path (the summary names it)."""
    problems = getattr(error, "problems", None)
    detail = getattr(problems[0], "detail", "") if problems else ""
    return detail or str(error)


def _as_is(batch: Any) -> Any:  # module-level, so DataLoader workers can pickle it
    return batch


def _same_size_runs(items: list[tuple[Path, str, torch.Tensor]]) -> list[list[tuple[Path, str, torch.Tensor]]]:
    runs: list[list[tuple[Path, str, torch.Tensor]]] = []
    for item in items:
        if runs and runs[-1][0][2].shape == item[2].shape:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


# ------------------------------------------------------------------------------------------------
# the tool


@dataclass
class PredictSummary:
    """What ``predict_paths`` did: written (image, mask, overlay) paths and skipped (image, reason)."""

    out_dir: Path
    written: list[tuple[Path, Path, Path]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    palette_source: str = "generated"
    seconds: float = 0.0

    @property
    def num_images(self) -> int:
        return len(self.written) + len(self.skipped)

    def format(self) -> str:
        lines = [f"wrote masks and overlays of {len(self.written)} of {self.num_images} image(s) to {self.out_dir} "
                 f"in {self.seconds:.1f} s (<stem>_mask.png: class ids with palette from {self.palette_source}; "
                 "<stem>_overlay.png)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable image(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def predict_paths(
    checkpoint: str | Path,
    inputs: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    *,
    mode: str = "slide",
    resize: int | Sequence[int] | None = None,
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    batch_size: int = 1,
    palette_from: str | Path | None = None,
    workers: int = 0,
    alpha: float = 0.5,
    device: str | torch.device | None = None,
    recursive: bool = False,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image of ``inputs`` with the stage-3 segmentor ``checkpoint``; write to ``out_dir``.

    mode: 'slide' (windows of ``crop`` every ``stride`` px, overlaps averaged) or 'whole'.
    resize: optional keep-ratio resize bounds before scoring (an int or an unordered pair of edge
        limits, mmseg semantics; masks are always written at the original size).
    crop: slide window size (default: the stage-3 training crop recorded in the file, else 512);
        stride: default 2/3 of the crop (512 -> 341).
    batch_size: images per forward pass (only images of equal size are batched together).
    palette_from: manifest whose palette colours the masks (default: the training manifest).
    workers: DataLoader processes decoding images (0 = in this process).
    alpha: overlay weight of the colour mask. device: default CUDA when available, else CPU.
    Returns a ``PredictSummary``; unreadable images are skipped (warning + summary), not fatal.
    """
    from tqdm.auto import tqdm

    from gkd.data.layout import BadSampleError, image_size
    from gkd.eval.inference import pair, predict
    from gkd.eval.visualize import save_prediction

    if mode not in ("slide", "whole"):
        raise ValueError(f"unknown mode {mode!r}; expected 'slide' or 'whole'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    images = collect_images(inputs, recursive=recursive)  # input errors before the model loads
    started = time.perf_counter()
    segmentor, metadata = load_stage3(checkpoint)
    num_classes = int(segmentor.num_classes)
    crop = pair(crop if crop is not None else (trained_crop_size(metadata) or DEFAULT_CROP), "crop")
    stride = pair(stride, "stride") if stride is not None else tuple(max(1, c * 2 // 3) for c in crop)
    resize = None if resize is None else pair(resize, "resize")
    palette, palette_source = resolve_palette(num_classes, metadata, palette_from)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    segmentor.to(device).eval()

    out = check_writable(out_dir, "the output folder")
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(out_dir=out, palette_source=palette_source)
    bar = tqdm(total=len(images), desc="predict", unit="img", disable=not progress)

    def skip(path: Path, reason: str) -> None:
        _log.warning("skipping unreadable image %s: %s", path, reason)
        summary.skipped.append((path, reason))

    groups: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    for path, stem in images:  # header only: (width, height) without decoding the pixels
        try:
            groups.setdefault(tuple(image_size(path)), []).append((path, stem))
        except BadSampleError as e:
            skip(path, _reason(e))
            bar.update(1)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    loader = DataLoader(_BatchReader(batches), batch_size=None, shuffle=False, num_workers=max(0, int(workers)),
                        collate_fn=_as_is)
    with torch.inference_mode():
        for items, errors in loader:
            for path, reason in errors:  # header fine, pixels not (e.g. a truncated file)
                skip(path, reason)
            for run in _same_size_runs(items):
                batch = torch.stack([img for _, _, img in run]).to(device)
                scores = predict(segmentor, batch, mode=mode, resize=resize, crop=crop, stride=stride,
                                 num_classes=num_classes)
                preds = scores.argmax(dim=1).cpu()
                for (path, stem, img), pred in zip(run, preds):
                    rel = Path(stem)
                    mask_path, overlay_path = save_prediction(out / rel.parent, rel.name, img, pred, palette, alpha=alpha)
                    summary.written.append((path, mask_path, overlay_path))
            bar.update(len(items) + len(errors))
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
