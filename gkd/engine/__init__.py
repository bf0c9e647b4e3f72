"""Training loops on accelerate, resumable checkpoints and the safetensors handoff."""
from gkd.engine.checkpoint import CheckpointManager, load_encoder, read_metadata, save_encoder
from gkd.engine.distill import NonFiniteLossError, train_distill

__all__ = ["CheckpointManager", "NonFiniteLossError", "load_encoder", "read_metadata", "save_encoder", "train_distill"]
