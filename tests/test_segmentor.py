"""Segmentor: frozen encoder, normalisation, feature pyramid, files; ViT features at other input sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from gkd.handoff import load_handoff, read_metadata, save_handoff
from gkd.models import (
    build_segmentor,
    build_student,
    load_encoder_for_segmentor,
    load_segmentor,
    save_segmentor,
)

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
TINY_M2F = dict(
    num_queries=8, num_layers=1, pixel_decoder_layers=1, hidden_dim=32, num_heads=2,
    dim_feedforward=64, pixel_decoder_ffn_dim=64, num_points=64,
)
MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.4)


def _vit(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_student("deit_small_patch16_224", img_size=64, patch_size=16, **dict(TINY_VIT, **kw))


def _batch(b: int = 2, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g)
    labels = torch.randint(0, 3, (b, size, size), generator=g)
    labels[:, :5] = 255
    return images, labels


def _enc_state(seg) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in seg.encoder.state_dict().items()}


@pytest.mark.parametrize("kind", ["vit_m2f", "cnn_mlp"])
def test_encoder_frozen_and_unchanged_by_decoder_training(kind: str) -> None:
    if kind == "vit_m2f":
        seg = build_segmentor(_vit(), "mask2former", num_classes=3, **TINY_M2F)
    else:  # ResNet: BatchNorm running statistics would move if the encoder ever ran in train mode
        torch.manual_seed(0)
        seg = build_segmentor(build_student("resnet18", img_size=64), "mlp", num_classes=3, channels=32)
    assert not any(p.requires_grad for p in seg.encoder.parameters())
    trainable = seg.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in seg.decoder.parameters()}
    seg.train()
    assert not seg.encoder.training and all(not m.training for m in seg.encoder.modules())
    assert seg.decoder.training
    before_enc, before_dec = _enc_state(seg), [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.05)
    images, labels = _batch()
    for _ in range(2):
        out = seg(images, labels)  # forward with labels = loss (what a DDP wrapper calls)
        assert set(out) >= {"loss"} and all(not v.requires_grad for k, v in out.items() if k != "loss")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in seg.encoder.parameters())
    after = seg.encoder.state_dict()
    assert all(torch.equal(before_enc[k], after[k]) for k in before_enc)  # bit-identical, buffers too
    assert any(not torch.equal(a, p) for a, p in zip(before_dec, trainable))
    seg.eval()
    assert not seg.decoder.training and not seg.encoder.training


def test_forward_scores_at_input_size_and_normalisation() -> None:
    seg = build_segmentor(_vit(), "mask2former", num_classes=3, mean=MEAN, std=STD, **TINY_M2F).eval()
    assert seg.layers == [0, 0, 0, 1]
    images, _ = _batch()
    with torch.no_grad():
        scores = seg(images)
        # manual: normalise, blocks' raw tokens (no final norm), bilinear ×4 ×2 ×1 ×0.5, decoder
        x = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        maps = seg.encoder.intermediate_layers(x, [0, 0, 0, 1], norm=False)
        feats = [F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False) for m, s in zip(maps, (4, 2, 1, 0.5))]
        feats[2] = maps[2]
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]  # strides 4, 8, 16, 32 of 64 px
        expected = seg.decoder.predict(feats, (64, 64))
        wrong_norm = build_segmentor(seg.encoder, "mlp", num_classes=3)  # ImageNet mean/std
        assert not torch.allclose(wrong_norm.normalize(images), x)
    assert scores.shape == (2, 3, 64, 64)
    torch.testing.assert_close(scores, expected)
    # other sizes: multiples of the patch size, and padded ones, come back at input size
    with torch.no_grad():
        assert seg(torch.rand(1, 3, 96, 48)).shape == (1, 3, 96, 48)
        assert seg(torch.rand(1, 3, 70, 50)).shape == (1, 3, 70, 50)
    with pytest.raises(ValueError, match="labels"):
        seg.loss(images, torch.zeros(2, 32, 32, dtype=torch.int64))


def test_cnn_features_at_strides_4_to_32() -> None:
    for name in ("resnet18", "efficientnet_lite0"):
        seg = build_segmentor(build_student(name, img_size=64), "mlp", num_classes=3, channels=32).eval()
        with torch.no_grad():
            feats = seg.extract_features(seg.normalize(torch.rand(1, 3, 64, 64)))
            assert seg(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2], name
        assert seg.decoder.in_channels == tuple(f.shape[1] for f in feats)
    with pytest.raises(ValueError, match="ViT"):
        build_segmentor(build_student("resnet18", img_size=64), "mlp", num_classes=3, feature_norm=True)


def _save_encoder(path, student, stage: int = 2) -> None:
    save_handoff(path, student, student.spec, stage=stage, config={"stage": stage},
                 extra={"input_norm": {"mean": list(MEAN), "std": list(STD)}})


def test_save_load_round_trip_and_refusals(tmp_path) -> None:
    enc_path = tmp_path / "encoder.safetensors"
    _save_encoder(enc_path, _vit(seed=3))
    student, norm = load_encoder_for_segmentor(enc_path, expected_spec={"name": "deit_small_patch16_224"})
    assert norm == {"mean": list(MEAN), "std": list(STD)}
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), _vit(seed=3).state_dict().values()))
    with pytest.raises(ValueError, match="refusing"):
        load_encoder_for_segmentor(enc_path, expected_spec={"embed_dim": 384})

    seg = build_segmentor(student, "mask2former", num_classes=3, class_names=["a", "b", "c"], **norm, **TINY_M2F)
    with torch.no_grad():  # make the decoder differ from a fresh init
        for p in seg.decoder.parameters():
            p.add_(0.01)
    path = save_segmentor(tmp_path / "segmentor.safetensors", seg.eval(), config={"lr": 1e-4}, parent=enc_path)
    meta = read_metadata(path)
    assert meta["gkd_stage"] == 3 and meta["gkd_input_norm"] == {"mean": list(MEAN), "std": list(STD)}
    assert meta["gkd_spec"]["decoder"]["name"] == "mask2former" and meta["gkd_parent_sha256"]
    loaded, meta2 = load_segmentor(path)
    assert loaded.spec == seg.spec and not loaded.training and meta2["gkd_config"] == {"lr": 1e-4}
    assert loaded.class_names == ["a", "b", "c"]
    images, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), seg(images), rtol=0, atol=0)

    # a stage-1/2 encoder file is not a segmentor, and vice versa
    with pytest.raises(ValueError, match="segmentor.safetensors written by stage 3"):
        load_segmentor(enc_path)
    with pytest.raises(ValueError, match="encoder.safetensors"):
        load_encoder_for_segmentor(path)
    # a segmentor built on another encoder refuses the file
    other = build_segmentor(_vit(depth=3), "mask2former", num_classes=3, class_names=["a", "b", "c"],
                            **norm, **TINY_M2F)
    with pytest.raises(ValueError, match="another model"):
        load_handoff(path, other, other.spec)


def _manual_deit_tokens(student, x: torch.Tensor, upto: int) -> torch.Tensor:
    """DeiT forward written out at any size: patchify, cls, + bicubic-resampled table, blocks."""
    enc, p = student.encoder, student.patch_size
    t = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    pos = resample_abs_pos_embed(enc.pos_embed, new_size=list(grid), old_size=list(student.grid), num_prefix_tokens=1)
    t = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + pos
    for blk in enc.blocks[: upto + 1]:
        t = blk(t)
    return t


def test_vit_intermediate_layers_at_other_sizes() -> None:
    student = _vit().eval()
    x = torch.randn(2, 3, 96, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw, normed = student.intermediate_layers(x, [0, -1], norm=False)[0], student.intermediate_layers(x, [1])[0]
        t0, t1 = _manual_deit_tokens(student, x, 0), _manual_deit_tokens(student, x, 1)
    assert raw.shape == (2, 32, 6, 3) and normed.shape == (2, 32, 6, 3)
    torch.testing.assert_close(raw, t0[:, 1:].transpose(1, 2).reshape(2, 32, 6, 3))
    torch.testing.assert_close(normed, student.encoder.norm(t1)[:, 1:].transpose(1, 2).reshape(2, 32, 6, 3))
    # the stored table is not touched, and the training size still uses it as is
    assert student.encoder.pos_embed.shape == (1, 17, 32)
    x64 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            student.intermediate_layers(x64, [1], norm=True)[0].flatten(2).transpose(1, 2), student(x64).patch
        )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        student.intermediate_layers(torch.randn(1, 3, 70, 64), [0])


def test_vit_other_sizes_registers_and_rope() -> None:
    torch.manual_seed(0)
    # no_embed_class layout with register tokens: the table covers patches only
    reg = build_student("vit_small_patch14_reg4_dinov2", img_size=56, patch_size=14, **TINY_VIT).eval()
    enc = reg.encoder
    x = torch.randn(1, 3, 84, 42)
    with torch.no_grad():
        out = reg.intermediate_layers(x, [0], norm=False)[0]
        t = enc.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = t + resample_abs_pos_embed(enc.pos_embed, new_size=[6, 3], old_size=[4, 4], num_prefix_tokens=0)
        t = torch.cat([enc.cls_token, enc.reg_token, t], dim=1)
        t = enc.blocks[0](t)
    torch.testing.assert_close(out, t[:, 5:].transpose(1, 2).reshape(1, 32, 6, 3))
    # EVA-02 (RoPE): clear refusal away from the training size, fine at it
    eva = build_student("eva02_tiny_patch14_224", img_size=56, patch_size=14, **TINY_VIT).eval()
    with torch.no_grad():
        assert eva.intermediate_layers(torch.randn(1, 3, 56, 56), [0])[0].shape == (1, 32, 4, 4)
    with pytest.raises(NotImplementedError, match="training size"):
        eva.intermediate_layers(torch.randn(1, 3, 84, 56), [0])


def test_distill_outputs_final_norm_map_and_head_feature() -> None:
    """SegOutputs.last_norm = the last block's patch tokens through the encoder's final LayerNorm
    (checked against timm's forward_features); head_feature = the decoder's pre-classifier map."""
    seg = build_segmentor(_vit(depth=3), "mlp", num_classes=3, mean=MEAN, std=STD, channels=16).eval()
    norm = seg.encoder.encoder.norm
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    images, labels = _batch()
    with torch.no_grad():
        terms, out = seg.distill_outputs(images, labels, blocks=[0, 1])
        x = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        tokens = seg.encoder.encoder.forward_features(x)[:, seg.encoder.encoder.num_prefix_tokens:]   # [B, N, C]
        ln = F.layer_norm(out.last.flatten(2).transpose(1, 2), (32,), norm.weight, norm.bias, norm.eps)
    expected = tokens.transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(out.last_norm, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_norm, ln.transpose(1, 2).reshape(2, 32, 4, 4), rtol=1e-5, atol=1e-5)
    assert sorted(out.blocks) == [0, 1] and terms is not None
    with torch.no_grad():
        fused = seg.decoder.fused(out.features)
    assert out.head_feature.shape == (2, 16, 16, 16)
    torch.testing.assert_close(out.head_feature, fused)
    torch.testing.assert_close(out.logits, seg.decoder.head.classifier(fused))
    # teacher side without the decoder: no logits, no head feature; the encoder maps are still there
    with torch.no_grad():
        none, bare = seg.distill_outputs(images, None, logits=False)
    assert none is None and bare.logits is None and bare.head_feature is None
    torch.testing.assert_close(bare.last_norm, expected, rtol=1e-5, atol=1e-5)
    # feature_norm=True: the last map is normed already, and not normed twice
    normed = build_segmentor(seg.encoder, "mlp", num_classes=3, mean=MEAN, std=STD, channels=16, feature_norm=True)
    with torch.no_grad():
        _, n_out = normed.eval().distill_outputs(images, None, logits=False)
    torch.testing.assert_close(n_out.last_norm, expected, rtol=1e-5, atol=1e-5)
    # CNNs have no final token norm
    torch.manual_seed(0)
    cnn = build_segmentor(build_student("resnet18", img_size=64), "mlp", num_classes=3, channels=16).eval()
    with torch.no_grad():
        _, c_out = cnn.distill_outputs(images, labels)
    assert c_out.last_norm is None and c_out.head_feature.shape == (2, 16, 16, 16)
