"""Shard reader: specs, rank/worker splits, exact steps, determinism, resume, corrupt data."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gkd.data.shards import write_shards
from gkd.data.wds import (ShardReadError, build_shard_loader, count_samples, default_steps_per_epoch,
                          epoch_samples, epoch_shard_order, read_plan, resolve_shards, verify_shards)

WNIDS = ["n01440764", "n01443537", "n02085620", "n04579432"]


def _jpeg(rng: np.random.Generator, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(root: Path, n_images: int, shard_size: int, seed: int = 0) -> Path:
    """ImageNet layout train/<wnid>/*.JPEG -> shards via the real writer; returns the shard dir."""
    rng = np.random.default_rng(seed)
    train = root / "train"
    for i in range(n_images):
        wnid = WNIDS[i % len(WNIDS)]
        (train / wnid).mkdir(parents=True, exist_ok=True)
        (train / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rng))
    out = root / "shards"
    write_shards(train, out, shard_size=shard_size)
    return out


def noisy_transform(img: Image.Image) -> torch.Tensor:
    """Small transform drawing from all three RNGs the reader seeds (python, numpy, torch)."""
    x = torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255
    return x + torch.rand(1) + random.random() + float(np.random.rand())


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> Path:
    """48 samples in 8 shards of 6: splits evenly over 2 ranks x 2 workers."""
    return make_shards(tmp_path_factory.mktemp("even"), 48, 6)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """30 samples in shards of 7,7,7,7,2."""
    return make_shards(tmp_path_factory.mktemp("uneven"), 30, 7)


def run(shards, B=3, **kw) -> list[dict]:
    kw.setdefault("seed", 5)
    return list(build_shard_loader(shards, noisy_transform, B, return_keys=True, **kw))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["image"], y["image"])


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------------------- shard specs

def test_shard_specs_resolve_to_same_set(even):
    pattern = str(even / "train-{000000..000007}.tar")
    by_dir = resolve_shards(even)
    by_json = resolve_shards(even / "train-index.json")
    by_pattern = resolve_shards(pattern)
    by_list = resolve_shards([str(p) for p in sorted(even.glob("*.tar"))])
    for s in (by_json, by_pattern, by_list):
        assert [os.path.abspath(u) for u in s.urls] == [os.path.abspath(u) for u in by_dir.urls]
        assert s.num_samples == 48 and s.counts == [6] * 8  # counts from the index beside the shards
    assert by_dir.classes == WNIDS
    assert resolve_shards(pattern, num_samples=40).num_samples == 40  # declared total wins
    assert count_samples(pattern) == 48 and count_samples(even, num_samples=40) == 40
    assert verify_shards(even).num_samples == 48


def test_counts_without_index(even, tmp_path):
    for p in sorted(even.glob("*.tar"))[:3]:
        shutil.copy(p, tmp_path / p.name)
    s = resolve_shards(tmp_path)  # no index: all *.tar, counted from tar headers
    assert len(s.urls) == 3 and s.counts == [6, 6, 6]


def test_missing_shards_fail_before_reading(even):
    with pytest.raises(FileNotFoundError, match="train-000009.tar") as err:
        build_shard_loader(str(even / "train-{000000..000009}.tar"), None, 2)
    assert "train-000008.tar" in str(err.value) and "2 of 10" in str(err.value)
    with pytest.raises(ValueError, match="cannot fill"):
        build_shard_loader(even, None, 30, world_size=2)
    with pytest.raises(ValueError, match="start_step"):
        build_shard_loader(even, None, 3, start_step=17)


# ----------------------------------------------------------------------------- splitting

def test_read_plan_covers_every_sample_once():
    counts = [5, 3, 4]
    for world, workers in [(1, 1), (2, 2), (3, 1), (2, 3), (4, 2)]:
        seen: list[tuple[int, int]] = []
        order = epoch_shard_order(3, seed=0, epoch=1)
        for r in range(world):
            for w in range(workers):
                plan = read_plan(order, r, world, w, workers)
                stream = [(s, i) for s in plan.shards for i in range(counts[s])]
                seen += [x for p, x in enumerate(stream) if p % plan.modulo == plan.remainder]
        assert sorted(seen) == sorted((s, i) for s in range(3) for i in range(counts[s])), (world, workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_samples_and_yield_exact_steps(even, num_workers):
    per_rank = [run(even, rank=r, world_size=2, num_workers=num_workers) for r in range(2)]
    for batches in per_rank:
        assert len(batches) == 8  # 48 // (3 * 2)
        b = batches[0]
        assert b["image"].shape == (3, 3, 8, 8) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["skipped"].tolist() == [0, 0, 0]
        for bb in batches:  # labels are the classes the writer stored
            assert bb["label"].tolist() == [WNIDS.index(k.split("_")[0]) for k in bb["key"]]
    k0, k1 = keys(per_rank[0]), keys(per_rank[1])
    assert not set(k0) & set(k1)
    assert len(set(k0)) == len(k0) == 24 and len(set(k0 + k1)) == 48  # an epoch sees everything once


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (3, 0)])
def test_uneven_shards_cycle_to_exact_steps(uneven, world_size, num_workers):
    steps = 30 // (2 * world_size)
    per_rank = [run(uneven, B=2, rank=r, world_size=world_size, num_workers=num_workers)
                for r in range(world_size)]
    assert [len(b) for b in per_rank] == [steps] * world_size
    sets = [set(keys(b)) for b in per_rank]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not sets[i] & sets[j]
    long = run(uneven, B=2, world_size=world_size, num_workers=num_workers, steps_per_epoch=25)
    assert len(long) == 25  # explicit steps: cycles over this rank's shards


def test_fewer_shards_than_readers_split_by_sample(tmp_path):
    shards = make_shards(tmp_path, 16, 16)  # one shard, 2 ranks x 2 workers
    per_rank = [run(shards, B=2, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert [len(b) for b in per_rank] == [4, 4]
    k0, k1 = keys(per_rank[0]), keys(per_rank[1])
    assert not set(k0) & set(k1) and len(set(k0 + k1)) == 16


# ----------------------------------------------------------------------------- determinism

def test_deterministic_order_and_epochs_differ(even):
    a = run(even, num_workers=2, world_size=2, rank=1)
    assert_same(a, run(even, num_workers=2, world_size=2, rank=1))
    b = run(even, num_workers=2, world_size=2, rank=1, epoch=1)
    assert keys(a) != keys(b)


def test_augmentation_independent_of_worker_count(even):
    def by_key(batches):
        return {k: img for b in batches for k, img in zip(b["key"], b["image"])}
    w0, w2 = by_key(run(even, num_workers=0)), by_key(run(even, num_workers=2))
    assert set(w0) == set(w2) and len(w0) == 48
    for k in w0:
        assert torch.equal(w0[k], w2[k]), k
    # seeds depend on the epoch too
    e1 = by_key(run(even, num_workers=0, epoch=1))
    assert not any(torch.equal(w0[k], e1[k]) for k in w0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted_epoch(uneven, num_workers):
    full = run(uneven, B=2, num_workers=num_workers, world_size=2, rank=1, epoch=3)
    for k in (1, 4, len(full) - 1):
        loader = build_shard_loader(uneven, noisy_transform, 2, num_workers=num_workers, world_size=2,
                                    rank=1, epoch=3, seed=5, start_step=k, return_keys=True)
        assert len(loader) == len(full) - k
        assert_same(list(loader), full[k:])


def test_in_process_loading_leaves_global_rngs_alone(even):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    # iterate the dataset itself: DataLoader.__iter__ draws its own base seed from torch
    batches = list(build_shard_loader(even, noisy_transform, 3, num_workers=0).dataset)
    assert len(batches) == 16
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


# ----------------------------------------------------------------------------- corrupt data

def _write_raw_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with wds.TarWriter(str(path)) as w:
        for key, data, cls in samples:
            w.write({"__key__": key, "jpg": data, "cls": cls})


def test_corrupt_images_are_skipped_counted_logged_and_resume_stays_exact(tmp_path, caplog):
    rng = np.random.default_rng(3)
    bad = {"s03", "s04", "s11"}
    samples = [(f"s{i:02d}", b"\xff\xd8 not a jpeg" if f"s{i:02d}" in bad else _jpeg(rng), i)
               for i in range(16)]
    _write_raw_shard(tmp_path / "d-000000.tar", samples[:8])
    _write_raw_shard(tmp_path / "d-000001.tar", samples[8:])
    spec = str(tmp_path / "d-{000000..000001}.tar")  # no index: counted from headers
    with caplog.at_level(logging.WARNING, logger="gkd.data.wds"):
        batches = run(spec, B=4, shuffle_buffer=1)
    assert len(batches) == 4 and all(b["image"].shape == (4, 3, 8, 8) for b in batches)
    assert sum(int(b["skipped"].sum()) for b in batches) == 3
    flagged = {k for b in batches for k, s in zip(b["key"], b["skipped"]) if s}
    assert flagged == bad
    for b in batches:  # a skipped slot holds another sample's image and label
        for k, lab, s in zip(b["key"], b["label"].tolist(), b["skipped"]):
            if not s:
                assert lab == int(k[1:])
    for key in bad:
        assert caplog.text.count(f"sample {key} ") == 1
    resumed = run(spec, B=4, shuffle_buffer=1, start_step=1)
    assert_same(resumed, batches[1:])


def test_whole_batch_corrupt_takes_donor_from_stream(tmp_path):
    rng = np.random.default_rng(4)
    samples = [("a", b"junk", 0), ("b", _jpeg(rng), 1), ("c", _jpeg(rng), 2)]
    _write_raw_shard(tmp_path / "x.tar", samples)
    batches = run(str(tmp_path / "x.tar"), B=1, shuffle_buffer=1)
    assert [b["key"] for b in batches] == [["a"], ["b"], ["c"]]
    assert [b["skipped"].item() for b in batches] == [1, 0, 0]
    assert batches[0]["label"].item() == 1  # donor: next decodable sample, augmented with a's seed
    assert not torch.equal(batches[0]["image"], batches[1]["image"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_names_the_shard(even, tmp_path, num_workers):
    out = tmp_path / "cut"
    shutil.copytree(even, out)
    victim = out / "train-000003.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(ShardReadError, match="train-000003.tar"):
        verify_shards(out)  # optional pre-flight check
    it = iter(build_shard_loader(out, noisy_transform, 3, num_workers=num_workers))
    with pytest.raises(ShardReadError, match="train-000003.tar") as err:
        list(it)
    # Drop the traceback's frames so the iterator dies now, not in a later gc pass (where torch
    # may meet its queues already finalised and wait 5 s per worker before killing them).
    traceback.clear_frames(err.value.__traceback__)
    del it


def test_shard_shorter_than_index_is_an_error(even, tmp_path):
    out = tmp_path / "short"
    shutil.copytree(even, out)
    victim = out / "train-000005.tar"
    _write_raw_shard(victim, [("only", _jpeg(np.random.default_rng(0)), 0)])  # valid tar, 1 sample
    with pytest.raises(ShardReadError, match="train-000005.tar.*index says 6"):
        run(out)


# ----------------------------------------------------------------------------- real images

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet_sample"


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason="shared imagenet_sample not present")
def test_real_images_through_writer_reader_and_paper_transform(tmp_path):
    from gkd.data.transforms import build_train_transform
    src = tmp_path / "src"
    src.mkdir()
    files = sorted(SAMPLE_DIR.glob("*.jpg"))[:: 50][:20]
    for f in files:
        shutil.copy(f, src / f.name)
    index = write_shards(src, tmp_path / "shards", shard_size=5)
    tf = build_train_transform(img_size=64)
    batches = list(build_shard_loader(str(tmp_path / "shards" / "train-{000000..000003}.tar"), tf, 5,
                                      num_workers=2, seed=1, return_keys=True))
    assert len(batches) == 4 and index.num_samples == 20
    seen = keys(batches)
    assert sorted(seen) == sorted(f.stem for f in files)
    for b in batches:
        assert b["image"].shape == (5, 3, 64, 64) and int(b["skipped"].sum()) == 0
        assert b["label"].tolist() == [index.classes.index(k.split("_")[0]) for k in b["key"]]
    images = torch.cat([b["image"] for b in batches])
    assert -1.0 < images.mean().item() < 1.0 and 0.5 < images.std().item() < 1.5  # normalised


# ----------------------------------------------------------------------------- repeated augmentation

def _rasampler_steps(n: int, world: int, batch: int, repeats: int = 3) -> int:
    """Batches per rank of DeiT's RASampler + DataLoader(drop_last=True), replayed with its own lists."""
    num_samples = int(math.ceil(n * repeats / world))
    total = num_samples * world
    selected = int(math.floor(n // 256 * 256 / world))
    indices = [i for i in range(n) for _ in range(repeats)]
    indices += indices[: total - len(indices)]
    per_rank = [len(indices[r:total:world][:selected]) for r in range(world)]
    assert len(set(per_rank)) == 1
    return per_rank[0] // batch


def test_epoch_length_counts_as_rasampler():
    for n in (256, 700, 1000, 3000):
        for world, batch in [(1, 10), (2, 3), (8, 7), (3, 32)]:
            assert default_steps_per_epoch(n, batch, world, repeats=3) == _rasampler_steps(n, world, batch), (n, world)
    assert epoch_samples(1000, 3) == 768 and epoch_samples(1000, 1) == 1000  # about N views, not 3N
    assert epoch_samples(1_281_167, 3) == 1_281_024  # ImageNet-1k: 143 fewer
    assert default_steps_per_epoch(1000, 10, 1) == 100  # repeats=1: today's count
    assert epoch_samples(200, 3) == 200  # deviation: RASampler's epoch would be empty
    with pytest.raises(ValueError, match="repeats"):
        epoch_samples(10, 0)


def _views(batches_per_rank: list[list[dict]]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """key -> [(rank, image)] over all ranks' batches."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for rank, batches in enumerate(batches_per_rank):
        for b in batches:
            for k, img in zip(b["key"], b["image"]):
                out.setdefault(k, []).append((rank, img))
    return out


def _check_full_pass(views: dict, n_keys: int, world: int, repeats: int = 3) -> None:
    assert len(views) == n_keys
    for k, got in views.items():
        assert len(got) == repeats, k
        imgs = [img for _, img in got]
        assert all(not torch.equal(imgs[i], imgs[j]) for i in range(repeats) for j in range(i + 1, repeats)), k
        ranks = sorted(r for r, _ in got)
        # RASampler: consecutive copies on different ranks, so a rank holds ceil(r/world) at most
        assert len(set(ranks)) == min(world, repeats), (k, ranks)
        assert max(ranks.count(r) for r in set(ranks)) == math.ceil(repeats / world), (k, ranks)


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (3, 0), (1, 2)])
def test_repeats_give_three_distinct_views_spread_over_ranks(even, world_size, num_workers):
    full_pass = 48 * 3 // (3 * world_size)  # every (key, copy) once
    per_rank = [run(even, rank=r, world_size=world_size, num_workers=num_workers, repeats=3,
                    steps_per_epoch=full_pass) for r in range(world_size)]
    assert [len(b) for b in per_rank] == [full_pass] * world_size
    for batches in per_rank:
        for b in batches:
            assert b["label"].tolist() == [WNIDS.index(k.split("_")[0]) for k in b["key"]]
    views = _views(per_rank)
    _check_full_pass(views, 48, world_size)
    # copy 0 keeps the plain reader's augmentation
    plain = {k: img for b in run(even, num_workers=0, steps_per_epoch=16) for k, img in zip(b["key"], b["image"])}
    assert all(any(torch.equal(img, plain[k]) for _, img in got) for k, got in views.items())


def test_repeats_with_fewer_shards_than_readers(tmp_path):
    shards = make_shards(tmp_path, 16, 16)  # one shard, 2 ranks x 2 workers: sample-level split
    per_rank = [run(shards, B=2, rank=r, world_size=2, num_workers=2, repeats=3, steps_per_epoch=12)
                for r in range(2)]
    _check_full_pass(_views(per_rank), 16, 2)


def test_repeats_default_epoch_is_rasampler_length(even):
    # 48 < 256 samples: the whole set per epoch (epoch_samples), cut from the 3-fold stream
    per_rank = [run(even, rank=r, world_size=2, num_workers=2, repeats=3) for r in range(2)]
    assert [len(b) for b in per_rank] == [48 // (3 * 2)] * 2
    counts = [len(v) for v in _views(per_rank).values()]
    assert sum(counts) == 48 and max(counts) == 3  # views of the first shards, not one view of each image


@pytest.mark.parametrize("num_workers", [0, 2])
def test_repeats_resume_equals_uninterrupted_epoch(uneven, num_workers):
    for steps in (None, 22):  # RASampler length, and one that cycles past the 3-fold pass
        full = run(uneven, B=2, num_workers=num_workers, world_size=2, rank=1, epoch=3, repeats=3,
                   steps_per_epoch=steps)
        assert len(full) == (30 // 4 if steps is None else steps)
        for k in (1, 4, len(full) - 1):
            resumed = run(uneven, B=2, num_workers=num_workers, world_size=2, rank=1, epoch=3, repeats=3,
                          steps_per_epoch=steps, start_step=k)
            assert_same(resumed, full[k:])


def _plain_reader_by_hand(shards: Path, batch: int, seed: int, epoch: int) -> list[tuple[list[str], torch.Tensor]]:
    """One rank, one worker, no shuffle buffer: shards in epoch order, each image seeded as documented."""
    urls = resolve_shards(shards).urls
    out, keys_, imgs = [], [], []
    for i in epoch_shard_order(len(urls), seed, epoch):
        for sample in wds.tarfile_samples([{"url": urls[i]}]):
            key = sample["__key__"]
            s = int.from_bytes(hashlib.blake2b(f"aug/{seed}/{epoch}/0/{key}".encode(), digest_size=8).digest(),
                               "little")
            random.seed(s), np.random.seed(s % 2**32), torch.manual_seed(s)
            keys_.append(key)
            imgs.append(noisy_transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            if len(keys_) == batch:
                out.append((keys_, torch.stack(imgs)))
                keys_, imgs = [], []
    return out


def test_repeats_one_is_the_plain_reader(even):
    expected = _plain_reader_by_hand(even, 4, seed=5, epoch=2)
    for kw in ({}, {"repeats": 1}):
        got = run(even, B=4, shuffle_buffer=1, epoch=2, **kw)
        assert len(got) == len(expected) == 12
        for b, (k, img) in zip(got, expected):
            assert b["key"] == k and torch.equal(b["image"], img)
    assert read_plan([3, 1, 2], 1, 2, 0, 1, repeats=1) == read_plan([3, 1, 2], 1, 2, 0, 1)


def test_bad_repeats_is_refused(even, shards, tmp_path):
    with pytest.raises(ValueError, match="repeats"):
        build_shard_loader(even, None, 3, repeats=0)
    from helpers import TINY

    from gkd.config import ConfigError, DistillConfig, load_config
    from gkd.engine.distill import train_distill

    with pytest.raises(ConfigError, match="data.repeats"):
        train_distill(load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={tmp_path}",
                                                      "data.repeats=0"]))


def test_engine_epoch_length_follows_repeats(shards, tmp_path):
    """Warmup is warmup_epochs x steps/epoch, so the first step's lr shows the epoch length the engine used."""
    from helpers import TINY, reset_accelerate

    from gkd.config import DistillConfig, load_config
    from gkd.engine.distill import train_distill

    first_lr = {}
    for repeats in (1, 3):
        out = tmp_path / f"r{repeats}"
        train_distill(load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={out}",
                                                      "data.num_samples=600", f"data.repeats={repeats}",
                                                      "optim.max_steps=1", "optim.warmup_epochs=0.5"]))
        reset_accelerate()
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        first_lr[repeats] = next(r["lr"] for r in records if "lr" in r)
    warmup = {1: round(0.5 * (600 // 8)), 3: round(0.5 * _rasampler_steps(600, 1, 8))}  # 38 and 32 steps
    assert warmup == {1: 38, 3: 32}
    assert first_lr[1] / first_lr[3] == pytest.approx(warmup[3] / warmup[1])
