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

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from gkd.tensors import EncoderInfo, SegOutputs

__all__ = ["TaskKDLoss", "resize_to", "resize_labels", "teacher_map", "pixel_kl", "IGNORE_INDEX"]

IGNORE_INDEX = 255


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
