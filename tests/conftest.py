from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import SHAPES_MANIFEST, make_images, make_scene, reset_accelerate


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """48 generated images (3 classes) as 4 webdataset shards of 12."""
    from gkd.data import write_shards

    root = tmp_path_factory.mktemp("wds")
    write_shards(make_images(root / "train", 48), root / "out", shard_size=12)
    return str(root / "out" / "train-{000000..000003}.tar")


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Data root in the folder layout, its manifest and a one-target suite."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 6)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image, label = make_scene(rng)
            Image.fromarray(image).save(root / "images" / split / f"{split}_{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{split}_{i:03d}.png")
    manifest = root / "shapes.yaml"
    manifest.write_text(SHAPES_MANIFEST)
    suite = root / "suite.yaml"
    suite.write_text(
        f"name: shapes\nsource: shapes (train)\nmode: slide\ncrop: 32\nstride: 21\n"
        f"targets:\n  - name: Shapes val\n    manifest: {manifest}\n    split: val\n    resize: null\n"
    )
    return root, manifest, suite
