"""``gta5`` (``on_mismatch`` skip|resize, ``copy``, ``overwrite``): palette labels read as indices::

    OUT/images/<split>/<id>.png        link to the raw frame (copy with copy=True)
    OUT/labels/<split>/<id>.png        single-channel uint8 Cityscapes label ids (as raw)

split = train/val/test from ``split.mat`` when present, else everything in ``train``.

Facts relied on (read in public code, not copied):

* GTA5 ("Playing for Data"): ``images/<5-digit>.png`` and ``labels/<5-digit>.png``, labels are
  P-mode PNGs whose indices are Cityscapes label ids; ``split.mat`` holds ``trainIds``, ``valIds``,
  ``testIds`` as column vectors of 1-based frame numbers (a public GTA5 loader reads
  ``split[mode + "Ids"][:, 0]`` and opens ``'%05d.png' % id``; the same loader leaves out frames
  15188, 17705 and 20801-20860 for image/label size mismatches — not verified here, every
  mismatch is found by comparing sizes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gkd.data.prepare.base import (PrepareError, PrepareReport, Skip, header_size, listing, place_image,
                                   prepare_out_dir, read_index_label, register, size_text, unpaired_labels,
                                   walk, write_label_png)

GTA5_SPLIT_KEYS = {"train": "trainIds", "val": "valIds", "test": "testIds"}
ON_MISMATCH = ("skip", "resize")


def _gta5_folders(src: Path) -> tuple[Path, Path]:
    images, labels = src / "images", src / "labels"
    if not images.is_dir() or not labels.is_dir():
        nested = [p.name for p in src.iterdir() if p.is_dir() and (p / "images").is_dir()]
        hint = f" (images/ is one level down in {', '.join(nested)}: use that as --src)" if nested else ""
        raise PrepareError(f"gta5: expected images/<5-digit>.png and labels/<5-digit>.png in {src}"
                           f"{hint}; found: {listing(src)}")
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
        from gkd.data.layout import LabelDecoder

        self.out, self.on_mismatch, self.copy, self.report = out, on_mismatch, copy, report
        self.decoder = LabelDecoder(load_manifest("gta5"))  # the ids the shipped manifest maps

    def __call__(self, key: str, split: str, image: Path, label: Path) -> None:
        wh = header_size(image)
        raw = read_index_label(label)
        _, outside = self.decoder.map(raw.astype(np.int64))
        if outside:
            raise Skip(label, f"label ids {outside[:10]} are not Cityscapes label ids 0-33")
        lbl_wh = (raw.shape[1], raw.shape[0])
        if lbl_wh != wh:
            text = f"label is {size_text(lbl_wh)} but image {image.name} is {size_text(wh)}"
            if self.on_mismatch == "skip":
                raise Skip(label, f"size mismatch: {text} (--on-mismatch resize keeps it)")
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
        raise PrepareError(f"gta5: no .png images in {image_dir}; found: {listing(image_dir)}")
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
        except Skip as s:
            report.skip(s.file, s.reason)
    unpaired_labels(labels, images, report)
    report.splits = {s: {"images": n, "labels": n} for s, n in counts.items()}
    report.notes.append("labels/<split>/*.png hold Cityscapes label ids (as the raw palette "
                        "indices); the gta5 manifest maps them to train ids")
    return report
