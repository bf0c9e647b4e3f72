"""Stage 1: task-agnostic distillation of a frozen VFM teacher into a student on ImageNet shards.

    accelerate launch stages/stage1.py --config configs/stage1/<experiment>.yaml [key=value ...]

Writes `<out_dir>/encoder.safetensors`, plus config.yaml, metrics.jsonl and checkpoints/.
"""
from gkd.engine.runner import run_stage

if __name__ == "__main__":
    run_stage(1)
