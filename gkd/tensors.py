"""The tensor bundles that models, distillation objectives and losses pass between them.

Bottom layer: models return them, ``gkd.distill`` consumes them, and neither imports the other for
them. Plain dataclasses (torch only for the annotations).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Tokens", "EncoderInfo", "SegOutputs"]


@dataclass
class Tokens:
    """Final-norm tokens of one forward pass (every teacher and student returns them).

    cls:   [B, C]    class token
    patch: [B, N, C] patch tokens in row-major grid order, N = grid[0] * grid[1]
    grid:  (h, w)    token grid
    """

    cls: Tensor
    patch: Tensor
    grid: tuple[int, int]


@dataclass(frozen=True)
class EncoderInfo:
    """Shapes a task-level loss needs to build its own layers.

    kind: "vit" or "cnn". embed_dim: channels of ``SegOutputs.last`` (ViT width; CNN last stage).
    depth: number of ViT blocks (0 for CNNs). feature_channels: channels of the 4 decoder inputs.
    head_channels: channels of ``SegOutputs.head_feature`` (the decoder's ``head_channels``); 0 when
    unknown (a loss that needs it refuses to build).
    """

    kind: str
    embed_dim: int
    depth: int
    feature_channels: tuple[int, ...]
    head_channels: int = 0


@dataclass
class SegOutputs:
    """One segmentor forward, as a task-level distillation loss sees it.

    logits: [B, K, h, w] decoder scores at the decoder's output resolution (MLP head: stride 4);
        for Mask2Former, the log of its per-class semantic scores (see ``Decoder.logits``). None on
        the teacher side when the loss does not read logits (its decoder is then not run).
    features: the decoder's 4 input maps [B, C_l, H_l, W_l] at strides 4, 8, 16, 32.
    last: the encoder's final map [B, C, h, w] (ViT: last block's patch tokens on the token grid,
        before the final norm; CNN: last stage).
    blocks: ViT block outputs as maps [B, C, h, w] on the token grid, keyed by block index, for
        the indices the loss asked for in ``blocks()`` (empty otherwise).
    last_norm: ViT only: ``last`` after the encoder's own final norm [B, C, h, w] (the tokens a
        ViT classifier reads; ViTKD's generation target). None for CNNs.
    head_feature: the decoder's per-pixel feature that its classifier reads [B, D, h, w], on the
        logit grid (``Decoder.head_channels`` channels; see the decoders). None when ``logits`` is.
    """

    logits: Tensor | None
    features: list[Tensor]
    last: Tensor
    blocks: dict[int, Tensor] = field(default_factory=dict)
    last_norm: Tensor | None = None
    head_feature: Tensor | None = None
