"""What `stages/stageN.py` and `gkd stageN` run: parse the config, check it fits the stage, train.

`seeds=[0,1,2]` runs the stage once per seed into `<out_dir>/seed<k>/` and writes `<out_dir>/seeds.json`
({"stage", "seeds", "runs": [handoff file per seed]}). Such a folder can be the parent of the next
stage (`init=` / `encoder=`): each seed then starts from the parent run of the same seed. `gkd eval`
takes the folder as one group of runs and reports mean ± std over them.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from gkd.config import ConfigError, DistillConfig, SegmentConfig, check_world, parse_cli
from gkd.atomic import check_writable
from gkd.engine.trainer import reset_accelerate_state
from gkd.errors import error_boundary
from gkd.logs import setup_logging

SEEDS_FILE = "seeds.json"


def stage_main(stage: int, argv: Sequence[str] | None = None) -> int:
    """`gkd stageN` and `stages/stageN.py`: run the stage inside the error boundary; the exit status."""
    def run() -> int:
        path = run_stage(stage, argv)
        if os.environ.get("RANK", "0") == "0":
            print(path)
        return 0

    return error_boundary(run)


def run_stage(stage: int, argv: Sequence[str] | None = None) -> Path:
    """Run stage 1, 2 or 3 from `[--config FILE ...] [key=value ...]`; return the handoff file.

    Every check a config can fail runs here, before any model or dataset is built: the schema and
    its values (`gkd.config`), the stage, stage 2's parent, and the batch split over the processes
    `accelerate launch` started (WORLD_SIZE)."""
    setup_logging()
    if stage not in (1, 2, 3):
        raise ConfigError(f"unknown stage {stage}")
    schema = DistillConfig if stage < 3 else SegmentConfig
    cfg = parse_cli(schema, argv, base={"stage": stage, "out_dir": f"runs/stage{stage}"})
    if cfg.stage != stage:
        raise ConfigError(f"this entry point runs stage {stage}, the config says stage={cfg.stage}")
    if cfg.seeds:
        return _run_seeds(stage, cfg, list(argv if argv is not None else sys.argv[1:]))
    if stage == 2 and not cfg.init:
        raise ConfigError("stage 2 starts from a stage-1 encoder: pass init=<run>/encoder.safetensors")
    check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_writable(cfg.out_dir, "out_dir")
    if stage == 3:
        from gkd.engine.segment import train_segmentor as train
    else:
        from gkd.engine.distill import train_distill as train
    return train(cfg)


def _run_seeds(stage: int, cfg, argv: list[str]) -> Path:
    """One run per seed (later overrides win over `argv`'s), then the folder's seeds.json."""
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds has repeats: {list(cfg.seeds)}")
    runs = []
    for seed in cfg.seeds:
        runs.append(str(run_stage(stage, [*argv, *seed_overrides(stage, cfg, seed)])))
        reset_accelerate_state()  # the next run builds its own Accelerator
    path = Path(cfg.out_dir) / SEEDS_FILE
    path.write_text(json.dumps({"stage": stage, "seeds": list(cfg.seeds), "runs": runs}, indent=2) + "\n")
    return path


def seed_overrides(stage: int, cfg, seed: int) -> list[str]:
    """The overrides of seed `seed`'s run of a multi-seed stage config: its seed and folder
    (`<out_dir>/seed<k>`) and, when the parent (`init=` / stage 3's `encoder=`) is a multi-seed
    folder, the parent's run of the same seed (a parent file is every seed's)."""
    extra = [f"seed={seed}", f"out_dir={Path(cfg.out_dir) / f'seed{seed}'}", "seeds=[]"]
    key = "encoder" if stage == 3 else "init"
    if cfg.get(key) and Path(cfg.get(key)).is_dir():
        extra.append(f"{key}={seed_run(cfg.get(key), seed)}")
    return extra


def seed_runs(folder: str | Path) -> dict[int, Path]:
    """seed → handoff file of a multi-seed run folder (its seeds.json); an error naming what is missing."""
    path = Path(folder) / SEEDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is a folder but not a multi-seed run (no {SEEDS_FILE}); "
                                "give a .safetensors file or run the stage with seeds=[...]")
    record = json.loads(path.read_text())
    runs = {int(s): Path(r) for s, r in zip(record["seeds"], record["runs"])}
    absent = [str(r) for r in runs.values() if not r.is_file()]
    if absent:
        raise FileNotFoundError(f"{path} lists runs that are not on disk: {', '.join(absent)}")
    return runs


def seed_run(folder: str | Path, seed: int) -> Path:
    runs = seed_runs(folder)
    if seed not in runs:
        raise FileNotFoundError(f"{folder} has no run of seed {seed} (seeds: {sorted(runs)})")
    return runs[seed]
