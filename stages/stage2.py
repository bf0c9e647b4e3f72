"""Stage 2: distillation on source-domain images (no labels), starting from a stage-1 encoder.

    accelerate launch stages/stage2.py --config configs/stage2/<experiment>.yaml [key=value ...]

Writes `<out_dir>/encoder.safetensors`, plus config.yaml, metrics.jsonl and checkpoints/.
"""
import sys

from gkd.engine.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(2))
