"""Distillation heads, masking and objectives: GKD and Proteus (stages 1-2), the task-level KD losses
(stage 3), all selected by name from ``METHODS`` (``gkd.distill.methods``)."""
from gkd.distill.masking import batch_patch_mask, num_masked_samples, num_masked_tokens, random_patch_mask
from gkd.distill.methods import METHODS, Method, build_objective, build_task_loss, get_method
from gkd.distill.objectives import LOSS_TERMS, GKDObjective, ProteusObjective, TokenDistillationObjective
from gkd.distill.qsd import QSD, LinearHead
from gkd.distill.task_base import TaskKDLoss
from gkd.tensors import EncoderInfo, SegOutputs

__all__ = [
    "QSD",
    "LinearHead",
    "random_patch_mask",
    "batch_patch_mask",
    "num_masked_samples",
    "num_masked_tokens",
    "TokenDistillationObjective",
    "GKDObjective",
    "ProteusObjective",
    "LOSS_TERMS",
    "METHODS",
    "Method",
    "get_method",
    "build_objective",
    "build_task_loss",
    "EncoderInfo",
    "SegOutputs",
    "TaskKDLoss",
]
