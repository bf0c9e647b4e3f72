"""Coloured prediction masks and overlays.

Masks are saved as palette ('P' mode) PNGs: the pixel values are the class ids, the palette gives
the colours, so one file is both viewable and machine-readable. Overlays blend the image with the
coloured mask (RGB PNG).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def make_palette(num_classes: int, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """[K,3] uint8 colours: the manifest's palette, completed with fixed pseudo-random colours."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    given = [list(c)[:3] for c in (palette or [])][:num_classes]
    if given:
        colours[: len(given)] = np.asarray(given, dtype=np.uint8)
    if len(given) < num_classes:  # seeded, so a class keeps its colour across runs
        extra = np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
        colours[len(given):] = extra[len(given):]
    return colours


def colorize(mask: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]] | np.ndarray | None,
             num_classes: int | None = None) -> np.ndarray:
    """Class ids [H,W] → RGB [H,W,3] uint8 (ids outside the palette, e.g. 255, are black)."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.int64)
    k = num_classes or max(int(mask.max(initial=0)) + 1, len(palette) if palette is not None else 0)
    colours = make_palette(k, palette)
    out = np.zeros(mask.shape + (3,), dtype=np.uint8)
    inside = (mask >= 0) & (mask < k)
    out[inside] = colours[mask[inside]]
    return out


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Image [3,H,W] float in [0,1] (or [H,W,3] uint8) → [H,W,3] uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        image = image.permute(1, 2, 0).numpy() if image.shape[0] in (1, 3) else image.numpy()
    return np.ascontiguousarray(image, dtype=np.uint8)


def overlay(image: torch.Tensor | np.ndarray, color_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend: (1 − alpha) · image + alpha · colour mask → [H,W,3] uint8."""
    base = to_uint8_image(image).astype(np.float32)
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    blended = (1 - alpha) * base + alpha * color_mask.astype(np.float32)
    return np.clip(blended.round(), 0, 255).astype(np.uint8)


def mask_image(mask: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]] | None,
               num_classes: int | None = None) -> Image.Image:
    """A 'P'-mode PIL image: values are class ids, the palette colours them."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if mask.max(initial=0) > 255:
        raise ValueError("palette PNGs hold at most 256 classes")
    k = num_classes or max(int(mask.max(initial=0)) + 1, len(palette or []))
    img = Image.fromarray(mask.astype(np.uint8))  # 'L'; putpalette turns it into 'P'
    img.putpalette(make_palette(min(k, 256), palette).reshape(-1).tolist())
    return img


def save_prediction(out_dir: str | Path, stem: str, image: torch.Tensor | np.ndarray,
                    pred: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]] | None,
                    alpha: float = 0.5) -> tuple[Path, Path]:
    """Write `<stem>_mask.png` (palette PNG) and `<stem>_overlay.png`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    mask_image(pred, palette).save(mask_path)
    Image.fromarray(overlay(image, colorize(pred, palette))).save(overlay_path)
    return mask_path, overlay_path


PANEL_GAP = 4  # pixels between tiles
PANEL_HEADER = 16  # pixels above the first row, for the column titles
PANEL_BACKGROUND = (255, 255, 255)


def compose_panel(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str]) -> np.ndarray:
    """Tiles (uint8 [h,w,3], all the same size) in a grid under a title strip → RGB uint8 image."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    h, w = rows[0][0].shape[:2]
    height = PANEL_HEADER + len(rows) * (h + PANEL_GAP) - PANEL_GAP
    width = len(rows[0]) * (w + PANEL_GAP) - PANEL_GAP
    canvas = Image.new("RGB", (width, height), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * (w + PANEL_GAP) + 2, 1), title, fill=(0, 0, 0), font=font)
    out = np.array(canvas)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = PANEL_HEADER + r * (h + PANEL_GAP), c * (w + PANEL_GAP)
            out[y:y + h, x:x + w] = tile
    return out


def models_panel(samples: Sequence[Sequence[np.ndarray]], predictions: Sequence[Sequence[np.ndarray]],
                 palette: Sequence[Sequence[int]] | None, num_classes: int, titles: Sequence[str],
                 height: int | None = None) -> np.ndarray:
    """Rows of image | ground truth | one prediction per model → RGB uint8 panel.

    samples: (image [H,W,3] uint8, label [H,W]) per row (further items are ignored);
    predictions: per model, one prediction [H,W] per row; titles: one per column.
    height None: tiles at the images' native size when all rows have the same size, else every row
    scaled to the first image's size; height N: every row scaled to N pixels (the first image's
    aspect ratio). Images are scaled bilinearly, masks by nearest neighbour."""
    if not samples:
        raise ValueError("models_panel: no rows to draw")
    predictions = [list(p) for p in predictions]
    if any(len(p) != len(samples) for p in predictions):
        raise ValueError(f"models_panel: {len(samples)} rows but {[len(p) for p in predictions]} predictions per model")
    if len(titles) != 2 + len(predictions):
        raise ValueError(f"models_panel: {2 + len(predictions)} columns but {len(titles)} titles")
    h0, w0 = samples[0][0].shape[:2]
    size = (w0, h0) if height is None else (max(1, round(w0 * height / h0)), height)  # PIL's (width, height)

    def fit(tile: np.ndarray, resample: int) -> np.ndarray:
        return tile if tile.shape[1::-1] == size else np.asarray(Image.fromarray(tile).resize(size, resample))

    rows = []
    for r, (image, label, *_) in enumerate(samples):
        masks = [label, *(p[r] for p in predictions)]
        rows.append([fit(np.ascontiguousarray(image, dtype=np.uint8), Image.BILINEAR),
                     *(fit(colorize(m, palette, num_classes), Image.NEAREST) for m in masks)])
    return compose_panel(rows, titles)


def prediction_panel(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: Sequence[Sequence[int]] | None,
                     num_classes: int, title: str, height: int = 192) -> np.ndarray:
    """Rows of image | ground truth | prediction, each scaled to `height` pixels (the first image's
    aspect ratio; masks by nearest neighbour) → RGB uint8 panel (`models_panel` with one model).

    samples: (image [H,W,3] uint8, label [H,W], prediction [H,W]) per row."""
    return models_panel(samples, [[pred for _, _, pred in samples]], palette, num_classes,
                        [title, "ground truth", "prediction"], height=height)
