"""Where a stage-1 step's time goes, and what reusing the unmasked pass saves.

Measures, in one process and interleaved (these machines are noisy, so compare ratios taken in
the same run): the teacher forward, and the student + objective forward/backward with the masked
pass over the whole batch (the authors' code) versus only over the masked half (GKD's default for
batch-independent students; exact, see gkd/distill/objectives.py).

    python benchmarks/stage1_step.py                      # DINOv2-S/14 → DeiT-S at 224 px, batch 8
    python benchmarks/stage1_step.py --teacher vit_base_patch14_dinov2 --batch 8 --reps 5

Random weights (no download); timings do not depend on the values.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gkd.distill import build_objective
from gkd.models import build_student, build_teacher


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="vit_small_patch14_dinov2")
    p.add_argument("--student", default="deit_small_patch16_224")
    p.add_argument("--method", default="gkd")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = build_teacher(args.teacher, img_size=args.img_size)
    student = build_student(args.student, img_size=args.img_size, grid=teacher.grid)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    tokens = teacher(images)
    objectives = {
        "masked pass on the whole batch": build_objective(args.method, student.embed_dim, teacher.embed_dim,
                                                          reuse_unmasked=False),
        "masked pass on the masked half": build_objective(args.method, student.embed_dim, teacher.embed_dim,
                                                          reuse_unmasked=True),
    }

    def step(objective) -> None:
        student.zero_grad(set_to_none=True)
        objective(student, images, tokens)["loss"].backward()

    for objective in objectives.values():  # warm-up
        step(objective)
    timings: dict[str, list[float]] = {"teacher forward": [], **{k: [] for k in objectives}}
    for _ in range(args.reps):  # interleave so drifts in machine load hit all variants alike
        timings["teacher forward"] += _time(lambda: teacher(images), 1)
        for name, objective in objectives.items():
            timings[name] += _time(lambda: step(objective), 1)

    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"{args.teacher} → {args.student}, {args.method}, batch {args.batch}, {args.img_size} px, "
          f"{args.threads} threads, median of {args.reps}")
    for name, seconds in med.items():
        print(f"  {name:34s} {seconds:7.3f} s")
    full, half = med["masked pass on the whole batch"], med["masked pass on the masked half"]
    print(f"  student step ratio half/whole: {half / full:.3f}  (saving {100 * (1 - half / full):.1f} %)")
    t = med["teacher forward"]
    print(f"  whole step ratio (teacher + student) half/whole: {(t + half) / (t + full):.3f}")


if __name__ == "__main__":
    main()
