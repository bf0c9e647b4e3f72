"""Evaluation throughput: sliding-window inference of a segmentor, and SegMetric.update's share.

A segmentor (gkd.models.build_segmentor: a student encoder at `--crop` px with 16-px patches and
the `--decoder` head) scores random `--height`×`--width` images with gkd.eval.inference.predict
(slide, window `--crop`, stride `--stride`, as the evaluation suites do); then argmax and
SegMetric.update with random labels (5 % ignore). Interleaved, medians, random weights.

    OMP_NUM_THREADS=2 python benchmarks/eval_throughput.py             # DeiT-Ti + mlp, 512×1024, window 512/341
    python benchmarks/eval_throughput.py --student deit_small_patch16_224 --window-batch 3 --device cuda
"""
from __future__ import annotations

import torch

from _bench import interleaved, parser, setup
from gkd.eval.inference import predict, window_grid
from gkd.eval.metrics import SegMetric
from gkd.models import build_segmentor, build_student


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--decoder", default="mlp")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--stride", type=int, default=341)
    p.add_argument("--window-batch", type=int, default=1)
    p.set_defaults(batch=1)
    args = p.parse_args()
    device = setup(args)
    encoder = build_student(args.student, img_size=args.crop, patch_size=16)
    seg = build_segmentor(encoder, decoder=args.decoder, num_classes=args.classes).to(device).eval()
    images = torch.rand(args.batch, 3, args.height, args.width, device=device)
    labels = torch.randint(0, args.classes, (args.batch, args.height, args.width), device=device)
    labels[torch.rand(labels.shape, device=device) < 0.05] = 255
    metric = SegMetric(args.classes)
    pred = {}

    def infer() -> None:
        scores = predict(seg, images, mode="slide", crop=args.crop, stride=args.stride,
                         num_classes=args.classes, window_batch=args.window_batch)
        pred["ids"] = scores.argmax(1)

    infer()
    med = interleaved({"inference": infer, "metric": lambda: metric.update(pred["ids"], labels)}, args.reps, device)
    windows = len(window_grid(args.height, args.width, args.crop, args.stride))
    print(f"{args.student} + {args.decoder}, {args.height}×{args.width}, window {args.crop} stride {args.stride} "
          f"({windows} windows/image), batch {args.batch}, median of {args.reps} interleaved")
    print(f"sliding-window inference + argmax: {args.batch / med['inference']:7.2f} images/s  "
          f"({med['inference'] / args.batch:.3f} s/image)")
    print(f"SegMetric.update:                  {1e3 * med['metric'] / args.batch:7.2f} ms/image")
    print(f"metric / inference time: {100 * med['metric'] / med['inference']:.2f} %")


if __name__ == "__main__":
    main()
