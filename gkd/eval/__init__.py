"""Evaluation: `SegMetric`, sliding-window inference, domain-generalization suites and their report.

Names are imported lazily (PEP 562) so that ``import gkd.eval`` stays cheap for the CLI.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # gkd.eval.metrics
    "SegMetric": "metrics",
    # gkd.eval.inference
    "predict": "inference",
    "slide_inference": "inference",
    "whole_inference": "inference",
    "window_grid": "inference",
    "coverage_count": "inference",
    "keep_ratio_size": "inference",
    # gkd.eval.suite
    "Suite": "suite",
    "Target": "suite",
    "SuiteError": "suite",
    "load_suite": "suite",
    "parse_suite": "suite",
    "prepare_targets": "suite",
    "run_eval": "suite",
    # gkd.eval.report
    "write_report": "report",
    "read_results": "report",
    "merge_results": "report",
    "main_table": "report",
    # gkd.eval.visualize
    "save_prediction": "visualize",
    "colorize": "visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gkd.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
