"""Stage 1: task-agnostic distillation of a frozen VFM teacher into a student on ImageNet shards.

    accelerate launch stages/stage1.py --config configs/stage1/<experiment>.yaml [key=value ...]

Writes `<out_dir>/encoder.safetensors`, plus config.yaml, metrics.jsonl and checkpoints/.
"""
import sys

from gkd.engine.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(1))
