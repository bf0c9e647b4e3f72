import pytest

from helpers import make_images, reset_accelerate


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
