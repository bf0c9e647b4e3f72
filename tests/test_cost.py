"""stage_cost predicts what a real run records: its flops event, steps, images and TFLOPs (stages 1-3)."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from gkd.config import DistillConfig, SegmentConfig, load_config
from gkd.engine.cost import stage_cost
from gkd.engine.distill import train_distill
from gkd.engine.segment import train_segmentor
from helpers import TINY, reset_accelerate

REPO = Path(__file__).resolve().parents[1]
STAGE2 = ["stage=2", "data.img_size=64", "teacher.patch_size=16", "optim.epochs=1"]
M2F = ["decoder.name=mask2former", "decoder.kwargs.num_queries=6", "decoder.kwargs.num_layers=1",
       "decoder.kwargs.pixel_decoder_layers=1", "decoder.kwargs.hidden_dim=32", "decoder.kwargs.num_heads=2",
       "decoder.kwargs.dim_feedforward=64", "decoder.kwargs.pixel_decoder_ffn_dim=64", "decoder.kwargs.num_points=256"]


def _recorded(out_dir: Path) -> tuple[dict, dict]:
    """The run's flops event and its compute record, from metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    flops = [r for r in rows if r.get("event") == "flops"]
    compute = [r for r in rows if r.get("event") == "compute"]
    assert len(flops) == 1 and len(compute) == 1
    last_loss = [r for r in rows if "loss" in r][-1]
    assert last_loss["train_tflops"] == compute[-1]["train_tflops"]
    return flops[0], compute[-1]


def _assert_predicts(cost: dict, out_dir: Path) -> None:
    flops, compute = _recorded(out_dir)
    assert cost["flops_per_step"] == flops["flops_per_step"]
    assert cost["steps"] == compute["steps"]
    assert cost["images"] == compute["images_seen"]
    assert cost["train_tflops"] == compute["train_tflops"]


def _stage1_cfg(out, shards, *extra) -> DistillConfig:
    return load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={out}", "optim.epochs=1",
                                           *extra])


def _stage2_cfg(out, shards, init, *extra) -> DistillConfig:
    rest = [o for o in TINY if not o.startswith("student.")]  # the student comes from the parent
    return load_config(DistillConfig, [], [*rest, *STAGE2, f"data.train_shards={shards}", f"out_dir={out}",
                                           f"init={init}", *extra])


def _stage3_cfg(out, encoder, manifest, root, *extra) -> SegmentConfig:
    return load_config(SegmentConfig, [], [
        f"encoder={encoder}", f"data.manifest={manifest}", f"data.root={root}", "data.crop_size=64",
        "data.short_edges=null", "data.scale=[128,64]", "data.batch_size=2", "data.num_workers=0", "optim.iters=3",
        "optim.lr=1e-3", "engine.log_every=1", "engine.save_every=100", f"out_dir={out}", *extra])


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, shards):
    """A real stage-1 run (48 images, batch 8: 6 steps) and the stage-2 run continuing it (at 64 px, patch 16)."""
    root = tmp_path_factory.mktemp("cost")
    cfg1 = _stage1_cfg(root / "s1", shards)
    path1 = train_distill(cfg1)
    reset_accelerate()
    cfg2 = _stage2_cfg(root / "s2", shards, path1)
    path2 = train_distill(cfg2)
    reset_accelerate()
    return cfg1, path1, cfg2, path2


def test_stage1_prediction_equals_the_run(lineage):
    cfg1, path1, _, _ = lineage
    cost = stage_cost(1, cfg1)
    assert cost["stage"] == 1 and cost["steps"] == 48 // 8 and cost["notes"] == []
    _assert_predicts(cost, path1.parent)


def test_stage2_prediction_from_the_parent_config(lineage, tmp_path):
    cfg1, _, cfg2, path2 = lineage
    cost = stage_cost(2, cfg2, parent=cfg1)
    _assert_predicts(cost, path2.parent)
    # without a parent config, the architecture is read from init's header: the same count
    assert stage_cost(2, cfg2)["flops_per_step"] == cost["flops_per_step"]
    # a parent encoder not written yet needs its config
    missing = _stage2_cfg(tmp_path, cfg2.data.train_shards, tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="parent="):
        stage_cost(2, missing)
    assert stage_cost(2, missing, parent=cfg1)["flops_per_step"] == cost["flops_per_step"]
    with pytest.raises(TypeError, match="DistillConfig"):
        stage_cost(2, cfg2, parent="s1.yaml")


def test_stage3_prediction_equals_the_run(lineage, folder_dataset, tmp_path):
    root, manifest, _ = folder_dataset
    _, path1, cfg2, path2 = lineage
    cfg3 = _stage3_cfg(tmp_path / "s3", path2, manifest, root, "decoder.name=mlp", "decoder.kwargs.channels=16")
    train_segmentor(cfg3)
    cost = stage_cost(3, cfg3, parent=cfg2)
    assert cost["steps"] == 3 and cost["images"] == 6
    _assert_predicts(cost, tmp_path / "s3")
    planned = _stage3_cfg(tmp_path / "p", tmp_path / "not-yet.safetensors", manifest, root, "decoder.name=mlp",
                          "decoder.kwargs.channels=16")
    assert stage_cost(3, planned, parent=[lineage[0], cfg2])["flops_per_step"] == cost["flops_per_step"]
    with pytest.raises(TypeError, match="SegmentConfig"):
        stage_cost(3, cfg2)


def test_stage3_mask2former_is_an_upper_bound(lineage, folder_dataset, tmp_path):
    """Mask2Former's matching reads values (no fake tensors): counted on CPU with every class in every crop."""
    root, manifest, _ = folder_dataset
    _, _, cfg2, path2 = lineage
    cfg3 = _stage3_cfg(tmp_path / "s3", path2, manifest, root, *M2F, "optim.iters=1")
    train_segmentor(cfg3)
    flops, _ = _recorded(tmp_path / "s3")
    cost = stage_cost(3, cfg3, parent=cfg2)
    assert cost["flops_per_step"] >= flops["flops_per_step"] > 0.9 * cost["flops_per_step"]
    assert any("mask2former" in n and "every class" in n for n in cost["notes"])


def test_tflops_budget_and_grad_accum_as_the_run(lineage, tmp_path, shards):
    """2 micro-batches of 4 per step (counts are not linear in the batch: GKD masks the first half of it)."""
    fps = stage_cost(1, lineage[0])["flops_per_step"]
    amount = 3.3 * fps / 1e12  # about 3.3 steps of batch 8 at once; the Trainer stops within half a step
    cfg = _stage1_cfg(tmp_path / "t", shards, "optim.grad_accum=2", "budget.kind=tflops", f"budget.amount={amount}",
                      "engine.save_every=100")
    cost = stage_cost(1, cfg)
    # 3.28 steps of this config: the Trainer stops at 3 (Budget.done: within half a step), not ceil() = 4
    assert cost["flops_per_step"] != fps and cost["steps"] == 3
    train_distill(cfg)
    _assert_predicts(cost, tmp_path / "t")
    # 2 processes × micro-batch 4 count as 1 process × 2 accumulated micro-batches of 4
    assert stage_cost(1, lineage[0], world_size=2)["flops_per_step"] == cost["flops_per_step"]


def test_missing_shards_give_no_steps_but_flops(tmp_path, lineage):
    cfg = _stage1_cfg(tmp_path, str(tmp_path / "absent-{000000..000003}.tar"))
    cost = stage_cost(1, cfg)
    assert cost["steps"] is None and cost["images"] is None and cost["train_tflops"] is None
    assert cost["flops_per_step"] == stage_cost(1, lineage[0])["flops_per_step"]
    assert any("data.num_samples" in n for n in cost["notes"])
    counted = stage_cost(1, _stage1_cfg(tmp_path, str(tmp_path / "absent.tar"), "data.num_samples=100"))
    assert counted["steps"] == 100 // 8
    seconds = stage_cost(1, _stage1_cfg(tmp_path, str(tmp_path / "absent.tar"), "budget.kind=seconds",
                                        "budget.amount=60"))
    assert seconds["steps"] is None and any("seconds" in n for n in seconds["notes"])
    with pytest.raises(ValueError, match="split"):  # batch 8 over 3 processes
        stage_cost(1, lineage[0], world_size=3)


def test_paper_stage1_config_counts_offline_and_fast(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("stage_cost tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = load_config(DistillConfig, [str(REPO / "configs/stage1/dinov2b_to_vits.yaml")],
                      ["data.num_samples=1281167", "data.train_shards=/absent/in1k-{000000..001281}.tar"])
    started = time.perf_counter()
    cost = stage_cost(1, cfg)
    assert time.perf_counter() - started < 20
    # 100 epochs of RASampler's epoch (N rounded down to 256) at batch 512
    assert cost["steps"] == 100 * (1281167 // 256 * 256 // 512)
    # ViT-B/14 teacher forward + ViT-S student forward and backward over 257 tokens: 2·params·tokens per
    # forward (86M and 22M parameters), a backward twice a forward, plus the masked pass and attention
    dense = 2 * 257 * (86e6 + 3 * 22e6)
    assert 1.0 * dense * 512 < cost["flops_per_step"] < 2.0 * dense * 512
