"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself).

Every script measures its variants in one process, interleaved rep by rep (the order rotates each
rep), and reports medians: drifts in the load of a shared machine then hit all variants alike and
cancel in the ratios. Weights are random (nothing is downloaded); timings do not depend on them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from gkd.distill import build_objective
from gkd.models import build_student, build_teacher

DEFAULT_TEACHER = "vit_small_patch14_dinov2"
DEFAULT_STUDENT = "deit_tiny_patch16_224"  # small default for a shared 2-core host


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="timm teacher name (random weights)")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="timm student name (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (medians are reported)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Thread count, seed; print the hardware line. Returns the device."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {hardware()}, {args.threads} torch threads, device {args.device}")
    return torch.device(args.device)


def hardware() -> str:
    """CPU model, logical cores, torch version (and the GPU when there is one)."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__}{gpu}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], reps: int, device: torch.device,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable over `reps` interleaved calls (after `warmup` calls each)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every rep
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class DistillPair:
    """Teacher, student and objective of a stage-1 step, as train_distill builds them."""

    def __init__(self, teacher: str, student: str, img_size: int, method: str = "gkd",
                 device: torch.device = torch.device("cpu")):
        from gkd.engine.distill import DistillModel

        self.teacher = build_teacher(teacher, img_size=img_size).to(device)
        stu = build_student(student, img_size=img_size, grid=self.teacher.grid)
        objective = build_objective(method, stu.embed_dim, self.teacher.embed_dim)
        self.model: nn.Module = DistillModel(stu, objective).to(device)

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images, self.teacher(images))


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with the stage-1 settings (wd 0.05, the project's decay / no-decay groups), built as
    train_distill builds it (``make_adamw``: fused where torch has a fused kernel)."""
    from gkd.engine.trainer import make_adamw

    return make_adamw(model, 5e-4 * 8 / 512, 0.05, (0.9, 0.999))


def plain_step(pair: DistillPair, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> None:
    """One stage-1 step by hand: teacher forward, student + objective forward/backward, AdamW."""
    pair.loss(images)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
