"""Stage 1 end to end on tiny models and real-layout shards: learning, resume, bad input, DDP."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gkd.config import DistillConfig, load_config
from gkd.data import write_shards
from gkd.engine import NonFiniteLossError, load_handoff, read_metadata, train_distill
from gkd.models import build_student_from_spec
from helpers import TINY, make_images, reset_accelerate

REPO = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE = REPO.parent / "shared" / "data" / "imagenet_sample"

def _cfg(out_dir: Path, shards: str, *extra: str) -> DistillConfig:
    return load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={out_dir}", *extra])


def _records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage1_learns_and_hands_over(tmp_path, shards):
    out = tmp_path / "run"
    path = train_distill(_cfg(out, shards, "optim.epochs=6"))
    steps = [r for r in _records(out) if "loss" in r]
    assert len(steps) == 6 * 48 // 8
    first, last = np.mean([r["loss"] for r in steps[:3]]), np.mean([r["loss"] for r in steps[-3:]])
    assert last < 0.9 * first, (first, last)
    for r in steps:  # the reported total is the sum of its terms (all weights 1)
        assert r["loss"] == pytest.approx(r["loss_token"] + r["loss_fea"] + r["loss_patch"], rel=1e-5)
    assert (out / "config.yaml").is_file() and "vit_tiny_patch16_224" in (out / "config.yaml").read_text()

    meta = read_metadata(path)
    assert meta["gkd_stage"] == 1 and meta["gkd_config"]["out_dir"] == str(out)
    student = build_student_from_spec(meta["gkd_spec"])
    load_handoff(path, student, student.spec)  # strict, spec checked
    assert not any("qsd" in k or "objective" in k for k in student.state_dict())


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, shards, monkeypatch):
    """Kill at step 5 (after the step-4 checkpoint, mid-epoch 0 of 6 steps), resume, compare."""
    full = train_distill(_cfg(tmp_path / "full", shards, "data.num_workers=2"))

    import gkd.engine.distill as loop

    real_lr_at = loop.lr_at

    def dying_lr_at(step, *a):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_lr_at(step, *a)

    monkeypatch.setattr(loop, "lr_at", dying_lr_at)
    with pytest.raises(KeyboardInterrupt):
        train_distill(_cfg(tmp_path / "cut", shards, "data.num_workers=2"))
    reset_accelerate()
    assert (tmp_path / "cut" / "checkpoints" / "step_00000004").is_dir()
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    resumed = train_distill(_cfg(tmp_path / "cut", shards, "data.num_workers=2"))

    from safetensors.torch import load_file

    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_nonfinite_loss_stops_with_checkpoint_intact(tmp_path, shards, monkeypatch):
    import gkd.engine.distill as loop

    real_forward = loop.DistillModel.forward
    calls = {"n": 0}

    def poisoned(self, images, teacher):
        out = real_forward(self, images, teacher)
        calls["n"] += 1
        if calls["n"] == 5:  # step index 3 (the first call is the FLOP count's sample step)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(loop.DistillModel, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"step 3.*step_00000002"):
        train_distill(_cfg(out, shards))
    assert (out / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
    assert not (out / "encoder.safetensors").exists()


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    src = make_images(tmp_path / "imgs", 16)
    write_shards(src, tmp_path / "wds", shard_size=16)
    bad = tmp_path / "wds" / "train-000001.tar"
    with wds.TarWriter(str(bad)) as w:
        for i in range(8):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (i * 20, 50, 90)).save(buf, format="JPEG")
            data = b"\xff\xd8 definitely not a jpeg" if i == 3 else buf.getvalue()
            w.write({"__key__": f"extra_{i}", "jpg": data, "cls": b"1"})
    out = tmp_path / "run"
    train_distill(_cfg(out, str(tmp_path / "wds" / "train-{000000..000001}.tar"), "data.num_samples=24",
                       "optim.epochs=1", "data.repeats=1"))  # one pass: the bad image is read exactly once
    ends = [r for r in _records(out) if r.get("event") == "epoch_end"]
    assert [r["skipped_corrupt_total"] for r in ends] == [1]
    assert read_metadata(out / "encoder.safetensors")["gkd_compute"]["skipped_corrupt"] == 1  # handed on


def test_missing_shard_is_named(tmp_path, shards):
    missing = shards.replace("{000000..000003}", "{000000..000009}")
    with pytest.raises(FileNotFoundError, match="train-000009.tar"):
        train_distill(_cfg(tmp_path / "run", missing))


@pytest.mark.slow
def test_two_process_ddp_on_realmake_images(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: real DDP over gloo."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not present")
    src = tmp_path / "imgs"
    src.mkdir()
    for p in sorted(IMAGENET_SAMPLE.glob("*.jpg"))[:96]:
        (src / p.name).symlink_to(p)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "gkd.cli", "data", "shard", str(src), str(tmp_path / "wds"),
                    "--shard-size", "24"], check=True, env=env)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "stages" / "stage1.py"), *TINY, f"data.train_shards={tmp_path}/wds/train-{{000000..000003}}.tar",
           f"out_dir={out}", "optim.epochs=4", "engine.log_sample_keys=true", "data.num_workers=1",
           "data.repeats=1"]  # one pass per epoch: each key once, on one rank
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    keys = {r: [ln.split("\t") for ln in (out / "sample_keys" / f"rank{r}.txt").read_text().splitlines()] for r in (0, 1)}
    for epoch in range(4):
        k0 = {k for e, k in keys[0] if int(e) == epoch}
        k1 = {k for e, k in keys[1] if int(e) == epoch}
        assert len(k0) == len(k1) == 96 // 2 and not k0 & k1  # different samples on each rank
    records = _records(out)
    end = [r for r in records if r.get("event") == "end"][0]
    assert len(end["param_checksum_per_rank"]) == 2
    assert end["param_checksum_per_rank"][0] == end["param_checksum_per_rank"][1]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    meta = read_metadata(out / "encoder.safetensors")
    student = build_student_from_spec(meta["gkd_spec"])
    load_handoff(out / "encoder.safetensors", student, student.spec)


def test_grad_accumulation_matches_full_batch(tmp_path, shards):
    """Two micro-batches of 4 with accumulation give the same update as one batch of 8.

    Masking is switched off (mask_ratio=0) so that no per-micro-batch randomness differs; the
    loss is a mean over equal-sized micro-batches, so the accumulated gradient is the full one.
    """
    common = ("optim.epochs=1", "method.options.mask_ratio=0.0", "optim.grad_clip=1.0")
    a = train_distill(_cfg(tmp_path / "full", shards, *common))
    reset_accelerate()
    b = train_distill(_cfg(tmp_path / "accum", shards, *common, "optim.grad_accum=2"))
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    la = [r["loss"] for r in _records(tmp_path / "full") if "loss" in r]
    lb = [r["loss"] for r in _records(tmp_path / "accum") if "loss" in r]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_bf16_autocast_trains(tmp_path, shards):
    """The mixed-precision path (bf16 autocast via accelerate) runs, stays finite on CPU and gives the
    fp32 run's losses within bf16's precision."""
    out = tmp_path / "bf16"
    train_distill(_cfg(out, shards, "optim.epochs=1", "engine.mixed_precision=bf16"))
    reset_accelerate()
    train_distill(_cfg(tmp_path / "fp32", shards, "optim.epochs=1"))
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    reference = [r["loss"] for r in _records(tmp_path / "fp32") if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    np.testing.assert_allclose(losses, reference, rtol=0.05)
