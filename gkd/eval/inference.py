"""Test-time inference: keep-ratio resize, whole-image or sliding-window scoring, scores back at full size.

Semantics follow mmseg's test pipeline (facts, re-derived here):
- `Resize(scale=(L, S), keep_ratio=True)`: one scale factor f = min(max(L,S)/long_edge, min(L,S)/short_edge),
  new size = round(edge · f), up- or down-scaling; an int r means (r, r). Bilinear, no antialiasing
  (what cv2's INTER_LINEAR does).
- `slide_inference`: windows start every `stride` pixels; the last row/column of windows is shifted
  back to end at the image border; overlapping scores are averaged with a per-pixel count map.
  A window larger than the image covers the whole image; we pad that crop (bottom/right) up to the
  crop size so fixed-size models (ViTs with a fixed token grid) always see `crop`-sized inputs.
- Scores are bilinearly resized (align_corners=False) back to the original label size before argmax.

Models are callables `images [B,3,H,W] float in [0,1] -> scores [B,K,h,w]`; scores at another
resolution than the input (e.g. stride 4) are bilinearly resized to the input size.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def pair(value: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """An int or a 2-sequence as (h, w) of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair [h, w], got {value!r}")
    if min(out) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


def keep_ratio_size(height: int, width: int, resize: int | Sequence[int] | None) -> tuple[int, int]:
    """(new_h, new_w) for a keep-ratio resize bounded by `resize` (int r → (r, r); None → unchanged).

    `resize` is an unordered pair of edge limits: the long edge ≤ max(resize), the short edge ≤
    min(resize), with equality on at least one of them (mmcv `rescale_size` semantics).
    """
    if resize is None:
        return height, width
    a, b = pair(resize, "resize")
    long_max, short_max = max(a, b), min(a, b)
    scale = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def whole_inference(model: Model, images: torch.Tensor) -> torch.Tensor:
    """Score whole images. images [B,3,H,W] → scores [B,K,H,W] (float32)."""
    scores = model(images)
    return _resize(scores.float(), tuple(images.shape[-2:]))


def window_grid(height: int, width: int, crop: int | Sequence[int] = 512,
                stride: int | Sequence[int] = 341) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, y2, x1, x2) covering an H×W image; last ones aligned to the border."""
    ch, cw = pair(crop, "crop")
    sh, sw = pair(stride, "stride")
    if sh > ch or sw > cw:  # windows would leave gaps no score covers
        raise ValueError(f"stride {(sh, sw)} must not exceed crop {(ch, cw)}")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def coverage_count(height: int, width: int, crop: int | Sequence[int] = 512,
                   stride: int | Sequence[int] = 341) -> torch.Tensor:
    """How many windows cover each pixel: [H,W] int64 (≥ 1 everywhere)."""
    count = torch.zeros(height, width, dtype=torch.int64)
    for y1, y2, x1, x2 in window_grid(height, width, crop, stride):
        count[y1:y2, x1:x2] += 1
    return count


@torch.no_grad()
def slide_inference(model: Model, images: torch.Tensor, num_classes: int, crop: int | Sequence[int] = 512,
                    stride: int | Sequence[int] = 341, pad_value: float = 0.0,
                    window_batch: int = 1) -> torch.Tensor:
    """Sliding-window scores. images [B,3,H,W] → scores [B,K,H,W] (float32), overlaps averaged.

    `window_batch` windows are scored per model call (all crops have the crop size after padding).
    `pad_value` fills the padding of images smaller than the crop (0 = black in [0,1] RGB).
    """
    b, _, h, w = images.shape
    ch, cw = pair(crop, "crop")
    windows = window_grid(h, w, (ch, cw), stride)
    scores = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for start in range(0, len(windows), max(1, window_batch)):
        chunk = windows[start:start + max(1, window_batch)]
        crops = []
        for y1, y2, x1, x2 in chunk:
            patch = images[:, :, y1:y2, x1:x2]
            # pad (left, right, top, bottom): only when the image is smaller than the crop
            patch = F.pad(patch, (0, cw - (x2 - x1), 0, ch - (y2 - y1)), value=pad_value)
            crops.append(patch)
        out = whole_inference(model, torch.cat(crops, dim=0))
        if out.shape[1] != num_classes:
            raise ValueError(f"model returned {out.shape[1]} score channels, expected {num_classes}")
        for i, (y1, y2, x1, x2) in enumerate(chunk):
            scores[:, :, y1:y2, x1:x2] += out[i * b:(i + 1) * b, :, : y2 - y1, : x2 - x1]
            count[:, :, y1:y2, x1:x2] += 1
    return scores / count


@torch.no_grad()
def predict(model: Model, images: torch.Tensor, mode: str = "slide", resize: int | Sequence[int] | None = None,
            crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341,
            num_classes: int | None = None, window_batch: int = 1) -> torch.Tensor:
    """Scores at the ORIGINAL size. images [B,3,H,W] in [0,1] → [B,K,H,W] (float32).

    The images are keep-ratio resized to `resize`, scored (`mode` 'slide' or 'whole') and the
    scores bilinearly resized back to H×W — as mmseg does, so metrics are at label resolution.
    """
    h, w = images.shape[-2:]
    x = _resize(images, keep_ratio_size(h, w, resize))
    if mode == "slide":
        k = num_classes if num_classes is not None else int(getattr(model, "num_classes"))
        scores = slide_inference(model, x, k, crop=crop, stride=stride, window_batch=window_batch)
    elif mode == "whole":
        scores = whole_inference(model, x)
    else:
        raise ValueError(f"unknown inference mode {mode!r}; expected 'slide' or 'whole'")
    return _resize(scores, (h, w))


def config_data(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``data`` section of the config recorded in a handoff file's metadata (empty when absent)."""
    config = metadata.get("gkd_config")
    data = config.get("data") if isinstance(config, Mapping) else None
    return data if isinstance(data, Mapping) else {}


DEFAULT_CROP = 512  # the slide window when a segmentor file records no training crop


def trained_crop_size(metadata: Mapping[str, Any]) -> int | None:
    """The stage-3 training crop (``data.crop_size`` of the config in the file's metadata), if recorded."""
    crop = config_data(metadata).get("crop_size")
    return int(crop) if isinstance(crop, int) and not isinstance(crop, bool) and crop > 0 else None
