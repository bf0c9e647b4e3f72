"""What `stages/stageN.py` and `gkd stageN` run: parse the config, check it fits the stage, train."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from gkd.config import ConfigError, DistillConfig, parse_cli
from gkd.engine.common import setup_logging


def run_stage(stage: int, argv: Sequence[str] | None = None) -> Path:
    """Run stage 1, 2 or 3 from `[--config FILE ...] [key=value ...]`; return the handoff file."""
    setup_logging()
    try:
        if stage in (1, 2):
            cfg = parse_cli(DistillConfig, argv, base={"stage": stage, "out_dir": f"runs/stage{stage}"})
        else:
            raise ConfigError(f"unknown stage {stage}")
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if cfg.stage != stage:
        sys.exit(f"config error: this entry point runs stage {stage}, the config says stage={cfg.stage}")
    if stage == 2 and not cfg.init:
        sys.exit("config error: stage 2 starts from a stage-1 encoder: pass init=<run>/encoder.safetensors")
    from gkd.engine.distill import train_distill

    return train_distill(cfg)
