"""Step time of the GKD objective (QSD heads) vs the Proteus objective (linear heads).

Same teacher, same student weights, same batch; a step is student + objective forward, backward
and AdamW (the teacher tokens are computed once: the teacher forward is the same for both and is
reported separately, so the whole-step ratio is also printed). Interleaved, medians, random weights.

    OMP_NUM_THREADS=2 python benchmarks/qsd_vs_proteus.py               # DINOv2-S/14 → DeiT-Ti, batch 4, 224 px
    python benchmarks/qsd_vs_proteus.py --teacher vit_base_patch14_dinov2 --student deit_small_patch16_224 --batch 8

Target: GKD ≤ 1.10 × Proteus.
"""
from __future__ import annotations

import torch

from _bench import DistillPair, adamw, interleaved, parser, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    pairs, opts = {}, {}
    for method in ("gkd", "proteus"):
        torch.manual_seed(0)  # identical teacher and student weights
        pairs[method] = DistillPair(args.teacher, args.student, args.img_size, method=method, device=device)
        opts[method] = adamw(pairs[method].model)
    teacher = pairs["gkd"].teacher
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    tokens = teacher(images)

    def step(method: str) -> None:
        pairs[method].model(images, tokens)["loss"].backward()
        opts[method].step()
        opts[method].zero_grad(set_to_none=True)

    med = interleaved({"teacher forward": lambda: teacher(images), "gkd": lambda: step("gkd"),
                       "proteus": lambda: step("proteus")}, args.reps, device)
    print(f"{args.teacher} → {args.student}, batch {args.batch}, {args.img_size} px, median of {args.reps} interleaved")
    heads = {m: sum(p.numel() for p in pairs[m].model.objective.parameters()) / 1e6 for m in pairs}
    for name, s in med.items():
        extra = f"   (heads {heads[name]:.2f} M params)" if name in heads else ""
        print(f"{name:16s} {s:7.3f} s{extra}")
    ratio = med["gkd"] / med["proteus"]
    t = med["teacher forward"]
    print(f"GKD / Proteus, student step (fwd+bwd+AdamW): {ratio:.3f}  (target ≤ 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")
    print(f"GKD / Proteus, whole step incl. teacher forward: {(t + med['gkd']) / (t + med['proteus']):.3f}")


if __name__ == "__main__":
    main()
