"""Semantic-segmentation metrics from a confusion matrix (mmseg `IoUMetric` semantics).

The state is one [K, K] int64 confusion matrix (rows: ground truth, columns: prediction) over the
pixels whose label is not `ignore_index`. Sums of confusion matrices are exact, so per-rank
matrices can be added (`merge`, `reduce`) and give the same numbers as one pass over all images.

Per class c, with TP = M[c, c], GT = Σ_j M[c, j] (labelled c), PR = Σ_i M[i, c] (predicted c):
    IoU_c = TP / (GT + PR − TP)      Acc_c = TP / GT      aAcc = Σ TP / Σ GT
Edge cases (as in mmseg, where 0/0 gives NaN and NaNs are left out of the means):
    class in neither GT nor prediction  → IoU NaN, Acc NaN  (left out of mIoU and mAcc)
    class in prediction only            → IoU 0,   Acc NaN  (counts against mIoU, not in mAcc)
    class in GT only                    → IoU 0,   Acc 0    (counts against both)
Predictions at ignored pixels are not counted at all. All numbers are percentages.
"""
from __future__ import annotations

import math
from typing import Any

import torch


class SegMetric:
    """Accumulates a confusion matrix over `update` calls; `compute` turns it into mIoU & co."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. pred: [B,H,W] (or [H,W]) class ids; target: same shape, train ids or ignore."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("SegMetric.update expects integer class-id tensors (take argmax of the scores first)")
        k = self.num_classes
        target = target.reshape(-1).to(torch.int64)
        pred = pred.reshape(-1).to(device=target.device, dtype=torch.int64)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        # A label outside [0, K) that is not the ignore index is a data bug (wrong label map):
        # mmseg would silently drop it, we refuse so it cannot go unnoticed.
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
            bad = torch.unique(target[(target < 0) | (target >= k)])[:10].tolist()
            raise ValueError(f"label values {bad} are outside [0, {k}) and not the ignore index {self.ignore_index}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(f"predicted class ids must lie in [0, {k}); got min {int(pred.min())}, max {int(pred.max())}")
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self.confusion += counts.view(k, k).cpu()

    def merge(self, other: "SegMetric") -> "SegMetric":
        """Add another metric's counts into this one (e.g. from another shard); returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge SegMetrics with different num_classes / ignore_index")
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def reduce(self, accelerator: Any = None) -> "SegMetric":
        """Sum the confusion matrix over all processes, in place; returns self.

        `accelerator` may be an `accelerate.Accelerator` (its `reduce` is used), a `PartialState`
        or None; without `reduce` we call `torch.distributed.all_reduce` when a process group is up.
        """
        world = _world_size(accelerator)
        if world == 1:
            return self
        device = _reduce_device(accelerator)
        counts = self.confusion.to(device)
        if accelerator is not None and hasattr(accelerator, "reduce"):
            counts = accelerator.reduce(counts, reduction="sum")
        else:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        self.confusion = counts.cpu().to(torch.int64)
        return self

    def compute(self) -> dict[str, Any]:
        """{'aAcc', 'mIoU', 'mAcc': float %, 'IoU', 'Acc': list[float] % per class (NaN: see module doc)}."""
        m = self.confusion.to(torch.float64)
        tp = m.diag()
        gt = m.sum(dim=1)
        pr = m.sum(dim=0)
        union = gt + pr - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan) * 100
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan) * 100
        total = gt.sum()
        return {
            "aAcc": float(tp.sum() / total * 100) if total > 0 else math.nan,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }


def _nanmean(x: torch.Tensor) -> float:
    """Mean over non-NaN entries; NaN (without a warning) when there are none."""
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if bool(keep.any()) else math.nan


def _world_size(accelerator: Any) -> int:
    if accelerator is not None:
        return int(accelerator.num_processes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _reduce_device(accelerator: Any) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo/CPU takes CPU tensors."""
    if accelerator is not None:
        return torch.device(accelerator.device)
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
