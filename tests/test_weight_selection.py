"""Weight selection (Xu et al., ICLR 2024): a student initialised from a larger teacher ViT.

Tiny random timm models; every parameter is re-drawn (biases, norms and LayerScale included) so that
no check passes because a tensor happens to be zero or one. Expected slices are computed here with
plain indexing, independently of gkd.models.weight_selection.
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import timm
import torch
from torch import nn

from gkd.models.resample import resample_abs_pos_embed, resample_patch_embed
from gkd.models.weight_selection import (
    WeightSelectionError,
    evenly_spaced,
    init_student_from_teacher,
    plan_selection,
    select_weights,
)

DINO = "vit_small_patch14_dinov2"  # LayerScale, patch 14
DEIT = "vit_tiny_patch16_224"  # no LayerScale
# Teacher: 56 px, patch 14 (4x4 grid), 64 channels, 4 heads of 16, MLP 256, 4 blocks.
T_KW = dict(img_size=56, patch_size=14, embed_dim=64, num_heads=4, depth=4)


def vit(name: str, seed: int = 0, **kw) -> nn.Module:
    """A timm ViT with every parameter drawn at random (LayerScale gammas around 1, not 1e-5)."""
    torch.manual_seed(seed)
    m = timm.create_model(name, **{"num_classes": 0, **kw}).eval()
    with torch.no_grad():
        for name_, p in m.named_parameters():
            if name_.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 0.5)
    return m


def teacher_model(**over) -> nn.Module:
    return vit(DINO, seed=1, **{**T_KW, **over})


def feats(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.forward_features(x)


def spaced(total: int, keep: int) -> torch.Tensor:
    """The paper's evenly spaced indices, written out independently of the module."""
    if total % keep == 0:
        return torch.arange(0, total, total // keep)
    return torch.tensor([math.floor(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)])


def test_evenly_spaced_values():
    assert evenly_spaced(12, 6).tolist() == [0, 2, 4, 6, 8, 10]
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(64, 48).tolist() == spaced(64, 48).tolist()
    assert evenly_spaced(384, 192).tolist() == list(range(0, 384, 2))
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1).tolist() == [0]
    with pytest.raises(WeightSelectionError, match="exceeds"):
        evenly_spaced(4, 5)


@pytest.mark.parametrize("name", [DINO, DEIT])
def test_same_size_student_is_exact(name):
    t = vit(name, seed=1, **T_KW)
    s = vit(name, seed=2, **T_KW)
    sd = select_weights(t, s)
    assert set(sd) == set(s.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(sd[k], v), k
    s.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(feats(s, x), feats(t, x))


def test_layerscale_folded_exactly_into_projections():
    t = teacher_model()
    s = vit(DEIT, seed=2, **T_KW)  # same size, no LayerScale
    sd = select_weights(t, s)
    tsd = t.state_dict()
    g1, g2 = tsd["blocks.2.ls1.gamma"], tsd["blocks.2.ls2.gamma"]
    assert torch.equal(sd["blocks.2.attn.proj.weight"], g1[:, None] * tsd["blocks.2.attn.proj.weight"])
    assert torch.equal(sd["blocks.2.mlp.fc2.bias"], g2 * tsd["blocks.2.mlp.fc2.bias"])
    s.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    ref = feats(t, x)
    assert torch.allclose(feats(s, x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_student_layerscale_without_teacher_layerscale_is_one(caplog):
    t = vit(DEIT, seed=1, **T_KW)
    s = vit(DINO, seed=2, **T_KW)
    with caplog.at_level(logging.INFO, logger="gkd.models.weight_selection"):
        sd = select_weights(t, s)
    assert "gamma = 1" in caplog.text
    assert torch.equal(sd["blocks.0.ls1.gamma"], torch.ones(64))
    s.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(feats(s, x), feats(t, x))


@pytest.mark.parametrize("cs,heads", [(32, 2), (48, 3)])  # divisible and non-divisible widths (head_dim 16 kept)
def test_residual_channels_consistent_everywhere(cs, heads):
    t = teacher_model()
    s = vit(DINO, seed=2, **{**T_KW, "embed_dim": cs, "num_heads": heads})
    sd, tsd = select_weights(t, s), t.state_dict()
    r = spaced(64, cs)
    assert torch.equal(sd["cls_token"], tsd["cls_token"][..., r])
    assert torch.equal(sd["pos_embed"], tsd["pos_embed"][..., r])
    assert torch.equal(sd["patch_embed.proj.weight"], tsd["patch_embed.proj.weight"][r])
    assert torch.equal(sd["patch_embed.proj.bias"], tsd["patch_embed.proj.bias"][r])
    assert torch.equal(sd["norm.weight"], tsd["norm.weight"][r])
    for i in range(4):
        p = f"blocks.{i}."
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias",
                  "ls1.gamma", "ls2.gamma"):
            assert torch.equal(sd[p + k], tsd[p + k][r]), p + k
        # Inputs read the same residual channels (columns), outputs write them (rows).
        hidden = sd[p + "mlp.fc1.weight"].shape[0]
        m = spaced(256, hidden)
        assert torch.equal(sd[p + "mlp.fc1.weight"], tsd[p + "mlp.fc1.weight"][m][:, r])
        assert torch.equal(sd[p + "mlp.fc2.weight"], tsd[p + "mlp.fc2.weight"][r][:, m])
        hsel = spaced(4, heads)
        rows = torch.cat([hsel[h] * 16 + torch.arange(16) for h in range(heads)])
        qkv = tsd[p + "attn.qkv.weight"].reshape(3, 64, 64)
        assert torch.equal(sd[p + "attn.qkv.weight"], qkv[:, rows][:, :, r].reshape(3 * cs, cs))
        assert torch.equal(sd[p + "attn.proj.weight"], tsd[p + "attn.proj.weight"][r][:, rows])


def test_half_student_is_a_teacher_slice_with_whole_heads():
    t = teacher_model()
    s = vit(DINO, seed=2, **{**T_KW, "embed_dim": 32, "num_heads": 2, "depth": 2})  # head_dim 16 as the teacher
    plan = plan_selection(t, s)
    assert plan.teacher_layers == (0, 1) and plan.attention_mode == "whole_heads"  # first-N layers
    sd, tsd = select_weights(t, s), t.state_dict()
    r, m = torch.arange(0, 64, 2), torch.arange(0, 256, 2)
    expected = {
        "cls_token": tsd["cls_token"][..., r],
        "pos_embed": tsd["pos_embed"][..., r],
        "patch_embed.proj.weight": tsd["patch_embed.proj.weight"][r],
        "patch_embed.proj.bias": tsd["patch_embed.proj.bias"][r],
        "norm.weight": tsd["norm.weight"][r],
        "norm.bias": tsd["norm.bias"][r],
    }
    for i in range(2):
        p = f"blocks.{i}."
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma",
                  "attn.proj.bias", "mlp.fc2.bias"):
            expected[p + k] = tsd[p + k][r]
        # heads 0 and 2 of the teacher, whole: rows [0:16] and [32:48] of each of q, k, v
        heads = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
        w = tsd[p + "attn.qkv.weight"]
        expected[p + "attn.qkv.weight"] = torch.cat([w[o + heads][:, r] for o in (0, 64, 128)])
        expected[p + "attn.qkv.bias"] = torch.cat([tsd[p + "attn.qkv.bias"][o + heads] for o in (0, 64, 128)])
        expected[p + "attn.proj.weight"] = tsd[p + "attn.proj.weight"][r][:, heads]
        expected[p + "mlp.fc1.weight"] = tsd[p + "mlp.fc1.weight"][m][:, r]
        expected[p + "mlp.fc1.bias"] = tsd[p + "mlp.fc1.bias"][m]
        expected[p + "mlp.fc2.weight"] = tsd[p + "mlp.fc2.weight"][r][:, m]
    assert set(expected) == set(sd) == set(s.state_dict())
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    # Student head 1 is teacher head 2: its k rows on the kept channels.
    k_rows = sd["blocks.1.attn.qkv.weight"][32 + 16:32 + 32]
    assert torch.equal(k_rows, tsd["blocks.1.attn.qkv.weight"][64 + 32:64 + 48][:, r])


def test_uniform_layers_and_heads_and_channels():
    t = teacher_model()
    s = vit(DINO, seed=2, **{**T_KW, "embed_dim": 32, "num_heads": 4, "depth": 2})  # 4 heads of 8
    plan = plan_selection(t, s, layers="uniform")
    assert plan.teacher_layers == (0, 2) and plan.attention_mode == "heads_and_channels"
    sd, tsd = select_weights(t, s, layers="uniform"), t.state_dict()
    r = torch.arange(0, 64, 2)
    # every head kept, channels 0, 2, ..., 14 of each: here the same as evenly spaced over all 64
    rows = torch.cat([h * 16 + torch.arange(0, 16, 2) for h in range(4)])
    qkv = tsd["blocks.2.attn.qkv.weight"].reshape(3, 64, 64)
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], qkv[:, rows][:, :, r].reshape(96, 32))
    assert torch.equal(sd["blocks.1.norm1.weight"], tsd["blocks.2.norm1.weight"][r])
    sd2 = select_weights(t, s, layers=[1, 3])
    assert torch.equal(sd2["blocks.0.mlp.fc1.bias"], tsd["blocks.1.mlp.fc1.bias"][torch.arange(0, 256, 2)])
    with pytest.raises(WeightSelectionError, match="distinct teacher block indices"):
        select_weights(t, s, layers=[1, 1])


def test_teacher_classifier_is_left_out_and_logged(caplog):
    t = vit(DINO, seed=1, **T_KW, num_classes=10)
    s = vit(DINO, seed=2, **{**T_KW, "embed_dim": 32, "num_heads": 2})
    with caplog.at_level(logging.INFO, logger="gkd.models.weight_selection"):
        sd = select_weights(t, s)
    assert "head.bias, head.weight" in caplog.text and set(sd) == set(s.state_dict())


def test_position_table_and_patch_kernel_resampled():
    t = teacher_model()
    s = vit(DEIT, seed=2, img_size=48, patch_size=16, embed_dim=32, num_heads=2, depth=2)  # 3x3 grid, patch 16
    sd, tsd = select_weights(t, s), t.state_dict()
    r = torch.arange(0, 64, 2)
    pos = resample_abs_pos_embed(tsd["pos_embed"][..., r], new_size=[3, 3], old_size=[4, 4], num_prefix_tokens=1)
    assert sd["pos_embed"].shape == (1, 10, 32)
    assert torch.equal(sd["pos_embed"], pos)
    assert torch.equal(sd["patch_embed.proj.weight"], resample_patch_embed(tsd["patch_embed.proj.weight"][r], [16, 16]))
    s.load_state_dict(sd, strict=True)


def test_class_position_entry_folded_for_no_embed_class_student():
    t = teacher_model()  # pos_embed holds a class entry
    s = vit(DINO, seed=2, **T_KW, no_embed_class=True)
    sd, tsd = select_weights(t, s), t.state_dict()
    assert torch.equal(sd["cls_token"], tsd["cls_token"] + tsd["pos_embed"][:, :1])
    assert torch.equal(sd["pos_embed"], tsd["pos_embed"][:, 1:])
    s.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    assert torch.allclose(feats(s, x), feats(t, x), rtol=1e-5, atol=1e-5)


def test_registers_copied_and_student_only_registers_logged(caplog):
    t = vit("vit_small_patch14_reg4_dinov2", seed=1, **T_KW)
    s = vit("vit_small_patch14_reg4_dinov2", seed=2, **{**T_KW, "embed_dim": 32, "num_heads": 2})
    sd, tsd = select_weights(t, s), t.state_dict()
    assert torch.equal(sd["reg_token"], tsd["reg_token"][..., torch.arange(0, 64, 2)])
    plain = teacher_model()
    s2 = vit("vit_small_patch14_reg4_dinov2", seed=3, **T_KW)
    with caplog.at_level(logging.INFO, logger="gkd.models.weight_selection"):
        sd2 = select_weights(plain, s2)
    assert "reg_token: the teacher has none" in caplog.text
    assert torch.equal(sd2["reg_token"], s2.state_dict()["reg_token"])  # its own initialisation
    # the teacher's class position entry joins the class token (the reg4 layout has none)
    assert torch.equal(sd2["cls_token"], plain.state_dict()["cls_token"] + plain.state_dict()["pos_embed"][:, :1])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(embed_dim=96, num_heads=6), "embed_dim: student size 96 exceeds teacher size 64"),
        (dict(depth=6), "depth: student has 6 blocks, more than the teacher's 4"),
        (dict(mlp_ratio=8.0), r"mlp hidden \(fc1 out\): student size 512 exceeds teacher size 256"),
    ],
)
def test_student_larger_than_teacher_is_refused(kw, match):
    t = teacher_model()
    s = vit(DINO, seed=2, **{**T_KW, **kw})
    with pytest.raises(WeightSelectionError, match=match):
        select_weights(t, s)


def test_more_student_heads_fall_back_to_evenly_spaced_channels():
    t = teacher_model()
    s = vit(DINO, seed=2, **{**T_KW, "embed_dim": 32, "num_heads": 8})  # 8 heads of 4 > the teacher's 4 heads
    assert plan_selection(t, s).attention_mode == "channels"
    sd, tsd = select_weights(t, s), t.state_dict()
    a = r = torch.arange(0, 64, 2)
    assert torch.equal(sd["blocks.3.attn.qkv.bias"], tsd["blocks.3.attn.qkv.bias"].reshape(3, 64)[:, a].reshape(-1))
    assert torch.equal(sd["blocks.3.attn.proj.weight"], tsd["blocks.3.attn.proj.weight"][r][:, a])


@pytest.mark.parametrize(
    "teacher_kw,student_kw,match",
    [
        (dict(), dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu"), "mlp"),
        (dict(reg_tokens=2, no_embed_class=True), dict(), "reg_token: teacher has 2 register tokens, student 0"),
        (dict(pre_norm=True), dict(), "norm_pre"),
        (dict(qk_norm=True), dict(), "q_norm"),
    ],
)
def test_incompatible_architectures_are_refused(teacher_kw, student_kw, match):
    t = teacher_model(**teacher_kw)
    s = vit(DINO, seed=2, **{**T_KW, "embed_dim": 32, "num_heads": 2, **student_kw})
    with pytest.raises(WeightSelectionError, match=match):
        select_weights(t, s)


def test_non_vit_refused():
    with pytest.raises(ValueError, match="VisionTransformer"):
        select_weights(teacher_model(), nn.Linear(2, 2))


def test_init_student_from_teacher_records_and_keeps_mask_token():
    from gkd.models import build_student, build_teacher

    torch.manual_seed(0)
    teacher = build_teacher(DINO, img_size=56, depth=3, embed_dim=48, num_heads=3)  # native 37x37 table
    student = build_student(DEIT, img_size=56, grid=teacher.grid, depth=2, embed_dim=32, num_heads=2)
    with torch.no_grad():
        student.mask_token.normal_()
    mask = student.mask_token.detach().clone()
    record = init_student_from_teacher(student, teacher)
    json.dumps(record)
    assert record["teacher"] == DINO and record["teacher_layers"] == [0, 1]
    assert record["embed_dim"] == [48, 32] and record["attention_mode"] == "whole_heads"
    assert record["pos_grid"] == [[37, 37], [4, 4]]
    assert torch.equal(student.mask_token, mask)
    r = spaced(48, 32)
    tsd = teacher.model.state_dict()
    pos = resample_abs_pos_embed(tsd["pos_embed"][..., r], new_size=[4, 4], old_size=[37, 37], num_prefix_tokens=1)
    assert torch.equal(student.encoder.pos_embed.detach(), pos)
    assert student.encoder.pos_embed.requires_grad  # a trainable student, not a frozen copy
    with pytest.raises(ValueError, match="ViT students"):
        init_student_from_teacher(build_student("resnet18", img_size=56, grid=(4, 4)), teacher)
