"""An mmsegmentation backbone on a gkd encoder file: ``dict(type='GKDEncoder', checkpoint='encoder.safetensors')``.

Importing this module registers ``GKDEncoder`` in ``mmseg.registry.MODELS`` (an mmseg config does it
with ``custom_imports=dict(imports=['gkd.integrations.mmseg'], allow_failed_imports=False)``).

``GKDEncoder(checkpoint, layers=None, frozen=True)`` rebuilds the student of a stage-1/2
``encoder.safetensors`` (``load_encoder_for_segmentor``, strict) and its ``forward(x)`` returns the
tuple of four maps at strides 4, 8, 16, 32 that gkd's own stage-3 segmentor feeds its decoder: the
same block indices (``layers``; default ``default_vit_layers`` / ``default_cnn_layers``), the same
resizing — computed by ``Segmentor.extract_features`` itself, not re-implemented.

Input normalisation is NOT done here. mmseg normalises in its ``SegDataPreProcessor`` (0-255 pixels,
mean/std in 0-255 units), and ``Segmentor.extract_features`` takes already-normalised images too, so
the two paths agree on the same normalised tensor. The data preprocessor must use the encoder file's
``input_norm`` × 255 (``data_preprocessor_norm(path)`` gives it; ImageNet's for the authors' and
gkd's default students). Input sides must be multiples of the patch size (ViT) or 32 (CNN): set the
data preprocessor's ``size`` (crop) or ``size_divisor`` accordingly; the backbone does not pad, since
mmseg crops predictions by its own padding record only.

Frozen (the default, as in the authors' stage 3): no parameter requires grad, the encoder stays in
eval mode whatever ``train()`` mmseg calls, and features are computed without autograd.
``frozen=False`` fine-tunes it (the ``train_encoder`` mode of gkd's segmentor). ``init_weights`` is a
no-op: the weights come from the checkpoint and mmseg's initialisation must not overwrite them.

Only ``mmseg.registry`` and ``mmengine.model`` are imported, both of which work with mmcv-lite (no
compiled ops). Note that mmseg's ``MODELS.build`` first imports ``mmseg.models`` (its registry's lazy
import), which needs the full mmcv with compiled ops — as does any real mmseg model (Mask2Former).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor

from gkd.handoff import read_metadata
from gkd.models.segmentor import IMAGENET_MEAN, IMAGENET_STD, feature_segmentor, load_encoder_for_segmentor

__all__ = ["GKDEncoder", "data_preprocessor_norm"]


def data_preprocessor_norm(checkpoint: str | Path) -> dict[str, list[float]]:
    """``dict(mean=[...], std=[...])`` in 0-255 units for mmseg's ``SegDataPreProcessor``: the encoder
    file's recorded input normalisation (ImageNet's if the file records none) times 255."""
    norm = read_metadata(checkpoint).get("gkd_input_norm") or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {"mean": [255.0 * float(m) for m in norm["mean"]], "std": [255.0 * float(s) for s in norm["std"]]}


@MODELS.register_module()
class GKDEncoder(BaseModule):
    """A gkd encoder file as an mmseg backbone: ``forward(x [B,3,H,W] normalised) -> 4 maps, strides 4..32``.

    checkpoint: a stage-1/2 (or stage-0) ``encoder.safetensors``. layers: ViT block indices or CNN
    ``feature_info`` indices (default: gkd's). frozen: keep the encoder frozen (default True).
    Attributes: ``out_channels`` (per map, for the decode head's ``in_channels``), ``size_divisor``,
    ``input_norm`` (the file's, in [0, 1] units, or None).
    """

    def __init__(self, checkpoint: str, layers: Sequence[int] | None = None, frozen: bool = True,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        encoder, norm = load_encoder_for_segmentor(checkpoint)
        # gkd's segmentor owns the feature extraction: a decoder-less one, so that no decoder weights
        # end up in mmseg's state dict or optimiser.
        seg = feature_segmentor(encoder, layers=layers, train_encoder=not frozen)
        self.segmentor = seg
        self.frozen = bool(frozen)
        self.checkpoint = str(checkpoint)
        self.input_norm = norm
        self.layers = list(seg.layers)
        self.out_channels = self._channels()

    def _channels(self) -> list[int]:
        enc = self.segmentor.encoder
        if enc.kind == "vit":
            return [int(enc.embed_dim)] * len(self.layers)
        info = enc.encoder.feature_info
        return [int(info[i]["num_chs"]) for i in self.layers]

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (the ViT patch size, or 32 for a CNN)."""
        return self.segmentor.size_divisor

    def init_weights(self) -> None:
        """No-op: the weights are the checkpoint's (mmseg calls this after building the model)."""

    def train(self, mode: bool = True) -> "GKDEncoder":
        """Train/eval as asked, except that a frozen encoder always stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.segmentor.encoder.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Normalised images [B,3,H,W] (sides multiples of ``size_divisor``) -> 4 maps, strides 4, 8, 16, 32."""
        d = self.size_divisor
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(f"GKDEncoder needs normalised images [B,3,H,W] with H, W multiples of {d}, got "
                             f"{tuple(x.shape)}: set the data preprocessor's size or size_divisor")
        return tuple(self.segmentor.extract_features(x))
