"""Logging set-up for the command line and the stage entry points (no torch: `gkd --help` stays fast)."""
from __future__ import annotations

import logging


def setup_logging() -> None:
    """INFO lines with time, level and logger name; accelerate's per-file checkpoint lines silenced."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file otherwise
