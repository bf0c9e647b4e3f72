"""Stage 3: train a segmentation decoder on the frozen stage-2 encoder with source-domain labels.

    accelerate launch stages/stage3.py --config configs/stage3/<experiment>.yaml encoder=<run>/encoder.safetensors

Writes `<out_dir>/segmentor.safetensors` for `gkd eval`, plus config.yaml, metrics.jsonl, checkpoints/.
"""
from gkd.engine.runner import run_stage

if __name__ == "__main__":
    run_stage(3)
