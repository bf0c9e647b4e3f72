"""Compute accounting and training budgets: what a run cost, and when it must stop.

Every run records wall-clock seconds (of its optimizer steps, data loading included), optimizer
steps, images seen and training FLOPs. FLOPs are counted once, with PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` on one sample micro-batch (forward + backward, the
frozen teacher's forward included), and multiplied by micro-batches per step and processes. The
counter sees matrix products and convolutions (the bulk of a ViT's or CNN's work); element-wise
ops, norms, softmax and ``grid_sample`` are not counted. torch's table misses the CPU kernels of
fused attention, so they are registered here with torch's own SDPA formulas.

A ``Budget`` (kind steps | seconds | tflops, an amount) ends training once spent and gives the
learning-rate schedule its progress, ``fraction`` = used / amount in [0, 1]: schedules are laid
over the budget, not over an iteration count, and reach their final value at the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import flop_counter as fc

__all__ = ["Budget", "BudgetSpentError", "count_flops", "BUDGET_KINDS"]

BUDGET_KINDS = ("steps", "seconds", "tflops")


def _cpu_sdpa_flops(q, k, v, *args, **kwargs) -> int:
    return fc.sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad_out, q, k, v, *args, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out, q, k, v)


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) of everything ``fn()`` runs, backward included if it calls it."""
    with fc.FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


class BudgetSpentError(ValueError):
    """The budget was already used up by the first optimizer step."""


@dataclass(frozen=True)
class Budget:
    """How much training a run gets: `amount` optimizer steps, wall-clock seconds or TFLOPs.

    ``used(state)`` reads the amount spent from a Trainer's state (``step``, ``train_seconds``,
    ``train_flops``); ``fraction`` is used/amount clipped to [0, 1]; ``done`` is True once the next
    step would end further from the budget than stopping now (so a run stops within half a step of
    it on average, and never more than one step past it).
    """

    kind: str
    amount: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget.kind must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}")
        if not self.amount > 0:
            raise ValueError(f"budget.amount must be positive, got {self.amount}")

    def used(self, state: dict[str, Any]) -> float:
        if self.kind == "steps":
            return float(state["step"])
        if self.kind == "seconds":
            return float(state["train_seconds"])
        return float(state["train_flops"]) / 1e12

    def fraction(self, state: dict[str, Any]) -> float:
        return min(1.0, self.used(state) / self.amount)

    def done(self, state: dict[str, Any], step_cost: float) -> bool:
        """True when no further step fits: used ≥ amount − step_cost / 2 (step_cost in budget units)."""
        if self.kind == "steps":
            return state["step"] >= self.amount
        return self.used(state) >= self.amount - step_cost / 2

    def check_first_step(self, step_cost: float) -> None:
        """Refuse a budget the first step alone spends (rather than a zero- or one-step run)."""
        if step_cost >= self.amount:
            unit = {"steps": "steps", "seconds": "s", "tflops": "TFLOPs"}[self.kind]
            raise BudgetSpentError(
                f"the budget of {self.amount:g} {unit} is spent by the first optimizer step alone "
                f"({step_cost:.4g} {unit}); give a larger budget.amount"
            )

    def describe(self) -> str:
        return f"{self.amount:g} {self.kind}"


TOTAL_KEYS = ("train_seconds", "train_tflops", "steps", "images_seen")


def compute_metadata(compute: dict[str, Any], parent: str | None) -> dict[str, Any]:
    """Handoff-file fields: this run's ``compute`` and ``compute_total``, the sum over the lineage
    (this run plus the parent file's own ``compute_total``: stage 1 + 2 + 3 for a GKD segmentor).
    A parent without a compute record (random-init baseline, older files) adds nothing and is named."""
    from gkd.handoff import read_metadata

    total = {k: compute[k] for k in TOTAL_KEYS}
    total["runs"] = 1
    unrecorded = []
    if parent:
        ptotal = read_metadata(parent).get("gkd_compute_total")
        if ptotal is None:
            unrecorded.append(str(parent))
        else:
            total = {k: total[k] + ptotal.get(k, 0) for k in (*TOTAL_KEYS, "runs")}
            unrecorded += ptotal.get("unrecorded", [])
    total["unrecorded"] = unrecorded
    return {"compute": compute, "compute_total": total}
