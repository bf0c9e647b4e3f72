"""Standardised teacher targets: per-channel mean and std of the teacher's tokens.

VFM tokens have a few channels whose variance is orders of magnitude above the rest (DINOv2's
"massive activations"). An element-wise MSE on raw tokens is then dominated by those channels, and
a small student can lower it a lot by predicting them — for instance the mean token — while
learning little else. PHI-S (Ranzinger et al., 2024) and AM-RADIO standardise the teacher's
features before the distillation loss; this module does the per-channel version:

    T' = (T − μ) / σ        μ, σ ∈ R^{Ct}, estimated once on the distillation data,

with separate statistics for the class token and the patch tokens (their distributions differ a
lot in DINOv2). The heads then predict T'; ``inverse`` maps a prediction back to the teacher's
space. The statistics are buffers (saved with resumable checkpoints) and are recorded in the
stage's handoff file (``as_record``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gkd.tensors import Tokens

__all__ = ["TargetStandardizer", "TokenMoments"]


class TokenMoments:
    """Running float64 sums of the teacher's tokens (count, Σx, Σx²) for the class and patch tokens."""

    def __init__(self, channels: int) -> None:
        z = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        self.sums = {"cls": [torch.zeros((), dtype=torch.float64), z(), z()],
                     "patch": [torch.zeros((), dtype=torch.float64), z(), z()]}

    def update(self, tokens: Tokens) -> None:
        """Add a batch: cls [B, C], patch [B, N, C]."""
        for name, x in (("cls", tokens.cls), ("patch", tokens.patch)):
            x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
            s = self.sums[name]
            s[0] += x.shape[0]
            s[1] += x.sum(0)
            s[2] += x.square().sum(0)

    def flat(self) -> Tensor:
        """All sums as one vector (for an all-reduce across processes)."""
        return torch.cat([t.reshape(-1) for name in ("cls", "patch") for t in self.sums[name]])

    def load_flat(self, flat: Tensor) -> None:
        flat = flat.to("cpu", torch.float64)
        i = 0
        for name in ("cls", "patch"):
            for t in self.sums[name]:
                t.copy_(flat[i:i + t.numel()].reshape(t.shape))
                i += t.numel()

    def mean_std(self, name: str) -> tuple[Tensor, Tensor]:
        """(μ, σ) [C] of ``name`` (population std, as a standardisation uses)."""
        n, s1, s2 = self.sums[name]
        if n < 2:
            raise ValueError(f"need at least 2 {name} tokens to estimate their statistics, got {int(n)}")
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp_min(0.0)
        return mean, var.sqrt()


class TargetStandardizer(nn.Module):
    """``forward(Tokens) -> Tokens`` with every channel standardised; identity until ``set_stats``.

    eps: added to σ, so that a channel that never varies is not blown up (it becomes T − μ ≈ 0).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)
        for name in ("cls", "patch"):
            self.register_buffer(f"{name}_mean", torch.zeros(channels))
            self.register_buffer(f"{name}_std", torch.ones(channels))
        self.register_buffer("num_tokens", torch.zeros(2, dtype=torch.long))  # (cls, patch) tokens estimated on

    @property
    def ready(self) -> bool:
        return bool(self.num_tokens.sum() > 0)

    @torch.no_grad()
    def set_stats(self, moments: TokenMoments) -> None:
        for i, name in enumerate(("cls", "patch")):
            mean, std = moments.mean_std(name)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std)
            self.num_tokens[i] = int(moments.sums[name][0])

    def _standardize(self, x: Tensor, name: str, inverse: bool) -> Tensor:
        mean, std = getattr(self, f"{name}_mean"), getattr(self, f"{name}_std") + self.eps
        if inverse:
            return x * std.to(x.dtype) + mean.to(x.dtype)
        return (x - mean.to(x.dtype)) / std.to(x.dtype)

    def forward(self, tokens: Tokens) -> Tokens:
        """cls [B, C], patch [B, N, C] → standardised, same shapes."""
        return Tokens(cls=self._standardize(tokens.cls, "cls", False), patch=self._standardize(tokens.patch, "patch", False),
                      grid=tokens.grid)

    def inverse(self, tokens: Tokens) -> Tokens:
        """Back to the teacher's space: ``inverse(forward(t)) == t`` up to rounding."""
        return Tokens(cls=self._standardize(tokens.cls, "cls", True), patch=self._standardize(tokens.patch, "patch", True),
                      grid=tokens.grid)

    def as_record(self) -> dict[str, Any]:
        """JSON-able statistics for the handoff file's metadata."""
        rec: dict[str, Any] = {"kind": "per_channel_standardisation", "eps": self.eps,
                               "num_tokens": {"cls": int(self.num_tokens[0]), "patch": int(self.num_tokens[1])}}
        for name in ("cls", "patch"):
            rec[name] = {"mean": getattr(self, f"{name}_mean").tolist(), "std": getattr(self, f"{name}_std").tolist()}
        return rec

    def extra_repr(self) -> str:
        return f"channels={self.cls_mean.numel()}, eps={self.eps}, ready={self.ready}"
