"""User-facing tools on a stage-3 ``segmentor.safetensors``.

* ``predict_paths(checkpoint, inputs, out_dir, ...)`` (``gkd predict``): coloured palette masks and
  overlays for images or folders of images, batched, with progress; unreadable images are skipped and
  reported in the returned ``PredictSummary``.
* ``export_onnx(checkpoint, out=None, ...)`` (``gkd export --format onnx``): an ONNX model of the
  segmentor's forward (float RGB [B,3,H,W] in [0,1] -> scores [B,K,H,W]; dynamic batch, fixed H/W),
  checked against PyTorch with onnxruntime when it is installed.

* ``write_teacher_encoder`` (``gkd teacher-encoder``), ``write_student_encoder``: encoder files for
  the teacher segmentor and for task-level distillation's student.
* ``run_compare`` (``gkd compare``): methods at one matched compute budget → table + plot.

Names are imported lazily so that ``import gkd.tools`` stays cheap for the CLI.
"""
from __future__ import annotations

from gkd._lazy import lazy_exports


_EXPORTS = {
    "predict_paths": "predict",
    "PredictSummary": "predict",
    "collect_images": "predict",
    "resolve_palette": "predict",
    "load_stage3": "predict",
    "export_onnx": "export",
    "ExportResult": "export",
    "write_teacher_encoder": "encoders",
    "write_student_encoder": "encoders",
    "write_baseline_encoder": "encoders",
    "run_compare": "compare",
    "compare_table": "compare",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
