"""What `stages/stageN.py` and `gkd stageN` run: parse the config, check it fits the stage, train."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from gkd.config import ConfigError, DistillConfig, SegmentConfig, parse_cli
from gkd.engine.common import setup_logging


def run_stage(stage: int, argv: Sequence[str] | None = None) -> Path:
    """Run stage 1, 2 or 3 from `[--config FILE ...] [key=value ...]`; return the handoff file."""
    setup_logging()
    try:
        if stage not in (1, 2, 3):
            raise ConfigError(f"unknown stage {stage}")
        schema = DistillConfig if stage < 3 else SegmentConfig
        cfg = parse_cli(schema, argv, base={"stage": stage, "out_dir": f"runs/stage{stage}"})
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if cfg.stage != stage:
        sys.exit(f"config error: this entry point runs stage {stage}, the config says stage={cfg.stage}")
    if stage == 2 and not cfg.init:
        sys.exit("config error: stage 2 starts from a stage-1 encoder: pass init=<run>/encoder.safetensors")
    if stage == 3:
        from gkd.engine.segment import train_segmentor

        return train_segmentor(cfg)
    from gkd.engine.distill import train_distill

    return train_distill(cfg)
