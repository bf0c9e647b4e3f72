"""What every `gkd data prepare` family shares: `PrepareReport`, `PrepareError`, the preparer
registry (`PREPARERS`, `register`) and the file helpers the preparers use."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

REPORT_NAME = "prepare_report.json"
IGNORE = 255
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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


# ============================================================================ shared helpers

class Skip(Exception):
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
    Any other mode (RGB, RGBA, 16-bit) raises `Skip`: an RGB label holds colours, not indices.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                what = "colours, not class indices" if im.mode in ("RGB", "RGBA") else "not 8-bit indices"
                raise Skip(path, f"label image mode is {im.mode} ({what}); expected a palette (P) "
                                 "or single-channel (L) PNG")
            return np.asarray(im).copy()
    except READ_ERRORS as exc:
        raise Skip(path, f"unreadable label: {type(exc).__name__}: {exc}") from exc


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header (`segmentation.image_size`); `Skip` when unreadable."""
    from gkd.data.layout import BadSampleError, image_size

    try:
        return image_size(path)
    except BadSampleError as exc:
        raise Skip(path, f"unreadable image: {exc.problems[0].detail}") from exc


def walk(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """key (path below `folder` without suffix, '/'-separated) → file; the manifests' pairing rule."""
    from gkd.data.layout import walk_keys

    return walk_keys(folder, suffixes, ())


def size_text(wh: tuple[int, int]) -> str:
    """(width, height) as "WxH", for messages."""
    return f"{wh[0]}x{wh[1]}"


def listing(folder: Path, limit: int = 15) -> str:
    """The first entries of a folder, for messages."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def unpaired_labels(labels: dict[str, Path], keys: Iterable[str], report: PrepareReport) -> None:
    """Record every label whose key is not among the image `keys` as skipped."""
    for key in sorted(set(labels) - set(keys)):
        report.skip(labels[key], "label without an image")
