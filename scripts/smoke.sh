#!/usr/bin/env bash
# The whole pipeline on real images, offline, on a CPU, with tiny randomly initialised models:
# stage 1 on ImageNet samples → stage 2 on CamVid images → stage 3 on CamVid labels → evaluation on
# the seen (0016E5) and unseen (Seq05VD) CamVid sequences. It checks that everything runs and hands
# over; with random teachers the numbers mean nothing. Outputs go to runs/smoke-*.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${GKD_SHARED_DATA:-../shared/data}
launch=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

gkd data shard "$DATA/imagenet_sample" runs/smoke-data --shard-size 250
"${launch[@]}" stages/stage1.py --config configs/stage1/smoke.yaml
gkd data shard "$DATA/camvid" runs/smoke-camvid --manifest camvid --split train --shard-size 160
"${launch[@]}" stages/stage2.py --config configs/stage2/smoke.yaml
"${launch[@]}" stages/stage3.py --config configs/stage3/smoke.yaml data.root="$DATA/camvid"
gkd eval runs/smoke-stage3/segmentor.safetensors --suite camvid --root camvid="$DATA/camvid" --out runs/smoke-eval
echo "report: runs/smoke-eval/results.md"
