"""Resampling of patch-embedding kernels and position embeddings.

Two position-embedding rules exist and give different tokens away from the native grid:

* ``official_pos_embed`` — the rule of the official DINOv2 code, applied at *every forward*:
  bicubic ``F.interpolate`` of the native M×M grid with ``scale_factor=((h + offset)/M, (w + offset)/M)``
  (offset 0.1, antialias off, for the original models) or with ``size=(h, w)`` when the offset is 0
  (antialias on, for the register models). It is what the teachers must reproduce.
* timm's ``resample_abs_pos_embed`` (bicubic to ``size``, antialias on) — used by timm at load time
  and for ``dynamic_img_size``; we use it for students, whose position embeddings are trained anyway.

Two patch-kernel rules (``PATCH_RESAMPLE_RULES``), e.g. for the stage-2 teacher's 14 → 16 px kernel:

* ``"bicubic"`` — the authors' (GKD ``general_distillation/distillation_models_{deit,dino}.py``
  ``interpolate_patch_embed_``): ``F.interpolate(kernel.float(), size=(p, p), mode="bicubic",
  align_corners=False)``, antialias off, no rescaling. A 16-px kernel made this way sums over
  (16/14)² ≈ 1.31× as many pixels, so patch embeddings grow by about that factor.
* ``"pinv"`` — FlexiViT's pseudo-inverse resize (timm ``resample_patch_embed``): a p-px patch that
  is the resize of a p0-px patch gives the same projection (exact when upsampling).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import resample_abs_pos_embed, resample_patch_embed

__all__ = [
    "official_pos_embed",
    "timm_pos_embed",
    "resample_patch_conv",
    "bicubic_patch_embed",
    "resample_kernel",
    "PATCH_RESAMPLE_RULES",
    "infer_pos_grid",
    "resample_abs_pos_embed",
    "resample_patch_embed",
]


def official_pos_embed(
    patch_pos: Tensor,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    offset: float = 0.1,
    antialias: bool = False,
) -> Tensor:
    """Interpolate patch position embeddings with the official DINOv2 rule.

    patch_pos: [1, M*M, C] (no class entry), src_grid: (M, M), dst_grid: (h, w) token grid.
    Returns [1, h*w, C] in the input dtype. Interpolation runs in float32 as in the official code.
    The caller decides when to skip it (the official code returns the table unchanged when the
    token count matches and the image is square).
    """
    m_h, m_w = src_grid
    if m_h != m_w:
        # The official code recovers M with sqrt(N): only square native grids exist there.
        raise ValueError(f"official interpolation expects a square native grid, got {src_grid}")
    h, w = dst_grid
    dim = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, m_h, m_w, dim).permute(0, 3, 1, 2)  # [1, C, M, M]
    if offset:
        # The historical "+0.1" kludge: the output size is floor(M * (h + 0.1) / M) = h, but the
        # sampling positions follow the scale factor, not the output size.
        kwargs = {"scale_factor": ((h + offset) / m_h, (w + offset) / m_w)}
    else:
        kwargs = {"size": (h, w)}
    out = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(out.shape[-2:]) != (h, w):
        raise RuntimeError(f"position interpolation gave {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


def timm_pos_embed(patch_pos: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """timm's rule (bicubic to size, antialias on): [1, M*M, C] -> [1, h*w, C]."""
    return resample_abs_pos_embed(patch_pos, new_size=list(dst_grid), old_size=list(src_grid), num_prefix_tokens=0)


PATCH_RESAMPLE_RULES = ("bicubic", "pinv")


def bicubic_patch_embed(weight: Tensor, size: tuple[int, int] | list[int]) -> Tensor:
    """The authors' kernel rule: [C, 3, p0, p0] -> [C, 3, p, p] by a bicubic ``F.interpolate`` of the
    kernel itself (align_corners=False, antialias off), computed in float32, no rescaling."""
    out = F.interpolate(weight.float(), size=tuple(size), mode="bicubic", align_corners=False)
    return out.to(weight.dtype)


def resample_kernel(weight: Tensor, size: list[int], rule: str) -> Tensor:
    """[C, 3, p0, p0] -> [C, 3, *size] by ``rule`` (one of ``PATCH_RESAMPLE_RULES``)."""
    if rule not in PATCH_RESAMPLE_RULES:
        raise ValueError(f"patch_resample must be one of {PATCH_RESAMPLE_RULES}, got {rule!r}")
    return bicubic_patch_embed(weight, size) if rule == "bicubic" else resample_patch_embed(weight, size)


def resample_patch_conv(conv: nn.Conv2d, patch_size: int, *, rule: str) -> nn.Conv2d:
    """A new patchify conv with kernel = stride = ``patch_size`` and resampled weights (bias kept).

    conv.weight: [C, 3, p0, p0] -> [C, 3, p, p] with ``rule``: ``"bicubic"`` (``bicubic_patch_embed``,
    the authors') or ``"pinv"`` (timm's ``resample_patch_embed``, FlexiViT pseudo-inverse resize).
    """
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=patch_size,
        stride=patch_size,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(resample_kernel(conv.weight.detach(), [patch_size, patch_size], rule))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    new.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        new.bias.requires_grad_(conv.bias.requires_grad)
    return new


def infer_pos_grid(num_pos: int, max_prefix: int = 8) -> tuple[int, int]:
    """(num_prefix_entries, M) such that num_pos = num_prefix_entries + M*M, smallest prefix first.

    Used to read the native grid off a checkpoint's ``pos_embed`` [1, num_pos, C].
    """
    for prefix in range(max_prefix + 1):
        m = math.isqrt(num_pos - prefix) if num_pos - prefix > 0 else 0
        if m > 0 and m * m == num_pos - prefix:
            return prefix, m
    raise ValueError(f"pos_embed with {num_pos} entries is not prefix + square grid")
