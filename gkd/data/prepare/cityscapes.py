"""Cityscapes classes (train-id order) and the layout checks ``cityscapes``, ``acdc``, ``bdd100k``.

Layout checks: nothing is written but the report; the raw folder is read as it is
(``data.root=SRC``). Problems (unpaired files, values outside the map, size mismatches) are
listed in ``report.problems`` (the CLI then exits 1).

Facts relied on (read in public code, not copied):

* BDD100K: the 10k semantic segmentation release is ``images/10k/{train,val,test}`` and
  ``labels/sem_seg/masks/{train,val}``; the older release is ``seg/images/{train,val,test}`` and
  ``seg/labels/{train,val}/<name>_train_id.png`` (mmsegmentation's old BDD100KDataset and other
  loaders use that suffix).
* ACDC: ``rgb_anon/<condition>/{train,val,test}/<sequence>/..._rgb_anon.png`` and
  ``gt/<condition>/{train,val}/...`` (test labels are not public).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from gkd.data.prepare.base import PrepareError, PrepareReport, listing, register, walk

if TYPE_CHECKING:  # torch-free import of this module for the CLI
    from gkd.data.layout import SplitCheck

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")  # train-id order
TRAIN_ID = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}


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
    from gkd.data.layout import check_dataset

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
                           f"{listing(src)}")
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
                           f"{', '.join(ACDC_CONDITIONS)}) in {src}; found: {listing(src)}"
                           + (f"; rgb_anon holds: {listing(rgb)}" if rgb.is_dir() else ""))
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
                        f"{src} holds: {listing(src)}")


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
