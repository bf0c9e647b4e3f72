"""Peak memory per stage at the benchmark batch, each stage in a fresh subprocess.

CPU: the process's RSS high-water mark (resource.getrusage ru_maxrss; torch's allocations are
native, so tracemalloc would miss them), read after building the models and again after two steps.
GPU: torch.cuda.max_memory_allocated. Stages:
  stage1  teacher + student + GKD objective, forward/backward + AdamW at `--img-size`
  stage3  frozen encoder (no grad) + `--decoder` head at `--crop`² crops, loss, backward + AdamW
  eval    sliding-window inference of the same segmentor on a `--height`×`--width` image

    OMP_NUM_THREADS=2 python benchmarks/peak_memory.py                 # DINOv2-S/14 → DeiT-Ti batch 4; stage 3 batch 2
    python benchmarks/peak_memory.py --student deit_small_patch16_224 --batch 64 --seg-batch 4 --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from _bench import DistillPair, adamw, parser, plain_step, setup


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_stage(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Build the stage's models, run two steps; the peak after building and after the steps."""
    if args.child == "stage1":
        pair = DistillPair(args.teacher, args.student, args.img_size, device=device)
        opt = adamw(pair.model)
        images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
        step = lambda: plain_step(pair, opt, images)  # noqa: E731
    else:
        from gkd.eval.inference import predict
        from gkd.models import build_segmentor, build_student

        seg = build_segmentor(build_student(args.student, img_size=args.crop, patch_size=16),
                              decoder=args.decoder, num_classes=19).to(device)
        if args.child == "stage3":
            opt = adamw(seg)
            images = torch.rand(args.seg_batch, 3, args.crop, args.crop, device=device)
            labels = torch.randint(0, 19, (args.seg_batch, args.crop, args.crop), device=device)
            seg.train()

            def step() -> None:
                seg.loss(images, labels)["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            seg.eval()
            images = torch.rand(1, 3, args.height, args.width, device=device)
            step = lambda: predict(seg, images, mode="slide", crop=args.crop, stride=341, num_classes=19)  # noqa: E731
    built = peak_mib(device)
    for _ in range(2):
        step()
    return {"built": built, "peak": peak_mib(device)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--decoder", default="mlp")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--seg-batch", type=int, default=2, help="stage-3 batch (paper: 4)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--child", choices=["stage1", "stage3", "eval"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # inside the fresh subprocess
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        print(json.dumps(run_stage(args, torch.device(args.device))))
        return
    setup(args)
    unit = "max_memory_allocated" if args.device == "cuda" else "RSS high-water (ru_maxrss)"
    shapes = {"stage1": f"{args.teacher} → {args.student}, batch {args.batch}, {args.img_size} px",
              "stage3": f"frozen {args.student} + {args.decoder}, batch {args.seg_batch}, {args.crop}² crops",
              "eval": f"{args.student} + {args.decoder}, 1 image {args.height}×{args.width}, slide {args.crop}/341"}
    for stage, shape in shapes.items():
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", stage],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{stage:7s} peak {unit}: {r['peak']:8.0f} MiB  (after building: {r['built']:6.0f} MiB; "
              f"step adds {r['peak'] - r['built']:6.0f} MiB)  [{shape}]")


if __name__ == "__main__":
    main()
