"""``gkd export --format onnx``: the segmentor's forward as an ONNX model, checked with onnxruntime.

The graph: input ``images`` float32 [B, 3, H, W], RGB in [0, 1] (the segmentor's mean/std
normalisation, the padding to its size divisor and the cropping back are inside the graph); output
``scores`` float32 [B, K, H, W] (argmax over K = class id, as ``Segmentor.forward``).

* **Batch is dynamic, H and W are fixed** at export time (default: the stage-3 training crop
  recorded in the file, else the encoder's input size; any size works, not only multiples of the
  patch size). The models do not trace with dynamic H/W: the ViT's position table is resampled to
  the token grid, and the padding amounts, in Python at trace time. To score other sizes, resize
  the image or slide H×W windows over it (as ``gkd predict --mode slide`` does). When H×W gives
  another token grid than the encoder was trained on, the position table resampled for that grid
  (timm's bicubic antialiased resampling, which ONNX cannot express) is computed once in PyTorch and
  stored in the graph as a constant: the same numbers the PyTorch model uses at that size.
* **Exporters**: ``torchscript`` (default; ``torch.onnx.export(dynamo=False)``, the legacy tracer,
  opset 17; no extra package) or ``dynamo`` (``torch.export`` based, opset 18; needs ``onnxscript``).
  Both export the ``mlp`` and the ``mask2former`` decoders (Mask2Former's multi-scale deformable
  attention is plain PyTorch ``grid_sample``; its semantic inference has no matching step), on ViT
  and CNN students. EVA-02-style (RoPE) students export at their training size only. The legacy
  tracer turns ``torch.linspace(a, b, 1)`` into NaN; Mask2Former calls it for a feature level one
  pixel high or wide (small inputs), so while tracing a one-step linspace is recorded as a constant.
* **Check**: after writing, onnxruntime (when installed) runs the file on random batches of sizes
  ``verify_batches`` (other sizes than the one traced, so the dynamic batch is exercised) and the
  largest absolute difference to PyTorch is reported.
* **Encoder files** (stage 1/2 ``encoder.safetensors``) are detected by their header and go to
  ``export_encoder_onnx``: outputs ``feat4``..``feat32`` (the decoder-input maps), dynamic batch and,
  for ViT students with absolute position embeddings, dynamic H×W (see its docstring).
* **metadata_props**: ``gkd_class_names``, ``gkd_num_classes``, ``gkd_palette`` (when known),
  ``gkd_input`` / ``gkd_output`` (plain-language contract), ``gkd_input_norm`` (mean/std already
  applied inside the graph), ``gkd_input_size``, ``gkd_spec``, ``gkd_stage``, ``gkd_version``,
  ``gkd_manifest``, ``gkd_source`` and ``gkd_source_sha256`` (the segmentor file), ``gkd_exporter``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd.atomic import atomic_path

from .predict import config_data, load_stage3, resolve_palette, trained_crop_size

_log = logging.getLogger(__name__)

__all__ = ["ExportResult", "EncoderExportResult", "export_onnx", "export_encoder_onnx", "EXPORTERS"]

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
TRACE_BATCH = 2  # traced at batch 2, verified at 1 and 3: a batch size baked into the graph would show


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and how well onnxruntime agreed with PyTorch."""

    path: Path
    height: int
    width: int
    exporter: str
    opset: int
    num_classes: int
    verified: bool = False
    max_abs_diff: dict[int, float] = field(default_factory=dict)  # batch size -> max |onnx - torch|
    note: str = ""

    @property
    def max_diff(self) -> float | None:
        return max(self.max_abs_diff.values()) if self.max_abs_diff else None

    def format(self) -> str:
        line = (f"wrote {self.path}: images float32 [B,3,{self.height},{self.width}] RGB in [0,1] -> "
                f"scores [B,{self.num_classes},{self.height},{self.width}]; batch dynamic, size fixed "
                f"({self.exporter} exporter, opset {self.opset})")
        if self.verified:
            diffs = ", ".join(f"batch {b}: {d:.3g}" for b, d in self.max_abs_diff.items())
            line += f"\nonnxruntime vs PyTorch max abs difference: {diffs}"
        if self.note:
            line += f"\n{self.note}"
        return line


class _ScoresOnly(nn.Module):
    """``images -> scores``: the segmentor's inference forward with a one-argument signature."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: Tensor) -> Tensor:
        return self.segmentor(images)


@contextlib.contextmanager
def _constant_position_tables(segmentor: nn.Module, height: int, width: int) -> Iterator[None]:
    """During export, ``resample_abs_pos_embed`` in ``gkd.models.student`` returns precomputed tables.

    The student resamples its position table (bicubic, antialiased: no ONNX equivalent) whenever an
    input's token grid differs from the training grid. At a fixed export size that table does not
    depend on the input, so it is computed once here by the real function (an eager forward pass at
    ``height`` x ``width``) and replayed as a constant while tracing. Nothing changes for other models.
    """
    from gkd.models import student as student_module

    real = student_module.resample_abs_pos_embed
    tables: dict[tuple, Tensor] = {}

    def key(new_size: Sequence[Any], old_size: Sequence[Any], num_prefix_tokens: Any) -> tuple:
        return tuple(int(v) for v in new_size), tuple(int(v) for v in old_size), int(num_prefix_tokens)

    def record(posemb: Tensor, new_size: Sequence[int], old_size: Sequence[int] | None = None,
               num_prefix_tokens: int = 1, **kw: Any) -> Tensor:
        out = real(posemb, new_size=new_size, old_size=old_size, num_prefix_tokens=num_prefix_tokens, **kw)
        if old_size is not None:
            tables[key(new_size, old_size, num_prefix_tokens)] = out.detach().clone()
        return out

    def replay(posemb: Tensor, new_size: Sequence[int], old_size: Sequence[int] | None = None,
               num_prefix_tokens: int = 1, **kw: Any) -> Tensor:
        if old_size is not None:
            table = tables.get(key(new_size, old_size, num_prefix_tokens))
            if table is not None:
                return table
        return real(posemb, new_size=new_size, old_size=old_size, num_prefix_tokens=num_prefix_tokens, **kw)

    student_module.resample_abs_pos_embed = record
    try:
        with torch.no_grad():
            segmentor(torch.zeros(1, 3, height, width))
    finally:
        student_module.resample_abs_pos_embed = real
    if not tables:
        yield
        return
    student_module.resample_abs_pos_embed = replay
    try:
        yield
    finally:
        student_module.resample_abs_pos_embed = real


@contextlib.contextmanager
def _one_step_linspace() -> Iterator[None]:
    """While tracing for the legacy exporter, ``torch.linspace(a, b, 1)`` is traced as a constant.

    That exporter turns a one-step linspace into NaN (its step is (b - a) / (steps - 1)).
    Mask2Former's pixel decoder calls ``torch.linspace(0.5, side - 0.5, side)`` for the reference
    points of each level, and the stride-32 level has a side of 1 for small inputs (e.g. a 3×5 ViT
    token grid halved). Other calls go to the real function.
    """
    real = torch.linspace

    def linspace(start: Any, end: Any, steps: Any, **kwargs: Any) -> Tensor:
        if int(steps) == 1:  # one value: start (fixed export size, so a constant is exact)
            kw = {k: v for k, v in kwargs.items() if k in ("dtype", "device", "requires_grad")}
            return torch.full((1,), float(start), **kw)
        return real(start, end, steps, **kwargs)

    torch.linspace = linspace
    try:
        yield
    finally:
        torch.linspace = real


def _default_size(segmentor: Any, metadata: dict[str, Any]) -> tuple[int, int]:
    crop = trained_crop_size(metadata)
    if crop:
        return crop, crop
    h, w = segmentor.encoder.img_size
    return int(h), int(w)


def _size_and_opset(height: int | None, width: int | None, default: tuple[int, int], opset: int | None,
                    exporter: str, default_opset: Mapping[str, int]) -> tuple[int, int, int]:
    """The export's H, W (one given: the other equals it; none: `default`) and opset, checked."""
    if height is None and width is None:
        height, width = default
    height = int(height if height is not None else width)
    width = int(width if width is not None else height)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    opset = int(opset) if opset is not None else default_opset[exporter]
    if exporter == "dynamo" and opset < 18:
        raise ValueError("the dynamo exporter needs opset 18 or newer")
    return height, width, opset


def _trace(wrapper: nn.Module, example: Tensor, path: Path, exporter: str, opset: int,
           outputs: Sequence[str] = ("scores",), dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Export `wrapper` on `example` to `path`: input "images", `outputs`; dynamic_axes (torchscript)
    default: the batch of every input and output (the dynamo exporter: the batch only)."""
    names = ["images", *outputs]
    dynamic_axes = dynamic_axes or {n: {0: "batch"} for n in names}
    if exporter == "torchscript":
        with warnings.catch_warnings(), _one_step_linspace():
            # Expected while tracing: shape-dependent Python branches are fixed at the export size,
            # and torch's notice that this exporter is the legacy one.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=["images"], output_names=list(outputs), dynamic_axes=dynamic_axes,
            )
        return
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("the dynamo exporter needs the onnxscript package (pip install onnxscript); "
                          "or use --exporter torchscript")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=True, opset_version=opset, external_data=False,
            input_names=["images"], output_names=list(outputs), dynamic_shapes=({0: batch},), verbose=False,
        )


def _metadata_props(segmentor: Any, metadata: dict[str, Any], checkpoint: Path, height: int, width: int,
                    exporter: str) -> dict[str, str]:
    from gkd.handoff import file_sha256

    spec = segmentor.spec
    k = int(segmentor.num_classes)
    names = metadata.get("gkd_class_names") or segmentor.class_names
    palette, source = resolve_palette(k, metadata)
    props = {
        "gkd_input": (f"images: float32 [B,3,{height},{width}], RGB in [0,1] (no normalisation: mean/std in "
                      "gkd_input_norm are applied inside the graph); B is dynamic, H and W are fixed"),
        "gkd_output": f"scores: float32 [B,{k},{height},{width}] per-class scores; argmax over dim 1 = class id",
        "gkd_input_norm": json.dumps({"mean": spec["mean"], "std": spec["std"], "applied": "inside the graph"}),
        "gkd_input_size": json.dumps([height, width]),
        "gkd_num_classes": str(k),
        "gkd_class_names": json.dumps(names),
        "gkd_spec": json.dumps(spec, sort_keys=True),
        "gkd_stage": str(metadata.get("gkd_stage", "")),
        "gkd_version": str(metadata.get("gkd_version", "")),
        "gkd_manifest": str(config_data(metadata).get("manifest") or ""),
        "gkd_source": checkpoint.name,
        "gkd_source_sha256": file_sha256(checkpoint),
        "gkd_exporter": exporter,
    }
    if source != "generated":
        props["gkd_palette"] = json.dumps(palette)
    return props


def _write_metadata(path: Path, props: dict[str, str], doc: str) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    model.doc_string = doc
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _verify(module: nn.Module, path: Path, height: int, width: int, batches: Sequence[int], seed: int,
            outputs: Sequence[str] = ("scores",)) -> dict[int, float]:
    """Largest |onnxruntime - PyTorch| over `outputs`, per batch size of random [0,1] inputs."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batches:
        x = torch.rand(int(b), 3, height, width, generator=gen)
        with torch.no_grad():
            out = module(x)
        refs = [m.float().numpy() for m in (out if isinstance(out, (tuple, list)) else (out,))]
        gots = session.run(list(outputs), {"images": x.numpy()})
        for got, ref in zip(gots, refs):
            if got.shape != ref.shape:
                raise RuntimeError(f"onnxruntime returned {got.shape} for batch {b}, PyTorch {ref.shape}")
        diffs[int(b)] = max(float(np.abs(g - r).max()) for g, r in zip(gots, refs))
    return diffs


def export_onnx(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    opset: int | None = None,
    exporter: str = "torchscript",
    verify: bool = True,
    verify_batches: Sequence[int] = (1, 3),
    seed: int = 0,
) -> ExportResult:
    """Export the stage-3 segmentor ``checkpoint`` to ONNX at ``out`` (default: next to it, ``.onnx``).

    height / width: the fixed input size (default: the training crop in the file's config, else the
    encoder's input size; give one and the other defaults to it). opset: default 17 (torchscript)
    or 18 (dynamo). verify: run onnxruntime on random batches of each size in ``verify_batches``
    and record the max abs difference to PyTorch per batch size (skipped with a note when
    onnxruntime is not installed). A stage-1/2 encoder file goes to ``export_encoder_onnx``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    checkpoint = Path(checkpoint)
    if _is_encoder_file(checkpoint):  # stage-1/2 file: the encoder's multi-level maps (no decoder)
        return export_encoder_onnx(checkpoint, out, height=height, width=width, opset=opset, exporter=exporter,
                                   verify=verify, verify_batches=verify_batches, seed=seed)
    segmentor, metadata = load_stage3(checkpoint)
    segmentor.eval()
    height, width, opset = _size_and_opset(height, width, _default_size(segmentor, metadata), opset, exporter,
                                           DEFAULT_OPSET)
    path = Path(out) if out is not None else checkpoint.with_suffix(".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)

    wrapper = _ScoresOnly(segmentor).eval()
    example = torch.rand(TRACE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with atomic_path(path) as tmp:  # a failed export leaves no file behind
        try:
            with _constant_position_tables(segmentor, height, width):
                _trace(wrapper, example, tmp, exporter, opset)
        except ImportError:
            raise
        except NotImplementedError as e:  # e.g. a RoPE student at another size than its training size
            raise RuntimeError(f"cannot export {checkpoint} at {height}x{width}: {e}") from e
        except Exception as e:
            decoder = getattr(segmentor, "decoder_name", "?")
            other = "dynamo" if exporter == "torchscript" else "torchscript"
            raise RuntimeError(f"ONNX export of the {decoder!r} segmentor failed with the {exporter} exporter "
                               f"(opset {opset}): {type(e).__name__}: {e}. Try --exporter {other}.") from e
        finally:
            segmentor.eval()  # the legacy exporter restores the wrapper's training flag afterwards
    props = _metadata_props(segmentor, metadata, checkpoint, height, width, exporter)
    _write_metadata(path, props, doc=f"GKD segmentor exported from {checkpoint.name}. {props['gkd_input']}. "
                                     f"{props['gkd_output']}.")

    result = ExportResult(path=path, height=height, width=width, exporter=exporter, opset=opset,
                          num_classes=int(segmentor.num_classes))
    if not verify:
        result.note = "not verified (--no-verify)"
    elif importlib.util.find_spec("onnxruntime") is None:
        result.note = "not verified: onnxruntime is not installed (pip install onnxruntime)"
    else:
        result.max_abs_diff = _verify(segmentor, path, height, width, verify_batches, seed + 1)
        result.verified = True
    return result


# ------------------------------------------------------------------------------------------------
# encoder-only export (a stage-1/2 encoder.safetensors)

ENCODER_OUTPUTS = ("feat4", "feat8", "feat16", "feat32")  # = gkd.api.MAP_NAMES, the decoder inputs
ENCODER_OPSET = {"torchscript": 18, "dynamo": 18}  # 18: Resize with antialias (dynamic position tables)


def _off_grid_size(features: Any) -> tuple[int, int]:
    """An input size one divisor (ViT: patch) row and two columns past the encoder's training size."""
    d = int(features.size_divisor)
    h, w = (int(s) for s in features.encoder.img_size)
    return h + d, w + 2 * d


def _is_encoder_file(path: Path) -> bool:
    """True for an intact gkd handoff file whose spec is a student's (no decoder); anything else
    (missing, damaged, a segmentor) goes the segmentor way, whose loader explains it."""
    from gkd.handoff import is_handoff, read_metadata
    from gkd.models.segmentor import is_segmentor_spec

    if not path.is_file() or not is_handoff(path):
        return False
    spec = read_metadata(path).get("gkd_spec")
    return isinstance(spec, dict) and not is_segmentor_spec(spec)


@dataclass
class EncoderExportResult(ExportResult):
    """What ``export_encoder_onnx`` wrote: ``shapes`` are the four output maps' [C, h, w]."""

    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    dynamic_size: bool = False
    verified_sizes: list[tuple[int, int]] = field(default_factory=list)

    def format(self) -> str:
        outs = ", ".join(f"{k} [B,{c},{h},{w}]" for k, (c, h, w) in self.shapes.items())
        size = "batch, height and width dynamic" if self.dynamic_size else "batch dynamic, size fixed"
        line = (f"wrote {self.path}: images float32 [B,3,{self.height},{self.width}] RGB in [0,1] -> {outs} "
                f"(at {self.height}x{self.width}); {size} ({self.exporter} exporter, opset {self.opset})")
        if self.verified:
            diffs = ", ".join(f"batch {b}: {d:.3g}" for b, d in self.max_abs_diff.items())
            at = " and ".join(f"{h}x{w}" for h, w in self.verified_sizes)
            line += f"\nonnxruntime vs PyTorch max abs difference (all outputs, at {at}): {diffs}"
        if self.note:
            line += f"\n{self.note}"
        return line


class _MapsOnly(nn.Module):
    """``images [B,3,H,W] in [0,1] -> (feat4, feat8, feat16, feat32)``: the segmentor feature path
    (normalise, pad to the size divisor, the 4 levels) of a decoder-less segmentor shell."""

    def __init__(self, features: nn.Module, pad_in_graph: bool = False) -> None:
        super().__init__()
        self.features = features
        self.pad_in_graph = pad_in_graph

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.pad_in_graph:
            images = self._pad_to_divisor(images)
        return tuple(self.features.distill_outputs(images, logits=False)[1].features)

    def _pad_to_divisor(self, images: Tensor) -> Tensor:
        """Pad bottom/right to multiples of the size divisor with the per-channel mean (normalised:
        exactly 0, the segmentor's padding), with pad amounts computed from the traced shape: the
        segmentor's own padding is a Python branch that tracing would freeze at the traced size."""
        d = int(self.features.size_divisor)
        ph, pw = (d - images.shape[-2] % d) % d, (d - images.shape[-1] % d) % d
        mean = self.features.mean
        return F.pad(images - mean, (0, pw, 0, ph)) + mean


def _aa_bicubic_symbolic(g: Any, x: Any, output_size: Any, *rest: Any) -> Any:
    """ONNX for ``aten::_upsample_bicubic2d_aa`` (timm's position-table resampling): opset-18 Resize
    with antialias, cubic a = -0.5, taps outside the input excluded and renormalised, half-pixel
    centres: PyTorch's (PIL's) antialiased bicubic filter, with the output size from the graph."""
    shape = g.op("Shape", x)
    batch_channels = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])),
                          g.op("Constant", value_t=torch.tensor([2])))
    sizes = g.op("Concat", batch_channels, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7: int64
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, sizes, mode_s="cubic", cubic_coeff_a_f=-0.5, antialias_i=1,
                exclude_outside_i=1, coordinate_transformation_mode_s="half_pixel")


@contextlib.contextmanager
def _antialiased_resize_symbolic(opset: int) -> Iterator[None]:
    """Register ``_aa_bicubic_symbolic`` for the legacy exporter while exporting, then remove it."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _aa_bicubic_symbolic, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::_upsample_bicubic2d_aa", opset)


def _dynamic_size_refusal(student: Any, exporter: str, opset: int) -> str | None:
    """Why this encoder cannot get a dynamic H×W graph (None: it can)."""
    if getattr(student.encoder, "rope", None) is not None:
        return (f"{student.name} uses RoPE (EVA-02-style): its rotary table is built for one grid, so it "
                f"exports at its training size {tuple(student.img_size)} only")
    if exporter != "torchscript":
        return "the dynamo exporter exports a fixed size (dynamic H×W uses the torchscript exporter)"
    if opset < 18:
        return f"opset {opset} has no antialiased Resize (dynamic H×W needs opset 18 or newer)"
    return None


def export_encoder_onnx(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    opset: int | None = None,
    exporter: str = "torchscript",
    verify: bool = True,
    verify_batches: Sequence[int] = (1, 3),
    seed: int = 0,
    fixed_size: bool = False,
) -> EncoderExportResult:
    """Export the stage-1/2 encoder ``checkpoint`` to ONNX: input ``images`` float32 [B,3,H,W] RGB in
    [0,1] (the file's input normalisation and the padding to the patch size, or 32 for CNNs, inside
    the graph); outputs ``feat4``, ``feat8``, ``feat16``, ``feat32`` [B,C,H'/s,W'/s] (H', W' padded),
    the four maps a stage-3 decoder reads (``gkd.api``'s ``embed(..., output="maps")``: default feature
    levels, no feature norm).

    Sizes: batch is always dynamic. With the torchscript exporter at opset >= 18 (the default) H and
    W are dynamic too, for CNN students and for ViT students with absolute position embeddings: the
    ViT's position table is resampled to each token grid inside the graph (timm's antialiased bicubic
    rule, written as an antialiased ONNX Resize, ``_aa_bicubic_symbolic``) and the padding to the
    size divisor is computed from the input shape. Otherwise (RoPE/EVA-02 students, the dynamo
    exporter, ``fixed_size``) H×W
    is fixed at ``height`` x ``width`` (default: the encoder's input size; the position table
    resampled for it is a graph constant, as for segmentors), and the reason is in ``result.note``;
    a RoPE student at another size than its training size is refused (RuntimeError).
    verify: onnxruntime vs PyTorch on random batches of ``verify_batches`` at ``height`` x ``width``
    and, for a dynamic graph, also at the traced size (another token grid).
    """
    from gkd.api import load

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    checkpoint = Path(checkpoint)
    loaded = load(checkpoint)
    default = tuple(int(s) for s in loaded.student.img_size)
    height, width, opset = _size_and_opset(height, width, default, opset, exporter, ENCODER_OPSET)
    path = Path(out) if out is not None else checkpoint.with_suffix(".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    fixed_why = None if fixed_size else _dynamic_size_refusal(loaded.student, exporter, opset)
    dynamic = not fixed_size and fixed_why is None
    wrapper = _MapsOnly(loaded.features, pad_in_graph=dynamic).eval()

    # A dynamic graph is traced at a size whose token grid differs from the training grid, so that
    # the position-table resampling (a Python branch in the student) is in the graph.
    trace_hw = _off_grid_size(loaded.features) if dynamic else (height, width)
    example = torch.rand(TRACE_BATCH, 3, *trace_hw, generator=torch.Generator().manual_seed(seed))
    names = list(ENCODER_OUTPUTS)
    dyn_axes = {"images": {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}}
    for n, st in zip(names, (4, 8, 16, 32)):
        dyn_axes[n] = {0: "batch", 2: f"height/{st}", 3: f"width/{st}"} if dynamic else {0: "batch"}
    with atomic_path(path) as tmp:
        try:
            tables = contextlib.nullcontext() if dynamic else _constant_position_tables(wrapper, height, width)
            symbolic = _antialiased_resize_symbolic(opset) if dynamic else contextlib.nullcontext()
            with tables, symbolic:
                _trace(wrapper, example, tmp, exporter, opset, names, dyn_axes)
        except ImportError:
            raise
        except NotImplementedError as e:  # a RoPE student at another size than its training size
            raise RuntimeError(f"cannot export {checkpoint} at {height}x{width}: {e}") from e
        except Exception as e:
            raise RuntimeError(f"ONNX export of the encoder {checkpoint} failed with the {exporter} exporter "
                               f"(opset {opset}): {type(e).__name__}: {e}") from e
        finally:
            wrapper.eval()
    with torch.no_grad():
        maps = wrapper(torch.zeros(1, 3, height, width))
    shapes = {n: tuple(int(d) for d in m.shape[1:]) for n, m in zip(names, maps)}
    from gkd.handoff import file_sha256

    meta, norm = loaded.metadata, loaded.input_norm
    props = {
        "gkd_input": ("images: float32 [B,3,H,W], RGB in [0,1] (no normalisation: mean/std in gkd_input_norm "
                      "are applied inside the graph); " + (
                          "B, H and W are dynamic (sides padded to multiples of the patch size inside)" if dynamic
                          else f"B is dynamic, H x W is fixed at {height} x {width}")),
        "gkd_output": "; ".join(f"{k}: float32 [B,{c},{h},{w}]" for k, (c, h, w) in shapes.items())
                      + f" at {height} x {width} (the stride-4/8/16/32 maps a gkd segmentor decoder reads; "
                        "sides = padded input sides / stride)",
        "gkd_dynamic_size": "true" if dynamic else "false",
        "gkd_input_norm": json.dumps({**norm, "applied": "inside the graph"}),
        "gkd_input_size": json.dumps([height, width]),
        "gkd_layers": json.dumps(loaded.features.layers),
        "gkd_spec": json.dumps(meta.get("gkd_spec"), sort_keys=True),
        "gkd_stage": str(meta.get("gkd_stage", "")),
        "gkd_version": str(meta.get("gkd_version", "")),
        "gkd_source": checkpoint.name,
        "gkd_source_sha256": file_sha256(checkpoint),
        "gkd_exporter": exporter,
    }
    _write_metadata(path, props, doc=f"GKD encoder exported from {checkpoint.name}. {props['gkd_input']}. "
                                     f"{props['gkd_output']}.")
    result = EncoderExportResult(path=path, height=height, width=width, exporter=exporter, opset=opset,
                                 num_classes=0, shapes=shapes, dynamic_size=dynamic)
    notes = [f"fixed size: {fixed_why}"] if fixed_why else []
    if dynamic:
        notes.append(f"any H×W works (padded to multiples of {loaded.features.size_divisor} inside the graph)")
    if not verify:
        notes.append("not verified (--no-verify)")
    elif importlib.util.find_spec("onnxruntime") is None:
        notes.append("not verified: onnxruntime is not installed (pip install onnxruntime)")
    else:
        # a dynamic graph is checked at the asked size and at the traced one (another token grid)
        result.verified_sizes = [(height, width)] + ([trace_hw] if dynamic and trace_hw != (height, width) else [])
        for i, (h, w) in enumerate(result.verified_sizes):
            for b, d in _verify(wrapper, path, h, w, verify_batches, seed + 1 + i, ENCODER_OUTPUTS).items():
                result.max_abs_diff[b] = max(d, result.max_abs_diff.get(b, 0.0))
        result.verified = True
    result.note = "\n".join(notes)
    return result
