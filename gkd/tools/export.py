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
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from gkd.atomic import atomic_path

from .predict import config_data, load_stage3, resolve_palette, trained_crop_size

_log = logging.getLogger(__name__)

__all__ = ["ExportResult", "export_onnx", "EXPORTERS"]

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


def _trace(wrapper: nn.Module, example: Tensor, path: Path, exporter: str, opset: int) -> None:
    if exporter == "torchscript":
        with warnings.catch_warnings(), _one_step_linspace():
            # Expected while tracing: shape-dependent Python branches are fixed at the export size,
            # and torch's notice that this exporter is the legacy one.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=["images"], output_names=["scores"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}},
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
            input_names=["images"], output_names=["scores"], dynamic_shapes=({0: batch},), verbose=False,
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


def _verify(segmentor: nn.Module, path: Path, height: int, width: int, batches: Sequence[int],
            seed: int) -> dict[int, float]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batches:
        x = torch.rand(int(b), 3, height, width, generator=gen)
        with torch.no_grad():
            ref = segmentor(x).float().numpy()
        got = session.run(["scores"], {"images": x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"onnxruntime returned {got.shape} for batch {b}, PyTorch {ref.shape}")
        diffs[int(b)] = float(np.abs(got - ref).max())
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
    onnxruntime is not installed). Stage-1/2 encoder files are refused.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    checkpoint = Path(checkpoint)
    segmentor, metadata = load_stage3(checkpoint)
    segmentor.eval()
    if height is None and width is None:
        height, width = _default_size(segmentor, metadata)
    height = int(height if height is not None else width)
    width = int(width if width is not None else height)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    opset = int(opset) if opset is not None else DEFAULT_OPSET[exporter]
    if exporter == "dynamo" and opset < 18:
        raise ValueError("the dynamo exporter needs opset 18 or newer")
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
