"""Image transforms for distillation (stages 1-2): the paper's training recipe and an eval view.

Training recipe (ARCHITECTURE.md §1): RandomResizedCrop, horizontal flip, RandAugment m9
(``rand-m9-mstd0.5-inc1``), random erasing p=0.25, built with timm's ``create_transform``. Colour
jitter is off: timm disables it whenever RandAugment is on, and the recipe has none otherwise.

Normalisation must be the teacher's: DINOv2 uses the ImageNet mean/std, EVA-02 the OpenAI-CLIP
mean/std (timm pretrained_cfg). ``teacher_mean_std`` looks it up without downloading anything.
All of timm's randomness here comes from python ``random`` and torch's CPU generator, which the
shard reader seeds per sample.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN,
                                 OPENAI_CLIP_STD)

logger = logging.getLogger(__name__)

PAPER_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]


def _timm_pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg
    try:
        return get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):  # a name timm does not know
        return None


def teacher_mean_std(model_name: str) -> MeanStd:
    """(mean, std) a teacher expects, from timm's pretrained config (no download).

    ``hf:`` names and names timm does not know fall back by family: ``eva`` -> OpenAI CLIP,
    anything else -> ImageNet default (DINOv2/DINOv3).
    """
    is_hf = model_name.startswith("hf:")
    name = model_name[3:] if is_hf else model_name
    cfg = None if is_hf else _timm_pretrained_cfg(name)
    if cfg is not None and cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    if "eva" in name.lower():
        return tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
    logger.info("no pretrained config for %r: using ImageNet mean/std", model_name)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def build_train_transform(
    img_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = PAPER_AUTO_AUGMENT,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    color_jitter: float | None = None,
) -> Callable:
    """PIL RGB image -> float tensor [3, img_size, img_size], randomly augmented and normalised.

    Order (timm): RandomResizedCrop(scale, ratio, interpolation) -> flip(hflip) ->
    RandAugment(auto_augment) -> ToTensor -> Normalize(mean, std) -> RandomErasing(re_prob,
    per-pixel normal noise, as DeiT). ``auto_augment=None`` / ``re_prob=0`` switch those off.
    """
    tf = create_transform(
        input_size=img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        auto_augment=auto_augment or None, interpolation=interpolation, mean=tuple(mean),
        std=tuple(std), re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        color_jitter=color_jitter if color_jitter else None,
    )
    _patch_posterize(tf)
    return tf


def _posterize_compat(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, also for 0 bits. 'rand-m9-mstd0.5' draws magnitude 10 about 2% of the
    time, which PosterizeIncreasing maps to 0 bits; Pillow < 13 returned a black image for that,
    Pillow >= 13 raises ValueError and would crash the data loader. Keep the old result."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # all bits dropped: black
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(tf: Callable) -> None:
    """Swap timm's posterize for ``_posterize_compat`` in every RandAugment/AutoAugment op."""
    for t in getattr(tf, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is timm_aa.posterize:
                op.aug_fn = _posterize_compat


def build_eval_transform(
    img_size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """PIL RGB image -> float tensor [3, img_size, img_size]: resize the short side to
    ``img_size / crop_pct``, centre crop, normalise."""
    return create_transform(input_size=img_size, is_training=False, crop_pct=crop_pct,
                            interpolation=interpolation, mean=tuple(mean), std=tuple(std))
