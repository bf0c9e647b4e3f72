"""The authors' stage-1/2 recipe as the default: no warmup, weight decay on tokens and position tables,
the paper pairs' configs (distilled DeiT / DINO v1 students, ImageNet mean/std for EVA-02), and the
stage-2 teacher built as the authors build it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay

from gkd.config import DistillConfig, load_config
from gkd.distill import build_objective
from gkd.engine.distill import DistillModel, build_stage_teacher, lr_at, train_distill
from gkd.engine.trainer import make_adamw, param_groups
from gkd.models import build_student
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]
STAGE1, STAGE2 = REPO / "configs" / "stage1", REPO / "configs" / "stage2"
TINY_TEACHER = ["teacher.pretrained=false", "teacher.random_init=true", "teacher.kwargs.depth=1",
                "teacher.kwargs.embed_dim=32", "teacher.kwargs.num_heads=2"]


# ------------------------------------------------------------------------------------------------
# warmup


def test_no_warmup_by_default_first_step_at_peak_lr(tmp_path, shards) -> None:
    from gkd.config import OptimConfig

    assert OptimConfig.warmup_epochs == 0.0  # the authors' main.py --warmup-epochs default
    overrides = [o for o in TINY if not o.startswith("optim.warmup_epochs")]
    cfg = load_config(DistillConfig, [], [*overrides, f"data.train_shards={shards}", f"out_dir={tmp_path}",
                                          "optim.max_steps=2"])
    assert cfg.optim.warmup_epochs == 0.0
    train_distill(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    peak = 2e-3 * 8 / 512  # optim.lr × batch / lr_base_batch
    assert steps[0]["step"] == 1 and steps[0]["lr"] == pytest.approx(peak, rel=1e-12)
    assert lr_at(0, 0.0, 0, peak, 1e-5) == peak  # warmup 0: the cosine starts at the peak


# ------------------------------------------------------------------------------------------------
# weight decay


def _names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _distill_model() -> DistillModel:
    student = build_student("deit_small_patch16_224", img_size=56, grid=(4, 4), embed_dim=32, depth=1, num_heads=2)
    return DistillModel(student, build_objective("gkd", 32, 48))


def test_authors_weight_decay_rule_decays_tokens_and_positions() -> None:
    model = _distill_model()
    opt = make_adamw(model, 1e-3, 0.05, (0.9, 0.999), roles={"student": model.student, "heads": model.objective},
                     decay_rule="timm")
    decay = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in _names(model, g["params"])}
    spared = {n for g in opt.param_groups if g["weight_decay"] == 0 for n in _names(model, g["params"])}
    assert all(g["weight_decay"] in (0.0, 0.05) for g in opt.param_groups)
    # Independent: timm's own rule, as the authors' create_optimizer(args, model) applies it (no no_weight_decay).
    timm_groups = param_groups_weight_decay(model, 0.05)
    assert decay == {n for g in timm_groups if g["weight_decay"] > 0 for n in _names(model, g["params"])}
    assert spared == {n for g in timm_groups if g["weight_decay"] == 0 for n in _names(model, g["params"])}
    assert decay | spared == {n for n, _ in model.named_parameters()} and not decay & spared
    enc = "student.encoder."
    assert {enc + "pos_embed", enc + "cls_token", "student.mask_token", enc + "patch_embed.proj.weight",
            enc + "blocks.0.attn.qkv.weight", enc + "blocks.0.mlp.fc1.weight"} <= decay
    assert {enc + "patch_embed.proj.bias", enc + "blocks.0.norm1.weight", enc + "blocks.0.attn.qkv.bias",
            enc + "norm.weight", enc + "norm.bias"} <= spared
    heads = {n for n, _ in model.objective.named_parameters()}
    assert {f"objective.{n}" for n in heads if n.endswith(".weight") and "proj_q.1" in n} <= decay  # Linear weights
    assert {f"objective.{n}" for n in heads if "proj_q.0" in n or n.endswith(".bias")} <= spared  # LayerNorms, biases


def test_no_decay_tokens_option_keeps_the_previous_rule() -> None:
    model = _distill_model()
    groups = param_groups(model, 0.05, "tokens")
    decay, spared = (_names(model, g["params"]) for g in groups)
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    enc = "student.encoder."
    assert {enc + "pos_embed", enc + "cls_token", "student.mask_token"} <= spared
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1} - {enc + "pos_embed", enc + "cls_token",
                                                                              "student.mask_token"}
    with pytest.raises(ValueError, match="weight-decay rule"):
        param_groups(model, 0.05, "none")


def test_stage3_decay_rule_is_the_authors_mmseg_paramwise_cfg() -> None:
    """norm_decay_mult=0 and decay_mult 0 for norm / query_embed / query_feat / level_embed; biases decay."""
    from gkd.models import build_segmentor

    student = build_student("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=32, num_heads=2)
    seg = build_segmentor(student, decoder="mask2former", num_classes=3, mean=[0.5] * 3, std=[0.5] * 3,
                          layers=[0, 1, 1, 1], train_encoder=True, num_queries=4, num_layers=1, pixel_decoder_layers=1,
                          hidden_dim=32, num_heads=2, dim_feedforward=64, pixel_decoder_ffn_dim=64, num_points=16)
    decay, spared = (_names(seg, g["params"]) for g in param_groups(seg, 0.05, "mmseg"))
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    # independent: every parameter of a norm module, every name holding "norm", the query / level embeddings
    want = {f"{m}.{n}" for m, mod in seg.named_modules() if isinstance(mod, norms) for n, _ in mod.named_parameters(recurse=False)}
    want |= {n for n, _ in seg.named_parameters() if "norm" in n or "queries_embedder" in n or "queries_features" in n
             or "level_embed" in n}
    assert spared == want and decay == {n for n, _ in seg.named_parameters()} - want
    assert any(n.endswith(".bias") for n in decay) and "encoder.encoder.pos_embed" in decay
    assert any("queries_embedder" in n for n in spared) and any("level_embed" in n for n in spared)


# ------------------------------------------------------------------------------------------------
# the paper configs


@pytest.mark.parametrize("file, teacher, student, checkpoint, kwargs", [
    ("dinov2b_to_vits.yaml", "vit_base_patch14_dinov2", "deit_small_patch16_224",
     "timm:deit_small_distilled_patch16_224.fb_in1k", {}),
    ("dinov2l_to_vitb.yaml", "vit_large_patch14_dinov2", "deit_base_patch16_224",
     "timm:deit_base_distilled_patch16_224.fb_in1k", {}),
    ("dinov2b_to_dino_vits.yaml", "vit_base_patch14_dinov2", "vit_small_patch16_224",
     "timm:vit_small_patch16_224.dino", {"init_values": 1.0}),
    ("dinov2l_to_dino_vitb.yaml", "vit_large_patch14_dinov2", "vit_base_patch16_224",
     "timm:vit_base_patch16_224.dino", {"init_values": 1.0}),
])
def test_paper_pairs_name_the_authors_student_weights(file, teacher, student, checkpoint, kwargs) -> None:
    cfg = load_config(DistillConfig, [STAGE1 / file], ["data.train_shards=x.tar"])
    assert (cfg.teacher.name, cfg.student.name, cfg.student.checkpoint) == (teacher, student, checkpoint)
    assert not cfg.student.pretrained and dict(cfg.student.kwargs) == kwargs
    assert cfg.optim.warmup_epochs == 0.0 and not cfg.optim.no_decay_tokens and cfg.optim.weight_decay == 0.05


def test_the_non_paper_pair_says_so() -> None:
    assert not (STAGE1 / "dinov2b_to_dinov2s.yaml").exists()
    assert "NOT a paper pair" in (STAGE1 / "nonpaper_dinov2b_to_dinov2s.yaml").read_text()


@pytest.mark.parametrize("file", ["eva02b_to_eva02s.yaml", "eva02l_to_eva02b.yaml"])
@pytest.mark.parametrize("explicit", [True, False])
def test_eva02_configs_resolve_to_imagenet_mean_std(file: str, explicit: bool) -> None:
    overrides = ["data.train_shards=x.tar", *TINY_TEACHER] + ([] if explicit else ["teacher.mean=null", "teacher.std=null"])
    cfg = load_config(DistillConfig, [STAGE1 / file], overrides)
    assert cfg.teacher.name.startswith("eva02_") and (cfg.teacher.mean is not None) == explicit
    teacher = build_stage_teacher(cfg)  # a tiny random EVA-02 with the config's name and tag
    assert teacher.mean == IMAGENET_DEFAULT_MEAN and teacher.std == IMAGENET_DEFAULT_STD
    assert cfg.student.mean is None  # the student follows the teacher's normalisation


@pytest.mark.parametrize("file", ["cityscapes_vits.yaml", "gta5_vits.yaml", "potsdam_vits.yaml"])
def test_stage2_teacher_built_as_the_authors(file: str) -> None:
    cfg = load_config(DistillConfig, [STAGE2 / file], ["data.train_shards=x.tar", *TINY_TEACHER])
    assert cfg.teacher.patch_size == 16 and cfg.teacher.patch_resample == "bicubic"
    teacher = build_stage_teacher(cfg)
    spec = teacher.spec
    assert spec["patch_resample"] == "bicubic" and spec["grid"] == [32, 32]
    assert spec["interpolate_offset"] == 0.0 and spec["interpolate_antialias"] is False
    native = build_stage_teacher(load_config(DistillConfig, [], ["data.train_shards=x.tar", *TINY_TEACHER]))
    torch.testing.assert_close(
        teacher.model.patch_embed.proj.weight,  # same seed, same random weights: the kernel, interpolated
        torch.nn.functional.interpolate(native.model.patch_embed.proj.weight, size=(16, 16), mode="bicubic",
                                        align_corners=False), atol=0, rtol=0)


def test_schema_defaults_are_the_authors() -> None:
    cfg = load_config(DistillConfig, [], ["data.train_shards=x.tar"])
    assert cfg.teacher.patch_resample == "bicubic" and cfg.teacher.mean is None
    assert cfg.optim.warmup_epochs == 0.0 and cfg.optim.no_decay_tokens is False
    with pytest.raises(ValueError, match="patch_resample"):
        build_stage_teacher(load_config(DistillConfig, [], ["data.train_shards=x.tar", *TINY_TEACHER,
                                                             "teacher.patch_size=16", "teacher.patch_resample=area"]))


@pytest.mark.parametrize("file", ["dinov2b_to_vits.yaml", "dinov2l_to_vitb.yaml", "dinov2b_to_dino_vits.yaml"])
def test_stage1_configs_resolve_to_the_authors_schedule(file: str) -> None:
    """main.py + train_script/*.sh: 100 epochs × 512 (4 × 128), lr 5e-4 × 512/512, cosine to 1e-5, no warm-up,
    no clipping, AdamW betas (0.9, 0.999), RASampler ×3, the DeiT augmentation."""
    cfg = load_config(DistillConfig, [STAGE1 / file], ["data.train_shards=x.tar"])
    o, d = cfg.optim, cfg.data
    assert (o.epochs, d.batch_size, o.lr, o.lr_base_batch, o.min_lr) == (100, 512, 5e-4, 512, 1e-5)
    assert o.grad_clip is None and list(o.betas) == [0.9, 0.999] and o.weight_decay == 0.05
    assert d.repeats == 3 and d.img_size == 224 and cfg.student.patch_resample == "bicubic"
    assert (list(d.aug.scale), d.aug.hflip, d.aug.auto_augment, d.aug.re_prob, d.aug.interpolation) == \
        ([0.08, 1.0], 0.5, "rand-m9-mstd0.5-inc1", 0.25, "bicubic")
    assert cfg.method.name == "gkd"


@pytest.mark.parametrize("file", ["cityscapes_vits.yaml", "gta5_vits.yaml", "potsdam_vits.yaml"])
def test_stage2_configs_resolve_to_the_authors_schedule(file: str) -> None:
    cfg = load_config(DistillConfig, [STAGE2 / file], ["data.train_shards=x.tar"])
    assert (cfg.optim.epochs, cfg.data.batch_size, cfg.data.img_size, cfg.data.repeats) == (300, 128, 512, 3)
    assert cfg.optim.warmup_epochs == 0.0 and cfg.optim.grad_clip is None


STAGE3 = STAGE1.parent / "stage3"


@pytest.mark.parametrize("file", ["gta5_vits_mask2former.yaml", "cityscapes_vits_mask2former.yaml",
                                  "potsdam_vits_mask2former.yaml"])
def test_stage3_configs_resolve_to_the_authors_task_learning_configs(file: str) -> None:
    from gkd.config import SegmentConfig

    cfg = load_config(SegmentConfig, [STAGE3 / file], ["encoder=e.safetensors"])
    o, d = cfg.optim, cfg.data
    assert (o.iters, o.lr, o.weight_decay, o.power, o.min_lr, o.warmup_iters) == (40000, 1e-4, 0.05, 0.9, 0.0, 0)
    assert o.grad_clip is None  # the DINOv2 + Mask2Former configs clip nothing
    assert (d.batch_size, d.crop_size, d.cat_max_ratio, d.photometric) == (4, 512, 0.75, True)
    assert d.short_edges == [int(512 * x * 0.1) for x in range(5, 21)] and d.max_size == 2048
    assert cfg.decoder.name == "mask2former" and cfg.method.name == "none" and not cfg.train_encoder
    eva = load_config(SegmentConfig, [STAGE3 / file, STAGE3 / "recipes" / "eva02_finetune.yaml"], ["encoder=e.safetensors"])
    assert eva.train_encoder and eva.optim.encoder_lr_scale == 0.1 and eva.encoder_drop_path == 0.15
