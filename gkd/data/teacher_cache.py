"""Teacher-feature cache: run the frozen teacher once, train stages 1-2 on its stored outputs.

``write_teacher_cache`` reads the training shards in order and, for every image, makes K augmented
views with the stage's own training transform, each seeded by (seed, key, view), runs the teacher on
them and writes one webdataset sample per image::

    <key>.views.npy   float16 [K, 3, H, W]   the normalised views (the student's input)
    <key>.cls.npy     float16 [K, C]         the teacher's class token per view
    <key>.patch.npy   float16 [K, N, C]      the teacher's patch tokens per view
    <key>.json        {"key", "seed", "views": [{"crop": [top, left, height, width], "flip": bool}]}

plus ``cache-index.json`` (the shard index the reader uses) and ``cache-meta.json`` (teacher spec,
image size, K). In training (``data.teacher_cache=<dir>``), epoch e reads view e mod K of every
image through the same deterministic, resumable reader as the plain shards, so only the student
runs: the augmentation is then fixed per view (K draws per image instead of one per epoch).

Disk per image: K × (3·H·W + (N + 1)·C) × 2 bytes — at 224 px with a ViT-B/14 teacher
(N = 256, C = 768) about 0.69 MB per view, so ImageNet-1k with K = 4 needs about 3.5 TB; with a
ViT-S/14 teacher (C = 384) about 0.50 MB per view.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from gkd.data.shards import ShardIndex
from gkd.data.wds import (
    _DECODE_ERRORS,
    ShardStream,
    _mix,
    _preserved_rng,
    _read_shard,
    _seed_all,
    decode_image,
    resolve_shards,
)

log = logging.getLogger(__name__)

CACHE_INDEX, CACHE_META = "cache-index.json", "cache-meta.json"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _crop_flip(transform: Callable, img: Image.Image, seed: int) -> dict[str, Any]:
    """The crop box and flip the seeded ``transform`` draws first (timm's RandomResizedCrop draws
    with python's ``random``, the flip with torch's generator), replayed under the same seed."""
    ops = getattr(transform, "transforms", [])
    crop = next((t for t in ops if hasattr(t, "get_params") and hasattr(t, "scale")), None)
    flip = next((t for t in ops if type(t).__name__ == "RandomHorizontalFlip"), None)
    if crop is None:
        return {"crop": None, "flip": None}
    with _preserved_rng():
        _seed_all(seed)
        box = [int(v) for v in crop.get_params(img, crop.scale, crop.ratio)]
        flipped = bool(torch.rand(1) < flip.p) if flip is not None else False
    return {"crop": box, "flip": flipped}


@torch.no_grad()
def write_teacher_cache(shards: str, out_dir: str | Path, teacher: torch.nn.Module, transform: Callable,
                        views: int = 4, seed: int = 0, batch_size: int = 32, shard_size: int = 256,
                        device: str | torch.device = "cpu") -> Path:
    """Write the cache of `shards` (see the module docstring); return the index path.

    teacher: a ``build_teacher`` teacher (called on normalised views, returns Tokens).
    transform: the stage's training transform (``build_train_transform`` with the stage's settings).
    Undecodable images are skipped, counted and logged; the count is in ``cache-meta.json``.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_set = resolve_shards(shards)
    teacher = teacher.to(device).eval()
    pattern = str(out / "cache-%06d.tar")
    counts: dict[str, int] = {}  # shard file → images written to it (this run's shards only)
    skipped: list[str] = []
    pending: list[tuple[dict, torch.Tensor, list[dict]]] = []

    def flush(sink: wds.ShardWriter) -> None:
        if not pending:
            return
        images = torch.cat([v for _, v, _ in pending]).to(device)  # [n·K, 3, H, W]
        tokens = teacher(images)
        cls = tokens.cls.float().cpu().view(len(pending), views, -1)
        patch = tokens.patch.float().cpu().view(len(pending), views, *tokens.patch.shape[1:])
        for i, (sample, view_stack, params) in enumerate(pending):
            record = {"__key__": sample["__key__"], "views.npy": _npy(view_stack.half().numpy()),
                      "cls.npy": _npy(cls[i].half().numpy()), "patch.npy": _npy(patch[i].half().numpy()),
                      "json": json.dumps({"key": sample["__key__"], "seed": seed, "views": params}).encode()}
            if "cls" in sample:
                record["cls"] = sample["cls"]
            sink.write(record)
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
        pending.clear()

    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for u, url in enumerate(shard_set.urls):
            expected = None if shard_set.counts is None else shard_set.counts[u]
            for sample in _read_shard(url, expected):
                key = sample["__key__"]
                try:
                    img = decode_image(sample)
                except _DECODE_ERRORS as exc:
                    log.warning("teacher cache: skipping undecodable sample %s in %s: %s", key, url, exc)
                    skipped.append(key)
                    continue
                stack, params = [], []
                for k in range(views):
                    view_seed = _mix("cache", seed, key, k)
                    params.append(_crop_flip(transform, img, view_seed))
                    with _preserved_rng():
                        _seed_all(view_seed)
                        stack.append(transform(img))
                pending.append((sample, torch.stack(stack), params))
                if len(pending) * views >= batch_size:
                    flush(sink)
        flush(sink)
    index = ShardIndex(shards=list(counts), counts=list(counts.values()), classes=list(shard_set.classes), prefix="cache", seed=seed,
                       shuffled=False, sources=list(shard_set.sources), num_skipped=len(skipped), skipped=skipped[:100])
    (out / CACHE_INDEX).write_text(json.dumps(index.to_json(), indent=2))
    spec = getattr(teacher, "spec", {})
    (out / CACHE_META).write_text(json.dumps({"views": views, "seed": seed, "num_images": sum(counts.values()),
                                              "num_skipped": len(skipped), "teacher": spec}, indent=2))
    if skipped:
        log.warning("teacher cache: skipped %d undecodable image(s)", len(skipped))
    return out / CACHE_INDEX


def read_cache_meta(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / CACHE_META
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} is not a teacher cache (no {CACHE_META}); write one with "
                                "`gkd data cache-teacher`")
    return json.loads(path.read_text())


class CachedShardStream(ShardStream):
    """``ShardStream`` over a teacher cache: batches of ``image`` (view epoch mod K, float32),
    ``teacher_cls`` [B, C], ``teacher_patch`` [B, N, C] (float32), ``label``, ``skipped``.
    ``views`` (K) is set by ``build_cache_loader``."""

    views: int = 1

    def _decode(self, sample: dict) -> tuple[dict[str, torch.Tensor], int] | None:
        key = sample.get("__key__")
        try:
            k = self.epoch % self.views
            out = {name: torch.from_numpy(np.load(io.BytesIO(sample[f"{field}.npy"]))[k].astype(np.float32))
                   for name, field in (("image", "views"), ("teacher_cls", "cls"), ("teacher_patch", "patch"))}
            return out, int(sample["cls"]) if "cls" in sample else -1
        except (KeyError, ValueError, OSError, IndexError) as exc:
            if key not in self._logged:
                self._logged.add(key)
                log.warning("skipping unreadable cache sample %s in %s: %s: %s", key, sample.get("__url__"),
                            type(exc).__name__, exc)
            return None

    def _prepare(self, payload: dict[str, torch.Tensor], sample: dict) -> dict[str, torch.Tensor]:
        return payload  # augmented when the cache was written


def build_cache_loader(cache_dir: str | Path, batch_size_per_rank: int, **kw: Any) -> torch.utils.data.DataLoader:
    """``build_shard_loader`` over a teacher cache (same splitting, seeding and resume; no transform)."""
    from gkd.data.wds import build_shard_loader

    loader = build_shard_loader(str(cache_dir), None, batch_size_per_rank, stream_cls=CachedShardStream, **kw)
    loader.dataset.views = int(read_cache_meta(cache_dir)["views"])  # set before workers copy the dataset
    return loader
