"""Segmentation decoders trained on a frozen encoder's multi-level features (ARCHITECTURE.md §1, stage 3).

Every decoder takes ``features``: a list of maps [B, C_i, H_i, W_i], highest resolution first (for the
built-in segmentor: four maps at strides 4, 8, 16, 32), and offers

* ``forward(features)``: the raw outputs (logits);
* ``predict(features, size) -> [B, K, H, W]``: per-class scores at ``size`` (argmax = prediction);
* ``loss(features, labels [B, H, W] int64, 255 = ignore) -> dict``: ``loss`` (to backpropagate) and
  detached terms for logging;
* ``distill_forward(features, labels=None) -> (loss or None, logits, head feature)``: what task-level
  distillation reads, from one forward: per-class scores at the decoder's output resolution and the
  per-pixel feature its classifier reads (``head_channels`` channels, see each decoder).

Decoders are picked by name from ``DECODERS``; ``build_decoder(name, in_channels, num_classes, **kw)``.
A decoder's ``kwargs`` (all constructor arguments except ``in_channels`` / ``num_classes``) are what a
segmentor spec stores to rebuild it.

* ``mask2former``: Mask2Former as in the paper, assembled from transformers' pure-PyTorch pieces:
  ``Mask2FormerPixelDecoder`` (multi-scale deformable attention in plain PyTorch via ``grid_sample``,
  no compiled op), ``Mask2FormerTransformerModule`` (masked-attention decoder with its mask predictor),
  a class predictor (``nn.Linear(hidden, K + 1)``, the last logit is "no object") and
  ``Mask2FormerLoss`` (Hungarian matcher from scipy, point-sampled mask BCE and dice, class CE with
  the no-object weight). Weights are initialised with transformers' own Mask2Former init.
* ``mlp``: the all-MLP SegFormer head, transformers' ``SegformerDecodeHead`` as is (a plain
  ``nn.Module``: per-level ``Linear`` to ``channels``, bilinear upsampling to the first level,
  1×1 conv + BatchNorm + ReLU fusion, dropout, 1×1 classifier); pixel cross-entropy, ignore 255.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DECODERS",
    "Decoder",
    "MLPDecoder",
    "Mask2FormerDecoder",
    "build_decoder",
    "semantic_inference",
    "semantic_to_instances",
]

IGNORE_INDEX = 255


class Decoder(nn.Module):
    """Base class: see the module docstring for the contract."""

    num_classes: int
    in_channels: tuple[int, ...]
    head_channels: int  # channels of the feature the classifier reads (``distill_forward``'s third output)

    def __init__(self, in_channels: Sequence[int], num_classes: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = int(num_classes)
        self._kwargs = dict(kwargs)

    @property
    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments besides ``in_channels`` / ``num_classes`` (JSON-able)."""
        return dict(self._kwargs)

    def _check_features(self, features: Sequence[Tensor]) -> None:
        chans = tuple(int(f.shape[1]) for f in features)
        if chans != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects feature channels {self.in_channels}, got {chans}")

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.dtype != torch.int64 or labels.ndim != 3 or labels.shape[0] != batch:
            raise ValueError(f"labels must be int64 [B={batch},H,W], got {labels.dtype} {tuple(labels.shape)}")
        valid = labels[labels != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_classes):
            raise ValueError(
                f"label values must be in [0, {self.num_classes}) or {IGNORE_INDEX} (ignore); "
                f"found {int(valid.min())}..{int(valid.max())}"
            )

    def predict(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss(self, features: Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The training loss: dict with 'loss' (differentiable) and detached 'loss_*' terms."""
        return self.loss_and_logits(features, labels)[0]

    def distill_forward(self, features: Sequence[Tensor], labels: Tensor | None = None
                        ) -> tuple[dict[str, Tensor] | None, Tensor, Tensor]:  # pragma: no cover
        """One decoder forward for distillation: (``loss(features, labels)`` or None without labels,
        per-class scores [B, K, h, w] at the decoder's output resolution, the per-pixel feature its
        classifier reads [B, head_channels, h, w] on the same grid)."""
        raise NotImplementedError

    def logits(self, features: Sequence[Tensor]) -> Tensor:
        """Per-class scores [B, K, h, w] at the decoder's output resolution, for distillation."""
        return self.distill_forward(features)[1]

    def loss_and_logits(self, features: Sequence[Tensor], labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``(loss(features, labels), logits(features))`` from one decoder forward."""
        terms, logits, _ = self.distill_forward(features, labels)
        return terms, logits


# ------------------------------------------------------------------------------------------------
# all-MLP head


class MLPDecoder(Decoder):
    """SegFormer's all-MLP head (transformers ``SegformerDecodeHead``) with pixel cross-entropy.

    in_channels: channels of each input level; channels: the common embedding width (256 in SegFormer);
    dropout: before the classifier (0.1 in SegFormer).

    The head's feature before its classifier (``fused``, ``head_channels`` = ``channels``) is the
    fused map: per-level Linear → upsampling → 1×1 fusion conv → BatchNorm → ReLU → dropout, i.e.
    exactly the tensor the final 1×1 classifier reads (dropout included, as the classifier sees it).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(in_channels, num_classes, {"channels": int(channels), "dropout": float(dropout)})
        from transformers import SegformerConfig
        from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

        config = SegformerConfig(
            num_encoder_blocks=len(self.in_channels),
            hidden_sizes=list(self.in_channels),
            decoder_hidden_size=int(channels),
            classifier_dropout_prob=float(dropout),
            num_labels=self.num_classes,
            reshape_last_stage=True,
        )
        self.head = SegformerDecodeHead(config)  # PyTorch default init, as in SegFormer's head
        self.head_channels = int(channels)

    def fused(self, features: Sequence[Tensor]) -> Tensor:
        """features -> the fused map the classifier reads, [B, channels, H_0, W_0].

        ``SegformerDecodeHead.forward`` up to its classifier, run with the head's own modules (so
        ``head.classifier(fused(f)) == head(f)``; a test checks it against the head itself).
        """
        self._check_features(features)
        head, size = self.head, features[0].shape[-2:]
        levels = []
        for x, proj in zip(features, head.linear_projections):
            b, _, h, w = x.shape
            y = proj(x).transpose(1, 2).reshape(b, -1, h, w)  # per-pixel Linear to `channels`
            levels.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = head.linear_fuse(torch.cat(levels[::-1], dim=1))  # deepest level first, as in SegFormer
        return head.dropout(head.activation(head.batch_norm(y)))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features -> logits [B, K, H_0, W_0] at the first (finest) level's resolution."""
        return self.head.classifier(self.fused(features))

    def predict(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Logits bilinearly upsampled to ``size``: [B, K, H, W]."""
        return F.interpolate(self(features), size=tuple(size), mode="bilinear", align_corners=False)

    def distill_forward(self, features: Sequence[Tensor], labels: Tensor | None = None
                        ) -> tuple[dict[str, Tensor] | None, Tensor, Tensor]:
        """(pixel cross-entropy or None, logits [B, K, H_0, W_0] (stride 4), fused map [B, channels, H_0, W_0])."""
        fused = self.fused(features)
        small = self.head.classifier(fused)
        return (None if labels is None else self._cross_entropy(small, labels)), small, fused

    def _cross_entropy(self, small: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Pixel cross-entropy of the logits upsampled to the label size (255 ignored)."""
        logits = F.interpolate(small, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
        self._check_labels(labels, logits.shape[0])
        if not bool((labels != IGNORE_INDEX).any()):
            ce = logits.sum() * 0.0  # every pixel ignored: zero loss (mean over no pixel would be NaN)
        else:
            ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return {"loss": ce, "loss_ce": ce.detach()}


# ------------------------------------------------------------------------------------------------
# Mask2Former


def semantic_inference(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Mask2Former semantic scores: sum over queries of softmax(class)[..., :-1] × sigmoid(mask).

    class_logits: [B, Q, K + 1] (last = no object); mask_logits: [B, Q, h, w], bilinearly resized to
    ``size`` *before* the sigmoid (as mmseg's Mask2Former head does). Returns [B, K, H, W].
    """
    if size is not None and tuple(mask_logits.shape[-2:]) != tuple(size):
        mask_logits = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    probs = class_logits.softmax(dim=-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probs, mask_logits.sigmoid())


def semantic_to_instances(
    labels: Tensor, ignore_index: int = IGNORE_INDEX, dtype: torch.dtype = torch.float32
) -> tuple[list[Tensor], list[Tensor]]:
    """Semantic maps [B, H, W] -> per image: binary masks [n_b, H, W] (``dtype``) and classes [n_b].

    One mask per class present (sorted). Ignored pixels belong to no mask, i.e. they are negatives
    for every mask, as in mmseg's / transformers' semantic Mask2Former targets.
    """
    masks, classes = [], []
    for lab in labels:
        present = torch.unique(lab)
        present = present[present != ignore_index]
        classes.append(present.to(torch.int64))
        masks.append((lab.unsqueeze(0) == present.view(-1, 1, 1)).to(dtype))
    return masks, classes


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def _init_like_transformers(module: nn.Module, config: Any) -> None:
    """transformers' Mask2Former weight init, applied children first as ``PreTrainedModel`` does.

    Needed: ``Mask2FormerPixelDecoder.level_embed`` is allocated uninitialised, and the deformable
    attention's sampling offsets / the decoder layers' xavier init come from ``_init_weights``. A bare
    ``Mask2FormerPreTrainedModel`` (no submodules) supplies that method with its config.
    """
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

    initializer = Mask2FormerPreTrainedModel(config)
    for m in _post_order(module):
        initializer._init_weights(m)


class Mask2FormerDecoder(Decoder):
    """Mask2Former head (pixel decoder + masked-attention transformer decoder) for semantic segmentation.

    Defaults are the paper's: 100 queries, 9 transformer decoder layers, a 6-layer multi-scale
    deformable-attention pixel decoder, 256 channels, 8 heads; loss weights class 2.0 (no object 0.1),
    mask BCE 5.0, dice 5.0, with the same weights as Hungarian matching costs; 12544 sampled points
    (oversample 3, importance 0.75); losses on every intermediate prediction (``aux_loss``).

    The four input levels must have strides 4, 8, 16, 32 (the pixel decoder attends over the last
    three and adds the first through its FPN branch). ``num_layers`` counts transformer layers: the
    transformers config's ``decoder_layers`` is ``num_layers + 1`` (one prediction before the first layer).

    "The feature before the classifier" (``distill_forward``'s third output, ``head_channels`` =
    ``hidden_dim``): Mask2Former classifies queries, not pixels, so its last per-pixel map is the
    pixel decoder's ``mask_features`` [B, hidden_dim, H_0, W_0] (stride 4), the map every query's
    mask embedding is dotted with to give the mask logits that the semantic scores are built from.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        num_queries: int = 100,
        num_layers: int = 9,
        pixel_decoder_layers: int = 6,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        pixel_decoder_ffn_dim: int = 1024,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        aux_loss: bool = True,
    ) -> None:
        kwargs = dict(
            num_queries=int(num_queries), num_layers=int(num_layers), pixel_decoder_layers=int(pixel_decoder_layers),
            hidden_dim=int(hidden_dim), num_heads=int(num_heads), dim_feedforward=int(dim_feedforward),
            pixel_decoder_ffn_dim=int(pixel_decoder_ffn_dim), num_points=int(num_points),
            oversample_ratio=float(oversample_ratio), importance_sample_ratio=float(importance_sample_ratio),
            class_weight=float(class_weight), mask_weight=float(mask_weight), dice_weight=float(dice_weight),
            no_object_weight=float(no_object_weight), aux_loss=bool(aux_loss),
        )
        super().__init__(in_channels, num_classes, kwargs)
        if len(self.in_channels) != 4:
            raise ValueError(f"Mask2Former expects 4 feature levels (strides 4, 8, 16, 32), got {len(self.in_channels)}")
        if hidden_dim % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm with 32 groups), got {hidden_dim}")
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import (
            Mask2FormerLoss,
            Mask2FormerPixelDecoder,
            Mask2FormerTransformerModule,
        )

        config = Mask2FormerConfig(
            num_labels=self.num_classes,
            feature_size=hidden_dim,
            mask_feature_size=hidden_dim,
            hidden_dim=hidden_dim,
            encoder_layers=pixel_decoder_layers,
            encoder_feedforward_dim=pixel_decoder_ffn_dim,
            decoder_layers=num_layers + 1,
            num_attention_heads=num_heads,
            dim_feedforward=dim_feedforward,
            dropout=0.0,
            pre_norm=False,
            enforce_input_projection=False,
            common_stride=4,
            feature_strides=[4, 8, 16, 32],
            num_queries=num_queries,
            no_object_weight=no_object_weight,
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            train_num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            use_auxiliary_loss=aux_loss,
            ignore_value=IGNORE_INDEX,
        )
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(self.in_channels))
        self.transformer = Mask2FormerTransformerModule(in_features=hidden_dim, config=config)
        self.class_predictor = nn.Linear(hidden_dim, self.num_classes + 1)
        self.head_channels = int(hidden_dim)
        self.weights = {"loss_cross_entropy": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weights)
        _init_like_transformers(self, config)

    def forward(self, features: Sequence[Tensor]) -> dict[str, Any]:
        """features (4 levels, strides 4..32) -> dict:

        ``class_logits`` [B, Q, K + 1] and ``mask_logits`` [B, Q, H_0, W_0] (at the first level's
        resolution) of the last layer; ``aux``: the same for every earlier prediction (list of dicts,
        first = before any transformer layer); ``mask_features``: the pixel decoder's per-pixel map
        [B, hidden_dim, H_0, W_0] the mask logits are read from.
        """
        self._check_features(features)
        pixel = self.pixel_decoder(list(features), output_attentions=False, output_hidden_states=False, return_dict=True)
        dec = self.transformer(
            multi_scale_features=list(pixel.multi_scale_features), mask_features=pixel.mask_features,
            output_hidden_states=False, output_attentions=False,
        )
        # intermediate_hidden_states: layer-normed queries [Q, B, C] after each prediction step.
        class_logits = [self.class_predictor(h.transpose(0, 1)) for h in dec.intermediate_hidden_states]
        masks = list(dec.masks_queries_logits)
        aux = [{"class_queries_logits": c, "masks_queries_logits": m} for c, m in zip(class_logits[:-1], masks[:-1])]
        return {"class_logits": class_logits[-1], "mask_logits": masks[-1], "aux": aux,
                "mask_features": pixel.mask_features}

    def predict(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Semantic scores [B, K, H, W] at ``size`` (see ``semantic_inference``)."""
        out = self(features)
        return semantic_inference(out["class_logits"], out["mask_logits"], size)

    @staticmethod
    def _semantic_logits(out: dict[str, Any]) -> Tensor:
        """Distillation logits: log of the semantic scores at mask resolution (stride 4), so that a
        softmax over classes gives the scores normalised per pixel (Mask2Former has no pixel logits)."""
        return semantic_inference(out["class_logits"].float(), out["mask_logits"].float()).clamp_min(1e-6).log()

    def loss(self, features: Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The set loss alone (see ``_set_loss``): no distillation logits are computed."""
        return self._set_loss(self(features), labels)

    def distill_forward(self, features: Sequence[Tensor], labels: Tensor | None = None
                        ) -> tuple[dict[str, Tensor] | None, Tensor, Tensor]:
        """(set loss or None, semantic log-scores [B, K, H_0, W_0] (``_semantic_logits``), the pixel
        decoder's ``mask_features`` [B, hidden_dim, H_0, W_0]) of one forward."""
        out = self(features)
        terms = None if labels is None else self._set_loss(out, labels)
        return terms, self._semantic_logits(out), out["mask_features"]

    def _set_loss(self, out: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """Hungarian-matched set loss against the semantic labels (one target mask per present class).

        Returns ``loss`` = Σ over all predictions (last + aux) of 2·CE + 5·BCE + 5·dice (weights as
        configured) and the detached sums ``loss_cls``, ``loss_mask``, ``loss_dice`` (each weighted).
        """
        logits = out["mask_logits"]
        self._check_labels(labels, logits.shape[0])
        masks, classes = semantic_to_instances(labels)
        if sum(len(c) for c in classes) == 0:
            raise ValueError("every pixel of the batch is ignored (255): no target mask to learn from")
        aux = out["aux"] if self.kwargs["aux_loss"] else None
        if aux is not None:
            aux = [{k: v.float() for k, v in a.items()} for a in aux]
        # The loss runs in float32 outside autocast, as in the original Mask2Former criterion: the
        # matcher hands its cost matrix to scipy (no bfloat16 there) and BCE/dice want full precision.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            terms = self.criterion(
                masks_queries_logits=logits.float(), class_queries_logits=out["class_logits"].float(),
                mask_labels=[m.float() for m in masks], class_labels=classes, auxiliary_predictions=aux,
            )
        # terms: loss_cross_entropy, loss_mask, loss_dice, and the same with suffix _<i> per aux prediction.
        sums = {"loss_cls": 0.0, "loss_mask": 0.0, "loss_dice": 0.0}
        names = {"loss_cross_entropy": "loss_cls", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
        for key, value in terms.items():
            base = next(k for k in names if key == k or key.startswith(k + "_"))
            sums[names[base]] = sums[names[base]] + self.weights[base] * value
        total = sums["loss_cls"] + sums["loss_mask"] + sums["loss_dice"]
        return {"loss": total, **{k: v.detach() for k, v in sums.items()}}


DECODERS: dict[str, type[Decoder]] = {
    "mask2former": Mask2FormerDecoder,
    "mlp": MLPDecoder,
}


def build_decoder(name: str, in_channels: Sequence[int], num_classes: int, **kwargs: Any) -> Decoder:
    """``DECODERS[name](in_channels, num_classes, **kwargs)`` with a clear error for unknown names."""
    if name not in DECODERS:
        raise KeyError(f"unknown decoder {name!r}; known: {sorted(DECODERS)}")
    return DECODERS[name](in_channels, num_classes, **kwargs)
