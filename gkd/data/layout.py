"""How a segmentation dataset lies on disk, read without torch: its root, the image/label pairs of a
split, label decoding through the manifest's map, per-pair checks and the checker behind
``gkd data check``.

Bad input is never silent. Three kinds exist: an image without its label file (found when the split
is listed), a label value outside the manifest's map, and an image/label size mismatch (found when a
pair is decoded; unreadable files count as bad too). ``check_dataset`` reports, per split, counts,
unpaired files, label values outside the map (value -> files) and size mismatches, without raising.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image

from gkd.data.manifest import Manifest, SplitPart, load_manifest

logger = logging.getLogger(__name__)

ManifestLike = Union[str, "os.PathLike[str]", Manifest]
ON_BAD = ("error", "skip")
ENV_ROOT = "GKD_DATA_ROOT"
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


class BadSampleError(ValueError):
    """A sample cannot be used as it is; ``.problems`` lists what is wrong (each names a file)."""

    def __init__(self, message: str, problems: Sequence["Problem"] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Problem:
    """One bad sample. ``kind``: missing_label | outside_map | size_mismatch | unreadable.

    ``path`` is the file at fault (the image for missing_label and unreadable images, else the
    label); ``values`` are the raw label values outside the map (rgb colours packed).
    """

    kind: str
    path: str
    detail: str
    values: tuple[int, ...] = ()
    image: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


# ============================================================================ roots and pairing

def resolve_root(manifest: ManifestLike, root: str | os.PathLike | None = None) -> Path:
    """The dataset's root folder: ``root`` if given, else the manifest's own ``root`` field,
    else ``$GKD_DATA_ROOT/<default_root>``. Raises FileNotFoundError naming the path (so that an
    evaluation suite can fail before loading a model)."""
    m = load_manifest(manifest)
    if root is not None:
        path = Path(root).expanduser()
    elif m.root is not None:
        path = m.root
    else:
        env = os.environ.get(ENV_ROOT)
        if not env:
            raise FileNotFoundError(
                f"dataset {m.name!r}: no root given and ${ENV_ROOT} is not set; pass a root "
                f"(--root) or set ${ENV_ROOT} so that ${ENV_ROOT}/{m.default_root} is the dataset")
        path = Path(env).expanduser() / m.default_root
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {m.name!r}: root folder not found: {path}")
    return path


def _first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return None


def _strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    low = name.lower()
    for s in suffixes:
        if low.endswith(s.lower()) and len(name) > len(s):
            return name[: -len(s)]
    return None


def walk_keys(folder: Path, suffixes: Sequence[str], include: Sequence[str]) -> dict[str, Path]:
    """key (relative path minus suffix, '/'-separated) -> file, for files ending in a suffix."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(folder).as_posix()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            stem = _strip_suffix(name, suffixes)
            if stem is None:
                continue
            key = stem if rel_dir == "." else f"{rel_dir}/{stem}"
            if include and not any(fnmatch.fnmatchcase(key, p)
                                   or fnmatch.fnmatchcase(key.rsplit("/", 1)[-1], p)
                                   for p in include):
                continue
            if key in found:  # e.g. a.jpg and a.png with the folder default suffixes
                logger.warning("%s: %s and %s have the same key %r; using the first",
                               folder, found[key].name, name, key)
                continue
            found[key] = Path(dirpath) / name
    return found


@dataclass
class SplitListing:
    """What the folders of one split hold (absolute paths, sorted)."""

    split: str
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unpaired_images: list[tuple[Path, Path]] = field(default_factory=list)  # (image, expected label)
    unpaired_labels: list[Path] = field(default_factory=list)
    num_images: int = 0
    num_labels: int = 0
    image_dirs: list[Path] = field(default_factory=list)
    label_dirs: list[Path] = field(default_factory=list)
    missing_dirs: list[str] = field(default_factory=list)  # "images: a | b" (alternatives tried)


def _split_parts(m: Manifest, split: str) -> tuple[SplitPart, ...]:
    if split not in m.splits:
        raise KeyError(f"dataset {m.name!r} ({m.source()}) has no split {split!r}; "
                       f"splits: {', '.join(m.splits)}")
    return m.splits[split]


def list_split(manifest: ManifestLike, split: str, root: str | os.PathLike | None = None,
               ) -> SplitListing:
    """Pair the images and labels of ``split`` (missing folders are recorded, not raised)."""
    m = load_manifest(manifest)
    root = resolve_root(m, root)
    out = SplitListing(split=split)
    for part in _split_parts(m, split):
        img_dir = _first_existing(root, part.images)
        lbl_dir = _first_existing(root, part.labels)
        if img_dir is None:
            out.missing_dirs.append("images: " + " | ".join(str(root / p) for p in part.images))
        if lbl_dir is None:
            out.missing_dirs.append("labels: " + " | ".join(str(root / p) for p in part.labels))
        images = walk_keys(img_dir, m.image_suffixes, part.include) if img_dir else {}
        labels = walk_keys(lbl_dir, (m.label_suffix,), part.include) if lbl_dir else {}
        out.num_images += len(images)
        out.num_labels += len(labels)
        if img_dir:
            out.image_dirs.append(img_dir)
        if lbl_dir:
            out.label_dirs.append(lbl_dir)
        expected_dir = lbl_dir or root / part.labels[0]
        for key, img in images.items():
            if key in labels:
                out.pairs.append((img, labels[key]))
            else:
                out.unpaired_images.append((img, expected_dir / f"{key}{m.label_suffix}"))
        out.unpaired_labels += [p for k, p in labels.items() if k not in images]
    return out


def manifest_image_files(manifest: ManifestLike, split: str,
                         root: str | os.PathLike | None = None) -> list[Path]:
    """The image files of a split (labels not needed), sorted; for stage-2 sharding::

        write_shards(root, out_dir, files=manifest_image_files("gta5", "train", root))
    """
    m = load_manifest(manifest)
    root_path = resolve_root(m, root)
    files: list[Path] = []
    for part in _split_parts(m, split):
        img_dir = _first_existing(root_path, part.images)
        if img_dir is None:
            raise FileNotFoundError(f"dataset {m.name!r} split {split!r}: image folder not found: "
                                    + " | ".join(str(root_path / p) for p in part.images))
        files += walk_keys(img_dir, m.image_suffixes, part.include).values()
    if not files:
        raise FileNotFoundError(f"dataset {m.name!r} split {split!r}: no images ending in "
                                f"{' / '.join(m.image_suffixes)} under {root_path}")
    return sorted(files)


# ============================================================================ decoding

class LabelDecoder:
    """Reads label files of a manifest's encoding and maps raw values to train ids.

    ``ids``: single-channel values (L, P indices, 16/32-bit); ``palette``: P-mode indices (L also
    accepted); ``rgb``: colours, compared as packed ints. Values outside the map come out as -1
    in ``map`` and are listed, so callers decide whether to raise, skip or report.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.m = manifest
        self.fill = manifest.ignore_index if manifest.unlisted == "ignore" else -1
        self.table = {**{v: manifest.ignore_index for v in manifest.ignore_values},
                      **dict(manifest.label_map)}
        self.lut: np.ndarray | None = None
        if manifest.label_encoding != "rgb":
            # A lookup table covers every 8-bit value and the largest listed one; larger values
            # (16/32-bit labels) go through the slow path in ``map``.
            size = max(256, max(self.table, default=0) + 1)
            self.lut = np.full(size, self.fill, dtype=np.int64)
            for k, v in self.table.items():
                self.lut[k] = v

    def read_raw(self, path: Path) -> np.ndarray:
        """Raw label values [H, W] int64 (rgb: packed colours). Raises BadSampleError."""
        enc = self.m.label_encoding
        try:
            with Image.open(path) as im:
                mode = im.mode
                if enc == "rgb":
                    if mode not in ("RGB", "RGBA", "P"):
                        raise format_error(path, mode, "an RGB colour image (label_encoding: rgb)")
                    a = np.asarray(im.convert("RGB")).astype(np.int64)
                    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
                ok = ("P", "L") if enc == "palette" else _SINGLE_CHANNEL_MODES
                if mode not in ok:
                    what = ("a palette (P-mode) PNG (label_encoding: palette)" if enc == "palette"
                            else "a single-channel image (label_encoding: ids)")
                    raise format_error(path, mode, what)
                return np.asarray(im).astype(np.int64)
        except BadSampleError:
            raise
        except READ_ERRORS as exc:
            raise BadSampleError(f"cannot read label {path}: {type(exc).__name__}: {exc}",
                                 [Problem("unreadable", str(path), f"{type(exc).__name__}: {exc}")]
                                 ) from exc

    def map(self, raw: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Raw values [H, W] -> (train ids int64 [H, W] with -1 outside the map, outside values)."""
        if self.lut is not None and raw.size and raw.min() >= 0 and raw.max() < self.lut.size:
            out = self.lut[raw]
        else:  # rgb colours, or ids beyond the table: map the distinct values only
            vals, inv = np.unique(raw, return_inverse=True)
            mapped = np.array([self.table.get(int(v), self.fill) for v in vals], dtype=np.int64)
            out = mapped[inv].reshape(raw.shape)
        if self.fill != -1:
            return out, []
        outside = np.unique(raw[out < 0]).tolist() if (out < 0).any() else []
        return out, outside

    def decode(self, path: Path) -> tuple[np.ndarray, list[int]]:
        return self.map(self.read_raw(path))


def format_error(path: Path, mode: str, expected: str) -> BadSampleError:
    detail = f"label image mode is {mode}, expected {expected}"
    return BadSampleError(f"label {path}: {detail}", [Problem("unreadable", str(path), detail)])


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (no full decode). Raises BadSampleError."""
    try:
        with Image.open(path) as im:
            return im.size
    except READ_ERRORS as exc:
        raise BadSampleError(f"cannot read image {path}: {type(exc).__name__}: {exc}",
                             [Problem("unreadable", str(path), f"{type(exc).__name__}: {exc}")]
                             ) from exc


def decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) after a full RGB decode, as training reads the image (a header can be fine
    while the data is cut short). Raises BadSampleError."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB").size
    except READ_ERRORS as exc:
        raise BadSampleError(f"cannot read image {path}: {type(exc).__name__}: {exc}",
                             [Problem("unreadable", str(path), f"{type(exc).__name__}: {exc}")]
                             ) from exc


def outside_problem(m: Manifest, label: Path, image: Path, values: list[int]) -> Problem:
    shown = ", ".join(m.format_raw(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
    return Problem("outside_map", str(label),
                   f"label values outside the map of manifest {m.name!r}: {shown}",
                   tuple(values), str(image))


def size_problem(label: Path, image: Path, img_wh: tuple[int, int], lbl_wh: tuple[int, int]
                  ) -> Problem:
    return Problem("size_mismatch", str(label),
                   f"label is {lbl_wh[0]}x{lbl_wh[1]} but image {image} is {img_wh[0]}x{img_wh[1]}",
                   (), str(image))


def inspect_pair(decoder: LabelDecoder, image: Path, label: Path, decode_image: bool = False) -> list[Problem]:
    """Problems of one pair; the image's size comes from its header, or with ``decode_image`` from a
    full decode (which also finds images cut short)."""
    problems: list[Problem] = []
    try:
        img_wh = decoded_size(image) if decode_image else image_size(image)
    except BadSampleError as exc:
        problems += exc.problems
        img_wh = None
    try:
        raw = decoder.read_raw(label)
    except BadSampleError as exc:
        return problems + exc.problems
    _, outside = decoder.map(raw)
    if outside:
        problems.append(outside_problem(decoder.m, label, image, outside))
    lbl_wh = (raw.shape[1], raw.shape[0])
    if img_wh is not None and img_wh != lbl_wh:
        problems.append(size_problem(label, image, img_wh, lbl_wh))
    return problems


# ============================================================================ the dataset

def map_pairs(decoder: LabelDecoder, pairs: Sequence[tuple[Path, Path]], num_workers: int,
              decode_images: bool = False) -> list[list[Problem]]:
    """``inspect_pair`` over pairs, in threads when ``num_workers > 0`` (PIL decodes outside
    the GIL)."""
    if num_workers <= 0:
        return [inspect_pair(decoder, i, l, decode_images) for i, l in pairs]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(lambda p: inspect_pair(decoder, *p, decode_images), pairs))


# ============================================================================ dataset check

@dataclass
class SplitCheck:
    """What ``check_dataset`` found in one split (paths as strings)."""

    split: str
    num_images: int = 0
    num_labels: int = 0
    num_paired: int = 0
    unpaired_images: list[str] = field(default_factory=list)
    unpaired_labels: list[str] = field(default_factory=list)
    outside_map: dict[int, list[str]] = field(default_factory=dict)  # raw value -> label files
    size_mismatches: list[str] = field(default_factory=list)  # one readable line each
    unreadable: list[str] = field(default_factory=list)
    missing_dirs: list[str] = field(default_factory=list)

    @property
    def num_problems(self) -> int:
        outside_files = {f for fs in self.outside_map.values() for f in fs}
        return (len(self.unpaired_images) + len(self.unpaired_labels) + len(outside_files)
                + len(self.size_mismatches) + len(self.unreadable) + len(self.missing_dirs))

    @property
    def ok(self) -> bool:
        return self.num_problems == 0 and self.num_paired > 0


@dataclass
class CheckReport:
    """``check_dataset`` result: ``splits[name] -> SplitCheck``; ``ok`` when every split is."""

    manifest: Manifest
    root: Path
    splits: dict[str, SplitCheck]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.splits.values())

    def format(self, max_listed: int = 20) -> str:
        """Human-readable report; at most ``max_listed`` entries per list."""
        m = self.manifest
        lines = [f"dataset {m.name} ({m.source()})", f"root    {self.root}"]
        if m.layout:
            lines.append("layout  " + " ".join(m.layout.split()))
        for s in self.splits.values():
            status = "OK" if s.ok else f"{s.num_problems} problem(s)"
            if s.num_paired == 0 and not s.num_problems:
                status = "no image/label pairs"
            lines.append(f"split {s.split}: {s.num_images} images, {s.num_labels} labels, "
                         f"{s.num_paired} paired - {status}")
            lines += _listed("missing folders", s.missing_dirs, max_listed)
            lines += _listed("images without a label", s.unpaired_images, max_listed)
            lines += _listed("labels without an image", s.unpaired_labels, max_listed)
            if s.outside_map:
                lines.append(f"  label values outside the map ({len(s.outside_map)}):")
                for v, files in list(sorted(s.outside_map.items()))[:max_listed]:
                    name = m.raw_names.get(v)
                    lines.append(f"    {m.format_raw(v)}{f' ({name})' if name else ''}: "
                                 f"{len(files)} file(s), e.g. {files[0]}")
            lines += _listed("image/label size mismatches", s.size_mismatches, max_listed)
            lines += _listed("unreadable files", s.unreadable, max_listed)
        lines.append("RESULT: " + ("OK" if self.ok else "NOT OK"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _listed(title: str, items: Sequence[str], max_listed: int) -> list[str]:
    if not items:
        return []
    out = [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items[:max_listed]]
    if len(items) > max_listed:
        out.append(f"    ... and {len(items) - max_listed} more")
    return out


def check_dataset(manifest: ManifestLike, root: str | os.PathLike | None = None,
                  splits: str | Iterable[str] | None = None, num_workers: int = 0) -> CheckReport:
    """Check the given splits (default: all) of a dataset and report, never raising on bad
    samples (a missing root or an unknown split still raise). Every label is decoded once;
    ``num_workers`` threads share that work. Paths in the report are relative to the root."""
    m = load_manifest(manifest)
    root_path = resolve_root(m, root)
    names = list(m.splits) if splits is None else ([splits] if isinstance(splits, str)
                                                   else list(splits))
    for name in names:
        _split_parts(m, name)  # unknown split -> KeyError before any work
    decoder = LabelDecoder(m)

    def rel(p: str | Path) -> str:
        try:
            return Path(p).relative_to(root_path).as_posix()
        except ValueError:
            return str(p)

    report = CheckReport(m, root_path, {})
    for name in names:
        listing = list_split(m, name, root_path)
        sc = SplitCheck(name, listing.num_images, listing.num_labels, len(listing.pairs),
                        [f"{rel(i)} (expected {rel(l)})" for i, l in listing.unpaired_images],
                        [rel(p) for p in listing.unpaired_labels],
                        missing_dirs=list(listing.missing_dirs))
        for problem in (p for ps in map_pairs(decoder, listing.pairs, num_workers) for p in ps):
            if problem.kind == "outside_map":
                for v in problem.values:
                    sc.outside_map.setdefault(v, []).append(rel(problem.path))
            elif problem.kind == "size_mismatch":
                detail = problem.detail.replace(str(problem.image), rel(problem.image))
                sc.size_mismatches.append(f"{rel(problem.path)}: {detail}")
            else:
                sc.unreadable.append(f"{rel(problem.path)}: {problem.detail}")
        report.splits[name] = sc
    return report
