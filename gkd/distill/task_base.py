"""What every task-level (stage-3) distillation loss sees: one interface for KD, FitNet, CWD, ViTKD, ...

In task-level distillation the student segmentor (trainable encoder + decoder) learns from the
segmentation labels *and* from a frozen teacher segmentor (stage 3 run on the frozen teacher
encoder). One forward of each gives a ``SegOutputs``; a loss module compares them:

    loss_module = LossClass(student_info, teacher_info, num_classes, **options)
    terms = loss_module(s_out, t_out, labels, progress)   # {'loss': weighted sum, 'loss_<term>': detached}

``terms['loss']`` already carries the paper's loss weight(s) and is *added* to the student's
segmentation loss. Loss modules may own parameters (regressors, generators, projection heads):
they train with the student and are discarded after training. Teacher tensors arrive without
autograd history; a loss must never make the teacher require grad.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EncoderInfo", "SegOutputs", "TaskKDLoss", "resize_to", "resize_labels", "teacher_map", "pixel_kl",
           "IGNORE_INDEX"]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class EncoderInfo:
    """Shapes a loss needs to build its own layers.

    kind: "vit" or "cnn". embed_dim: channels of ``SegOutputs.last`` (ViT width; CNN last stage).
    depth: number of ViT blocks (0 for CNNs). feature_channels: channels of the 4 decoder inputs.
    """

    kind: str
    embed_dim: int
    depth: int
    feature_channels: tuple[int, ...]


@dataclass
class SegOutputs:
    """One segmentor forward, as a distillation loss sees it.

    logits: [B, K, h, w] decoder scores at the decoder's output resolution (MLP head: stride 4);
        for Mask2Former, the log of its per-class semantic scores (see ``Decoder.logits``). None on
        the teacher side when the loss does not read logits (its decoder is then not run).
    features: the decoder's 4 input maps [B, C_l, H_l, W_l] at strides 4, 8, 16, 32.
    last: the encoder's final map [B, C, h, w] (ViT: last block's patch tokens on the token grid,
        before the final norm; CNN: last stage).
    blocks: ViT block outputs as maps [B, C, h, w] on the token grid, keyed by block index, for
        the indices the loss asked for in ``blocks()`` (empty otherwise).
    """

    logits: Tensor | None
    features: list[Tensor]
    last: Tensor
    blocks: dict[int, Tensor] = field(default_factory=dict)


class TaskKDLoss(nn.Module):
    """Base of the task-level distillation losses.

    Subclasses set ``uses`` (which teacher outputs they read: "logits", "features") and
    implement ``forward(s, t, labels, progress) -> dict`` with key 'loss' (weighted, differentiable)
    and 'loss_<term>' (detached) entries. ``labels``: [B, H, W] int64 train ids at the image size,
    255 = ignore. ``progress``: fraction of the training budget used before this step, in [0, 1)
    (t-1)/t_max for schedules such as BCKD's r(t).
    """

    uses: ClassVar[tuple[str, ...]] = ()

    def __init__(self, student: EncoderInfo, teacher: EncoderInfo, num_classes: int) -> None:
        super().__init__()
        self.student_info, self.teacher_info, self.num_classes = student, teacher, int(num_classes)

    def blocks(self, info: EncoderInfo, role: str) -> list[int]:
        """ViT block indices whose outputs this loss needs from the `role` ("student"/"teacher") encoder."""
        return []

    def forward(self, s: SegOutputs, t: SegOutputs, labels: Tensor, progress: float) -> dict[str, Tensor]:
        raise NotImplementedError


def resize_to(x: Tensor, like: Tensor) -> Tensor:
    """Bilinearly resize a map [B,C,h,w] to ``like``'s spatial size (no-op when equal).

    Teacher and student maps share a size when their patch sizes match (the usual setup: the
    teacher encoder is built on the student's token grid); otherwise the teacher's is resized.
    """
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def teacher_map(t: Tensor, like: Tensor) -> Tensor:
    """Teacher map [B,C,h',w'] → detached fp32 map on ``like``'s [h,w] grid (no gradient can reach it)."""
    return resize_to(t.detach().float(), like)


def pixel_kl(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """Per-pixel KL(softmax(t/T) ‖ softmax(s/T)) over classes: [B,K,h,w] × 2 → [B,h,w]."""
    log_p_t = F.log_softmax(t_logits / temperature, dim=1)
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels [B,H,W] (255 = ignore) nearest-sampled to a loss's grid: [B,h,w] int64."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
