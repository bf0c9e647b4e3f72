"""Fast paths give the plain path's results: fused AdamW, fused attention in QSD, device-side loss sums."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gkd.config import DistillConfig, load_config
from gkd.distill import QSD
from gkd.engine.trainer import make_adamw
from gkd.engine.distill import train_distill
from helpers import TINY


def test_fused_adamw_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    fused_model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    fused_model.load_state_dict(plain_model.state_dict())
    fused = make_adamw(fused_model, 1e-2, 0.05, (0.9, 0.999))
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": [p for p in plain_model.parameters() if p.ndim > 1], "weight_decay": 0.05},
                               {"params": [p for p in plain_model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.999), foreach=False)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        for model, opt in ((plain_model, plain), (fused_model, fused)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(plain_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("heads", [1, 2])
def test_fused_qsd_attention_matches_the_explicit_softmax(heads):
    torch.manual_seed(0)
    plain = QSD(12, 16, num_heads=heads, fused=False)
    fused = QSD(12, 16, num_heads=heads, fused=True)
    fused.load_state_dict(plain.state_dict())
    s, t = torch.randn(3, 9, 12), torch.randn(3, 9, 16) * 0.3
    a, b = plain(s, t), fused(s, t)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, pa), pb in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert QSD(12, 16).fused is None  # automatic: fused on CUDA only


def test_logged_losses_are_the_mean_of_the_steps_losses(tmp_path, shards, monkeypatch):
    """Loss terms are summed on the device and read back once per log window: a window's record
    must equal the mean of the per-step values (recorded here independently)."""
    import gkd.engine.distill as loop

    seen: list[float] = []
    real = loop.DistillModel.forward

    def spy(self, images, teacher):
        out = real(self, images, teacher)
        seen.append(float(out["loss"].detach()))
        return out

    monkeypatch.setattr(loop.DistillModel, "forward", spy)
    out = tmp_path / "run"
    train_distill(load_config(DistillConfig, [], [*TINY, f"out_dir={out}", f"data.train_shards={shards}",
                                                  "engine.log_every=3", "budget.amount=6"]))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["loss"] for r in records if "loss" in r]
    step_losses = seen[1:]  # the first forward is the FLOP count's sample step
    assert windows == pytest.approx([sum(step_losses[:3]) / 3, sum(step_losses[3:]) / 3], rel=1e-6)


def _run(tmp_path, shards, name, *extra, base=TINY):
    out = tmp_path / name
    train_distill(load_config(DistillConfig, [], [*base, f"out_dir={out}", f"data.train_shards={shards}",
                                                  "engine.log_every=1", "budget.amount=3", *extra]))
    from helpers import reset_accelerate

    reset_accelerate()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(tmp_path, shards):
    eager = _run(tmp_path, shards, "eager")
    compiled = _run(tmp_path, shards, "compiled", "engine.compile=true")
    assert [r["loss"] for r in compiled if "loss" in r] == pytest.approx([r["loss"] for r in eager if "loss" in r],
                                                                          rel=1e-4)
    flops = [next(r["flops_per_step"] for r in rs if r.get("event") == "flops") for rs in (eager, compiled)]
    assert flops[0] > 0 and flops[1] > 0


def test_channels_last_cnn_student_trains_like_the_contiguous_one(tmp_path, shards):
    cnn = [x for x in TINY if not x.startswith("student.")] + ["student.name=resnet18"]
    plain = _run(tmp_path, shards, "plain", "engine.channels_last=false", base=cnn)
    cl = _run(tmp_path, shards, "cl", "engine.channels_last=true", base=cnn)
    assert [r["loss"] for r in cl if "loss" in r] == pytest.approx([r["loss"] for r in plain if "loss" in r], rel=1e-4)


def test_fast_path_switches_reach_the_student():
    from gkd.engine.distill import _fast_paths
    from gkd.models import build_student

    cfg = load_config(DistillConfig, [], ["data.train_shards=x", "engine.channels_last=true", "engine.compile=true"])
    cnn = build_student("resnet18", img_size=56, grid=(4, 4))
    assert _fast_paths(cfg, cnn) is True
    assert cnn.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert cnn._compiled_call_impl is not None  # nn.Module.compile: same parameter names
    vit = build_student("vit_tiny_patch16_224", img_size=56, patch_size=14, depth=1, embed_dim=32, num_heads=2)
    assert _fast_paths(cfg, vit) is False  # channels-last is for CNN students only
    auto = load_config(DistillConfig, [], ["data.train_shards=x"])
    assert _fast_paths(auto, build_student("resnet18", img_size=56, grid=(4, 4))) is torch.cuda.is_available()
