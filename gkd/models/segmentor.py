"""The stage-3 segmentor: a frozen student encoder, a multi-level feature pyramid and a trained decoder.

Images enter as float RGB in [0, 1] and are normalised with the segmentor's ``mean`` / ``std``
buffers (the encoder's input normalisation, recorded in its ``encoder.safetensors``).

Multi-level features (what the decoder sees, highest resolution first):

* ViT: patch tokens after 4 blocks (``layers``; default [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23]
  for 24, as in the authors' configs; other depths: ``default_vit_layers``), as maps at stride p
  (the patch size), taken *before* the final norm (``feature_norm=False``, the authors' backbone
  returns raw block outputs), then bilinearly resized by ×4, ×2, ×1, ×0.5 (``F.interpolate`` with
  ``scale_factor``, ``align_corners=False``, as the authors' backbone does) to strides p/4, p/2, p,
  2p — 4, 8, 16, 32 for p = 16. The resizing is parameter-free; every learned part is in the decoder.
* CNN: the timm model's own stage maps at strides 4, 8, 16, 32 (``feature_info`` entries, read with
  timm's ``forward_intermediates``), unresized.

The encoder is frozen: no parameter requires grad, it stays in eval mode whatever ``train()`` is
called with, and its features are computed under ``torch.no_grad()``. Only the decoder trains.
Inputs whose sides are not multiples of ``size_divisor`` (the patch size, or 32 for CNNs) are
zero-padded at the bottom/right after normalisation and the scores cropped back (labels are padded
with 255 in ``loss``).

Files: ``save_segmentor`` writes ``segmentor.safetensors`` (stage 3) through the handoff writer, with
the segmentor spec as ``gkd_spec``; ``load_segmentor`` rebuilds from that spec and loads strictly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.errors import HandoffError
from gkd.handoff import load_handoff, read_metadata, save_handoff, spec_mismatch
from gkd.tensors import SegOutputs

from .decoders import IGNORE_INDEX, Decoder, build_decoder
from .student import Student, build_student_from_spec
from .teacher import final_norm, jsonable
from .weights import CheckpointError, check_input_norm

__all__ = [
    "Segmentor",
    "build_segmentor",
    "feature_segmentor",
    "build_segmentor_from_spec",
    "save_segmentor",
    "load_segmentor",
    "load_encoder_for_segmentor",
    "default_vit_layers",
    "default_cnn_layers",
    "is_segmentor_spec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

SEGMENTOR_SPEC_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_SCALES = (4.0, 2.0, 1.0, 0.5)  # stride p -> p/4, p/2, p, 2p
CNN_REDUCTIONS = (4, 8, 16, 32)


def default_vit_layers(depth: int) -> list[int]:
    """Blocks whose outputs feed the decoder: [round(d/3), round(d/2), round(2d/3), d] - 1.

    Gives the authors' [3, 5, 7, 11] for 12 blocks and [7, 11, 15, 23] for 24; for other depths the
    same fractions of the depth (rounded half up, at least block 0), e.g. 6 -> [1, 2, 3, 5].
    """
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    return [max(0, math.floor(depth * f + 0.5) - 1) for f in (1 / 3, 1 / 2, 2 / 3)] + [depth - 1]


def default_cnn_layers(encoder: Student) -> list[int]:
    """Indices into the timm CNN's ``feature_info`` of its stage maps at strides 4, 8, 16, 32."""
    info = getattr(encoder.encoder, "feature_info", None)
    if info is None:
        raise NotImplementedError(f"{encoder.name}: timm model has no feature_info to find its stage maps")
    reductions = [int(f["reduction"]) for f in info]
    missing = [r for r in CNN_REDUCTIONS if r not in reductions]
    if missing:
        raise NotImplementedError(f"{encoder.name}: no stage map at stride(s) {missing} (has {reductions})")
    return [len(reductions) - 1 - reductions[::-1].index(r) for r in CNN_REDUCTIONS]  # last map at each stride


def is_segmentor_spec(spec: Mapping[str, Any]) -> bool:
    """True for a segmentor spec (it has a decoder), False for a student/encoder spec."""
    return isinstance(spec, Mapping) and "decoder" in spec and "encoder" in spec


class Segmentor(nn.Module):
    """Frozen ``encoder`` (a Student) + trainable ``decoder``.

    ``forward(images [B,3,H,W] in [0,1]) -> scores [B,K,H,W]`` (argmax = prediction);
    ``forward(images, labels)`` = ``loss(images, labels)``, so a DDP/accelerate-wrapped model can be
    trained through its ``forward`` (DDP's gradient sync hooks in through ``forward``).
    """

    def __init__(
        self,
        encoder: Student,
        decoder: Decoder,
        *,
        decoder_name: str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        layers: Sequence[int],
        feature_norm: bool = False,
        class_names: Sequence[str] | None = None,
        train_encoder: bool = False,
    ) -> None:
        super().__init__()
        check_input_norm(mean, std)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if decoder.num_classes != num_classes:
            raise ValueError(f"decoder predicts {decoder.num_classes} classes, segmentor has {num_classes}")
        self.encoder = encoder
        self.decoder = decoder
        self.decoder_name = decoder_name
        self.num_classes = int(num_classes)
        self.layers = [int(i) for i in layers]
        self.feature_norm = bool(feature_norm)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        # The spec keeps the given values (float32 buffers would print as 0.48500001...).
        self._norm = ([float(m) for m in mean], [float(s) for s in std])
        self.register_buffer("mean", torch.tensor(self._norm[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self._norm[1]).view(1, 3, 1, 1))
        # Task-level distillation trains the encoder too; otherwise freeze it once and for all: no
        # grads, eval mode (BatchNorm statistics, dropout, drop path off). Not part of the spec: a
        # loaded segmentor is frozen either way.
        self.train_encoder = bool(train_encoder)
        if not self.train_encoder:
            encoder.requires_grad_(False)
            encoder.eval()

    # -- properties -----------------------------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description; ``build_segmentor_from_spec(spec)`` rebuilds the same module."""
        return jsonable(
            {
                "format": SEGMENTOR_SPEC_FORMAT,
                "encoder": self.encoder.spec,
                "decoder": {"name": self.decoder_name, "kwargs": self.decoder.kwargs},
                "num_classes": self.num_classes,
                "mean": self._norm[0],
                "std": self._norm[1],
                "layers": self.layers,
                "feature_norm": self.feature_norm,
                "class_names": self.class_names,
            }
        )

    @property
    def size_divisor(self) -> int:
        """Input sides are padded to a multiple of this: the ViT patch size, or 32 for a CNN."""
        return int(self.encoder.patch_size) if self.encoder.kind == "vit" else CNN_REDUCTIONS[-1]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require grad: the decoder's (and the encoder's with ``train_encoder``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "Segmentor":
        """Train/eval the decoder; a frozen encoder always stays in eval mode."""
        super().train(mode)
        if not self.train_encoder:
            self.encoder.eval()
        return self

    # -- computation ----------------------------------------------------------------------------

    def normalize(self, images: Tensor) -> Tensor:
        """[B,3,H,W] RGB in [0, 1] -> (images - mean) / std."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B,3,H,W] RGB in [0,1], got {images.dtype} {tuple(images.shape)}")
        return (images - self.mean) / self.std

    def extract_features(self, x: Tensor) -> list[Tensor]:
        """Normalised images [B,3,H,W] (sides multiples of ``size_divisor``) -> 4 maps, strides 4..32.

        A frozen encoder runs without autograd: nothing flows back into it.
        """
        return self._encode(x, with_last=False)[0]

    def _encode(self, x: Tensor, blocks: Sequence[int] = (), with_last: bool = True
                ) -> tuple[list[Tensor], Tensor | None, dict[int, Tensor], Tensor | None]:
        """(the 4 decoder inputs, the encoder's last map if ``with_last``, ViT block maps for ``blocks``,
        the ViT's last map after its final norm if ``with_last``) in one pass; nothing past the deepest
        requested block/stage is computed."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            if self.encoder.kind == "vit":
                depth = self.encoder.depth
                extra = [depth - 1] if with_last else []
                extra += [int(b) % depth for b in blocks]
                maps = self.encoder.intermediate_layers(x, self.layers + extra, norm=self.feature_norm)
                features = [
                    m if s == 1.0 else F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
                    for m, s in zip(maps, VIT_SCALES)
                ]
                rest = maps[len(self.layers):]
                last = rest.pop(0) if with_last else None
                return features, last, dict(zip(blocks, rest)), self._final_norm(last)
            if blocks:
                raise ValueError("block outputs are a ViT notion; this encoder is a CNN")
            # timm's forward_intermediates returns the feature_info stage maps (same modules as forward),
            # in stage order, each index once.
            last = len(self.encoder.encoder.feature_info) - 1
            wanted = sorted({*self.layers, last} if with_last else set(self.layers))
            maps = dict(zip(wanted, self.encoder.encoder.forward_intermediates(x, indices=wanted, intermediates_only=True)))
            return [maps[i] for i in self.layers], maps[last] if with_last else None, {}, None

    def _final_norm(self, last: Tensor | None) -> Tensor | None:
        """ViT last-block map [B,C,h,w] -> the same tokens after the encoder's final norm (the map
        ``last`` is already normed with ``feature_norm``). The norm acts per token, so it is applied
        to the [B, h·w, C] token sequence and folded back."""
        if last is None or self.feature_norm:
            return last
        b, c, h, w = last.shape
        tokens = final_norm(self.encoder.encoder, last.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def distill_outputs(self, images: Tensor, labels: Tensor | None = None, blocks: Sequence[int] = (),
                        logits: bool = True) -> tuple[dict[str, Tensor] | None, SegOutputs]:
        """One forward for task-level distillation: (``loss(images, labels)`` or None, SegOutputs).

        images [B,3,H,W] in [0,1]; labels [B,H,W] (255 ignore) or None (teacher side). The outputs
        are those of the padded input (sides multiples of ``size_divisor``). ``logits=False`` (teacher
        side, for losses that read features only) skips the decoder: ``SegOutputs.logits`` and
        ``head_feature`` are None.
        """
        x = self._pad(self.normalize(images), 0.0)
        features, last, block_maps, last_norm = self._encode(x, blocks)
        if labels is not None and labels.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        terms, scores, head = None, None, None
        if labels is not None:
            terms, scores, head = self.decoder.distill_forward(features, self._pad(labels, IGNORE_INDEX))
        elif logits:
            _, scores, head = self.decoder.distill_forward(features)
        return terms, SegOutputs(scores, features, last, block_maps, last_norm=last_norm, head_feature=head)

    def _pad(self, x: Tensor, value: float) -> Tensor:
        """Zero/``value``-pad the last two dims at the bottom/right to multiples of ``size_divisor``."""
        d = self.size_divisor
        ph, pw = (-x.shape[-2]) % d, (-x.shape[-1]) % d
        return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """images [B,3,H,W] float RGB in [0,1] -> scores [B,K,H,W]; with ``labels``: ``loss(images, labels)``."""
        if labels is not None:
            return self.loss(images, labels)
        h, w = images.shape[-2:]
        x = self._pad(self.normalize(images), 0.0)
        scores = self.decoder.predict(self.extract_features(x), tuple(x.shape[-2:]))
        return scores[..., :h, :w]

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """images [B,3,H,W] in [0,1], labels [B,H,W] int64 (255 = ignore) -> dict(loss=..., detached terms)."""
        if labels.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        x = self._pad(self.normalize(images), 0.0)
        labels = self._pad(labels, IGNORE_INDEX)
        return self.decoder.loss(self.extract_features(x), labels)


# ------------------------------------------------------------------------------------------------
# building


def _feature_channels(encoder: Student, layers: Sequence[int]) -> list[int]:
    if encoder.kind == "vit":
        return [encoder.embed_dim] * len(layers)
    info = encoder.encoder.feature_info
    return [int(info[i]["num_chs"]) for i in layers]


def _resolve_layers(encoder: Student, layers: Sequence[int] | None) -> list[int]:
    if encoder.kind == "vit":
        layers = default_vit_layers(encoder.depth) if layers is None else [int(i) for i in layers]
        if len(layers) != len(VIT_SCALES):
            raise ValueError(f"ViT features need {len(VIT_SCALES)} block indices (strides 4..32), got {layers}")
        bad = [i for i in layers if not -encoder.depth <= i < encoder.depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {encoder.depth}-block encoder")
        return [i % encoder.depth for i in layers]
    layers = default_cnn_layers(encoder) if layers is None else [int(i) for i in layers]
    n = len(encoder.encoder.feature_info)
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"feature_info indices {layers} out of range [0, {n})")
    return layers


def build_segmentor(
    encoder: Student,
    decoder: str = "mlp",
    num_classes: int = 19,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    layers: Sequence[int] | None = None,
    feature_norm: bool = False,
    class_names: Sequence[str] | None = None,
    train_encoder: bool = False,
    **decoder_kwargs: Any,
) -> Segmentor:
    """Wrap a (loaded) student ``encoder`` with a new decoder ``DECODERS[decoder]`` (random init).

    mean / std: the encoder's input normalisation for [0, 1] RGB (stage 3 passes the encoder file's
    ``input_norm``). layers: ViT block indices (default ``default_vit_layers``) or, for CNNs,
    ``feature_info`` indices (default: the stride-4/8/16/32 maps). feature_norm: apply the ViT's
    final norm to the intermediate tokens (default False, as in the authors' backbone).
    decoder_kwargs: the decoder's constructor arguments (e.g. ``num_queries=100`` or ``channels=256``).
    The encoder is frozen in place unless ``train_encoder`` (task-level distillation).
    """
    if encoder.kind != "vit" and feature_norm:
        raise ValueError("feature_norm applies to ViT encoders only")
    layers = _resolve_layers(encoder, layers)
    dec = build_decoder(decoder, _feature_channels(encoder, layers), num_classes, **decoder_kwargs)
    return Segmentor(
        encoder, dec, decoder_name=decoder, num_classes=num_classes, mean=mean, std=std,
        layers=layers, feature_norm=feature_norm, class_names=class_names, train_encoder=train_encoder,
    )


class _NoDecoder(nn.Module):
    """Stands in for a decoder when a ``Segmentor`` only extracts features (never called)."""

    num_classes = 1

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:  # pragma: no cover - a misuse guard
        raise RuntimeError("this segmentor shell has no decoder: it only extracts features")


def feature_segmentor(encoder: Student, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      layers: Sequence[int] | None = None, train_encoder: bool = False) -> Segmentor:
    """A decoder-less ``Segmentor`` on ``encoder`` (no parameters besides the encoder's): its
    ``extract_features`` / ``distill_outputs(..., logits=False).features`` are the maps a stage-3
    decoder on this encoder would read (layers: as ``build_segmentor``; no feature norm)."""
    return Segmentor(encoder, _NoDecoder(), decoder_name="none", num_classes=1, mean=mean, std=std,
                     layers=_resolve_layers(encoder, layers), train_encoder=train_encoder)


def build_segmentor_from_spec(spec: Mapping[str, Any]) -> Segmentor:
    """Rebuild the architecture described by ``Segmentor.spec`` (weights random: load them after)."""
    if not is_segmentor_spec(spec):
        raise ValueError("not a segmentor spec (no decoder): expected the spec of a stage-3 segmentor.safetensors")
    if spec.get("format") != SEGMENTOR_SPEC_FORMAT:
        raise ValueError(f"unknown segmentor spec format {spec.get('format')!r}")
    encoder = build_student_from_spec(dict(spec["encoder"]))
    seg = build_segmentor(
        encoder,
        decoder=spec["decoder"]["name"],
        num_classes=int(spec["num_classes"]),
        mean=spec["mean"],
        std=spec["std"],
        layers=spec["layers"],
        feature_norm=bool(spec.get("feature_norm", False)),
        class_names=spec.get("class_names"),
        **dict(spec["decoder"].get("kwargs") or {}),
    )
    if seg.spec != jsonable(dict(spec)):
        raise ValueError(f"rebuilt segmentor spec {seg.spec} differs from {dict(spec)}")
    return seg


# ------------------------------------------------------------------------------------------------
# files (the handoff helpers are imported lazily: gkd.engine imports gkd.models)


def save_segmentor(
    path: str | Path,
    segmentor: Segmentor,
    *,
    config: Mapping[str, Any] | None = None,
    parent: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``segmentor.safetensors`` (stage 3): all weights (frozen encoder included), the segmentor
    spec, the resolved ``config``, the ``parent`` encoder file's hash, ``input_norm``,
    ``num_classes`` and ``class_names`` (plus ``extra``) in the header."""
    spec = segmentor.spec
    meta = {
        "input_norm": {"mean": spec["mean"], "std": spec["std"]},
        "num_classes": spec["num_classes"],
        "class_names": spec["class_names"],
        **dict(extra or {}),
    }
    return save_handoff(path, segmentor, spec, stage=3, config=config, parent=parent, extra=meta)


def load_segmentor(path: str | Path) -> tuple[Segmentor, dict[str, Any]]:
    """Rebuild a segmentor from a stage-3 file's spec and load its weights strictly.

    Returns (segmentor in eval mode, metadata). An encoder file from stage 1/2 is refused clearly.
    """
    meta = read_metadata(path)
    spec = meta["gkd_spec"]
    if not is_segmentor_spec(spec):
        raise ValueError(
            f"{path} is a stage-{meta.get('gkd_stage')} encoder file (its spec has no decoder); "
            "expected a segmentor.safetensors written by stage 3"
        )
    with _rebuilding(path):
        seg = build_segmentor_from_spec(spec)
    load_handoff(path, seg, seg.spec)
    return seg.eval(), meta


@contextmanager
def _rebuilding(path: str | Path) -> Iterator[None]:
    """A model spec read from `path` that cannot be built is that file's fault: say so, naming it."""
    try:
        yield
    except (CheckpointError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise HandoffError(f"{path}: the model spec in its header cannot be rebuilt ({e}); the file was written "
                           "by another gkd version or edited: re-run the stage that wrote it") from e


def load_encoder_for_segmentor(
    path: str | Path, expected_spec: Mapping[str, Any] | None = None, drop_path_rate: float = 0.0
) -> tuple[Student, dict[str, list[float]] | None]:
    """Rebuild the student of a stage-1/2 ``encoder.safetensors`` from its spec and load it strictly.

    expected_spec: if given, every key it has (e.g. ``name``, ``embed_dim``, or a whole student spec)
    must equal the file's, else the file is refused. drop_path_rate: stochastic depth for an encoder
    that stage 3 fine-tunes (a training setting, not in the spec). Returns (student, input_norm or
    None), where input_norm = {"mean": [...], "std": [...]} as recorded by stages 1-2.
    """
    meta = read_metadata(path)
    spec = meta["gkd_spec"]
    if is_segmentor_spec(spec):
        raise ValueError(f"{path} is a stage-3 segmentor file; expected an encoder.safetensors from stage 1 or 2")
    if expected_spec is not None:
        diffs = spec_mismatch(dict(expected_spec), {k: spec.get(k, "<absent>") for k in expected_spec})
        if diffs:
            raise ValueError(f"{path} holds another encoder than expected; refusing it:\n  " + "\n  ".join(diffs))
    with _rebuilding(path):
        student = build_student_from_spec(spec, drop_path_rate=drop_path_rate)
    load_handoff(path, student, student.spec)
    return student, meta.get("gkd_input_norm")
