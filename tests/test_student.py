"""Students: grid matching with resampled weights, mask token, CNN adapter, flags, spec round trip."""
from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from gkd.models import CheckpointError, Student, build_student, build_student_from_spec, same_architecture

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _images(b: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _random_mask(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.5


# ------------------------------------------------------------------------------------------------
# ViT students


def test_patch16_student_on_teacher_grid_resamples_checkpoint(tmp_path, caplog) -> None:
    native = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10, **TINY)
    sd = {k: v.clone() for k, v in native.state_dict().items()}
    assert sd["patch_embed.proj.weight"].shape[-1] == 16 and "head.weight" in sd
    torch.save({"state_dict": sd}, tmp_path / "deit.pth")
    with caplog.at_level(logging.INFO, logger="gkd.models"):
        student = build_student("deit_small_patch16_224", img_size=224, grid=(16, 16), checkpoint=tmp_path / "deit.pth",
                                patch_resample="pinv", **TINY)
    assert "head.weight" in caplog.text and "head.bias" in caplog.text  # dropped head is logged
    assert student.patch_size == 14 and student.grid == (16, 16) and student.num_patches == 256
    assert student.embed_dim == 32 and student.kind == "vit"
    enc = student.encoder
    torch.testing.assert_close(enc.patch_embed.proj.weight, resample_patch_embed(sd["patch_embed.proj.weight"], [14, 14]))
    torch.testing.assert_close(
        enc.pos_embed, resample_abs_pos_embed(sd["pos_embed"], new_size=[16, 16], old_size=[14, 14], num_prefix_tokens=1)
    )
    torch.testing.assert_close(enc.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    out = student(_images())
    assert out.patch.shape == (2, 256, 32) and out.cls.shape == (2, 32) and out.grid == (16, 16)

    # PI-resize: a 14-px patch that is the resize of a smooth 16-px patch projects nearly the same
    # (exact only when upsampling); a plainly interpolated kernel does not.
    smooth16 = F.interpolate(torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(5)), size=(16, 16), mode="bilinear")
    smooth14 = F.interpolate(smooth16, size=(14, 14), mode="bicubic", antialias=True)
    w16 = sd["patch_embed.proj.weight"]
    target = F.conv2d(smooth16, w16)
    with torch.no_grad():
        pi_err = (F.conv2d(smooth14, enc.patch_embed.proj.weight) - target).abs().max()
        naive_err = (F.conv2d(smooth14, F.interpolate(w16, size=(14, 14), mode="bicubic")) - target).abs().max()
    assert pi_err < 0.01 * target.abs().max() and pi_err < naive_err / 5
    # the default is the authors' rule: that plain bicubic interpolation of the kernel
    authors = build_student("deit_small_patch16_224", img_size=224, grid=(16, 16), checkpoint=tmp_path / "deit.pth", **TINY)
    torch.testing.assert_close(authors.encoder.patch_embed.proj.weight,
                               F.interpolate(w16, size=(14, 14), mode="bicubic", align_corners=False))


def test_grid_errors_and_unknown_keys(tmp_path) -> None:
    with pytest.raises(ValueError):
        build_student("deit_small_patch16_224", img_size=224, grid=(15, 15), **TINY)
    with pytest.raises(ValueError):
        build_student("deit_small_patch16_224", img_size=224, grid=(16, 16), patch_size=16, **TINY)
    native = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    sd = dict(native.state_dict(), **{"blocks.0.extra": torch.zeros(1)})
    del sd["norm.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        build_student("deit_small_patch16_224", grid=(16, 16), checkpoint=tmp_path / "bad.pth", **TINY)
    assert "blocks.0.extra" in str(err.value) and "norm.bias" in str(err.value)


def _manual_vit_tokens(student: Student, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeiT forward written out: conv patchify, mask, cls, +pos, blocks, norm."""
    enc = student.encoder
    t = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=student.patch_size)
    t = t.flatten(2).transpose(1, 2)
    if mask is not None:
        t = t.clone()
        t[mask] = student.mask_token[0]
    t = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + enc.pos_embed
    for blk in enc.blocks:
        t = blk(t)
    t = enc.norm(t)
    return t[:, 0], t[:, 1:]


def test_mask_token_replaces_patch_embeddings_before_positions() -> None:
    student = build_student("deit_small_patch16_224", grid=(16, 16), **TINY).eval()
    with torch.no_grad():
        student.mask_token.normal_()
    x, mask = _images(), _random_mask(2, 256)
    out = student(x, mask)
    cls, patch = _manual_vit_tokens(student, x, mask)
    torch.testing.assert_close(out.cls, cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch, patch, atol=1e-5, rtol=0)
    assert (student(x).patch - out.patch).abs().max() > 1e-3
    none_masked = student(x, torch.zeros(2, 256, dtype=torch.bool))
    torch.testing.assert_close(none_masked.patch, student(x).patch, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_small_patch14_dinov2", "eva02_tiny_patch14_224"])
def test_zero_block_student_changes_only_masked_positions(name: str) -> None:
    """With no blocks, token i depends on patch i only: masking changes exactly the masked tokens,
    and a masked token is norm(mask_token + pos_i)."""
    student = build_student(name, img_size=224, grid=(16, 16), embed_dim=32, depth=0, num_heads=2).eval()
    with torch.no_grad():
        student.mask_token.normal_()
    x, mask = _images(), _random_mask(2, 256, seed=3)
    plain, masked = student(x).patch, student(x, mask).patch
    changed = (plain - masked).abs().amax(dim=-1) > 1e-6
    assert torch.equal(changed, mask)
    enc = student.encoder
    pos = enc.pos_embed[:, -256:]  # patch entries of the position table
    norm = enc.norm if not isinstance(enc.norm, torch.nn.Identity) else enc.fc_norm
    expected = norm(student.mask_token + pos).expand(2, -1, -1)
    torch.testing.assert_close(masked[mask], expected[mask], atol=1e-5, rtol=0)


def test_official_dinov2_checkpoint_as_student_init(tmp_path) -> None:
    # The official layout of a plain DINOv2 ViT is timm's plus a mask token (37×37 native grid).
    native = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY)
    sd = dict(native.state_dict(), mask_token=torch.randn(1, 32))
    assert sd["pos_embed"].shape[1] == 1 + 37 * 37
    torch.save(sd, tmp_path / "dinov2.pth")
    student = build_student("vit_small_patch14_dinov2", img_size=224, grid=(16, 16), checkpoint=tmp_path / "dinov2.pth", **TINY)
    torch.testing.assert_close(student.mask_token, sd["mask_token"])
    torch.testing.assert_close(
        student.encoder.pos_embed, resample_abs_pos_embed(sd["pos_embed"], new_size=[16, 16], old_size=[37, 37])
    )
    torch.testing.assert_close(student.encoder.blocks[0].ls1.gamma, sd["blocks.0.ls1.gamma"])


# ------------------------------------------------------------------------------------------------
# CNN students


def test_resnet_adapter_values_and_mask() -> None:
    student = build_student("resnet18", img_size=64, grid=(4, 4)).eval()
    assert student.kind == "cnn" and student.embed_dim == 512 and student.num_patches == 16
    x = _images(2, 64)
    out = student(x)
    with torch.no_grad():
        last = student.encoder.forward_features(x)  # timm's own path: [2, 512, 2, 2]
    cls = last.mean(dim=(2, 3))
    patch = F.interpolate(last, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    ln = student.token_norm
    torch.testing.assert_close(out.cls, F.layer_norm(cls, (512,), ln.weight, ln.bias, ln.eps), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch, F.layer_norm(patch, (512,), ln.weight, ln.bias, ln.eps), atol=1e-5, rtol=0)

    # mask on the stem map: 16×16 stem output, 4×4 token grid -> 4×4 blocks of stem pixels
    with torch.no_grad():
        student.mask_token.normal_()
    mask = _random_mask(2, 16, seed=1)
    enc = student.encoder
    with torch.no_grad():
        stem = enc.maxpool(enc.act1(enc.bn1(enc.conv1(x))))
        m = mask.view(2, 1, 4, 4).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
        stem = torch.where(m, student.mask_token.view(1, -1, 1, 1), stem)
        last = enc.layer4(enc.layer3(enc.layer2(enc.layer1(stem))))
    patch = F.interpolate(last, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(student(x, mask).patch, F.layer_norm(patch, (512,), ln.weight, ln.bias, ln.eps), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# flags, spec


def test_batch_independent_flags() -> None:
    vit = build_student("deit_small_patch16_224", grid=(16, 16), **TINY)
    assert vit.training and vit.batch_independent
    x = _images(3)
    torch.testing.assert_close(vit(x[:1]).patch, vit(x).patch[:1], atol=1e-5, rtol=0)  # the claim holds

    dp = build_student("deit_small_patch16_224", grid=(16, 16), drop_path_rate=0.1, **TINY)
    assert not dp.batch_independent and dp.eval().batch_independent
    drop = build_student("deit_small_patch16_224", grid=(16, 16), drop_rate=0.1, **TINY)
    assert not drop.batch_independent

    cnn = build_student("resnet18", img_size=64, grid=(4, 4))
    assert cnn.training and not cnn.batch_independent
    x = _images(3, 64)
    assert (cnn(x[:1]).patch - cnn(x).patch[:1]).abs().max() > 1e-4  # BatchNorm couples the batch
    assert cnn.eval().batch_independent


@pytest.mark.parametrize(
    "name,kw,size,grid",
    [("deit_small_patch16_224", TINY, 224, (16, 16)), ("eva02_tiny_patch14_224", TINY, 224, (16, 16)), ("resnet18", {}, 64, (4, 4))],
)
def test_spec_round_trip(tmp_path, name: str, kw: dict, size: int, grid: tuple[int, int]) -> None:
    student = build_student(name, img_size=size, grid=grid, **kw).eval()
    with torch.no_grad():
        student.mask_token.normal_()
    spec = json.loads(json.dumps(student.spec))
    assert spec["grid"] == list(grid) and spec["embed_dim"] == student.embed_dim
    rebuilt = build_student_from_spec(spec).eval()
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    assert student.encoder_state_dict().keys() == student.state_dict().keys()
    x, mask = _images(2, size), _random_mask(2, student.num_patches)
    torch.testing.assert_close(rebuilt(x, mask).patch, student(x, mask).patch, atol=0, rtol=0)

    # the saved encoder reloads through build_student (mask token and adapter included)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    reloaded = build_student_from_spec(spec, checkpoint=tmp_path / "encoder.safetensors").eval()
    torch.testing.assert_close(reloaded(x, mask).patch, student(x, mask).patch, atol=0, rtol=0)
    assert same_architecture(spec, reloaded.spec)


def test_stage2_reload_changes_grid_and_checks_architecture(tmp_path) -> None:
    stage1 = build_student("deit_small_patch16_224", img_size=224, grid=(16, 16), **TINY)
    save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    stage2 = build_student("deit_small_patch16_224", img_size=64, grid=(4, 4), checkpoint=tmp_path / "encoder.safetensors",
                           patch_resample="pinv", **TINY)
    assert stage2.patch_size == 16 and stage2.grid == (4, 4)
    torch.testing.assert_close(stage2.mask_token, stage1.mask_token)
    torch.testing.assert_close(
        stage2.encoder.patch_embed.proj.weight, resample_patch_embed(stage1.encoder.patch_embed.proj.weight, [16, 16])
    )
    assert same_architecture(stage1.spec, stage2.spec)
    assert not same_architecture(stage1.spec, build_student("deit_small_patch16_224", grid=(16, 16), embed_dim=32, depth=1, num_heads=2).spec)
