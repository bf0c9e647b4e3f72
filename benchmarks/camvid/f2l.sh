#!/usr/bin/env bash
# CamVid foundation-to-local benchmark, 3 seeds (benchmarks/camvid/f2l.yaml): every row at one matched
# wall-clock budget (600 s of training by default, summed over its stages), then mean ± std over the seeds.
#   bash benchmarks/camvid/f2l.sh [key=value ...]     e.g. budget.amount=300
# Two seeds run at a time, one thread each (OMP_NUM_THREADS=1): about 2.5 h on 2 cores. The teacher segmentor
# is trained once (seed 0) and shared by the task-level rows of every seed. Finished rows are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=benchmarks/camvid
OUT=${OUT:-runs/camvid-f2l}
DATA=${GKD_SHARED_DATA:-../shared/data} OUT=runs/bench-camvid bash $B/shards.sh
export OMP_NUM_THREADS=1
TEACHER=$OUT/seed0/teacher/s3/segmentor.safetensors

seed_run() {  # seed_run K: the rows of seed K (K > 0 waits for seed 0's teacher before its task-level rows)
  local k=$1; shift
  local plan=(--plan $B/f2l.yaml seed=$k out_dir=$OUT/seed$k "$@")
  if [ "$k" != 0 ]; then
    gkd compare "${plan[@]}" 'methods=[student,gkd,proteus]' baseline=student
    while [ ! -f "$TEACHER" ]; do sleep 30; done
    plan+=(teacher_segmentor=$TEACHER)
  fi
  gkd compare "${plan[@]}"
}

seed_run 0 "$@" > $OUT-seed0.log 2>&1 &
seed_run 1 "$@" > $OUT-seed1.log 2>&1
wait
seed_run 2 "$@" > $OUT-seed2.log 2>&1
python $B/summarize_f2l.py $OUT
