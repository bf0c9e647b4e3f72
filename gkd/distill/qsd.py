"""Query-based Soft Distillation (QSD), ARCHITECTURE.md §1 and §4.

The student asks the teacher: every student token, projected to the teacher width, is a
query over the raw teacher tokens of the same image; the attention weights then mix
values that are *also* projections of the student tokens. The result is compared with
the teacher tokens by MSE (done by the objective, not here).

    Q = Linear_q(LayerNorm_q(S))          [B, N, Ct]
    K = T  (raw teacher tokens)            [B, N, Ct]
    V = Linear_v(LayerNorm_v(S))          [B, N, Ct]
    QSD(S, T) = softmax_over_teacher_positions(Q Kᵀ) V     [B, N, Ct]

Because V comes from the student while the weights range over teacher positions, the
student and teacher token counts must be equal (matching token grids).

No 1/√d scaling and no temperature: the authors' code applies the softmax to the raw
dot products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def _projection(student_dim: int, teacher_dim: int) -> nn.Sequential:
    """LayerNorm(Cs) then Linear(Cs → Ct): the head shape shared by QSD and Proteus."""
    return nn.Sequential(nn.LayerNorm(student_dim), nn.Linear(student_dim, teacher_dim))


class QSD(nn.Module):
    """Query-based soft distillation head.

    Args:
        student_dim: Cs, channel width of the student tokens.
        teacher_dim: Ct, channel width of the teacher tokens.
        num_heads: number of channel groups. 1 (the paper's setting and the default)
            is plain single-head attention. With h > 1 the Ct channels of Q, K and V are
            split into h contiguous groups of Ct/h channels (``(h d)`` ordering, as the
            authors' reshape does); each group attends on its own, still with no
            scaling, and the group outputs are concatenated back to Ct channels.

        query_init_scale: multiplies the initial weights and bias of the query projection. 1.0
            (default) is PyTorch's init, as the authors'. With raw dot products over Ct channels the
            initial attention logits have a std of tens, so the softmax starts saturated on arbitrary
            teacher positions and learns where to look only slowly (``gkd.distill.diagnostics``
            measures it); a scale near 1/√Ct starts it soft. The formula is unchanged.
        fused: compute the attention with ``F.scaled_dot_product_attention`` (scale 1). None
            (default): on CUDA only — fused kernels are faster there, while on CPU torch's
            fused kernel was slower than two matrix products for the paper's shapes (N = 256,
            Ct = 768, forward + backward: 45 vs 34 ms). Both give the same values.

    Gradients never reach the teacher: K is detached inside ``forward``, so a teacher
    tensor that requires grad is still safe to pass.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_heads: int = 1, fused: bool | None = None,
                 query_init_scale: float = 1.0) -> None:
        super().__init__()
        if num_heads < 1 or teacher_dim % num_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} must be >= 1 and divide teacher_dim={teacher_dim}"
            )
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.num_heads = num_heads
        self.fused = fused
        self.proj_q = _projection(student_dim, teacher_dim)
        self.proj_v = _projection(student_dim, teacher_dim)
        if query_init_scale != 1.0:
            if query_init_scale <= 0:
                raise ValueError(f"query_init_scale must be > 0, got {query_init_scale}")
            with torch.no_grad():
                self.proj_q[1].weight.mul_(query_init_scale)
                self.proj_q[1].bias.mul_(query_init_scale)

    def forward(self, student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
        """student_tokens [B, N, Cs], teacher_tokens [B, N, Ct] → [B, N, Ct]."""
        if student_tokens.ndim != 3 or teacher_tokens.ndim != 3:
            raise ValueError(
                "QSD expects [B, N, C] tensors, got "
                f"{tuple(student_tokens.shape)} and {tuple(teacher_tokens.shape)}"
            )
        if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
            raise ValueError(
                f"QSD needs the same [B, N] for student and teacher, got {tuple(student_tokens.shape[:2])} "
                f"and {tuple(teacher_tokens.shape[:2])} (token grids must match)"
            )
        if teacher_tokens.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"teacher tokens have {teacher_tokens.shape[-1]} channels, QSD was built for {self.teacher_dim}"
            )
        h = self.num_heads
        q = rearrange(self.proj_q(student_tokens), "b n (h d) -> b h n d", h=h)
        v = rearrange(self.proj_v(student_tokens), "b n (h d) -> b h n d", h=h)
        # detach: the teacher is a fixed target; its tokens are keys, never trained.
        # The cast lets an fp16 feature cache meet an fp32 student outside autocast.
        k = rearrange(teacher_tokens.detach().to(q.dtype), "b n (h d) -> b h n d", h=h)
        if self.fused if self.fused is not None else q.is_cuda:
            # the same softmax(Q Kᵀ) V with scale 1: flash / memory-efficient kernels on GPU
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            attn = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(dim=-1)  # over teacher positions
            out = torch.einsum("bhqk,bhkd->bhqd", attn, v)
        return rearrange(out, "b h n d -> b n (h d)")

    @torch.no_grad()
    def attention(self, student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
        """The attention weights of ``forward``: [B, h, N, N] (rows: student positions, columns: teacher
        positions; each row sums to 1). For diagnostics: ``forward`` does not materialise them on GPU."""
        h = self.num_heads
        q = rearrange(self.proj_q(student_tokens), "b n (h d) -> b h n d", h=h)
        k = rearrange(teacher_tokens.detach().to(q.dtype), "b n (h d) -> b h n d", h=h)
        return torch.einsum("bhqd,bhkd->bhqk", q, k).float().softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, num_heads={self.num_heads}"


class LinearHead(nn.Module):
    """Proteus' plain head: LayerNorm(Cs) + Linear(Cs → Ct) on the student tokens.

    Takes ``(student_tokens, teacher_tokens)`` like :class:`QSD` so that both plug into
    the same objective; the teacher tokens are ignored.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = _projection(student_dim, teacher_dim)

    def forward(self, student_tokens: Tensor, teacher_tokens: Tensor | None = None) -> Tensor:
        """student_tokens [B, N, Cs] → [B, N, Ct]; teacher_tokens unused."""
        return self.proj(student_tokens)
