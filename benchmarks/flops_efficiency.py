"""Achieved GFLOP/s of a stage-1 step vs this machine's large-matmul GFLOP/s.

The step's FLOPs are counted once with gkd.engine.compute.count_flops (teacher forward + student and
GKD objective forward/backward, as Trainer.count_flops does; AdamW's elementwise work is not
counted) and divided by the measured step time (teacher forward, forward/backward, AdamW). The
reference is an n×n fp32 matmul (2·n³ FLOPs) at the same thread count, timed interleaved with the
steps. Medians, random weights.

    OMP_NUM_THREADS=2 python benchmarks/flops_efficiency.py             # DINOv2-S/14 → DeiT-Ti, batch 4, 224 px
    python benchmarks/flops_efficiency.py --student deit_small_patch16_224 --batch 64 --device cuda --matmul 8192

Target: ≥ 50 % of the matmul rate on CPU (GPU target: bf16 MFU ≥ 40 %, not measured here).
"""
from __future__ import annotations

import torch

from _bench import DistillPair, adamw, interleaved, parser, plain_step, setup
from gkd.engine.compute import count_flops


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--matmul", type=int, default=2048, help="n of the n×n fp32 reference matmul")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of one step")
    args = p.parse_args()
    device = setup(args)
    pair = DistillPair(args.teacher, args.student, args.img_size, device=device)
    opt = adamw(pair.model)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    flops = count_flops(lambda: pair.loss(images)["loss"].backward())
    opt.zero_grad(set_to_none=True)
    a, b = (torch.randn(args.matmul, args.matmul, device=device) for _ in range(2))
    mm_reps = 4  # matmuls per timed call

    def matmuls() -> None:
        for _ in range(mm_reps):
            torch.mm(a, b)

    med = interleaved({"step": lambda: plain_step(pair, opt, images), "matmul": matmuls}, args.reps, device)
    step_rate = flops / med["step"] / 1e9
    mm_rate = mm_reps * 2 * args.matmul ** 3 / med["matmul"] / 1e9
    print(f"{args.teacher} → {args.student}, gkd, batch {args.batch}, {args.img_size} px, median of {args.reps} interleaved")
    print(f"stage-1 step: {flops / 1e9:.1f} GFLOP in {med['step']:.3f} s = {step_rate:7.1f} GFLOP/s")
    print(f"{args.matmul}×{args.matmul} fp32 matmul:             {mm_rate:7.1f} GFLOP/s")
    ratio = step_rate / mm_rate
    print(f"step / matmul: {100 * ratio:.1f} %  (target ≥ 50 %: {'met' if ratio >= 0.5 else 'MISSED'})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            plain_step(pair, opt, images)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
