"""Stage 1: task-agnostic distillation of a frozen VFM teacher into a student on ImageNet shards.

    accelerate launch stages/stage1.py --config configs/stage1/dinov2b_to_vits.yaml \
        data.train_shards='/data/imagenet-wds/train-{000000..001281}.tar' out_dir=runs/s1

Writes `<out_dir>/encoder.safetensors` for stage 2, plus config.yaml, metrics.jsonl, checkpoints/.
"""
import logging
import sys

from gkd.config import ConfigError, DistillConfig, parse_cli
from gkd.engine import train_distill


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file otherwise
    try:
        cfg = parse_cli(DistillConfig, argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if cfg.stage != 1:
        sys.exit(f"config error: stages/stage1.py got stage={cfg.stage}")
    train_distill(cfg)


if __name__ == "__main__":
    main()
