"""Distillation heads, masking and objectives (GKD and the baselines)."""
from gkd.distill.masking import batch_patch_mask, num_masked_samples, num_masked_tokens, random_patch_mask
from gkd.distill.objectives import (
    LOSS_TERMS,
    METHODS,
    GKDObjective,
    ProteusObjective,
    TokenDistillationObjective,
    build_objective,
)
from gkd.distill.qsd import QSD, LinearHead

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
    "METHODS",
    "LOSS_TERMS",
    "build_objective",
]
