"""Shared by the engine tests: a tiny model pair, generated images, accelerate state reset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A random, narrow, one-block DINOv2-style teacher and DeiT-style student at 56 px (4×4 grid).
TINY = [
    "teacher.name=vit_small_patch14_dinov2", "teacher.kwargs.depth=1", "teacher.kwargs.embed_dim=48",
    "teacher.kwargs.num_heads=2", "teacher.random_init=true",
    "student.name=vit_tiny_patch16_224", "student.kwargs.depth=1", "student.kwargs.embed_dim=32",
    "student.kwargs.num_heads=2",
    "data.img_size=56", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
    "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.lr=2e-3", "engine.log_every=1", "engine.save_every=2",
]


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each in-process run must start from scratch."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n smooth random RGB images in ImageNet's <wnid>/<name>.JPEG layout, 3 classes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / f"n0000000{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((80, 64), Image.BILINEAR).save(d / f"img_{i:04d}.JPEG", quality=90)
    return folder
