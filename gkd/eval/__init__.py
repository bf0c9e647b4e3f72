"""Evaluation: `SegMetric`, sliding-window inference, domain-generalization suites, their report, the
protocol check and test-server exports.

Names are imported lazily (PEP 562) so that ``import gkd.eval`` stays cheap for the CLI.
"""
from __future__ import annotations

from gkd._lazy import lazy_exports


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
    # gkd.eval.targets
    "Suite": "targets",
    "Target": "targets",
    "SuiteError": "targets",
    "load_suite": "targets",
    "parse_suite": "targets",
    # gkd.eval.suite
    "prepare_targets": "suite",
    "run_eval": "suite",
    # gkd.eval.report
    "write_report": "report",
    "read_results": "report",
    "merge_results": "report",
    "main_table": "report",
    "seed_groups": "report",
    "mean_std": "report",
    # gkd.eval.protocol
    "ProtocolError": "protocol",
    "check_targets": "protocol",
    "split_uses": "protocol",
    # gkd.eval.submission
    "export_submission": "submission",
    "SERVER_FORMATS": "submission",
    # gkd.eval.visualize
    "save_prediction": "visualize",
    "colorize": "visualize",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
