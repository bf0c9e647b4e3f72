"""Teacher-feature cache: stored tokens are the teacher's on the stored views, crop/flip replay, training on it."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from gkd.cli import main
from gkd.config import DistillConfig, load_config
from gkd.data import build_train_transform
from gkd.data.teacher_cache import build_cache_loader, read_cache_meta
from gkd.data.wds import _read_shard
from gkd.engine.distill import build_stage_teacher, train_distill
from helpers import TINY, reset_accelerate


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("cache")
    cfg_file = out / "s1.yaml"
    cfg_file.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist([*TINY, f"data.train_shards={shards}"])))
    assert main(["data", "cache-teacher", "--config", str(cfg_file), "--out", str(out / "c"), "--views", "2",
                 "--batch-size", "8", "--shard-size", "20"]) == 0
    return out / "c", load_config(DistillConfig, [cfg_file])


def _samples(cache_dir: Path) -> list[dict]:
    return [s for t in sorted(cache_dir.glob("cache-*.tar")) for s in _read_shard(str(t), None)]


def test_cache_holds_the_teachers_tokens_of_its_views(cache):
    cache_dir, cfg = cache
    meta = read_cache_meta(cache_dir)
    samples = _samples(cache_dir)
    assert meta["views"] == 2 and meta["num_images"] == len(samples) == 48 and meta["num_skipped"] == 0
    assert json.loads((cache_dir / "cache-index.json").read_text())["num_samples"] == 48
    teacher = build_stage_teacher(cfg)
    load = lambda s, f: torch.from_numpy(np.load(io.BytesIO(s[f])).astype(np.float32))  # noqa: E731
    for s in samples[:3]:
        views = load(s, "views.npy")                       # [K, 3, 56, 56]
        assert views.shape == (2, 3, 56, 56) and not torch.equal(views[0], views[1])
        with torch.no_grad():
            tokens = teacher(views)
        torch.testing.assert_close(load(s, "patch.npy"), tokens.patch, rtol=1e-2, atol=1e-2)  # fp16 storage
        torch.testing.assert_close(load(s, "cls.npy"), tokens.cls, rtol=1e-2, atol=1e-2)


def test_recorded_crop_and_flip_reproduce_the_view(cache, shards, tmp_path):
    """With RandAugment and erasing off, crop box + flip + normalisation rebuild the stored view."""
    from gkd.data.teacher_cache import write_teacher_cache

    cache_dir, cfg = cache
    teacher = build_stage_teacher(cfg)
    tf = build_train_transform(img_size=56, mean=teacher.mean, std=teacher.std, auto_augment=None, re_prob=0.0)
    write_teacher_cache(shards, tmp_path / "plain", teacher, tf, views=2, batch_size=8)
    originals = {s["__key__"]: s for t in sorted(Path(shards.split("train-")[0]).glob("train-*.tar"))
                 for s in _read_shard(str(t), None)}
    for s in _samples(tmp_path / "plain")[:4]:
        info = json.loads(s["json"])
        img = Image.open(io.BytesIO(originals[s["__key__"]]["jpg"])).convert("RGB")
        views = np.load(io.BytesIO(s["views.npy"])).astype(np.float32)
        for k, p in enumerate(info["views"]):
            top, left, h, w = p["crop"]
            x = TF.resized_crop(img, top, left, h, w, [56, 56], TF.InterpolationMode.BICUBIC)
            x = TF.hflip(x) if p["flip"] else x
            x = TF.normalize(TF.to_tensor(x), teacher.mean, teacher.std)
            np.testing.assert_allclose(views[k], x.numpy(), atol=2e-3)  # fp16 storage


def test_training_on_the_cache_never_runs_the_teacher(cache, tmp_path, monkeypatch):
    cache_dir, cfg = cache
    loader = build_cache_loader(cache_dir, 8, epoch=1, steps_per_epoch=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 56, 56) and batch["teacher_patch"].shape == (8, 16, 48)

    import gkd.models.teacher as teachers

    def forbidden(self, images):
        raise AssertionError("the teacher ran although a cache was given")

    monkeypatch.setattr(teachers.Teacher, "forward", forbidden)
    out = tmp_path / "run"
    train_distill(load_config(DistillConfig, [], [*TINY, f"data.train_shards={cfg.data.train_shards}",
                                                  f"data.teacher_cache={cache_dir}", f"out_dir={out}",
                                                  "budget.amount=4"]))
    reset_accelerate()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="another teacher setup"):
        train_distill(load_config(DistillConfig, [], [*TINY, f"data.train_shards={cfg.data.train_shards}",
                                                      f"data.teacher_cache={cache_dir}", "data.img_size=112",
                                                      f"out_dir={tmp_path / 'bad'}"]))
