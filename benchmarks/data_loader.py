"""Data-loader throughput vs what a stage-1 step consumes.

Writes webdataset shards of ../shared/data/imagenet_sample into a temp dir (gkd.data.write_shards),
then alternates, round by round: a fresh build_shard_loader with the paper's augmentation
(RandomResizedCrop, flip, RandAugment m9, random erasing 0.25) and `--workers` workers, timed over
`--batches` batches after its first (worker start-up and shuffle-buffer fill are excluded), and
stage-1 steps (teacher forward, student + GKD objective forward/backward, AdamW) of the pair.
The loader is shut down before the steps run, so neither steals cores from the other.

    OMP_NUM_THREADS=2 python benchmarks/data_loader.py                  # DINOv2-S/14 → DeiT-Ti, batch 4, 2 workers
    python benchmarks/data_loader.py --src /data/imagenet/train --workers 8 --batch 64 --device cuda

Target: loader ≥ 3 × the step's consumption.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from _bench import DistillPair, adamw, parser, plain_step, setup, sync
from gkd.data import build_shard_loader, build_train_transform, write_shards

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_sample"


def loader_rate(shards: str, transform, batch: int, workers: int, batches: int, seed: int) -> float:
    """Images/s of one fresh loader over `batches` batches after its first."""
    loader = build_shard_loader(shards, transform, batch, num_workers=workers, seed=seed, epoch=seed,
                                steps_per_epoch=batches + 1)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    del it  # shuts the workers down
    return rate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--src", default=str(SAMPLE), help="image folder to shard")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=15, help="timed loader batches per round")
    p.set_defaults(reps=3)
    args = p.parse_args()
    device = setup(args)
    pair = DistillPair(args.teacher, args.student, args.img_size, device=device)
    opt = adamw(pair.model)
    transform = build_train_transform(img_size=args.img_size, mean=pair.teacher.mean, std=pair.teacher.std)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    with tempfile.TemporaryDirectory(prefix="gkd-bench-shards-") as tmp:
        index = write_shards(args.src, tmp, shard_size=250, verify=False)
        shards = str(Path(tmp) / "train-index.json")
        plain_step(pair, opt, images)  # warm-up
        loads, steps = [], []
        for r in range(args.reps):  # interleaved rounds
            loads.append(loader_rate(shards, transform, args.batch, args.workers, args.batches, seed=r))
            sync(device)
            t0 = time.perf_counter()
            plain_step(pair, opt, images)
            sync(device)
            steps.append(args.batch / (time.perf_counter() - t0))
    load, step = statistics.median(loads), statistics.median(steps)
    print(f"{index.num_samples} images in {len(index.counts)} shards; batch {args.batch}, {args.img_size} px, "
          f"median of {args.reps} interleaved rounds")
    print(f"loader ({args.workers} workers, paper augmentation) {load:8.1f} images/s")
    print(f"stage-1 step ({args.teacher} → {args.student})  {step:8.2f} images/s")
    ratio = load / step
    print(f"loader / step consumption: {ratio:.1f} ×  (target ≥ 3 ×: {'met' if ratio >= 3 else 'MISSED'})")


if __name__ == "__main__":
    main()
