"""Stage-1 epoch time with the teacher-feature cache vs without, in one run (interleaved).

Writes shards of the first `--images` images of ../shared/data/imagenet_sample, a cache of `--views`
views per image with the same stage-1 config, then runs `--reps` alternating one-epoch stage-1 runs
(train_distill, random weights) with and without `data.teacher_cache`, and compares their training
seconds (the steps' wall-clock from metrics.jsonl; setup excluded). Also prints the cache's disk use.

    OMP_NUM_THREADS=2 python benchmarks/teacher_cache.py            # ViT-S/14 teacher → ViT-Ti student, 224 px
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from gkd.config import DistillConfig, load_config
from gkd.data import build_train_transform, write_shards
from gkd.data.teacher_cache import write_teacher_cache
from gkd.engine.trainer import reset_accelerate_state
from gkd.engine.distill import build_stage_teacher, train_distill

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_sample"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="vit_small_patch14_dinov2")
    p.add_argument("--student", default="vit_tiny_patch16_224")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "imgs"
        src.mkdir()
        for f in sorted(DATA.glob("*.jpg"))[: args.images]:
            (src / f.name).symlink_to(f)
        write_shards(src, tmp / "wds", shard_size=max(1, args.images // 4))
        base = [f"teacher.name={args.teacher}", "teacher.random_init=true", f"student.name={args.student}",
                f"data.train_shards={tmp}/wds/train-{{000000..000003}}.tar", f"data.batch_size={args.batch}",
                "data.num_workers=2", "optim.epochs=1", "optim.warmup_epochs=0", "engine.save_every=100000",
                "engine.log_every=100000", "resume=never"]
        cfg = load_config(DistillConfig, [], base)
        teacher = build_stage_teacher(cfg)
        tf = build_train_transform(img_size=224, mean=teacher.mean, std=teacher.std, **cfg.data.aug)
        t0 = time.perf_counter()
        write_teacher_cache(cfg.data.train_shards, tmp / "cache", teacher, tf, views=args.views, batch_size=32)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (tmp / "cache").glob("*.tar"))
        seconds: dict[str, list[float]] = {"uncached": [], "cached": []}
        for rep in range(args.reps):
            for name in (("uncached", "cached") if rep % 2 == 0 else ("cached", "uncached")):
                extra = [f"data.teacher_cache={tmp / 'cache'}"] if name == "cached" else []
                out = tmp / f"{name}{rep}"
                train_distill(load_config(DistillConfig, [], [*base, *extra, f"out_dir={out}"]))
                reset_accelerate_state()
                rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                seconds[name].append(next(r for r in rec if r.get("event") == "compute")["train_seconds"])
        print(f"{args.teacher} → {args.student}, {args.images} images, batch {args.batch}, 224 px, "
              f"median of {args.reps}")
        u, c = statistics.median(seconds["uncached"]), statistics.median(seconds["cached"])
        print(f"uncached epoch     {u:.1f} s")
        print(f"cached epoch       {c:.1f} s")
        print(f"cached / uncached  {c / u:.3f}  (target ≤ 0.5)")
        print(f"cache: {args.views} view(s)/image, written in {write_s:.1f} s, "
              f"{disk / args.images / args.views / 1e6:.2f} MB per view")
        print(OmegaConf.to_yaml({"seconds": seconds}).strip())


if __name__ == "__main__":
    main()
