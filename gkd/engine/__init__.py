"""Training loops on accelerate, resumable checkpoints and the safetensors handoff."""
from gkd.engine.checkpoint import CheckpointManager, load_handoff, read_metadata, save_handoff
from gkd.engine.common import NonFiniteLossError
from gkd.engine.distill import train_distill

__all__ = ["CheckpointManager", "NonFiniteLossError", "load_handoff", "read_metadata", "save_handoff", "train_distill"]
