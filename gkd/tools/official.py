"""``gkd import-official``: the authors' released stage-1/2 checkpoints as a gkd ``encoder.safetensors``.

The authors' distillation (github.com/Younger-hua/GKD, ``general_distillation/main.py``) saves
``{'model': MetaArch.state_dict(), 'optimizer': ..., 'args': ...}``. The MetaArch holds

* ``student.backbone.*``: the student, an official-DINOv2-layout ViT (``cls_token``, ``pos_embed``,
  ``mask_token``, ``patch_embed.*``, ``blocks.N.*``, ``norm.*``) — the encoder;
* ``teacher.backbone.*``: the frozen teacher, and ``patch_head.*`` / ``fea_head.*`` / ``token_head.*``:
  the three QSD heads — thrown away after distillation (their ``convert_gkd.py`` keeps the student
  keys only and strips ``student.backbone.``), dropped and logged here.

The student keys then go through ``build_student`` like any DINOv2-layout checkpoint: renamed to
timm's layout, the kernel / position table resampled when another geometry is asked for, and loaded
strictly — a missing, unexpected or mis-shaped key is an error listing them. By default the
checkpoint's own geometry is kept (patch size from the kernel, image size from the position table):
224 px / patch 14 for a stage-1 file, 512 px / patch 16 for a stage-2 one.
"""
from __future__ import annotations

import argparse
import logging
import math
import pathlib
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from gkd.handoff import file_sha256, save_handoff, write_safetensors
from gkd.models import build_student
from gkd.models.weights import CheckpointError, check_input_norm, unwrap_state_dict

__all__ = ["import_official", "split_official_state_dict", "OFFICIAL_PREFIX"]

_log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "student.backbone."
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the authors' DINOv2 transforms
# Objects besides tensors that the authors' training checkpoints pickle: ``args`` (an argparse
# Namespace, possibly holding paths). Allowed explicitly so that loading stays weights_only.
_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]


def _load(path: Path) -> Mapping[str, torch.Tensor]:
    """The ``model`` state dict of an official checkpoint, read with ``weights_only=True``."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint of tensors ({type(e).__name__}: "
                              f"{first})") from None
    try:
        return unwrap_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def split_official_state_dict(sd: Mapping[str, torch.Tensor], who: str = "checkpoint"
                              ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the student backbone's weights without ``student.backbone.``, the dropped keys).

    Refuses a state dict without ``student.backbone.*`` keys, or with other ``student.*`` keys (a
    layout this converter does not know), naming what it found.
    """
    student = {k[len(OFFICIAL_PREFIX):]: v for k, v in sd.items() if k.startswith(OFFICIAL_PREFIX)}
    if not student:
        prefixes = sorted({k.split(".", 1)[0] for k in sd})
        raise CheckpointError(
            f"{who} is not an official GKD stage-1/2 checkpoint: no '{OFFICIAL_PREFIX}*' keys (its top-level key "
            f"prefixes: {', '.join(prefixes[:10])}{' ...' if len(prefixes) > 10 else ''}). For a plain timm/DINOv2 "
            "state dict use `gkd student-encoder NAME OUT --checkpoint FILE`")
    odd = sorted(k for k in sd if k.startswith("student.") and not k.startswith(OFFICIAL_PREFIX))
    if odd:
        raise CheckpointError(f"{who}: unknown student keys outside '{OFFICIAL_PREFIX}' ({len(odd)}): {', '.join(odd)}")
    dropped = sorted(k for k in sd if not k.startswith("student."))
    return student, dropped


def _native_geometry(sd: Mapping[str, torch.Tensor], who: str) -> tuple[int, int]:
    """(image size, patch size) the checkpoint was trained at: kernel side, and the side of the
    square position grid (after the class token) times it."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError(f"{who}: the student has no patch_embed.proj.weight / pos_embed: not a ViT")
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    n = int(sd["pos_embed"].shape[1]) - 1  # one class token, no registers in the authors' students
    side = math.isqrt(max(n, 0))
    if side * side != n:
        raise CheckpointError(f"{who}: pos_embed has {n} patch positions, not a square grid; pass --img-size")
    return side * patch, patch


def import_official(src: str | Path, name: str, out: str | Path, img_size: int | None = None,
                    patch_size: int | None = None, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None, patch_resample: str = "bicubic", **kw: Any) -> Path:
    """Convert an official GKD checkpoint `src` into the encoder file `out` of student `name` (a timm
    ViT name, e.g. ``deit_small_patch16_224``; `kw`: its timm kwargs) and return `out`.

    img_size / patch_size: the encoder's geometry (default: the checkpoint's own; another one
    resamples kernel and position table, rule `patch_resample`). mean / std: the input normalisation
    recorded (default ImageNet's, as the authors' transforms). Loaded strictly.
    """
    check_input_norm(mean, std)
    src = Path(src)
    sd, dropped = split_official_state_dict(_load(src), str(src))
    if dropped:
        heads = sorted({k.split(".", 1)[0] for k in dropped})
        _log.info("%s: dropping %d keys that are not the student (%s)", src, len(dropped), ", ".join(heads))
    native_size, native_patch = _native_geometry(sd, str(src))
    size = native_size if img_size is None else int(img_size)
    patch = native_patch if patch_size is None and img_size is None else patch_size
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "student.safetensors"
        write_safetensors(weights, sd, {"format": "pt"})
        try:
            student = build_student(name, img_size=size, patch_size=patch, checkpoint=weights,
                                    patch_resample=patch_resample, **kw)
        except CheckpointError as e:
            raise CheckpointError(f"{src} does not fit student {name} {kw or ''}: {e}") from None
    if mean is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    config = {"import_official": {"file": str(src), "sha256": file_sha256(src), "name": name, "kwargs": kw,
                                  "native": {"img_size": native_size, "patch_size": native_patch},
                                  "patch_resample": patch_resample, "dropped": len(dropped)}}
    protocol = {"stage": 0, "trained_by_gkd": False, "origin": "official GKD checkpoint (its data is not recorded)"}
    return save_handoff(out, student, student.spec, stage=0, config=config,
                        extra={"input_norm": {"mean": list(mean), "std": list(std)}, "protocol": protocol})
