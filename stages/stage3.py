"""Stage 3: train a segmentation decoder on the frozen stage-2 encoder with source-domain labels.

    accelerate launch stages/stage3.py --config configs/stage3/<experiment>.yaml encoder=<run>/encoder.safetensors

Writes `<out_dir>/segmentor.safetensors` for `gkd eval`, plus config.yaml, metrics.jsonl, checkpoints/.
"""
import sys

from gkd.engine.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(3))
