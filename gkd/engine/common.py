"""Pieces every training loop shares: the accelerator, parameter groups, seeds, the metrics log."""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch
from accelerate import Accelerator
from torch import nn

# Parameters that are embeddings or tokens: no weight decay, as in DeiT/DINOv2 training and
# mmseg's Mask2Former recipe (query and level embeddings).
_NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "mask_token", "reg_token", "register_tokens",
                      "queries_embedder.weight", "queries_features.weight", "level_embed", "level_embed.weight")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update."""


def make_accelerator(cfg: Any) -> Accelerator:
    """An Accelerator from a run config's `engine` section; CPU when CUDA is absent."""
    return Accelerator(
        cpu=cfg.engine.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.engine.mixed_precision,
        log_with=list(cfg.engine.trackers) or None,
        project_dir=str(Path(cfg.out_dir)),
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and kernels; spare biases, norms, tokens and position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(_NO_DECAY_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, optimizer step, rank, micro-batch)."""
    return (seed * 1_000_003 + step * 4099 + rank * 131 + micro) % (2**63 - 1)


@torch.no_grad()
def param_checksum(model: nn.Module) -> torch.Tensor:
    """Sum of all parameters in float64: equal across ranks iff DDP kept them in sync (in practice)."""
    return sum((p.detach().double().sum() for p in model.parameters()), torch.zeros((), dtype=torch.float64))


def sync_on_last(accelerator: Accelerator, model: nn.Module, micro: int, accum: int) -> ContextManager:
    """Gradient accumulation: skip DDP's all-reduce on every micro-batch but the last of a step."""
    return nullcontext() if micro == accum - 1 else accelerator.no_sync(model)


def check_finite(accelerator: Accelerator, nonfinite: torch.Tensor, step: int, where: str) -> None:
    """Stop every rank together when any rank saw a non-finite loss in this step."""
    if accelerator.reduce(nonfinite, "sum").item() > 0:
        raise NonFiniteLossError(f"non-finite loss at step {step}; the update was not applied. {where}")


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config for trackers that only take scalars."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class MetricsLog:
    """Appends JSON records to metrics.jsonl (main process) and forwards them to trackers."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = path
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_window(self, window: dict[str, float], state: dict[str, Any], epoch: int, lr: float,
                     elapsed: float, global_batch: int) -> dict[str, Any]:
        """Average the window's loss terms over steps and ranks; log and return the record."""
        steps = window.pop("steps")
        names = sorted(window)
        means = torch.tensor([window[k] / steps for k in names], device=self.accelerator.device)
        means = self.accelerator.reduce(means, "mean").tolist()
        record = {"step": state["step"], "epoch": epoch, "lr": lr, **dict(zip(names, means)),
                  "images_per_s": steps * global_batch / max(elapsed, 1e-9),
                  "images_seen": state["images_seen"], "train_seconds": round(state["train_seconds"], 3)}
        self.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state["step"])
        return record


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file otherwise
