"""Segmentation transforms on tensors: the paper's stage-3 augmentation and the test-time resize.

Both take and return ``(image float32 [3, H, W] in [0, 1], label int64 [H, W])``.

Training (mmsegmentation's pipeline, re-implemented; the definitions follow mmseg 1.x
``RandomResize`` / ``RandomCrop`` / ``RandomFlip`` / ``PhotoMetricDistortion`` and the data
preprocessor's padding):

1. random keep-ratio resize, image bilinear, label nearest (so no new label values appear), by one of
   two rules: ``short_edges`` (the authors' stage-3 configs: mmseg ``RandomChoiceResize`` over
   ``ResizeShortestEdge``) draws a short side uniformly from the list and shrinks the result so
   that the long side is at most ``max_size`` (see ``short_edge_size``); otherwise (mmseg
   ``RandomResize``) ``r ~ U(ratio_range)`` gives the bound ``(int(scale[0] r), int(scale[1] r))``
   = (long side, short side);
2. random crop to ``crop_size``; with ``cat_max_ratio < 1`` a crop is redrawn up to 10 times until
   it holds at least two classes and no class covers ``cat_max_ratio`` or more of its non-ignored
   pixels (after 10 failures the 11th draw is kept, as in mmseg);
3. horizontal flip with probability ``flip_prob`` (image and label together);
4. photometric distortion, each step with probability 1/2: brightness ``+U(-32, 32)``, contrast
   ``*U(0.5, 1.5)`` either second or last (coin flip), saturation ``*U(0.5, 1.5)`` and hue
   ``+randint(-18, 18)`` (OpenCV units of 2 degrees, upper bound exclusive as numpy's) in HSV.
   Values are on the 0..255 scale and clipped after each step like mmseg, but kept in float (mmseg
   truncates to uint8 after every step; that rounding is not reproduced);
5. padding to the crop size at the bottom/right: image 0, label ``ignore_index``.

Randomness: ``generator=None`` draws from torch's global RNG, which DataLoader seeds differently
in every worker — use that for training. A ``generator`` (or ``seed``) makes a transform
reproducible in one process; do not share one seeded transform across DataLoader workers (every
worker would hold a copy of the same generator state and repeat the same augmentations).

Evaluation: ``build_seg_eval_transform(resize)`` resizes the image only (keep ratio, bilinear) and
leaves the label at its original resolution, so metrics are computed at the original size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Size = tuple[int, int]


# ----------------------------------------------------------------------------- random draws

def _uniform(lo: float, hi: float, gen: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(lo: int, hi: int, gen: torch.Generator | None) -> int:
    """Integer in [lo, hi) (numpy ``randint`` convention)."""
    return int(torch.randint(lo, hi, (), generator=gen))


def _coin(gen: torch.Generator | None, p: float = 0.5) -> bool:
    return float(torch.rand((), generator=gen)) < p


# ----------------------------------------------------------------------------- geometry

def rescale_size(height: int, width: int, scale: int | Sequence[int]) -> Size:
    """Keep-ratio output (height, width) for a (long, short) bound, as mmcv ``imrescale``:
    the factor is ``min(long / max(h, w), short / min(h, w))`` and sizes round half up.
    An int bound means (n, n). E.g. 2048x1024 with (1024, 512) -> (512, 1024)."""
    if isinstance(scale, int):
        scale = (scale, scale)
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def short_edge_size(height: int, width: int, short: int, max_size: int | None) -> Size:
    """Output (height, width) of mmseg ``ResizeShortestEdge``: the short side becomes ``short``,
    then everything shrinks so that the long side is at most ``max_size``; the rounded size is the
    bound of a keep-ratio resize (mmcv ``imrescale``), as mmseg applies it."""
    factor = short / min(height, width)
    new_h, new_w = (short, factor * width) if height < width else (factor * height, short)
    if max_size and max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
    return rescale_size(height, width, (max(new_h, new_w), min(new_h, new_w)))


def resize_image(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize of [3, H, W] to ``size`` (h, w); half-pixel centres, no antialias (as
    OpenCV's INTER_LINEAR that mmseg uses)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def resize_label(label: torch.Tensor, size: Size) -> torch.Tensor:
    """Nearest resize of [H, W] integer labels (only existing values can appear)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    # float32 holds every label value below 2**24 exactly
    out = F.interpolate(label[None, None].float(), size=size, mode="nearest")
    return out[0, 0].to(label.dtype)


def crop_ok(label: torch.Tensor, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg's acceptance test: >= 2 classes among non-ignored pixels and the largest one
    covering less than ``cat_max_ratio`` of them."""
    values, counts = torch.unique(label, return_counts=True)
    counts = counts[values != ignore_index]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def random_crop(image: torch.Tensor, label: torch.Tensor, crop_size: Size,
                cat_max_ratio: float = 1.0, ignore_index: int = 255,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop of at most ``crop_size`` (h, w) (smaller inputs keep their size)."""
    h, w = label.shape[-2:]
    ch, cw = crop_size

    def draw() -> tuple[int, int]:
        return (_randint(0, max(h - ch, 0) + 1, generator), _randint(0, max(w - cw, 0) + 1, generator))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if crop_ok(label[y:y + ch, x:x + cw], cat_max_ratio, ignore_index):
                break
            y, x = draw()
    return image[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def pad_to(image: torch.Tensor, label: torch.Tensor, size: Size, ignore_index: int = 255,
           image_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to ``size`` (h, w): image with ``image_value``, label with ignore."""
    ph, pw = max(size[0] - image.shape[-2], 0), max(size[1] - image.shape[-1], 0)
    if ph == 0 and pw == 0:
        return image, label
    image = F.pad(image, (0, pw, 0, ph), value=image_value)
    label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


# ----------------------------------------------------------------------------- colour

def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = image.unbind(0)
    maxc, _ = image.max(0)
    minc, _ = image.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = hsv.unbind(0)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = {  # channel -> value for sector 0..5
        0: torch.stack([v, q, p, p, t, v]),
        1: torch.stack([t, v, v, q, p, p]),
        2: torch.stack([p, p, t, v, v, q]),
    }
    return torch.stack([choices[c].gather(0, i[None])[0] for c in range(3)])


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on float [3, H, W] images in [0, 1] (see module docstring)."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        gen = generator
        if _coin(gen):  # brightness: + beta on the 0..255 scale
            image = (image + _uniform(-self.brightness_delta, self.brightness_delta, gen) / 255.0
                     ).clamp(0.0, 1.0)
        contrast_last = _randint(0, 2, gen) == 0  # mmseg: mode 0 -> contrast after hue
        if not contrast_last:
            image = self._contrast(image, gen)
        if _coin(gen):  # saturation
            hsv = rgb_to_hsv(image)
            hsv[1] = (hsv[1] * _uniform(*self.saturation_range, gen)).clamp(0.0, 1.0)
            image = hsv_to_rgb(hsv)
        if _coin(gen):  # hue: OpenCV's uint8 hue has 180 steps per turn
            shift = _randint(-self.hue_delta, self.hue_delta, gen) if self.hue_delta > 0 else 0
            hsv = rgb_to_hsv(image)
            hsv[0] = (hsv[0] + shift / 180.0) % 1.0
            image = hsv_to_rgb(hsv)
        if contrast_last:
            image = self._contrast(image, gen)
        return image.clamp(0.0, 1.0)

    def _contrast(self, image: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if _coin(gen):  # mmseg's contrast is a plain gain (no mean subtraction)
            image = (image * _uniform(*self.contrast_range, gen)).clamp(0.0, 1.0)
        return image


# ----------------------------------------------------------------------------- pipelines

def _pair(v: int | Sequence[int]) -> Size:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SegTrainTransform:
    """resize -> crop -> flip -> photometric -> pad; ``(image, label) -> (image, label)``."""

    def __init__(self, crop_size: int | Sequence[int] | None = 512,
                 scale: Sequence[int] | None = (2048, 512),
                 ratio_range: Sequence[float] | None = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, ignore_index: int = 255,
                 generator: torch.Generator | None = None, short_edges: Sequence[int] | None = None,
                 max_size: int | None = None) -> None:
        if short_edges is not None and (not short_edges or min(short_edges) <= 0):
            raise ValueError(f"short_edges must be positive side lengths, got {list(short_edges)}")
        self.short_edges = None if short_edges is None else tuple(int(s) for s in short_edges)
        self.max_size = None if max_size is None else int(max_size)
        self.crop_size = None if crop_size is None else _pair(crop_size)
        self.scale = None if scale is None else (int(scale[0]), int(scale[1]))
        self.ratio_range = None if ratio_range is None else (float(ratio_range[0]),
                                                             float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.ignore_index = int(ignore_index)
        self.generator = generator

    def random_size(self, height: int, width: int) -> Size | None:
        """The (height, width) this draw resizes a ``height`` × ``width`` image to (None: unchanged)."""
        if self.short_edges is not None:
            short = self.short_edges[_randint(0, len(self.short_edges), self.generator)]
            return short_edge_size(height, width, short, self.max_size)
        bound = self.random_scale()
        return None if bound is None else rescale_size(height, width, bound)

    def random_scale(self) -> Size | None:
        """The (long, short) bound of this draw (mmcv RandomResize with ``ratio_range``)."""
        if self.scale is None:
            return None
        if self.ratio_range is None:
            return self.scale
        r = _uniform(*self.ratio_range, self.generator)
        return int(self.scale[0] * r), int(self.scale[1] * r)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(image.shape[1:]) != tuple(label.shape):
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in size")
        gen = self.generator
        size = self.random_size(image.shape[1], image.shape[2])
        if size is not None:
            image, label = resize_image(image, size), resize_label(label, size)
        if self.crop_size is not None:
            image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio,
                                       self.ignore_index, gen)
        if self.flip_prob > 0 and _coin(gen, self.flip_prob):
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric is not None:
            image = self.photometric(image, gen)
        if self.crop_size is not None:
            image, label = pad_to(image, label, self.crop_size, self.ignore_index)
        return image.contiguous(), label.contiguous()

    def __repr__(self) -> str:
        resize = (f"short_edges={list(self.short_edges)}, max_size={self.max_size}" if self.short_edges
                  else f"scale={self.scale}, ratio_range={self.ratio_range}")
        return (f"SegTrainTransform(crop_size={self.crop_size}, {resize}, cat_max_ratio={self.cat_max_ratio}, "
                f"flip_prob={self.flip_prob}, photometric={self.photometric is not None}, "
                f"ignore_index={self.ignore_index})")


class SegEvalTransform:
    """Keep-ratio resize of the image only; the label stays at its original size."""

    def __init__(self, resize: int | Sequence[int] | None) -> None:
        self.resize = None if resize is None else _pair(resize)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resize is not None:
            image = resize_image(image, rescale_size(image.shape[1], image.shape[2], self.resize))
        return image, label

    def __repr__(self) -> str:
        return f"SegEvalTransform(resize={self.resize})"


def build_seg_train_transform(crop_size: int | Sequence[int] = 512,
                              scale: Sequence[int] | None = (2048, 512),
                              ratio_range: Sequence[float] | None = (0.5, 2.0),
                              cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                              photometric: bool = True, ignore_index: int = 255,
                              generator: torch.Generator | None = None,
                              seed: int | None = None, short_edges: Sequence[int] | None = None,
                              max_size: int | None = None) -> SegTrainTransform:
    """The paper's stage-3 augmentation (ARCHITECTURE.md §1); see the module docstring for each step.

    ``crop_size``: int or (h, w). ``short_edges``/``max_size``: the authors' resize (a short side
    drawn from the list); else ``scale``: (long, short) bound before the random ratio.
    ``seed`` builds a private generator (only when ``generator`` is None).
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return SegTrainTransform(crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric,
                             ignore_index, generator, short_edges, max_size)


def build_seg_eval_transform(resize: int | Sequence[int] | None) -> SegEvalTransform:
    """Test-time transform: keep-ratio resize of the image to the (long, short) bound
    ``resize`` (a manifest's ``test_resize``; None = unchanged); the label is left as is."""
    return SegEvalTransform(resize)


__all__ = ["build_seg_train_transform", "build_seg_eval_transform", "SegTrainTransform",
           "SegEvalTransform", "PhotoMetricDistortion", "rescale_size", "short_edge_size", "resize_image",
           "resize_label", "random_crop", "crop_ok", "pad_to", "rgb_to_hsv", "hsv_to_rgb"]
