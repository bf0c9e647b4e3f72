#!/usr/bin/env bash
# CamVid mini-benchmark at one matched wall-clock budget: no distillation, the teacher, GKD and every
# task-level KD loss (benchmarks/camvid/compare.yaml), then the table and plot in runs/compare-camvid/.
#   bash benchmarks/camvid/compare.sh [key=value ...]     e.g. budget.amount=120 eval.limit=20
# About 10 × (budget + 15 s) + evaluation; rows already trained are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${GKD_SHARED_DATA:-../shared/data} OUT=runs/bench-camvid bash benchmarks/camvid/shards.sh
gkd compare --plan benchmarks/camvid/compare.yaml "$@"
