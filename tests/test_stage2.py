"""Stage 2 starts from a stage-1 encoder at a new grid (patch 14 → 16), with fresh QSD heads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from gkd.config import ConfigError, DistillConfig, load_config
from gkd.engine import read_metadata, train_distill
from gkd.handoff import file_sha256
from gkd.engine.distill import _build_student
from gkd.engine.runner import run_stage, stage_main

from helpers import TINY, reset_accelerate

STAGE2 = ["stage=2", "data.img_size=64", "teacher.patch_size=16", "optim.epochs=1"]


@pytest.fixture(scope="module")
def stage1_encoder(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("s1")
    cfg = load_config(DistillConfig, [], [*TINY, f"data.train_shards={shards}", f"out_dir={out}", "optim.epochs=1"])
    path = train_distill(cfg)
    reset_accelerate()
    return path


def _stage2_cfg(out, shards, init, *extra):
    rest = [o for o in TINY if not o.startswith("student.")]  # the student comes from the parent
    return load_config(DistillConfig, [], [*rest, *STAGE2, f"data.train_shards={shards}", f"out_dir={out}",
                                           f"init={init}", *extra])


def test_stage2_resamples_parent_and_trains(tmp_path, shards, stage1_encoder):
    cfg = _stage2_cfg(tmp_path / "s2", shards, stage1_encoder)
    student, init = _build_student(cfg, SimpleNamespace(grid=(4, 4)))  # only the teacher's grid is read
    assert init is None
    parent = load_file(str(stage1_encoder))
    assert student.spec["patch_size"] == 16 and student.spec["grid"] == [4, 4]
    assert parent["encoder.patch_embed.proj.weight"].shape[-1] == 14
    own = student.state_dict()
    for k, v in parent.items():  # everything but the resampled kernel / position table is the parent's
        if "patch_embed.proj.weight" not in k and "pos_embed" not in k:
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    assert own["encoder.patch_embed.proj.weight"].shape[-1] == 16

    path = train_distill(cfg)
    meta = read_metadata(path)
    assert meta["gkd_stage"] == 2 and meta["gkd_parent_sha256"] == file_sha256(stage1_encoder)
    assert meta["gkd_spec"]["name"] == "vit_tiny_patch16_224" and meta["gkd_spec"]["patch_size"] == 16


def test_stage2_refuses_other_architecture(tmp_path, shards, stage1_encoder):
    cfg = _stage2_cfg(tmp_path / "s2", shards, stage1_encoder, "student.name=vit_small_patch16_224")
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        train_distill(cfg)


def test_stage2_needs_init(tmp_path, shards):
    with pytest.raises(ConfigError, match="init="):
        run_stage(2, [*TINY, *STAGE2, f"data.train_shards={shards}", f"out_dir={tmp_path}"])


def test_stage_entry_point_reports_a_bad_option_in_one_line(tmp_path, shards, stage1_encoder, monkeypatch, capsys):
    args = [*TINY, *STAGE2, f"data.train_shards={shards}", f"init={stage1_encoder}", "heads.init=foo",
            f"out_dir={tmp_path}"]
    monkeypatch.delenv("GKD_DEBUG", raising=False)
    assert stage_main(2, args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("gkd: error: heads.init must be one of")
    reset_accelerate()
    monkeypatch.setenv("GKD_DEBUG", "1")
    with pytest.raises(ValueError, match="heads.init"):
        run_stage(2, args)
