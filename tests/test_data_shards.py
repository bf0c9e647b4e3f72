"""Shard writer: layouts, classes, bytes kept, conversion, skipped files, atomicity, determinism."""
from __future__ import annotations

import io
import json
import re
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkd.data import shards as shards_mod
from gkd.data.shards import ShardIndex, index_path, write_shards

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet_sample"
WNIDS = ["n01440764", "n01443537", "n02085620"]


def _jpeg_bytes(rng: np.random.Generator, size=(24, 20), fmt="JPEG") -> bytes:
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_imagenet_train(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """ImageNet's real layout: train/<wnid>/<wnid>_<n>.JPEG (written in reverse class order)."""
    rng = np.random.default_rng(seed)
    train = root / "train"
    for wnid in reversed(WNIDS):
        (train / wnid).mkdir(parents=True)
        for i in range(per_class):
            (train / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg_bytes(rng))
    return train


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Independent reader: {key: {ext: bytes}} using only tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def read_all(out_dir: Path, prefix: str = "train") -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for p in sorted(out_dir.glob(f"{prefix}-*.tar")):
        samples.update(read_tar(p))
    return samples


def test_imagenet_layout_classes_bytes_and_index(tmp_path):
    train = make_imagenet_train(tmp_path)
    index = write_shards(train, tmp_path / "out", shard_size=5)

    assert index.layout == "class_folders"
    assert index.classes == sorted(WNIDS)
    assert index.counts == [5, 5, 2] and index.num_samples == 12
    assert [Path(p).name for p in index.shard_paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    saved = json.loads(index_path(tmp_path / "out").read_text())
    assert saved["num_samples"] == 12 and saved["counts"] == [5, 5, 2] and saved["num_classes"] == 3
    assert ShardIndex.load(index_path(tmp_path / "out")).shard_paths == index.shard_paths

    samples = read_all(tmp_path / "out")
    assert len(samples) == 12
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "cls"}
        wnid = key.split("_")[0]
        assert int(sample["cls"].decode("ascii")) == sorted(WNIDS).index(wnid)
        src = train / wnid / f"{key}.JPEG"  # ImageNet stems already start with the wnid
        assert sample["jpg"] == src.read_bytes(), "JPEG bytes must be stored as-is"
    # shuffled with the seed: the first shard mixes classes
    first = read_tar(tmp_path / "out" / "train-000000.tar")
    assert len({k.split("_")[0] for k in first}) > 1
    assert not list((tmp_path / "out").glob(".*tmp*")), "no temporary files left behind"


def test_output_is_deterministic_and_seed_controls_order(tmp_path):
    train = make_imagenet_train(tmp_path)
    write_shards(train, tmp_path / "a", shard_size=4, seed=3)
    write_shards(train, tmp_path / "b", shard_size=4, seed=3)
    write_shards(train, tmp_path / "c", shard_size=4, seed=4)
    write_shards(train, tmp_path / "d", shard_size=4, shuffle=False)
    for name in ("train-000000.tar", "train-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    def order(d):
        return [k for p in sorted((tmp_path / d).glob("*.tar")) for k in read_tar(p)]
    assert order("a") != order("c")
    assert order("d") == sorted(order("d"))  # unshuffled: sorted class folders, sorted files


def test_flat_unlabelled_folder_png_conversion_and_skips(tmp_path, caplog):
    rng = np.random.default_rng(1)
    src = tmp_path / "flat"
    src.mkdir()
    (src / "a.jpg").write_bytes(_jpeg_bytes(rng))
    (src / "b.v2.jpeg").write_bytes(_jpeg_bytes(rng))  # dot in the stem: key must not keep it
    (src / "c.png").write_bytes(_jpeg_bytes(rng, fmt="PNG"))
    (src / "bad.jpg").write_bytes(b"this is not an image")
    (src / "cut.jpg").write_bytes(_jpeg_bytes(rng, size=(64, 64))[:300])  # truncated JPEG
    (src / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="gkd.data.shards"):
        index = write_shards(src, tmp_path / "out", shard_size=100, prefix="val")

    assert index.layout == "flat" and index.classes == []
    assert index.num_samples == 3 and index.num_skipped == 2
    assert sorted(index.skipped) == ["bad.jpg", "cut.jpg"] and index.num_converted == 1
    assert "bad.jpg" in caplog.text and "cut.jpg" in caplog.text
    samples = read_all(tmp_path / "out", prefix="val")
    assert sorted(samples) == ["a", "b_v2", "c"]
    assert all(s["cls"] == b"-1" for s in samples.values())
    assert samples["a"]["jpg"] == (src / "a.jpg").read_bytes()
    with Image.open(io.BytesIO(samples["c"]["jpg"])) as im:  # PNG became an RGB JPEG
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (24, 20)
    assert index_path(tmp_path / "out", "val").is_file()


def test_empty_missing_and_unreadable_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        write_shards(tmp_path / "empty", tmp_path / "o1")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        write_shards(tmp_path / "txt", tmp_path / "o2")
    with pytest.raises(FileNotFoundError):
        write_shards(tmp_path / "nope", tmp_path / "o3")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could be read"):
        write_shards(tmp_path / "bad", tmp_path / "o4")
    assert not list((tmp_path / "o4").glob("*")), "nothing written when no image is readable"


def test_fixed_class_list_and_unknown_class(tmp_path):
    train = make_imagenet_train(tmp_path, per_class=1)
    full = ["n00000001"] + WNIDS + ["n09999999"]
    index = write_shards(train, tmp_path / "out", classes=full)
    labels = {k.split("_")[0]: int(s["cls"]) for k, s in read_all(tmp_path / "out").items()}
    assert labels == {w: full.index(w) for w in WNIDS}
    with pytest.raises(ValueError, match="not in the given class list"):
        write_shards(train, tmp_path / "out2", classes=WNIDS[:2])
    assert index.classes == full


def test_failure_mid_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    train = make_imagenet_train(tmp_path)
    real = shards_mod._load_image_bytes
    calls = {"n": 0}

    def flaky(path, verify):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # e.g. the user stops the job
        return real(path, verify)

    monkeypatch.setattr(shards_mod, "_load_image_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(train, tmp_path / "out", shard_size=4)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["train-000000.tar"], names  # complete shard only; no tmp, no index
    assert len(read_tar(tmp_path / "out" / "train-000000.tar")) == 4


def test_process_pool_gives_identical_shards(tmp_path):
    train = make_imagenet_train(tmp_path)
    write_shards(train, tmp_path / "a", shard_size=5)
    write_shards(train, tmp_path / "b", shard_size=5, num_workers=2)
    for p in sorted((tmp_path / "a").glob("*.tar")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason="shared imagenet_sample not present")
def test_real_imagenet_sample_flat_wnid(tmp_path):
    src = tmp_path / "sample"
    src.mkdir()
    files = sorted(SAMPLE_DIR.glob("*.jpg"))[::50][:19]
    files += [f for f in SAMPLE_DIR.glob("*.jpg") if "'" in f.name][:1]  # odd key characters
    for f in files:
        shutil.copy(f, src / f.name)
    index = write_shards(src, tmp_path / "out", shard_size=8)

    assert index.layout == "flat_wnid" and index.counts == [8, 8, 4] and index.num_skipped == 0
    wnids = sorted({f.name.split("_")[0] for f in files})
    assert index.classes == wnids
    samples = read_all(tmp_path / "out")
    for f in files:
        s = samples[re.sub(r"[^A-Za-z0-9_-]", "_", f.stem)]  # documented key sanitising
        assert s["jpg"] == f.read_bytes()
        assert int(s["cls"]) == wnids.index(f.name.split("_")[0])
