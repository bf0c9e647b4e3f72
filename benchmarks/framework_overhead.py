"""Framework overhead of a stage-1 step: GKD's Trainer path vs a minimal hand-written PyTorch loop.

Both run the same step on the same pre-generated in-memory batches (data loading excluded):
teacher forward, student + GKD objective forward/backward, AdamW. The framework side is built as
train_distill builds it — DistillModel, the project's AdamW groups, make_accelerator (CPU unless
CUDA), accelerator.prepare, Trainer.start / Trainer.step (seeding, accelerator.autocast/backward,
non-finite check, loss-term bookkeeping, budget accounting; its metrics log every 20 steps is not reached at the default reps). The
hand loop is `loss.backward(); opt.step(); opt.zero_grad()`. Interleaved, medians, random weights.

    OMP_NUM_THREADS=2 python benchmarks/framework_overhead.py              # DINOv2-S/14 → DeiT-Ti, batch 4, 224 px
    python benchmarks/framework_overhead.py --teacher vit_base_patch14_dinov2 --batch 64 --reps 20 --device cuda

Target: overhead ≤ 5 %.
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch

from _bench import DistillPair, adamw, interleaved, parser, plain_step, setup
from gkd.config import DistillConfig, load_config
from gkd.engine.trainer import Trainer, make_accelerator, reset_accelerate_state
from gkd.engine.compute import Budget


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(reps=7)
    args = p.parse_args()
    device = setup(args)
    out_dir = tempfile.mkdtemp(prefix="gkd-bench-")
    cfg = load_config(DistillConfig, overrides=[
        f"out_dir={out_dir}", "resume=never", "data.train_shards=unused", f"data.batch_size={args.batch}",
        f"data.img_size={args.img_size}", f"teacher.name={args.teacher}", f"student.name={args.student}",
        f"engine.cpu={args.device == 'cpu'}", "engine.save_every=1000000000",
    ])

    # framework: built as train_distill builds it
    torch.manual_seed(0)
    fw = DistillPair(args.teacher, args.student, args.img_size)
    accelerator = make_accelerator(cfg)
    fw.model, fw_opt = accelerator.prepare(fw.model, adamw(fw.model))
    fw.teacher.to(accelerator.device)
    trainer = Trainer(cfg, accelerator, fw.model, fw_opt, Budget("steps", 10**9), desc="bench")
    trainer.start()

    # hand-written: same weights, same optimizer settings, no framework
    torch.manual_seed(0)
    hand = DistillPair(args.teacher, args.student, args.img_size, device=device)
    hand_opt = adamw(hand.model)

    n = 4  # distinct pre-generated batches, cycled
    data = [torch.randn(args.batch, 3, args.img_size, args.img_size, device=device) for _ in range(n)]
    batches = [{"image": x, "skipped": torch.zeros(args.batch, dtype=torch.long)} for x in data]
    counter = {"fw": 0, "hand": 0}

    def fw_loss(batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # train_distill's loss_fn
        images = batch["image"].to(accelerator.device, non_blocking=True)
        return fw.model(images, fw.teacher(images))

    def fw_step() -> None:
        trainer.step(iter([batches[counter["fw"] % n]]), fw_loss, lr=1e-5, epoch=0)
        counter["fw"] += 1

    def hand_step() -> None:
        plain_step(hand, hand_opt, data[counter["hand"] % n])
        counter["hand"] += 1

    med = interleaved({"framework (Trainer.step)": fw_step, "hand-written loop": hand_step}, args.reps, device)
    trainer.progress.close()
    reset_accelerate_state()

    print(f"{args.teacher} → {args.student}, gkd, batch {args.batch}, {args.img_size} px, "
          f"median of {args.reps} interleaved steps")
    for name, s in med.items():
        print(f"{name:28s} {args.batch / s:8.2f} images/s   ({s:.3f} s/step)")
    overhead = med["framework (Trainer.step)"] / med["hand-written loop"] - 1
    print(f"framework overhead: {100 * overhead:+.1f} %  (target ≤ 5 %: {'met' if overhead <= 0.05 else 'MISSED'})")


if __name__ == "__main__":
    main()
