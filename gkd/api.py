"""The Python API: ``gkd.load(path)`` → a ready-to-use encoder or segmentor from a gkd handoff file.

    import gkd
    seg = gkd.load("runs/stage3/segmentor.safetensors")     # a stage-3 file -> LoadedSegmentor
    masks = seg.predict(["a.jpg", "b.jpg"])                 # [B,H,W] int64 class ids (same-size inputs)
    enc = gkd.load("runs/stage2/encoder.safetensors")       # a stage-1/2 file -> LoadedEncoder
    tokens = enc.embed(images)                              # Tokens: .patch [B,N,C], .cls [B,C]
    f4, f8, f16, f32 = enc.embed(images, output="maps")     # the 4 maps a segmentor's decoder reads

What a file holds is read from its header (``gkd_spec``: a segmentor spec has a decoder), then the
module is rebuilt and loaded strictly by the loaders stage 3 and evaluation use
(``load_encoder_for_segmentor``, ``load_segmentor``), put in eval mode on ``device`` (default CPU).

Images: a float tensor [B,3,H,W] (or [3,H,W]) RGB in [0, 1], or a list of PIL images, numpy
HxWx3 uint8 arrays and/or image paths. The input normalisation recorded in the file is applied
inside; do not normalise yourself. Images of different sizes in one list are run one by one and
the result is a list (one entry per image) instead of a batched tensor. Results are on the CPU.

The wrappers hold the gkd modules (``.module``: the ``Student`` or the ``Segmentor``) and add no
computation of their own: prediction is ``gkd.eval.inference.predict`` (the evaluation suite's
scoring) + argmax; tokens are ``Student.forward``; maps are ``Segmentor.distill_outputs(...).features``
(the decoder's inputs), for an encoder file through a segmentor shell with no decoder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gkd.handoff import read_metadata
from gkd.models.segmentor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Segmentor,
    feature_segmentor,
    is_segmentor_spec,
    load_encoder_for_segmentor,
    load_segmentor,
)
from gkd.models.student import Student
from gkd.tensors import Tokens

_log = logging.getLogger(__name__)

__all__ = ["load", "LoadedEncoder", "LoadedSegmentor", "to_batches", "MAP_NAMES", "OUTPUTS"]

MAP_NAMES = ("feat4", "feat8", "feat16", "feat32")  # the decoder inputs, by stride (ViT p=16, CNNs)
OUTPUTS = ("tokens", "maps")

ImageLike = Union[str, Path, np.ndarray, Any]  # Any: a PIL image
Images = Union[Tensor, Sequence[ImageLike]]


# ------------------------------------------------------------------------------------------------
# inputs


def _one_image(item: ImageLike) -> Tensor:
    """A path, PIL image or HxWx3 uint8 array -> float32 [3,H,W] RGB in [0, 1]."""
    if isinstance(item, (str, Path)):
        from gkd.data.segmentation import read_image

        return read_image(Path(item))
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"numpy images must be HxWx3 uint8 RGB, got {item.dtype} {item.shape}")
        owned = np.array(item, copy=True)  # writable memory of its own (PIL's arrays are read-only)
        return torch.from_numpy(owned).permute(2, 0, 1).float().div_(255.0)
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image (not imported: duck-typed)
        return _one_image(np.asarray(item.convert("RGB")))
    if isinstance(item, Tensor):
        return _check_tensor(item.unsqueeze(0) if item.ndim == 3 else item)[0]
    raise TypeError(f"unsupported image {type(item).__name__}: give a path, a PIL image, an HxWx3 uint8 array "
                    "or a float tensor [3,H,W] in [0,1]")


def _check_tensor(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"image tensors must be float [B,3,H,W] RGB in [0,1], got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images


def to_batches(images: Images) -> tuple[list[Tensor], bool]:
    """(batches [b,3,H,W] float in [0,1], stacked): one batch when all images share a size (stacked
    True), else one batch per image (stacked False)."""
    if isinstance(images, Tensor):
        return [_check_tensor(images.unsqueeze(0) if images.ndim == 3 else images)], True
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
        images = [images]  # a single image
    tensors = [_one_image(i) for i in images]
    if not tensors:
        raise ValueError("no images given")
    if all(t.shape == tensors[0].shape for t in tensors):
        return [torch.stack(tensors)], True
    return [t.unsqueeze(0) for t in tensors], False


def _resize(x: Tensor, size: Sequence[int] | None) -> Tensor:
    """Bilinear resize to ``size`` (h, w) (align_corners False, no antialias), or unchanged."""
    if size is None or tuple(x.shape[-2:]) == tuple(int(s) for s in size):
        return x
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------
# wrappers


class _Embedder:
    """Shared by both wrappers: ``embed`` from a student and a feature segmentor around it."""

    student: Student
    features: Segmentor
    metadata: dict[str, Any]
    device: torch.device

    input_norm: dict[str, list[float]]  # {"mean": [3], "std": [3]}, applied inside to [0, 1] RGB

    def _normalise(self, x: Tensor) -> Tensor:
        return self.features.normalize(x)

    @torch.no_grad()
    def _tokens(self, x: Tensor) -> Tokens:
        tok = self.student(self._normalise(x))
        return Tokens(cls=tok.cls.cpu(), patch=tok.patch.cpu(), grid=tok.grid)

    @torch.no_grad()
    def _maps(self, x: Tensor) -> list[Tensor]:
        _, out = self.features.distill_outputs(x, logits=False)
        return [m.cpu() for m in out.features]

    def embed(self, images: Images, output: str = "tokens", size: Sequence[int] | None = None
              ) -> Tokens | list[Tensor] | list[Tokens] | list[list[Tensor]]:
        """Encoder features of ``images`` (see the module docstring for accepted inputs).

        output="tokens": ``Tokens`` with ``patch`` [B,N,C] and ``cls`` [B,C] after the student's final
            norm, ``Student.forward`` as distillation computes them. The student runs at its own input
            size only, so images are bilinearly resized to ``size`` = the student's ``img_size``
            (another ``size`` is refused).
        output="maps": the 4 decoder input maps [B,C_l,H'/s,W'/s] for s = 4, 8, 16, 32 (ViT patch 16;
            ViT strides are p/4..2p), H', W' = the input size padded up to a multiple of the patch
            size (CNN: 32). ``size`` (h, w): resize first (default: the images' own size).
        Equal-size inputs give one batched result; different sizes a list with one result per image.
        """
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}")
        if output == "tokens":
            own = tuple(int(s) for s in self.student.img_size)
            if size is not None and tuple(int(s) for s in size) != own:
                raise ValueError(f"tokens are computed at the student's input size {own}, not {tuple(size)}; "
                                 "use output='maps' for other sizes")
            size = own
        batches, stacked = to_batches(images)
        run = self._tokens if output == "tokens" else self._maps
        results = [run(_resize(b.to(self.device), size)) for b in batches]
        if stacked:
            return results[0]
        if output == "tokens":  # equal sizes after the resize: one Tokens after all
            return Tokens(cls=torch.cat([r.cls for r in results]), patch=torch.cat([r.patch for r in results]),
                          grid=results[0].grid)
        return results


class LoadedEncoder(_Embedder):
    """A stage-1/2 ``encoder.safetensors``: ``.module`` (the ``Student``, eval mode), ``.metadata``
    (the file's header), ``.embed(images, output="tokens"|"maps")``."""

    kind = "encoder"

    def __init__(self, student: Student, input_norm: dict[str, list[float]] | None, metadata: dict[str, Any],
                 device: torch.device) -> None:
        if input_norm is None:  # files of older versions; stage 3 refuses them, inference can go on
            _log.warning("%s records no input normalisation (gkd_input_norm): assuming ImageNet's mean/std",
                         metadata.get("gkd_spec", {}).get("name", "the encoder"))
        norm = input_norm or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        self.module = self.student = student.to(device).eval()
        self.features = feature_segmentor(student, norm["mean"], norm["std"]).to(device).eval()
        self.metadata, self.device, self.input_norm = metadata, device, {k: list(v) for k, v in norm.items()}
        self.norm_recorded = input_norm is not None  # False: ImageNet's assumed (old files)

    def __repr__(self) -> str:
        return f"LoadedEncoder({self.student.name}, img_size={tuple(self.student.img_size)}, device={self.device})"


class LoadedSegmentor(_Embedder):
    """A stage-3 ``segmentor.safetensors``: ``.module`` (the ``Segmentor``, eval mode), ``.metadata``,
    ``.num_classes``, ``.class_names``, ``.predict(images)`` and ``.embed`` (its frozen encoder)."""

    kind = "segmentor"

    def __init__(self, segmentor: Segmentor, metadata: dict[str, Any], device: torch.device) -> None:
        self.module = self.features = segmentor.to(device).eval()
        self.student = segmentor.encoder
        self.metadata, self.device = metadata, device
        spec = segmentor.spec
        self.input_norm = {"mean": list(spec["mean"]), "std": list(spec["std"])}

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    @property
    def class_names(self) -> list[str] | None:
        return self.module.class_names

    @property
    def crop(self) -> int:
        """The default slide window: the stage-3 training crop recorded in the file, else 512."""
        from gkd.eval.inference import DEFAULT_CROP, trained_crop_size

        return trained_crop_size(self.metadata) or DEFAULT_CROP

    @torch.no_grad()
    def scores(self, images: Tensor, mode: str = "slide", crop: int | Sequence[int] | None = None,
               stride: int | Sequence[int] | None = None, resize: int | Sequence[int] | None = None) -> Tensor:
        """images [B,3,H,W] in [0,1] -> scores [B,K,H,W] float32 on the CPU, by the evaluation's
        ``gkd.eval.inference.predict`` (slide windows of ``crop`` every ``stride``, default 2/3 of it)."""
        from gkd.eval.inference import pair, predict

        crop = pair(crop if crop is not None else self.crop, "crop")
        stride = pair(stride, "stride") if stride is not None else tuple(max(1, c * 2 // 3) for c in crop)
        out = predict(self.module, _check_tensor(images).to(self.device), mode=mode, resize=resize, crop=crop,
                      stride=stride, num_classes=self.num_classes)
        return out.cpu()

    def predict(self, images: Images, mode: str = "slide", crop: int | Sequence[int] | None = None,
                stride: int | Sequence[int] | None = None, resize: int | Sequence[int] | None = None
                ) -> Tensor | list[Tensor]:
        """Class-id masks at the input size: [B,H,W] int64 (a list of [H,W] for mixed sizes).

        mode "slide" (default; windows of the training crop, as evaluation) or "whole" (one forward
        per image at its size). resize: optional keep-ratio resize bounds before scoring (masks are
        still at the input size).
        """
        if mode not in ("slide", "whole"):
            raise ValueError(f"unknown mode {mode!r}; expected 'slide' or 'whole'")
        batches, stacked = to_batches(images)
        masks = [self.scores(b, mode, crop, stride, resize).argmax(dim=1) for b in batches]
        return masks[0] if stacked else [m[0] for m in masks]

    def __repr__(self) -> str:
        return (f"LoadedSegmentor({self.module.decoder_name} on {self.student.name}, {self.num_classes} classes, "
                f"device={self.device})")


def load(path: str | Path, device: str | torch.device | None = None) -> LoadedEncoder | LoadedSegmentor:
    """Load a gkd handoff file: a stage-3 segmentor → ``LoadedSegmentor``, a stage-1/2 encoder →
    ``LoadedEncoder`` (decided by the header's spec), in eval mode on ``device`` (default CPU)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"gkd file not found: {path} (expected an encoder.safetensors or segmentor.safetensors)")
    dev = torch.device(device if device is not None else "cpu")
    meta = read_metadata(path)
    if is_segmentor_spec(meta.get("gkd_spec")):
        segmentor, meta = load_segmentor(path)
        return LoadedSegmentor(segmentor, meta, dev)
    student, norm = load_encoder_for_segmentor(path)
    return LoadedEncoder(student, norm, meta, dev)
