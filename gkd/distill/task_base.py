"""What every task-level (stage-3) distillation loss sees: one interface for KD, FitNet, CWD, ViTKD, ...

In task-level distillation the student segmentor (trainable encoder + decoder) learns from the
segmentation labels *and* from a frozen teacher segmentor (stage 3 run on the frozen teacher
encoder). One forward of each gives a ``SegOutputs``; a loss module compares them:

    loss_module = LossClass(student_info, teacher_info, num_classes, **options)
    terms = loss_module(s_out, t_out, labels, progress)   # {'loss': weighted sum, 'loss_<term>': detached}

``terms['loss']`` already carries the paper's loss weight(s) and is *added* to the student's
segmentation loss, as ``loss_module.seg_term(seg_loss)`` (the segmentation loss itself unless a
method's recipe rescales it, as LFD's does). Loss modules may own parameters (regressors,
generators, projection heads) and state (buffers, e.g. BCKD's temperature): they train with the
student, are saved in the stage-3 training checkpoints with it (so a resumed run restores them) and
are discarded after training. Teacher tensors arrive without autograd history; a loss must never
make the teacher require grad. Besides 'loss' and the 'loss_<term>' entries (which add up to
'loss'), a loss may return detached diagnostics under other keys (e.g. 'raw_<term>', 'tau').
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.tensors import EncoderInfo, SegOutputs

__all__ = ["TaskKDLoss", "resize_to", "resize_labels", "teacher_map", "pixel_kl", "self_normalised", "IGNORE_INDEX"]

IGNORE_INDEX = 255


class TaskKDLoss(nn.Module):
    """Base of the task-level distillation losses.

    Subclasses set ``uses`` (which teacher outputs they read: "logits", "features", "head_feature";
    the teacher's decoder runs only when "logits" is among them) and
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

    def seg_term(self, seg_loss: Tensor) -> Tensor:
        """The student's segmentation loss (scalar) as it enters the total: unchanged by default."""
        return seg_loss


def self_normalised(loss: Tensor, weight: float = 1.0) -> Tensor:
    """``weight · loss / loss.detach()``: value ``weight``, gradient ``weight · ∇loss / loss``.

    A scalar loss divided by its own detached value (LFD's training script does this to several
    terms). Divided by the magnitude, so a slightly negative round-off value keeps its sign; a zero
    loss stays zero instead of 0/0.
    """
    return weight * loss / loss.detach().abs().clamp_min(torch.finfo(loss.dtype).tiny)


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
