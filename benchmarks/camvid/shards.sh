#!/usr/bin/env bash
# The CamVid mini-benchmark's shards (once): 1000 ImageNet samples for stage 1, CamVid train images
# (sequences 0006R0 + 0016E5, no labels) for stage 2. OUT and DATA come from the caller.
set -euo pipefail
OUT=${OUT:-runs/bench-camvid}
DATA=${DATA:-../shared/data}
[ -f "$OUT/imagenet-wds/train-index.json" ] || gkd data shard "$DATA/imagenet_sample" "$OUT/imagenet-wds" --shard-size 250
[ -f "$OUT/camvid-wds/train-index.json" ] || gkd data shard "$DATA/camvid" "$OUT/camvid-wds" --manifest camvid --split train --shard-size 160
