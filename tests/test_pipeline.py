"""Stage 1 → 2 → 3 → `gkd eval` end to end on generated data in a `folder` layout.

Stages 1 and 2 run in this process; stage 3 and the evaluation run through `accelerate launch`
with 2 CPU processes (real DDP / distributed metric reduction), as a user would run them.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gkd.config import DistillConfig, load_config
from gkd.engine import read_metadata, train_distill
from gkd.handoff import file_sha256
from gkd.eval import run_eval
from helpers import TINY, reset_accelerate

REPO = Path(__file__).resolve().parents[1]
def _launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_stage1_to_eval(tmp_path, shards, folder_dataset):
    root, manifest, suite = folder_dataset

    # stage 1: ImageNet-style shards
    s1 = train_distill(load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}",
                                                     f"out_dir={tmp_path / 's1'}", "optim.epochs=1"]))
    reset_accelerate()

    # stage 2: the source domain's images, sharded through its manifest (no labels)
    subprocess.run([sys.executable, "-m", "gkd.cli", "data", "shard", str(root), str(tmp_path / "src-wds"),
                    "--manifest", str(manifest), "--split", "train", "--shard-size", "12"], check=True)
    index = json.loads((tmp_path / "src-wds" / "train-index.json").read_text())
    assert sum(index["counts"]) == 24
    stage2 = [o for o in TINY if not o.startswith("student.")]
    s2 = train_distill(load_config(DistillConfig, [], [
        *stage2, "stage=2", f"init={s1}", "data.img_size=64", "teacher.patch_size=16", "optim.epochs=2",
        f"data.train_shards={tmp_path}/src-wds/train-{{000000..000001}}.tar", f"out_dir={tmp_path / 's2'}"]))
    reset_accelerate()
    meta2 = read_metadata(s2)
    assert meta2["gkd_stage"] == 2 and meta2["gkd_parent_sha256"] == file_sha256(s1)

    # stage 3 on 2 processes: MLP decoder on the frozen stage-2 encoder, half of the labels
    out3 = tmp_path / "s3"
    _launch(str(REPO / "stages" / "stage3.py"), f"encoder={s2}", f"data.manifest={manifest}", f"data.root={root}",
            "decoder.name=mlp", "decoder.kwargs.channels=32", "data.crop_size=64", "data.short_edges=null", "data.scale=[128,64]",
            "data.batch_size=4", "data.num_workers=0", "data.fraction=0.5", "optim.iters=12", "optim.lr=1e-3",
            "engine.log_every=2", "engine.save_every=6", f"out_dir={out3}")
    seg_path = out3 / "segmentor.safetensors"
    meta3 = read_metadata(seg_path)
    assert meta3["gkd_stage"] == 3 and meta3["gkd_parent_sha256"] == file_sha256(s2)
    encoder_weights, seg_weights = load_file(str(s2)), load_file(str(seg_path))
    for k, v in encoder_weights.items():  # the frozen encoder is bit-identical
        torch.testing.assert_close(seg_weights[f"encoder.{k}"], v, rtol=0, atol=0, msg=k)
    subset = (out3 / "train_subset.txt").read_text().split()
    assert len(subset) == 12 and len(set(subset)) == 12  # label-efficient: half of 24, recorded
    records = [json.loads(x) for x in (out3 / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("event") == "end"][0]["encoder_unchanged"] is True

    # gkd eval on 2 processes; the reduced metrics equal a single-process evaluation
    _launch("-m", "gkd.cli", "eval", str(seg_path), "--suite", str(suite), "--out", str(tmp_path / "eval"),
            "--root", f"shapes={root}", "--workers", "0")
    for name in ("results.md", "results.csv", "metrics.json"):
        assert (tmp_path / "eval" / name).is_file(), name
    two = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"][0]["datasets"]["Shapes val"]
    reset_accelerate()
    one = run_eval(seg_path, suite, tmp_path / "eval1", roots={"shapes": str(root)}, num_workers=0)
    one = one["models"][0]["datasets"]["Shapes val"]
    assert two["num_images"] == one["num_images"] == 6
    assert two["mIoU"] == pytest.approx(one["mIoU"]) and two["aAcc"] == pytest.approx(one["aAcc"])
    rows = list(csv.reader((tmp_path / "eval" / "results.csv").open()))
    assert rows[0][-1] == "Shapes val" or "Shapes val" in rows[0]
    assert float(rows[1][rows[0].index("Shapes val")]) == pytest.approx(round(one["mIoU"], 1))
