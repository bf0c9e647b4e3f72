"""Every distillation method, selected by name from this one table.

* representation level (stages 1-2, an encoder learns a frozen VFM's tokens): ``gkd`` (QSD heads),
  ``proteus`` (linear heads) — ``gkd.distill.objectives``;
* task level (stage 3, a trainable student segmentor learns from a frozen *teacher segmentor*
  besides the labels): ``kd``, ``fitnet``, ``cwd``, ``vitkd`` (``task_losses``) and ``afdcd``,
  ``bckd``, ``lfd`` (``task_losses_dense``).

``none`` is not a method: stage 3 without distillation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gkd.distill.objectives import GKDObjective, ProteusObjective, TokenDistillationObjective
from gkd.distill.task_base import TaskKDLoss
from gkd.tensors import EncoderInfo
from gkd.distill import task_losses, task_losses_dense

__all__ = ["Method", "METHODS", "get_method", "build_objective", "build_task_loss", "LEVELS"]

LEVELS = {"representation": "stages 1-2", "task": "stage 3"}


@dataclass(frozen=True)
class Method:
    name: str
    level: str  # "representation" | "task"
    cls: type


METHODS: dict[str, Method] = {
    **{n: Method(n, "representation", c) for n, c in {"gkd": GKDObjective, "proteus": ProteusObjective}.items()},
    **{n: Method(n, "task", c) for n, c in {**task_losses.LOSSES, **task_losses_dense.LOSSES}.items()},
}


def get_method(name: str, level: str | None = None) -> Method:
    """The method called `name`; an unknown name, or one of another level, is an error listing the choices."""
    available = ", ".join(f"{m.name} ({m.level}, {LEVELS[m.level]})" for m in METHODS.values())
    if name not in METHODS:
        raise ValueError(f"unknown distillation method {name!r}; available: {available}")
    method = METHODS[name]
    if level is not None and method.level != level:
        same = ", ".join(m.name for m in METHODS.values() if m.level == level)
        raise ValueError(f"{name!r} is a {method.level}-level method ({LEVELS[method.level]}), not usable in "
                         f"{LEVELS[level]}; {level}-level methods: {same}")
    return method


def build_objective(name: str, student_dim: int, teacher_dim: int, **options: Any) -> TokenDistillationObjective:
    """A representation-level objective: ``METHODS[name].cls(student_dim, teacher_dim, **options)``."""
    return get_method(name, "representation").cls(student_dim, teacher_dim, **options)


def build_task_loss(name: str, student: EncoderInfo, teacher: EncoderInfo, num_classes: int,
                    **options: Any) -> TaskKDLoss:
    """A task-level loss: ``METHODS[name].cls(student, teacher, num_classes, **options)``."""
    return get_method(name, "task").cls(student, teacher, num_classes, **options)
