"""Shared by the engine tests: a tiny model pair, generated images, accelerate state reset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gkd.engine.trainer import reset_accelerate_state as reset_accelerate  # noqa: F401  (re-exported for the tests)

# A random, narrow, one-block DINOv2-style teacher and DeiT-style student at 56 px (4×4 grid).
TINY = [
    "teacher.name=vit_small_patch14_dinov2", "teacher.kwargs.depth=1", "teacher.kwargs.embed_dim=48",
    "teacher.kwargs.num_heads=2", "teacher.random_init=true",
    "student.name=vit_tiny_patch16_224", "student.kwargs.depth=1", "student.kwargs.embed_dim=32",
    "student.kwargs.num_heads=2",
    "data.img_size=56", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
    "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.lr=2e-3", "engine.log_every=1", "engine.save_every=2",
]




def recorded_cost(run_dir: Path) -> tuple[dict, dict]:
    """A finished stage run's `flops` and `compute` events from its metrics.jsonl."""
    import json

    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return tuple(next(r for r in records if r.get("event") == e) for e in ("flops", "compute"))


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n smooth random RGB images in ImageNet's <wnid>/<name>.JPEG layout, 3 classes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / f"n0000000{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((80, 64), Image.BILINEAR).save(d / f"img_{i:04d}.JPEG", quality=90)
    return folder


# The manifest of make_scene's datasets in the folder layout (images/<split>, labels/<split>).
SHAPES_MANIFEST = (
    "name: shapes\ntype: folder\ndefault_root: shapes\nimage_suffix: .png\nlabel_suffix: .png\n"
    "splits:\n  train: {images: images/train, labels: labels/train}\n"
    "  val: {images: images/val, labels: labels/val}\n"
    "label_encoding: ids\nclasses: [background, box, disc]\n"
    "palette: [[200, 40, 40], [40, 200, 40], [40, 40, 200]]\nignore_values: [9]\nunlisted: error\n"
    "ignore_index: 255\ntest_resize: null\n"
)


COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.uint8)


def make_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A background (class 0) with a rectangle (1) and a disc (2); colours carry the classes."""
    label = np.zeros((size, size), dtype=np.uint8)
    y0, x0 = rng.integers(0, size // 2, 2)
    label[y0:y0 + size // 3, x0:x0 + size // 3] = 1
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    yy, xx = np.mgrid[:size, :size]
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] = 2
    image = COLOURS[label].astype(np.int16) + rng.integers(-30, 30, (size, size, 3))
    label[:2] = 9  # a strip of "unlabelled" (declared ignore value)
    return np.clip(image, 0, 255).astype(np.uint8), label
