"""Stage 2: distillation on source-domain images (no labels), starting from a stage-1 encoder.

    accelerate launch stages/stage2.py --config configs/stage2/<experiment>.yaml [key=value ...]

Writes `<out_dir>/encoder.safetensors`, plus config.yaml, metrics.jsonl and checkpoints/.
"""
from gkd.engine.runner import run_stage

if __name__ == "__main__":
    run_stage(2)
