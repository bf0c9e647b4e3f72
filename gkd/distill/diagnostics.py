"""What a distillation step says about the student besides its loss: is it learning the teacher's
tokens, or only their mean?

* ``token_cosine(pred, target)``: the mean cosine similarity of predicted and teacher tokens
  (prediction = a head's output in the teacher's channel space).
* ``relative_spread(x)``: per image, the share of the tokens' energy that varies across positions,
  ``Σ_n ‖x_n − x̄‖² / Σ_n ‖x_n‖²`` (x̄ the image's mean token). Scale-free and independent of the
  channel count, so a student's value can be compared with its teacher's.
* ``spread_ratio(student, teacher)``: mean relative spread of the student's patch tokens over the
  teacher's. A student that outputs the same token at every position (a collapse to the teacher's
  mean token, which a small MSE can hide when a few channels dominate it) shows a ratio near 0.

* ``self_attention_ratio(attn)``: for a QSD head, the mean attention weight a student position
  puts on the teacher token at its *own* position, times N (1 = no preference, as uniform or
  arbitrary attention; N = attends only to itself). A head whose softmax starts saturated on
  arbitrary positions stays near 1 for long: it can then only mix values from elsewhere, and the
  best it can predict per position is close to the mean token.

All inputs are detached; results are fp32 scalars (or [B]) meant for metrics.jsonl.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["token_cosine", "relative_spread", "spread_ratio", "self_attention_ratio", "DIAGNOSTICS"]

# The keys an objective adds to its output dict (metrics.jsonl averages them over each log window);
# diag_attn_self only for QSD heads.
DIAGNOSTICS = ("diag_cos_cls", "diag_cos_patch", "diag_spread_ratio", "diag_attn_self")


@torch.no_grad()
def token_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """pred, target [..., C] → the mean over all leading positions of cos(pred, target), fp32 scalar."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8).mean()


@torch.no_grad()
def relative_spread(x: Tensor) -> Tensor:
    """x [B, N, C] → [B]: Σ_n ‖x_n − x̄‖² / Σ_n ‖x_n‖² per image (0 = one token repeated, 1 = zero mean)."""
    x = x.float()
    centred = x - x.mean(dim=1, keepdim=True)
    return centred.square().sum(dim=(1, 2)) / x.square().sum(dim=(1, 2)).clamp_min(1e-12)


@torch.no_grad()
def spread_ratio(student: Tensor, teacher: Tensor) -> Tensor:
    """student [B, N, Cs], teacher [B, N, Ct] → mean relative spread of the student / the teacher's."""
    return relative_spread(student).mean() / relative_spread(teacher).mean().clamp_min(1e-12)


@torch.no_grad()
def self_attention_ratio(attn: Tensor) -> Tensor:
    """attn [B, h, N, N] (rows sum to 1) → N × the mean weight on the diagonal (fp32 scalar)."""
    n = attn.shape[-1]
    return attn.float().diagonal(dim1=-2, dim2=-1).mean() * n
