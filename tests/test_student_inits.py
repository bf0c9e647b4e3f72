"""The authors' student initialisations: distilled DeiT (distillation token dropped), DINO v1 with
LayerScale added at 1.0, and ``timm:<model>.<tag>`` references — all loaded strictly."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import gkd.models.weights as weights
from gkd.models import CheckpointError, build_student

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor replaced by seeded noise (zero-init tokens included)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.state_dict().items()}


def _distilled_deit_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny state dict in the distilled-DeiT layout (facebookresearch/deit, timm VisionTransformerDistilled)."""
    sd = _randomised(timm.create_model("deit_small_distilled_patch16_224", num_classes=10, **TINY), seed)
    assert {"cls_token", "dist_token", "head.weight", "head_dist.weight"} <= set(sd)
    assert sd["pos_embed"].shape == (1, 2 + 14 * 14, 32)  # rows: class, distillation, 14×14 grid
    return sd


# ------------------------------------------------------------------------------------------------
# distilled DeiT


def test_distilled_deit_loads_strictly_without_its_distillation_token(tmp_path, caplog) -> None:
    sd = _distilled_deit_sd()
    torch.save({"model": sd}, tmp_path / "deit_distilled.pth")  # DeiT's release wraps the weights in 'model'
    # At the checkpoint's own patch and grid nothing is resampled: values land exactly.
    with caplog.at_level(logging.INFO, logger="gkd.models"):
        native = build_student("deit_small_patch16_224", img_size=224, grid=(14, 14),
                               checkpoint=tmp_path / "deit_distilled.pth", **TINY)
    for dropped in ("dist_token", "head_dist.weight", "head_dist.bias", "head.weight", "head.bias"):
        assert dropped in caplog.text  # every dropped key is logged
    enc = native.encoder
    assert getattr(enc, "dist_token", None) is None and enc.num_prefix_tokens == 1
    kept_pos = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1)  # class row + grid, no dist row
    torch.testing.assert_close(enc.pos_embed, kept_pos, atol=0, rtol=0)
    own = native.encoder.state_dict()
    for k in own:
        torch.testing.assert_close(own[k], sd[k] if k != "pos_embed" else kept_pos, atol=0, rtol=0, msg=k)
    assert not native.mask_token.any()  # not in the checkpoint: the zero init (as the authors')

    # The paper's stage-1 geometry: kernel 16 -> 14 px (the authors' bicubic F.interpolate by default, pinv
    # on request) and table 14×14 -> 16×16.
    s1 = build_student("deit_small_patch16_224", img_size=224, grid=(16, 16),
                       checkpoint=tmp_path / "deit_distilled.pth", **TINY)
    assert s1.patch_size == 14
    torch.testing.assert_close(s1.encoder.patch_embed.proj.weight, F.interpolate(
        sd["patch_embed.proj.weight"], size=(14, 14), mode="bicubic", align_corners=False))
    pinv = build_student("deit_small_patch16_224", img_size=224, grid=(16, 16), patch_resample="pinv",
                         checkpoint=tmp_path / "deit_distilled.pth", **TINY)
    torch.testing.assert_close(pinv.encoder.patch_embed.proj.weight, resample_patch_embed(sd["patch_embed.proj.weight"], [14, 14]))
    torch.testing.assert_close(
        s1.encoder.pos_embed, resample_abs_pos_embed(kept_pos, new_size=[16, 16], old_size=[14, 14], num_prefix_tokens=1))
    torch.testing.assert_close(s1.encoder.cls_token, sd["cls_token"], atol=0, rtol=0)
    torch.testing.assert_close(s1.encoder.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"], atol=0, rtol=0)
    assert s1(torch.randn(1, 3, 224, 224)).patch.shape == (1, 256, 32)


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(1)}), "blocks.0.attn.extra"),
    (lambda sd: sd.pop("blocks.1.norm1.weight"), "blocks.1.norm1.weight"),
    (lambda sd: sd.update({"pos_embed": sd["pos_embed"][:, :-1]}), "pos_embed"),
])
def test_distilled_deit_stray_missing_or_misshaped_key_is_an_error(tmp_path, edit, named) -> None:
    sd = _distilled_deit_sd()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        build_student("deit_small_patch16_224", img_size=224, grid=(16, 16), checkpoint=tmp_path / "bad.pth", **TINY)


# ------------------------------------------------------------------------------------------------
# DINO v1 into a LayerScale student


def test_dino_v1_checkpoint_gets_layerscale_one_and_keeps_its_function(tmp_path, caplog) -> None:
    dino = timm.create_model("vit_small_patch16_224", num_classes=0, **TINY).eval()  # DINO v1 ViT-S/16 layout
    sd = _randomised(dino, seed=1)
    assert not any(".ls1." in k or ".ls2." in k for k in sd) and not any(k.startswith("head") for k in sd)
    dino.load_state_dict(sd, strict=True)
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    with caplog.at_level(logging.INFO, logger="gkd.models"):
        student = build_student("vit_small_patch16_224", img_size=224, grid=(14, 14), init_values=1.0,
                                checkpoint=tmp_path / "dino_deitsmall16_pretrain.pth", **TINY).eval()
    assert "LayerScale" in caplog.text and "1.0" in caplog.text  # stated, not silent
    enc = student.encoder
    for i, blk in enumerate(enc.blocks):
        assert torch.equal(blk.ls1.gamma, torch.ones(32)) and torch.equal(blk.ls2.gamma, torch.ones(32)), i
    for k, v in sd.items():
        torch.testing.assert_close(enc.state_dict()[k], v, atol=0, rtol=0, msg=k)
    # gamma = 1 is the checkpoint's own function: tokens equal timm's model without LayerScale.
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = dino.forward_features(x)
    out = student(x)
    torch.testing.assert_close(out.cls, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch, ref[:, 1:], atol=1e-5, rtol=0)
    assert student.spec["kwargs"]["init_values"] == 1.0  # stage 2 rebuilds the same architecture

    # Another init value in the model does not change the rule: the absent gammas become 1.0.
    small = build_student("vit_small_patch16_224", img_size=224, grid=(16, 16), init_values=1e-5,
                          checkpoint=tmp_path / "dino_deitsmall16_pretrain.pth", **TINY)
    assert torch.equal(small.encoder.blocks[0].ls1.gamma, torch.ones(32))


def test_partial_layerscale_or_stray_key_is_an_error(tmp_path) -> None:
    sd = _randomised(timm.create_model("vit_small_patch16_224", num_classes=0, **TINY), seed=2)
    torch.save(dict(sd, **{"blocks.0.ls1.gamma": torch.ones(32)}), tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as err:  # some gammas present: nothing is filled in
        build_student("vit_small_patch16_224", grid=(16, 16), init_values=1.0, checkpoint=tmp_path / "partial.pth", **TINY)
    assert "blocks.0.ls2.gamma" in str(err.value) and "blocks.1.ls1.gamma" in str(err.value)
    torch.save(dict(sd, **{"blocks.0.extra": torch.ones(1)}), tmp_path / "stray.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.extra"):
        build_student("vit_small_patch16_224", grid=(16, 16), init_values=1.0, checkpoint=tmp_path / "stray.pth", **TINY)
    # A model without LayerScale refuses gammas it has no place for.
    torch.save(dict(sd, **{"blocks.0.ls1.gamma": torch.ones(32)}), tmp_path / "ls.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ls1\.gamma"):
        build_student("vit_small_patch16_224", grid=(16, 16), checkpoint=tmp_path / "ls.pth", **TINY)


# ------------------------------------------------------------------------------------------------
# timm:<model>.<tag>


def test_timm_reference_is_fetched_by_timm_and_converted(monkeypatch) -> None:
    fetched: list[str] = []
    tiny = timm.create_model("deit_small_distilled_patch16_224", num_classes=10, **TINY)
    sd = _randomised(tiny, seed=3)
    tiny.load_state_dict(sd)

    def fake_fetch(name: str) -> torch.nn.Module:  # stands in for the download (tests never download)
        fetched.append(name)
        return tiny

    monkeypatch.setattr(weights, "_timm_model_with_weights", fake_fetch)
    student = build_student("deit_small_patch16_224", img_size=224, grid=(14, 14),
                            checkpoint="timm:deit_small_distilled_patch16_224.fb_in1k", **TINY)
    assert fetched == ["deit_small_distilled_patch16_224.fb_in1k"]
    torch.testing.assert_close(student.encoder.pos_embed, torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], 1),
                               atol=0, rtol=0)

    with pytest.raises(CheckpointError, match="not a timm pretrained tag"):
        build_student("deit_small_patch16_224", grid=(16, 16), checkpoint="timm:deit_small_patch16_224.nope", **TINY)

    def offline(name: str) -> torch.nn.Module:
        raise OSError("hub unreachable")

    monkeypatch.setattr(weights, "_timm_model_with_weights", offline)
    with pytest.raises(CheckpointError, match=r"deit_small_distilled_patch16_224-649709d9\.pth"):  # names the file
        build_student("deit_small_patch16_224", grid=(16, 16), checkpoint="timm:deit_small_distilled_patch16_224.fb_in1k",
                      **TINY)
