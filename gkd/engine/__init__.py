"""Training loops on accelerate, compute budgets, resumable checkpoints and the safetensors handoff."""
from gkd.engine.checkpoint import CheckpointManager, ResumeError
from gkd.engine.trainer import NonFiniteLossError, NonFiniteStateError
from gkd.engine.compute import Budget, BudgetSpentError, count_flops
from gkd.engine.distill import train_distill
from gkd.handoff import load_handoff, read_metadata, save_handoff

__all__ = ["Budget", "BudgetSpentError", "CheckpointManager", "NonFiniteLossError", "NonFiniteStateError",
           "ResumeError", "count_flops", "load_handoff", "read_metadata", "save_handoff", "train_distill"]
