"""Segmentation datasets read through manifests (the on-disk side is ``gkd.data.layout``).

``build_dataset(manifest, split)`` returns a map-style ``SegDataset`` whose items are dicts::

    image  float32 [3, H, W]  RGB in [0, 1], not normalised (the segmentor normalises)
    label  int64   [H, W]     train ids, ignore_index (255) where ignored
    path   str                the image file

With ``on_bad="error"`` a bad sample (see ``gkd.data.layout``) raises ``BadSampleError`` naming the
file. With ``on_bad="skip"`` the sample is dropped, logged and recorded in ``dataset.skipped`` (the
problems) and ``dataset.skipped_images`` (one image path per dropped sample): pairing problems at
construction; decode-time problems lazily — the bad index is remembered and ``__getitem__`` returns
the next good sample instead (so a DataLoader keeps its length). Lazily found skips are counted in
the process that found them (each DataLoader worker has its own copy, which the main process never
sees); call ``dataset.validate(decode_images=True)`` once before training for an exact, upfront
count — it decodes every label (and image), drops the bad samples and returns the problems. Stage 3
does so with ``data.on_bad=skip``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gkd.data.manifest import load_manifest
from gkd.data.layout import (ON_BAD, READ_ERRORS, BadSampleError, LabelDecoder, ManifestLike, Problem, list_split,
                             map_pairs, outside_problem, resolve_root, size_problem)

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
def read_image(path: Path) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [0, 1]. Raises BadSampleError when unreadable."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except READ_ERRORS as exc:
        raise BadSampleError(f"cannot read image {path}: {type(exc).__name__}: {exc}",
                             [Problem("unreadable", str(path), f"{type(exc).__name__}: {exc}")]
                             ) from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class SegDataset(Dataset):
    """Image/label pairs of one manifest split (see the module docstring for items and bad input).

    Attributes: ``manifest``, ``split``, ``root``, ``samples`` (list of (image, label) paths),
    ``classes``, ``palette``, ``num_classes``, ``ignore_index``, ``skipped`` (list of ``Problem``),
    ``skipped_images`` (the image path of each dropped sample, once).
    """

    def __init__(self, manifest: ManifestLike, split: str, root: str | os.PathLike | None = None,
                 transform: Transform | None = None, on_bad: str = "error") -> None:
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.manifest = load_manifest(manifest)
        self.split, self.transform, self.on_bad = split, transform, on_bad
        self.root = resolve_root(self.manifest, root)
        self.decoder = LabelDecoder(self.manifest)
        self.skipped: list[Problem] = []
        self.skipped_images: list[str] = []
        self._bad: set[int] = set()

        listing = list_split(self.manifest, split, self.root)
        where = f"dataset {self.manifest.name!r} split {split!r}"
        if listing.missing_dirs:
            raise FileNotFoundError(f"{where}: folder not found: {listing.missing_dirs[0]}")
        if listing.unpaired_images:
            problems = [Problem("missing_label", str(img), f"no label file {lbl}")
                        for img, lbl in listing.unpaired_images]
            self._bad_input(problems, f"{where}: {len(problems)} image(s) without a label",
                            [str(img) for img, _ in listing.unpaired_images])
        if listing.unpaired_labels:
            logger.warning("%s: %d label file(s) without an image (unused), e.g. %s", where,
                           len(listing.unpaired_labels), listing.unpaired_labels[0])
        self.samples: list[tuple[Path, Path]] = listing.pairs
        if not self.samples:
            raise FileNotFoundError(
                f"{where}: no image/label pairs under {self.root} (image suffix "
                f"{' / '.join(self.manifest.image_suffixes)}, label suffix "
                f"{self.manifest.label_suffix}; found {listing.num_images} images, "
                f"{listing.num_labels} labels)")

    # -- properties the engine and evaluator use
    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        return self.manifest.palette

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def ignore_index(self) -> int:
        return self.manifest.ignore_index

    @property
    def num_skipped(self) -> int:
        """Problems recorded (a sample can have several); ``len(skipped_images)`` counts samples."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index`` (no decoding)."""
        return self.samples[index][0]

    def label_path(self, index: int) -> Path:
        """The label file of sample ``index`` (no decoding)."""
        return self.samples[index][1]

    def __repr__(self) -> str:
        return (f"SegDataset({self.manifest.name!r}, split={self.split!r}, root={str(self.root)!r}, "
                f"samples={len(self)}, skipped={self.num_skipped})")

    # -- bad input
    def _bad_input(self, problems: list[Problem], summary: str, images: list[str]) -> None:
        """Raise (on_bad=error) or record and log (on_bad=skip) bad samples (``images``: theirs)."""
        if self.on_bad == "error":
            lines = "\n  ".join(map(str, problems[:10]))
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise BadSampleError(f"{summary}:\n  {lines}{more}\n(on_bad='skip' drops such samples; "
                                 "`gkd data check` lists all of them)", problems)
        self.skipped += problems
        self.skipped_images += images
        for p in problems[:10]:
            logger.warning("skipping bad sample: %s", p)
        if len(problems) > 10:
            logger.warning("... skipping %d more bad samples (%s)", len(problems) - 10, summary)

    # -- loading
    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode sample ``index`` without transform -> (image [3,H,W] float, label [H,W] int64).

        Raises BadSampleError (naming the file) for any bad input, whatever ``on_bad`` is.
        """
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label, outside = self.decoder.decode(label_path)
        if outside:
            p = outside_problem(self.manifest, label_path, image_path, outside)
            raise BadSampleError(str(p), [p])
        if tuple(label.shape) != tuple(image.shape[1:]):
            p = size_problem(label_path, image_path, (image.shape[2], image.shape[1]),
                              (label.shape[1], label.shape[0]))
            raise BadSampleError(str(p), [p])
        return image, torch.from_numpy(label)

    def _item(self, index: int) -> dict:
        image, label = self.load(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return {"image": image, "label": label, "path": str(self.samples[index][0])}

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        if self.on_bad == "error":
            return self._item(index)
        # skip: a bad sample is replaced by the next good one (wrapping), so the length holds.
        for j in (i % n for i in range(index, index + n)):
            if j in self._bad:
                continue
            try:
                return self._item(j)
            except BadSampleError as exc:
                self._bad.add(j)
                self._bad_input(exc.problems, f"dataset {self.manifest.name!r}", [str(self.samples[j][0])])
        raise BadSampleError(f"dataset {self.manifest.name!r} split {self.split!r}: all {n} "
                             "samples are bad", self.skipped)

    def validate(self, num_workers: int = 0, decode_images: bool = False, *, rank: int = 0, world_size: int = 1,
                 gather: Callable[[list[Any]], list[Any]] | None = None) -> list[Problem]:
        """Check every sample upfront: label fully decoded, image size from its header or, with
        ``decode_images``, from a full decode (all ``__getitem__`` could fail on; about one
        image + label decode per sample, in ``num_workers`` threads).

        Distributed: each of ``world_size`` processes checks every ``world_size``-th sample from
        ``rank`` on and ``gather`` (e.g. ``accelerate.utils.gather_object``: a list from each
        process → their concatenation) shares the findings, so all drop the same samples.

        ``on_bad="error"``: raises BadSampleError listing the problems. ``on_bad="skip"``: drops
        the bad samples from ``samples``, records them in ``skipped`` / ``skipped_images`` and
        returns the problems.
        """
        mine = range(rank, len(self.samples), world_size)
        found = map_pairs(self.decoder, [self.samples[i] for i in mine], num_workers, decode_images)
        bad = [(i, ps) for i, ps in zip(mine, found) if ps]
        if gather is not None:
            bad = sorted(gather(bad), key=lambda item: item[0])
        problems = [p for _, ps in bad for p in ps]
        if problems:
            self._bad_input(problems, f"dataset {self.manifest.name!r} split {self.split!r}: "
                                      f"{len(bad)} bad sample(s)", [str(self.samples[i][0]) for i, _ in bad])
            drop = {i for i, _ in bad}
            self.samples = [s for i, s in enumerate(self.samples) if i not in drop]
            self._bad.clear()  # indices changed
        return problems


def build_dataset(manifest: ManifestLike, split: str, root: str | os.PathLike | None = None,
                  transform: Transform | None = None, on_bad: str = "error") -> SegDataset:
    """The ``split`` of a dataset described by a manifest (name, path or ``Manifest``).

    Args:
        root: dataset folder; default ``$GKD_DATA_ROOT/<default_root>`` (see ``resolve_root``).
        transform: ``(image [3,H,W] float, label [H,W] int64) -> (image, label)``, e.g.
            ``gkd.data.seg_transforms.build_seg_train_transform()``.
        on_bad: ``"error"`` raises BadSampleError on bad input; ``"skip"`` drops, counts
            (``dataset.skipped``) and logs bad samples.
    """
    return SegDataset(manifest, split, root=root, transform=transform, on_bad=on_bad)
