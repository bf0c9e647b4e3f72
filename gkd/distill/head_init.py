"""Least-squares initialisation of the distillation heads, before the student takes a step.

Randomly initialised heads send the student gradients that mostly carry their own randomness; a
pretrained or teacher-initialised student is distorted by them before the heads have learned
anything (the feature distortion LP-FT, Kumar et al. 2022, avoids by fitting a linear probe first).
For QSD it is worse: PyTorch's init gives attention logits with a std of tens, so the softmax starts
saturated on arbitrary teacher positions (``diag_attn_self`` ≈ 1) and the head can only mix values
from elsewhere — the best it can predict per position is close to the mean token.

Here every head starts as the ridge regression of the (standardised) teacher tokens on its own
LayerNorm of the student tokens, fitted on a few batches:

    W, b = argmin Σ ‖T − (W·LN(S) + b)‖² + λ‖W‖²,   λ = ridge × (number of tokens)

* Proteus' linear head: ``proj`` = (W, b);
* QSD: ``proj_v`` = (W, b), and ``proj_q`` = (W, b) / √Ct — queries that predict the teacher token
  of their own position, scaled like a scaled dot product so the softmax starts soft but prefers the
  own position. The QSD formula itself is unchanged.

The token head is fitted on the class tokens, the feature and patch heads on the patch tokens. The
sums (Gram matrices) are float64 and can be all-reduced across processes before solving.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RidgeFit", "init_heads_least_squares"]


class RidgeFit:
    """Running sums for a ridge regression of targets [.., Ct] on LayerNorm(inputs [.., Cs]) with a bias."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5) -> None:
        self.eps = eps
        self.gram = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
        self.cross = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)

    def _design(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.detach().float(), x.shape[-1:], eps=self.eps).reshape(-1, x.shape[-1]).double().cpu()
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)

    def update(self, inputs: Tensor, targets: Tensor) -> None:
        """inputs [..., Cs], targets [..., Ct] with the same leading shape."""
        x = self._design(inputs)
        y = targets.detach().reshape(-1, targets.shape[-1]).double().cpu()
        self.gram += x.T @ x
        self.cross += x.T @ y

    def flat(self) -> Tensor:
        return torch.cat([self.gram.reshape(-1), self.cross.reshape(-1)])

    def load_flat(self, flat: Tensor) -> None:
        flat = flat.to("cpu", torch.float64)
        n = self.gram.numel()
        self.gram.copy_(flat[:n].reshape(self.gram.shape))
        self.cross.copy_(flat[n:].reshape(self.cross.shape))

    def solve(self, ridge: float) -> tuple[Tensor, Tensor]:
        """(W [Ct, Cs], b [Ct]) in float32; the bias is not penalised."""
        count = self.gram[-1, -1]
        if count < 1:
            raise ValueError("no tokens were added to the fit")
        penalty = torch.eye(len(self.gram), dtype=self.gram.dtype) * (ridge * count)
        penalty[-1, -1] = 0.0
        sol = torch.linalg.solve(self.gram + penalty, self.cross)  # [Cs + 1, Ct]
        return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()


def _set_projection(proj: nn.Sequential, weight: Tensor, bias: Tensor, scale: float = 1.0) -> None:
    """proj = LayerNorm + Linear: identity LayerNorm affine, Linear ← (weight, bias) × scale."""
    norm, linear = proj[0], proj[1]
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        linear.weight.copy_(weight * scale)
        linear.bias.copy_(bias * scale)


def init_heads_least_squares(objective: nn.Module, cls_fit: RidgeFit, patch_fit: RidgeFit, ridge: float = 0.1,
                             target_norm: nn.Module | None = None) -> None:
    """Set the token head from `cls_fit` and the feature / patch heads from `patch_fit` (see module doc).

    target_norm: the ``TargetStandardizer`` the heads' targets go through when the fits saw the raw
    teacher tokens. Each output channel is its own regression with an unpenalised bias, so the fit of
    (T − μ)/σ is exactly (W/σ, (b − μ)/σ): one pass over the data serves the statistics and the heads.
    """
    for name, fit, part in (("token_head", cls_fit, "cls"), ("fea_head", patch_fit, "patch"),
                            ("patch_head", patch_fit, "patch")):
        head = getattr(objective, name)
        weight, bias = fit.solve(ridge)
        if target_norm is not None:
            mean, std = getattr(target_norm, f"{part}_mean"), getattr(target_norm, f"{part}_std") + target_norm.eps
            weight, bias = weight / std[:, None], (bias - mean) / std
        if hasattr(head, "proj_q"):  # QSD
            _set_projection(head.proj_v, weight, bias)
            _set_projection(head.proj_q, weight, bias, 1.0 / math.sqrt(weight.shape[0]))
        elif hasattr(head, "proj"):  # Proteus' LinearHead
            _set_projection(head.proj, weight, bias)
        else:
            raise TypeError(f"{name}: {type(head).__name__} has no projection to initialise")
